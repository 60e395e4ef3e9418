"""The compiled fast path of ``tdvmcall trace`` (``src/tdvmcall/trace/_scan.c``): everything else is
declared in pyproject.toml.  A C compiler and Python's headers are needed at ``pip install``."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tdvmcall.trace._scan",
            ["src/tdvmcall/trace/_scan.c"],
            extra_compile_args=["-O2", "-std=c99", "-Wall", "-Wno-missing-field-initializers"],
        )
    ]
)
