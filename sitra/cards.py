"""Model cards: the README.md of a model folder a job writes (what was made, how, on which data,
its results and the command that reproduces it)."""
from pathlib import Path

import numpy as np

from sitra import runtime
from sitra.cli import command_line
from sitra.data.tasks import TaskDataArgs
from sitra.models.teacher import GGUF_NOTE, is_gguf
from sitra.results import atomic_write


def write_card(folder: Path, job: str, args, title: str, about: list[str], method: list[str], data_lines: list[str],
               table_title: str, table: str, extra: list[str] = ()):
    """README.md in a model folder: what was made, how, on which data, the results, the command."""
    lines = [f"# {title}", "", *about, "", "## Method", "", *(f"- {m}" for m in method), "",
             "## Data", "", *(f"- {d}" for d in data_lines), "", f"## {table_title}", "", table, "", *extra,
             "## Reproduce", "", "```bash", command_line(f"jobs/{job}.py", args), "```", ""]
    atomic_write(folder / "README.md", lambda tmp: tmp.write_text("\n".join(lines)))


def data_description(args: TaskDataArgs, n_train: int, splits: dict, seen: dict | None = None) -> list[str]:
    """The Data section: the splits, what training read of its split (`seen_in_training`), and
    which held-out splits chose the checkpoint and gave the results."""
    def where(split):
        return getattr(args, f"{split}_file") or f"{args.dataset_dir} ({split})"

    share = "" if args.train_fraction == 1 else f", the {args.train_fraction:g} of it --train_fraction keeps"
    lines = [f"train: {where('train')} ({n_train:,} examples{share})"]
    if seen is not None:
        lines.append(seen_line(seen)[0].lower() + seen_line(seen)[1:])
    if "validation" in splits:
        n = len(splits["validation"][0])
        lines.append(f"validation: {n} examples held out from the training split (taken evenly, never trained on)"
                     if args.validation_from_train else f"validation: {where('validation')} ({n} examples)")
        lines[-1] += ", chooses the checkpoint"
    if "test" in splits:
        lines.append(f"test: {where('test')} ({len(splits['test'][0])} examples), evaluated once with the chosen checkpoint")
    return lines


def seen_in_training(batches, progress, lengths) -> dict:
    """What a finished run read, from the data position it ended at (progress.epoch, .batch) and
    the batches' own order: every example of each full epoch and the first `progress.batch`
    batches of the last one. lengths: each training example's tokens (or genes).
    {"reads": examples read, "distinct": examples read at least once, "examples": in the training
    set, "tokens": tokens of the examples read, "steps": optimizer steps}."""
    world = runtime.world_size()
    order_of = batches.shard(0, world) if world > 1 else batches  # bounds of the batches all processes shared
    lengths = np.asarray(lengths, dtype=np.int64)
    reads = np.full(len(lengths), progress.epoch, dtype=np.int64)
    if progress.batch:
        np.add.at(reads, order_of.order(progress.epoch)[: order_of.bounds()[progress.batch]].numpy(), 1)
    return {"reads": int(reads.sum()), "distinct": int((reads > 0).sum()), "examples": len(lengths),
            "tokens": int(reads @ lengths), "steps": progress.step}


def seen_line(seen: dict, what: str = "examples") -> str:
    """The card's sentence on what training read (not what the data holds: 30 steps may read a tenth)."""
    share = seen["distinct"] / max(seen["examples"], 1)
    epochs = seen["reads"] / max(seen["examples"], 1)
    return (f"Seen in training: {seen['steps']:,} steps read {seen['reads']:,} {what} ({epochs:.2f} epochs; "
            f"{seen['distinct']:,} distinct, {share:.1%} of the {seen['examples']:,} training {what}), "
            f"{seen['tokens']:,} tokens")


def kept_layers_line(keep: list[int], teacher_layers: int) -> str:
    """Which teacher layers a student cut from it kept (0-based, as in the teacher's config)."""
    return f"Student layers: teacher layers {', '.join(map(str, keep))} of its {teacher_layers} (0-based), in that order"


def gguf_lines(args, flags=("teacher", "student")) -> list[str]:
    """A line for each model of `flags` the run read from a GGUF file (its weights were de-quantised)."""
    return [f"--{f} {getattr(args, f)}: {GGUF_NOTE}; the quantisation's rounding stays in the weights"
            for f in flags if is_gguf(getattr(args, f, None))]


def optimiser_line(args) -> str:
    n, unit = (args.max_steps, "steps") if args.max_steps else (args.epochs, "epochs")
    return (f"AdamW, lr {args.lr}, weight decay {args.adam_weight_decay}, warm-up {args.warmup_steps} steps, "
            f"{args.lr_scheduler} schedule, batch {args.batch_size} x {args.gradient_accumulation_steps} accumulation, "
            f"{n} {unit if n != 1 else unit[:-1]}, seed {args.seed}")
