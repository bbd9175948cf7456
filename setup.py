"""The packages to install; pyproject.toml holds everything else.

Here rather than in pyproject.toml because pyproject can either discover packages or list them, and we
need both: minterleave's subpackages found on disk, plus the top-level kernels/ folder installed as
`minterleave.kernels` (a top-level module `kernels` would clash with a published package of that name).
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["minterleave", "minterleave.*"]) + ["minterleave.kernels"],
      package_dir={"minterleave.kernels": "kernels"})
