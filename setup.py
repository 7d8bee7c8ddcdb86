"""tinyformer: a from-scratch tiny transformer framework (models on tensors, Triton kernels, training, compression).

The top-level `kernels/` folder is installed as the `tinyformer.kernels` package, so kernel users can read and use it
without the rest of tinyformer.
"""
from setuptools import setup

setup(
    name="tinyformer",
    version="0.1.0",
    description="Tiny transformers written on tensors, with Triton attention and low-bit matmul kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tinyformer", "tinyformer.kernels"],
    package_dir={"tinyformer": "tinyformer", "tinyformer.kernels": "kernels"},
    package_data={"tinyformer.kernels": ["configs.csv"]},  # the kernels' GPU launch configurations
    install_requires=[
        "numpy",
        "torch>=2.4",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",  # the loss plot of every training run
        "gguf",  # reading Llama GGUF files (tinyformer.load)
        "jinja2",  # rendering pretrained chat templates (tinyformer sample)
        "triton>=3.3; platform_system == 'Linux'",
    ],
    extras_require={
        # transformers is the reference that parity tests compare against, never a runtime dependency
        # transformers < 5.25: 5.25 requires Hugging Face's `kernels` package, whose import name our top-level
        # kernels/ folder shadows wherever the checkout root is on sys.path (python -m pytest, benchmarks/), and
        # importing transformers' models then fails ("cannot import name 'CUDAProperties' from 'kernels'")
        # peft: the LoRA reference (adapter layout and outputs, benchmarks/finetune.py); bitsandbytes: its QLoRA base
        # (NF4), whose 4-bit layers run on a CPU too (0.50.2), for benchmarks/finetune.py's QLoRA side by side
        "dev": ["pytest", "pytest-xdist", "hypothesis", "nbmake", "transformers<5.25", "accelerate", "peft",
                "bitsandbytes"],
        # the real runtimes that export's round trips are checked in (tests/test_export.py, benchmarks/export.py):
        # llama-cpp-python compiles llama.cpp when installed (.ci/run builds it once and pip's wheel cache keeps it)
        "interop": ["llama-cpp-python==0.3.36", "transformers<5.25"],
    },
    entry_points={"console_scripts": ["tinyformer = tinyformer.cli:main"]},
)
