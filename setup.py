from setuptools import find_packages, setup

# torch is pinned: on the project's machines pip takes a local CPU wheel of exactly this version; any other version
# pulls several GB of CUDA builds. `make` installs it first so this requirement is already satisfied.
TORCH = "torch==2.13.0"

setup(
    name="hibari",
    version="0.1.0",
    description="Distributed continual pretraining of Llama/Mistral models on Japanese web data",
    python_requires=">=3.11",
    packages=find_packages(include=["hibari*", "megatron_ext*", "data_pipeline*", "parallel*", "checkpoints*", "launch*"]),
    include_package_data=True,
    package_data={
        "": ["*.yaml", "*.txt", "*.json", "*.zst", "*.model"],
        "launch.demo_data": ["warc/*/*.warc.gz", "*.json", "*.zst"],
        "data_pipeline.corpus": ["assets/*.txt", "assets/*/*.txt", "assets/*/*"],
        # lm-eval task folders (YAML + JSONL + the loader the YAML names with !function); not packages themselves
        "megatron_ext.eval": ["tasks/*/*.yaml", "tasks/*/*.jsonl", "tasks/*/*.py"],
    },
    install_requires=[
        TORCH,
        "numpy>=1.26",
        "pydantic>=2.6",
        "pyyaml>=6",
        "rich>=13",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "matplotlib>=3.8",
        "zstandard>=0.22",
        "pyarrow>=14",  # parquet / arrow / save_to_disk inputs of every data command (data_pipeline/readers.py)
        "xxhash>=3",
        "fastwarc>=0.14",
        "resiliparse>=0.14",
        "trafilatura>=1.12",
        "py3langid>=0.3",
        "pyahocorasick>=2.0",
        "psutil>=5.9",
    ],
    extras_require={
        # lm-eval[hf] and wandb: tests/test_eval*.py (the HF backend is the parity oracle, wandb runs offline)
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "megatron-core==0.16.1", "datasets>=3", "torchao==0.18.0",
                "lm-eval[hf]>=0.4.9", "wandb>=0.19"],
        "bench": ["datatrove==0.10.1", "hojichar==0.18.1", "spacy[ja]", "datasketch"],
        "gpu": ["flash-attn"],
        "hf": ["datasets>=3"],  # only `hibari corpus export --format hf` writes through `datasets`
        "eval": ["lm-eval[hf]>=0.4.9"],  # `hibari eval` and eval.tasks in training (megatron_ext/eval)
        "wandb": ["wandb>=0.19"],  # log.wandb: experiment tracking next to TensorBoard
    },
    entry_points={"console_scripts": ["hibari=launch.cli:main"]},
)
