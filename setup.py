"""Build script.

`pyproject.toml` holds the package metadata. This file exists for the native part: the CUDA C++ extension
`fastalign._C` (sources in `csrc/`) is built here once it lands; until then a plain install is pure Python and
works on any machine, with or without a GPU.
"""

from setuptools import setup

setup()
