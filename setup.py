"""Build definition of deltal-kernels (the one place that lists what gets built)."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="deltal-kernels",
    version="0.1.0",
    description="RLVR policy loss straight from the logits: fused log-prob, PPO clipping, KL, entropy and "
                "Delta-L aggregation in Triton, CUDA C++ and C++",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["deltal_kernels", "deltal_kernels.*"]),
    install_requires=["torch>=2.4"],
    extras_require={"bench": ["rich", "matplotlib"], "test": ["pytest", "hypothesis"]},
)
