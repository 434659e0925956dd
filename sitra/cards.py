"""Model cards: the README.md of a model folder a job writes (what was made, how, on which data,
its results and the command that reproduces it)."""
from pathlib import Path

from sitra.cli import command_line
from sitra.data.tasks import TaskDataArgs
from sitra.results import atomic_write


def write_card(folder: Path, job: str, args, title: str, about: list[str], method: list[str], data_lines: list[str],
               table_title: str, table: str, extra: list[str] = ()):
    """README.md in a model folder: what was made, how, on which data, the results, the command."""
    lines = [f"# {title}", "", *about, "", "## Method", "", *(f"- {m}" for m in method), "",
             "## Data", "", *(f"- {d}" for d in data_lines), "", f"## {table_title}", "", table, "", *extra,
             "## Reproduce", "", "```bash", command_line(f"jobs/{job}.py", args), "```", ""]
    atomic_write(folder / "README.md", lambda tmp: tmp.write_text("\n".join(lines)))


def data_description(args: TaskDataArgs, n_train: int, splits: dict) -> list[str]:
    def where(split):
        return getattr(args, f"{split}_file") or f"{args.dataset_dir} ({split})"

    share = "all" if args.train_fraction == 1 else f"{args.train_fraction:g}"
    lines = [f"train: {where('train')}, {share} of it ({n_train} examples)"]
    if "validation" in splits:
        n = len(splits["validation"][0])
        lines.append(f"validation: {n} examples held out from the training split (taken evenly, never trained on)"
                     if args.validation_from_train else f"validation: {where('validation')} ({n} examples)")
        lines[-1] += ", chooses the checkpoint"
    if "test" in splits:
        lines.append(f"test: {where('test')} ({len(splits['test'][0])} examples), evaluated once with the chosen checkpoint")
    return lines


def optimiser_line(args) -> str:
    n, unit = (args.max_steps, "steps") if args.max_steps else (args.epochs, "epochs")
    return (f"AdamW, lr {args.lr}, weight decay {args.adam_weight_decay}, warm-up {args.warmup_steps} steps, "
            f"{args.lr_scheduler} schedule, batch {args.batch_size} x {args.gradient_accumulation_steps} accumulation, "
            f"{n} {unit if n != 1 else unit[:-1]}, seed {args.seed}")
