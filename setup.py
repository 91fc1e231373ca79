"""d2_norms: a Detectron2 plugin for batch-independent normalizers (FRN, GN, GN+WS, NF)."""
from setuptools import find_packages, setup

# torch / torchvision are not listed: they are installed first, pinned, by `make setup`
# (listing them here would let pip replace the local build with a multi-GB download).
# Detectron2 is installed by tools/install_detectron2.py (hash-pinned sdist, no C++ extension),
# or kept when already importable; these are its runtime requirements that apply here.
DETECTRON2_RUNTIME = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

setup(
    name="d2_norms",
    version="0.1.0",
    description="Batch-independent normalizers (FRN+TLU, GN, GN+WS, NF-ResNets) for Detectron2",
    packages=find_packages(include=("d2_norms", "d2_norms.*")),
    python_requires=">=3.9",
    install_requires=DETECTRON2_RUNTIME + [
        "numpy",
        "opencv-python-headless",
        "psutil",
        "faster-coco-eval>=1.5",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "pytest-xdist>=3", "timm>=0.9"],
    },
)
