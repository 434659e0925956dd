"""Replace two adjacent teacher layers by one new layer, trained to map the teacher's input of the
first to the teacher's output of the second."""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sitra import fuse, losses, models, results, runtime
from sitra.cli import apply_preset
from sitra.errors import UsageError
from sitra.models.capture import layers_io
from sitra.models.merged import INITS
from sitra.presets import PRESETS
from sitra.recipes.common import (
    train_modules,
    load_weights,
    StudentBlockArgs, TextDataArgs, check_data_args, check_student_block, compare, fidelity, text_batches,
)
from sitra.train import TrainArgs, check_train_args

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
    preset: str | None = field(default=None, metadata={"help": f"fill unset flags from a preset: {', '.join(PRESETS)}"})


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


def merge_step(layer, teacher, block: int, batch, criterion: str, on: str, temperature: float):
    """(loss, fidelity) of the merged layer on one batch: teacher input of `block` in, teacher
    output of `block + 1` as the target."""
    token_mask = batch["attention_mask"].bool()
    x, target = batch["layer_io"][(block, block + 2)]  # from the shared teacher pass (teacher_pass)
    x, target = x.clone(), target.clone()
    out = models.apply_layers([layer], teacher.config, x, batch["attention_mask"])
    loss = compare(out, target, token_mask, criterion, on, temperature, head=getattr(teacher, "cls", None))
    return loss, fidelity(out, target, token_mask)


def default_run_name(args: MergeArgs, heads: int, d_k: int, inter: int) -> str:
    return f"merge{args.block}_h{heads}_dk{d_k}_ff{inter}_{args.init}_{args.criterion}" + ("_logits" if args.loss_on_logits else "")


def teacher_pass(teacher, blocks: list[int]):
    """prepare(batch): the teacher's input of layer b and output of layer b + 1 for every
    student's b, from one forward."""
    def prepare(batch):
        with torch.inference_mode():
            spans = [(b, b + 2) for b in blocks]
            return {**batch, "layer_io": layers_io(teacher, spans, batch["input_ids"], batch["attention_mask"])}
    return prepare


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
    args_list = [apply_preset(a, PRESETS) for a in args_list]
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
    prepare = teacher_pass(teacher, sorted({a.block for a in args_list}))
    train_modules(layers, JOB, runs, args, train_batches, eval_batches, step_losses, device, prepare)
    return runs


def merge_runs(checkpoints: Path, teacher: str) -> list[Path]:
    """Finished merge runs of `teacher` anywhere under `checkpoints`."""
    found = []
    for args_file in sorted(checkpoints.glob("**/args.json")):
        config = json.loads(args_file.read_text())
        if "init" in config and config.get("teacher") == teacher and (args_file.parent / "best.safetensors").exists():
            found.append(args_file.parent)
    return found


def merge_run_start(folder: Path, teacher: str, flag: str = "--checkpoints") -> int:
    """The first layer a finished merge run folder replaces; one-line errors for anything else."""
    args_file = folder / "args.json"
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder}: no such folder")
    if not args_file.exists() or "init" not in json.loads(args_file.read_text()):
        raise UsageError(f"{flag} {folder}: not a {JOB} run folder")
    config = json.loads(args_file.read_text())
    if config["teacher"] != teacher:
        raise UsageError(f"{flag} {folder}: trained against {config['teacher']}, not --teacher {teacher}")
    if not (folder / "best.safetensors").exists():
        raise UsageError(f"{flag} {folder}: no best.safetensors (the merge run has not finished)")
    return config["block"]


def read_merged(folder: Path, teacher_model, teacher: str, flag: str = "--checkpoints"):
    """(first layer, merged layer with the run's best weights) of one merge run folder."""
    merge_run_start(folder, teacher, flag)
    config = json.loads((folder / "args.json").read_text())
    weights = load_weights(folder)
    heads = config["block_heads"]
    d_k = weights["attention.self.query.weight"].shape[0] // heads
    inter = weights["intermediate.dense.weight"].shape[0]
    layer = models.new_merged_layer(teacher_model, config["block"], heads, d_k, config["block_dropout"], inter, "random")
    layer.load_state_dict(weights)
    return config["block"], layer.to(next(teacher_model.parameters()).device).eval()


def find_merge_run(storage: Path, teacher: str, block: int, heads: int | None, d_k: int | None, hidden: int) -> Path:
    """The one finished merge run of `block` (and heads, d_k where given) under storage/checkpoints."""
    matches = []
    for folder in merge_runs(storage / "checkpoints", teacher):
        c = json.loads((folder / "args.json").read_text())
        run_d_k = c["block_d_k"] or hidden // c["block_heads"]
        if c["block"] == block and (heads is None or c["block_heads"] == heads) and (d_k is None or run_d_k == d_k):
            matches.append(folder)
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(str(m) for m in matches)
        raise UsageError(f"--block {block}: finished merge runs of {teacher} that match: {found}; "
                         "need exactly one (give --block_heads/--block_d_k or --checkpoint)")
    return matches[0]


ARGS = MergeArgs
