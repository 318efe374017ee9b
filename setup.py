from setuptools import find_packages, setup

setup(
    name="gptneox",
    version="0.1.0",
    description="Pure-PyTorch supervised fine-tuning of GPT-NeoX-family models with DeepSpeed ZeRO-2",
    packages=find_packages(include=["gptneox", "gptneox.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14.1",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "transformers>=4.40"],
        "data": ["pyarrow"],
        "plot": ["matplotlib"],
        "flash": ["flash-attn>=2.5"],
    },
)
