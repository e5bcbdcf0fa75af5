"""pymetric: config-driven metric learning and image retrieval in PyTorch."""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements():
    with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="pymetric",
    version="0.1.0",
    description="Config-driven metric learning and image retrieval in PyTorch",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["metric", "metric.*"]),
    python_requires=">=3.9",
    install_requires=_requirements(),
    extras_require={
        # faiss-gpu conflicts with faiss-cpu: see README ("GPU search").
        "gpu": ["faiss-gpu>=1.7.2"],
        "timm": ["timm>=0.9"],
        "onnx": ["onnx>=1.14", "onnxruntime>=1.16"],
        # open-clip-torch: the reference CLIP ViT of tests/test_vit.py (architecture only, no download)
        "test": [
            "pytest>=7",
            "ruff==0.17.6",
            "onnx>=1.14",
            "onnxruntime>=1.16",
            "timm>=0.9",
            "open-clip-torch>=2.20",
            "safetensors",
            # the reference AccuracyCalculator of tests/test_benchmark_dml.py (recall@1, MAP@R)
            "pytorch-metric-learning>=2.0",
        ],
    },
)
