"""Fine-tune the fully merged model (build_merged) end to end against the teacher."""
from dataclasses import dataclass

from sitra.recipes.finetune import FinetuneArgs, run_finetune

JOB = "finetune_fully_merged"


@dataclass(kw_only=True)
class FinetuneMergedArgs(FinetuneArgs):
    """--model defaults to checkpoints/merged_model."""


def run(args: FinetuneMergedArgs):
    return run_finetune(args, JOB, "merged_model")


ARGS = FinetuneMergedArgs
