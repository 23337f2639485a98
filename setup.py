"""Build msgnet's Cython extensions.

Environment switches:
  MSGNET_DEBUG=1           annotate, line tracing, MSGNET_DEBUG invariants
  MSGNET_NO_EXTENSIONS=1   build nothing (the pure-Python codec twin is used where possible)
  MSGNET_NO_OPENSSL=1      do not link libcrypto
  MSGNET_NO_SODIUM=1       do not link libsodium

_packet links libsodium (the "sodium" AEAD backend, cheapest for small packets; Debian/Ubuntu:
libsodium-dev) and libcrypto (OpenSSL's EVP ChaCha20-Poly1305, the "openssl" backend, faster
for large packets; libssl-dev) when a test program for each compiles and links here; with both
it uses each for the sizes it is faster at ("sodium+openssl"). Without either it uses
cryptography's AEAD, which is slower per packet.
"""

import os
import tempfile

from setuptools import Extension, setup

OPENSSL_PROBE = """
#include <openssl/evp.h>
int main(void) { EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new(); EVP_CIPHER_CTX_free(c);
                 return EVP_chacha20_poly1305() == NULL; }
"""
SODIUM_PROBE = """
#include <sodium.h>
int main(void) { return sodium_init() < 0 || crypto_aead_chacha20poly1305_ietf_KEYBYTES != 32; }
"""


def _links(program: str, library: str) -> bool:
    """Whether ``program`` compiles and links against ``library`` here."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.errors import CompileError, LinkError
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(program)
        try:
            objects = compiler.compile([source], output_dir=tmp)
            compiler.link_executable(objects, os.path.join(tmp, "probe"), libraries=[library])
        except (CompileError, LinkError):
            return False
    return True


def _have_openssl() -> bool:
    """libcrypto's EVP ChaCha20-Poly1305 (Debian/Ubuntu: libssl-dev)."""
    return not os.environ.get("MSGNET_NO_OPENSSL") and _links(OPENSSL_PROBE, "crypto")


def _have_sodium() -> bool:
    """libsodium's ChaCha20-Poly1305 (Debian/Ubuntu: libsodium-dev)."""
    return not os.environ.get("MSGNET_NO_SODIUM") and _links(SODIUM_PROBE, "sodium")

EXTENSIONS = [
    "msgnet._frame", "msgnet._packet", "msgnet._engine", "msgnet._stream", "msgnet._buffer",
]
# Plain-Python modules also compiled, typed by the .pxd beside them (they still run uncompiled).
COMPILED_PY = ["msgnet.core.delivery", "msgnet.qos", "msgnet._requests"]


def _extensions():
    if os.environ.get("MSGNET_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    debug = bool(os.environ.get("MSGNET_DEBUG"))
    macros = [("MSGNET_DEBUG", "1" if debug else "0")]
    if debug:
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    openssl = _have_openssl()
    sodium = _have_sodium()
    found = [name for name, have in (("sodium", sodium), ("openssl", openssl)) if have]
    print(f"msgnet: AEAD backends {', '.join(found + ['cryptography'])}")
    modules = [
        Extension(
            name,
            [name.replace(".", "/") + ".pyx"],
            define_macros=macros + ([("MSGNET_HAVE_OPENSSL", "1")]
                                    if openssl and name == "msgnet._packet" else [])
            + ([("MSGNET_HAVE_SODIUM", "1")] if sodium and name == "msgnet._packet" else []),
            libraries=(["crypto"] if openssl and name == "msgnet._packet" else [])
            + (["sodium"] if sodium and name == "msgnet._packet" else []),
            extra_compile_args=["-O2"] if os.name != "nt" else [],
        )
        for name in EXTENSIONS
        if os.path.exists(name.replace(".", "/") + ".pyx")
    ]
    compiled_py = [
        Extension(name, [name.replace(".", "/") + ".py"], define_macros=macros,
                  extra_compile_args=["-O2"] if os.name != "nt" else [])
        for name in COMPILED_PY
    ]
    # Python's semantics (indexing, division) as the uncompiled module has; C types from the
    # .pxd only, not from the annotations written for mypy.
    compiled_py = cythonize(
        compiled_py,
        compiler_directives={"language_level": 3, "annotation_typing": False,
                             "embedsignature": True, "linetrace": debug},
        annotate=debug,
    )
    return compiled_py + cythonize(
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
