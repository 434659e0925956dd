"""Retrain one attention block of a BERT teacher: a student self-attention with its own heads,
d_k and dropout, trained to reproduce the teacher's block output (or its MLM logits, or its
attention distributions) given the teacher's input to that layer."""
from dataclasses import dataclass, field
from typing import Literal

import torch

from sitra import fuse, losses, models, results, runtime
from sitra.args import BlockInitArgs, check_block_init, StudentBlockArgs, check_student_block
from sitra.data.mlm import text_batches
from sitra.data.text import TextDataArgs, check_data_args
from sitra.errors import UsageError
from sitra.losses import compare, fidelity
from sitra.models.attention import attention_probs
from sitra.models.capture import blocks_io
from sitra.train import TrainArgs, check_train_args, train_modules

JOB = "retrain_single_block"
FUSABLE = ("block", "block_heads", "block_d_k", "block_dropout")


@dataclass(kw_only=True)
class BlockArgs(TrainArgs, TextDataArgs, StudentBlockArgs, BlockInitArgs):
    criterion: Literal[tuple(losses.LOSSES)] = field(default="MSE", metadata={"help": "loss between student and teacher"})
    loss_on_logits: bool = field(default=False, metadata={"help": "compare MLM output distributions after the block"})
    loss_on_scores: bool = field(default=False, metadata={"help": "compare attention distributions (averaged over heads)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of --loss_on_logits"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW)"})


def default_run_name(args: BlockArgs, heads: int, d_k: int) -> str:
    mode = "_logits" if args.loss_on_logits else "_scores" if args.loss_on_scores else ""
    return f"block{args.block}_h{heads}_dk{d_k}_{args.criterion}{mode}{args.init_name()}"


def check(args: BlockArgs):
    """Every bad flag is reported here, before data, weights or compute."""
    check_train_args(args)
    check_data_args(args)
    config = models.load_config(args.teacher)
    heads, d_k = check_student_block(args, config)
    check_block_init(args, config, heads)
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
    x, target = batch["block_io"][block]  # from the shared teacher pass (teacher_pass)
    with torch.inference_mode():
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


def teacher_pass(teacher, blocks: list[int]):
    """prepare(batch): the teacher's input and attention-block output of every student's block,
    from one forward that stops after the deepest of them."""
    def prepare(batch):
        with torch.inference_mode():
            return {**batch, "block_io": blocks_io(teacher, blocks, batch["input_ids"], batch["attention_mask"])}
    return prepare


def check_fused(args_list: list[BlockArgs], memory_flag: str = "--max_memory_gb"):
    """check() of every student, then what fusing adds: shared flags, distinct names, memory."""
    shapes = [check(a) for a in args_list]
    names = [a.run_name or default_run_name(a, h, d) for a, (_, h, d) in zip(args_list, shapes)]
    fuse.check_shared(args_list, FUSABLE, names)
    args, config = args_list[0], shapes[0][0]
    each = [fuse.block_student_gb(config.hidden_size, h, d, args.batch_size, args.max_seq_length) for _, h, d in shapes]
    shared = fuse.teacher_gb(config, args.batch_size, args.max_seq_length)
    fuse.check_memory(shared + sum(each), args.max_memory_gb, len(shapes), max(each), memory_flag)
    return shapes


def run(args: BlockArgs):
    return run_fused([args])[0]


def run_fused(args_list: list[BlockArgs]):
    """Train every student of the list against one teacher pass per batch; returns their runs."""
    shapes = check_fused(args_list)
    args = args_list[0]
    tokenizer = models.load_tokenizer(args.teacher)
    train_batches, eval_batches = text_batches(args, tokenizer, args.batch_size, args.seed)
    runs = [results.open_run(a, default_run_name(a, h, d)) for a, (_, h, d) in zip(args_list, shapes)]
    device = runtime.pick_device(args.device)
    runtime.seed_everything(args.seed)
    teacher = models.load_model(args.teacher, device)
    students, step_losses = [], []
    for a, (config, heads, d_k) in zip(args_list, shapes):
        runtime.seed_everything(a.seed)  # each student starts as it would alone
        student = models.student_block(config, heads, d_k, a.block_dropout, a.block_init,
                                       models.encoder_layers(teacher)[a.block].attention.self)
        students.append(student.to(device))
        on = "logits" if a.loss_on_logits else "scores" if a.loss_on_scores else "output"
        step_losses.append(lambda batch, s=student, a=a, on=on: block_loss(s, teacher, a.block, batch, a.criterion, on, a.temperature))
    prepare = teacher_pass(teacher, sorted({a.block for a in args_list}))
    train_modules(students, JOB, runs, args, train_batches, eval_batches, step_losses, device, prepare)
    return runs


ARGS = BlockArgs
