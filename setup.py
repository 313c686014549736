"""energyvit: energy-inspired self-supervised pretraining of vision transformers.

`kernels/` is a top-level folder in the repository but installs as the subpackage
`energyvit.kernels`, so no generic top-level `kernels` module lands in site-packages.
"""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

setup(
    name="energyvit",
    version="0.1.0",
    description="Energy-inspired self-supervised pretraining of vision transformers with "
    "fused second-order Triton attention",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=["energyvit", "energyvit.kernels"],
    package_dir={"energyvit": "energyvit", "energyvit.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "numpy",
        "pillow",
        "scikit-learn",  # ships the embedded default dataset (8x8 digits); no download
        "safetensors",  # `energyvit export` writes timm-loadable .safetensors files
        "pyyaml",  # --config recipes (read with yaml.safe_load)
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "tensorboard": ["tensorboard"],  # pretrain writes TensorBoard events when it is installed
        "test": ["pytest", "pytest-benchmark", "triton>=3.6", "tensorboard"],
        "bench": ["pytest-benchmark", "nvidia-ml-py", "xformers"],
    },
    entry_points={"console_scripts": ["energyvit=energyvit.cli:main"]},
)
