"""Train one student attention block with the loss on the model's output: the teacher's MLM
distribution over masked tokens, through the frozen layers above the block."""
import copy
from dataclasses import dataclass, field

import torch

from sitra import models, results
from sitra.cli import UsageError, apply_preset
from sitra.presets import PRESETS
from sitra.recipes.common import (
    train_module,
    StudentBlockArgs, TextDataArgs, check_data_args, check_student_block, masked_kd, text_batches,
)
from sitra.train import TrainArgs, check_train_args, seed_everything

JOB = "train_block_till_end"


@dataclass(kw_only=True)
class BlockToEndArgs(TrainArgs, TextDataArgs, StudentBlockArgs):
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KL to the teacher"})
    alpha: float = field(default=0.0, metadata={"help": "weight of the MLM cross-entropy added to the KL"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW)"})
    preset: str | None = field(default=None, metadata={"help": f"fill unset flags from a preset: {', '.join(PRESETS)}"})


def check(args: BlockToEndArgs):
    check_train_args(args)
    check_data_args(args)
    config = models.load_config(args.teacher)
    heads, d_k = check_student_block(args, config)
    if not models.has_mlm_head(config):
        raise UsageError(f"--teacher {args.teacher}: block-to-end training needs a teacher with an MLM head")
    if not args.temperature > 0:
        raise UsageError(f"--temperature {args.temperature}: must be positive")
    if args.alpha < 0:
        raise UsageError(f"--alpha {args.alpha}: must be 0 or more")
    return config, heads, d_k


def run(args: BlockToEndArgs):
    args = apply_preset(args, PRESETS)
    config, heads, d_k = check(args)
    tokenizer = models.load_tokenizer(args.teacher)
    train_batches, eval_batches = text_batches(args, tokenizer, args.batch_size, args.seed)
    run_ = results.open_run(args, f"to_end_block{args.block}_h{heads}_dk{d_k}_T{args.temperature:g}_a{args.alpha:g}")
    device = models.pick_device(args.device)
    seed_everything(args.seed)
    teacher = models.load_model(args.teacher, device)
    student = models.StudentSelfAttention(config.hidden_size, heads, d_k, args.block_dropout)
    models.init_linear(student, config.initializer_range)
    model = copy.deepcopy(teacher)  # frozen; only the student block in it trains
    models.replace_attention(model, args.block, student.to(device))

    def step_loss(batch):
        masked = batch["labels"] != -100
        with torch.inference_mode():
            out = teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     output_hidden_states=True)
            x, teacher_logits = out.hidden_states[args.block], teacher.cls(out.last_hidden_state[masked])
        hidden = models.run_layers(model, x.clone(), batch["attention_mask"], start=args.block)
        return masked_kd(model.cls(hidden[masked]), teacher_logits.clone(), batch["labels"][masked],
                         args.temperature, args.alpha)

    train_module(student, JOB, run_, args, train_batches, eval_batches, step_loss, device)
    return run_


ARGS = BlockToEndArgs
