"""Build msgnet's Cython extensions.

Environment switches:
  MSGNET_DEBUG=1           annotate, line tracing, MSGNET_DEBUG invariants
  MSGNET_NO_EXTENSIONS=1   build nothing (the pure-Python codec twin is used where possible)
  MSGNET_NO_OPENSSL=1      do not link libcrypto: _packet seals with cryptography only

_packet links libcrypto (OpenSSL's EVP ChaCha20-Poly1305, the "openssl" AEAD backend) when a
test program including <openssl/evp.h> compiles and links here (Debian/Ubuntu: libssl-dev);
otherwise it builds without it and uses cryptography's AEAD, which is slower per packet.
"""

import os
import tempfile

from setuptools import Extension, setup

OPENSSL_PROBE = """
#include <openssl/evp.h>
int main(void) { EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new(); EVP_CIPHER_CTX_free(c);
                 return EVP_chacha20_poly1305() == NULL; }
"""


def _have_openssl() -> bool:
    """Whether a program using libcrypto's EVP ChaCha20-Poly1305 compiles and links."""
    if os.environ.get("MSGNET_NO_OPENSSL"):
        return False
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.errors import CompileError, LinkError
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(OPENSSL_PROBE)
        try:
            objects = compiler.compile([source], output_dir=tmp)
            compiler.link_executable(objects, os.path.join(tmp, "probe"), libraries=["crypto"])
        except (CompileError, LinkError):
            return False
    return True

EXTENSIONS = ["msgnet._frame", "msgnet._packet", "msgnet._engine", "msgnet._stream"]


def _extensions():
    if os.environ.get("MSGNET_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    debug = bool(os.environ.get("MSGNET_DEBUG"))
    macros = [("MSGNET_DEBUG", "1" if debug else "0")]
    if debug:
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    openssl = _have_openssl()
    print(f"msgnet: AEAD backend {'openssl (libcrypto)' if openssl else 'cryptography only'}")
    modules = [
        Extension(
            name,
            [name.replace(".", "/") + ".pyx"],
            define_macros=macros + ([("MSGNET_HAVE_OPENSSL", "1")]
                                    if openssl and name == "msgnet._packet" else []),
            libraries=["crypto"] if openssl and name == "msgnet._packet" else [],
            extra_compile_args=["-O2"] if os.name != "nt" else [],
        )
        for name in EXTENSIONS
        if os.path.exists(name.replace(".", "/") + ".pyx")
    ]
    return cythonize(
        modules,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
            "linetrace": debug,
        },
        annotate=debug,
    )


setup(ext_modules=_extensions())
