"""Replace two adjacent teacher layers by one new layer, trained to map the teacher's input of the
first to the teacher's output of the second."""
from dataclasses import dataclass, field
from typing import Literal

from sitra import fuse, losses, models, results, runtime
from sitra.args import StudentBlockArgs, check_student_block
from sitra.data.mlm import text_batches
from sitra.data.text import TextDataArgs, check_data_args
from sitra.errors import UsageError
from sitra.models.merged import INITS, merge_step, merge_teacher_pass
from sitra.train import TrainArgs, check_train_args, train_modules

JOB = "retrain_merge"
FUSABLE = ("block", "block_heads", "block_d_k", "block_dropout", "intermediate_size", "init")


@dataclass(kw_only=True)
class MergeArgs(TrainArgs, TextDataArgs, StudentBlockArgs):
    intermediate_size: int | None = field(default=None, metadata={"help": "feed-forward width of the merged layer (default: the teacher's)"})
    init: Literal[INITS] = field(default="first", metadata={"help": "start as a copy of the first layer, the average of both, or random"})
    criterion: Literal[tuple(losses.LOSSES)] = field(default="MSE", metadata={"help": "loss between merged and teacher output"})
    loss_on_logits: bool = field(default=False, metadata={"help": "compare MLM distributions of the outputs instead"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of --loss_on_logits"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)"})


def check(args: MergeArgs):
    check_train_args(args)
    check_data_args(args)
    config = models.load_config(args.teacher)
    heads, d_k = check_student_block(args, config, needs_successor=True)
    inter = args.intermediate_size or config.intermediate_size
    if inter < 1:
        raise UsageError(f"--intermediate_size {inter}: must be at least 1")
    if args.criterion == "CrossEntropy" and not args.loss_on_logits:
        raise UsageError("--criterion CrossEntropy compares distributions: add --loss_on_logits")
    if args.loss_on_logits and not models.has_mlm_head(config):
        raise UsageError(f"--loss_on_logits needs a teacher with an MLM head; --teacher {args.teacher} has none")
    return config, heads, d_k, inter


def default_run_name(args: MergeArgs, heads: int, d_k: int, inter: int) -> str:
    return f"merge{args.block}_h{heads}_dk{d_k}_ff{inter}_{args.init}_{args.criterion}" + ("_logits" if args.loss_on_logits else "")


def check_fused(args_list: list[MergeArgs], memory_flag: str = "--max_memory_gb"):
    shapes = [check(a) for a in args_list]
    names = [a.run_name or default_run_name(a, h, d, i) for a, (_, h, d, i) in zip(args_list, shapes)]
    fuse.check_shared(args_list, FUSABLE, names)
    args, config = args_list[0], shapes[0][0]
    each = [fuse.block_student_gb(config.hidden_size, h, d, args.batch_size, args.max_seq_length, i) for _, h, d, i in shapes]
    shared = fuse.teacher_gb(config, args.batch_size, args.max_seq_length)
    fuse.check_memory(shared + sum(each), args.max_memory_gb, len(shapes), max(each), memory_flag)
    return shapes


def run(args: MergeArgs):
    return run_fused([args])[0]


def run_fused(args_list: list[MergeArgs]):
    """Train every merged layer of the list against one teacher pass per batch; returns their runs."""
    shapes = check_fused(args_list)
    args = args_list[0]
    tokenizer = models.load_tokenizer(args.teacher)
    train_batches, eval_batches = text_batches(args, tokenizer, args.batch_size, args.seed)
    runs = [results.open_run(a, default_run_name(a, h, d, i)) for a, (_, h, d, i) in zip(args_list, shapes)]
    device = runtime.pick_device(args.device)
    runtime.seed_everything(args.seed)
    teacher = models.load_model(args.teacher, device)
    layers, step_losses = [], []
    for a, (_, heads, d_k, inter) in zip(args_list, shapes):
        runtime.seed_everything(a.seed)  # each layer starts as it would alone
        layer = models.new_merged_layer(teacher, a.block, heads, d_k, a.block_dropout, inter, a.init).to(device)
        layers.append(layer)
        on = "logits" if a.loss_on_logits else "output"
        step_losses.append(lambda batch, m=layer, a=a, on=on: merge_step(m, teacher, a.block, batch, a.criterion, on, a.temperature))
    prepare = merge_teacher_pass(teacher, sorted({a.block for a in args_list}))
    train_modules(layers, JOB, runs, args, train_batches, eval_batches, step_losses, device, prepare)
    return runs


ARGS = MergeArgs
