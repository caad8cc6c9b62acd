"""Only the C extension lives here; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The NFQUEUE reader of the userspace datapath (fallback/_nfq.c): plain netlink, no library.
        Extension("obi.fallback._nfq", ["fallback/_nfq.c"], extra_compile_args=["-O2", "-Wall"]),
    ]
)
