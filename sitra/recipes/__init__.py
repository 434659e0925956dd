"""One module per job: its argument dataclass (`ARGS`), `run(args)` and, where it has one,
`check(args)` (bad input found before any compute)."""
import importlib

from sitra.errors import UsageError

JOBS = {
    "retrain_single_block": "sitra.recipes.retrain_single_block",
    "build_retrained": "sitra.recipes.build_retrained",
    "eval_retrained": "sitra.recipes.eval_retrained",
    "collect_results": "sitra.recipes.collect_results",
    "train_block_till_end": "sitra.recipes.train_block_till_end",
    "retrain_merge": "sitra.recipes.retrain_merge",
    "eval_merge_layer": "sitra.recipes.eval_merge_layer",
    "build_merged": "sitra.recipes.build_merged",
    "finetune_fully_merged": "sitra.recipes.finetune_fully_merged",
    "finetune_conditioned_fully_merged": "sitra.recipes.finetune_conditioned_fully_merged",
    "train_full_merged_model": "sitra.recipes.train_full_merged_model",
    "eval_merged": "sitra.recipes.eval_merged",
    "distill_pythia": "sitra.recipes.distill_pythia",
    "eval_lm": "sitra.recipes.eval_lm",
    "finetune_classifier": "sitra.recipes.finetune_classifier",
    "distill_classifier": "sitra.recipes.distill_classifier",
    "distill_summarizer": "sitra.recipes.distill_summarizer",
    "tokenize_cells": "sitra.recipes.tokenize_cells",
    "distill_geneformer": "sitra.recipes.distill_geneformer",
    "eval_quick": "sitra.recipes.eval_quick",
    "plot_training": "sitra.recipes.plot_training",
    "export_ternary": "sitra.recipes.export_ternary",
    "record_teacher": "sitra.recipes.record_teacher",
}


def job_module(name: str):
    """The job's recipe module, imported on demand (importing every recipe would load every model family)."""
    if name not in JOBS:
        raise UsageError(f"job {name!r}: unknown; choose from {', '.join(JOBS)}")
    return importlib.import_module(JOBS[name])
