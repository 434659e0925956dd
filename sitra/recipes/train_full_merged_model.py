"""Fine-tune a model whose attention blocks were all retrained (build_retrained) end to end
against the teacher."""
from dataclasses import dataclass

from sitra.recipes.finetune import FinetuneArgs, run_finetune

JOB = "train_full_merged_model"


@dataclass(kw_only=True)
class FinetuneRetrainedArgs(FinetuneArgs):
    """--model defaults to checkpoints/retrained_model."""


def run(args: FinetuneRetrainedArgs):
    return run_finetune(args, JOB, "retrained_model")


ARGS = FinetuneRetrainedArgs
