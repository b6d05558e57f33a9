"""Build script: the Python package, the Triton kernels mapped to ``structprune._kernels``, and the optional
C++/CUDA extension ``structprune._C`` (see csrc/ and the README's "Building the extension")."""
from setuptools import setup

setup(
    packages=["structprune", "structprune._kernels", "structprune.qa", "structprune.strategies"],
    package_dir={"structprune": "structprune", "structprune._kernels": "kernels"},
    package_data={"structprune": ["csrc/**/*"]},
)
