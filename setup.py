"""Package definition for megatron_endprompt.

torch is required with a floor only: clusters bring their own (NGC containers). On a CPU machine
`scripts/setup.sh` installs the pinned CPU build only when torch is missing, so pip never replaces
an existing torch with a multi-GB CUDA wheel.
"""

from setuptools import find_packages, setup

HF = ["transformers>=4.45", "safetensors>=0.4", "tokenizers>=0.19"]

setup(
    name="megatron_endprompt",
    version="0.1.0",
    description="EndPrompt terminal-anchoring context extension for RoPE models on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_endprompt", "megatron_endprompt.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "tqdm>=4.66",
        "safetensors>=0.4",  # checkpoint conversion
        "tokenizers>=0.19",  # --tokenizer-type HuggingFaceTokenizer (Llama-3)
        "matplotlib>=3.8",  # evaluation plots (PNG)
        "psutil>=5.9",  # megatron-core's dist-checkpoint writer needs it (undeclared there)
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.9,<2.12"],  # the range megatron-core 0.16.1 supports
        "hf": HF,
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.5"] + HF,
    },
)
