"""Build msgnet's Cython extensions.

Environment switches:
  MSGNET_DEBUG=1           annotate, line tracing, MSGNET_DEBUG invariants
  MSGNET_NO_EXTENSIONS=1   build nothing (the pure-Python codec twin is used where possible)
"""

import os

from setuptools import Extension, setup

EXTENSIONS = ["msgnet._frame", "msgnet._packet", "msgnet._engine"]


def _extensions():
    if os.environ.get("MSGNET_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    debug = bool(os.environ.get("MSGNET_DEBUG"))
    macros = [("MSGNET_DEBUG", "1" if debug else "0")]
    if debug:
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    modules = [
        Extension(
            name,
            [name.replace(".", "/") + ".pyx"],
            define_macros=macros,
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
