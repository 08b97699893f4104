"""Builds pvq's optional C kernels (src/pvq/runtime/c/pvqkernels.c) where a C compiler is
present; without one the extension is skipped and the numba kernels run (same results).
Everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pvq._pvqkernels",
            sources=["src/pvq/runtime/c/pvqkernels.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing"],
            extra_link_args=["-pthread"],
            optional=True,  # a build failure skips the extension instead of failing the install
        )
    ]
)
