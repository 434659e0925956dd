"""Retrain one attention block of a BERT teacher: a student self-attention with its own heads,
d_k and dropout, trained to reproduce the teacher's block output (or its MLM logits, or its
attention distributions) given the teacher's input to that layer."""
from dataclasses import dataclass, field
from typing import Literal

import torch

from sitra import losses, models, results
from sitra.cli import UsageError, apply_preset
from sitra.models.attention import attention_probs
from sitra.presets import PRESETS
from sitra.recipes.common import (
    StudentBlockArgs, TextDataArgs, check_data_args, check_student_block, compare, fidelity, text_batches,
    train_module,
)
from sitra.train import TrainArgs, check_train_args, seed_everything

JOB = "retrain_single_block"


@dataclass(kw_only=True)
class BlockArgs(TrainArgs, TextDataArgs, StudentBlockArgs):
    criterion: Literal[tuple(losses.LOSSES)] = field(default="MSE", metadata={"help": "loss between student and teacher"})
    loss_on_logits: bool = field(default=False, metadata={"help": "compare MLM output distributions after the block"})
    loss_on_scores: bool = field(default=False, metadata={"help": "compare attention distributions (averaged over heads)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of --loss_on_logits"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW)"})
    preset: str | None = field(default=None, metadata={"help": f"fill unset flags from a preset: {', '.join(PRESETS)}"})


def default_run_name(args: BlockArgs, heads: int, d_k: int) -> str:
    mode = "_logits" if args.loss_on_logits else "_scores" if args.loss_on_scores else ""
    return f"block{args.block}_h{heads}_dk{d_k}_{args.criterion}{mode}"


def check(args: BlockArgs):
    """Every bad flag is reported here, before data, weights or compute."""
    check_train_args(args)
    check_data_args(args)
    config = models.load_config(args.teacher)
    heads, d_k = check_student_block(args, config)
    if args.loss_on_logits and args.loss_on_scores:
        raise UsageError("--loss_on_logits and --loss_on_scores: choose one")
    if args.loss_on_logits and not models.has_mlm_head(config):
        raise UsageError(f"--loss_on_logits needs a teacher with an MLM head; --teacher {args.teacher} has none")
    if args.criterion == "CrossEntropy" and not (args.loss_on_logits or args.loss_on_scores):
        raise UsageError("--criterion CrossEntropy compares distributions: add --loss_on_logits or --loss_on_scores")
    if not args.temperature > 0:
        raise UsageError(f"--temperature {args.temperature}: must be positive")
    return config, heads, d_k


def block_loss(student, teacher, block: int, batch, criterion: str, on: str, temperature: float):
    """(loss, {"block_mse", "block_cosine"}) of the student block against the teacher on a batch.

    on="output": criterion between block outputs. on="logits": between the MLM distributions
    softmax(head(output) / T). on="scores": between per-query attention distributions averaged
    over heads (student and teacher head counts may differ), padded queries and keys excluded.
    """
    token_mask = batch["attention_mask"].bool()
    with torch.inference_mode():
        x, target = models.block_io(teacher, block, batch["input_ids"], batch["attention_mask"])
        if on == "scores":
            t_self = models.encoder_layers(teacher)[block].attention.self
            teacher_probs = attention_probs(t_self.query, t_self.key, teacher.config.num_attention_heads, x, token_mask).mean(1)
    x, target = x.clone(), target.clone()  # leave inference mode: autograd may save them
    attn_mask = None if token_mask.all() else token_mask[:, None, None, :]
    out = models.encoder_layers(teacher)[block].attention.output(student(x, attn_mask)[0], x)
    if on == "scores":
        p_s, p_t = student.attention_probs(x, token_mask).mean(1), teacher_probs.clone()
        loss = (losses.soft_cross_entropy(p_s.clamp_min(1e-30).log(), p_t.clamp_min(1e-30).log(), token_mask)
                if criterion == "CrossEntropy" else
                losses.LOSSES[criterion](p_s, p_t, token_mask[:, :, None] & token_mask[:, None, :]))
    else:
        loss = compare(out, target, token_mask, criterion, on, temperature, head=teacher.cls if on == "logits" else None)
    return loss, fidelity(out, target, token_mask)


def run(args: BlockArgs):
    args = apply_preset(args, PRESETS)
    config, heads, d_k = check(args)
    tokenizer = models.load_tokenizer(args.teacher)
    train_batches, eval_batches = text_batches(args, tokenizer, args.batch_size, args.seed)
    run_ = results.open_run(args, default_run_name(args, heads, d_k))
    device = models.pick_device(args.device)
    seed_everything(args.seed)
    teacher = models.load_model(args.teacher, device)
    student = models.StudentSelfAttention(config.hidden_size, heads, d_k, args.block_dropout)
    models.init_linear(student, config.initializer_range)
    student.to(device)
    on = "logits" if args.loss_on_logits else "scores" if args.loss_on_scores else "output"

    def step_loss(batch):
        return block_loss(student, teacher, args.block, batch, args.criterion, on, args.temperature)

    train_module(student, JOB, run_, args, train_batches, eval_batches, step_loss, device)
    return run_


ARGS = BlockArgs
