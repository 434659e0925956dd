"""Assemble merged layers for pairs (0,1), (2,3), ... into a model with half the layers."""
from dataclasses import dataclass, field
from pathlib import Path

from sitra import models
from sitra.args import PresetArgs
from sitra.errors import UsageError
from sitra.models.assembly import (
    merge_run_start,
    merge_runs,
    outputs_equal,
    read_merged,
    save_model_folder,
)
from sitra.outputs import check_output

JOB = "build_merged"


@dataclass(kw_only=True)
class BuildMergedArgs(PresetArgs):
    teacher: str = field(default="bert-base-uncased", metadata={"teacher_source": True, "help": "the teacher the merged layers were trained against"})
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "merge run folders to use (default: the finished merge run of every pair (0,1), (2,3), ...)"})
    output: str | None = field(default=None, metadata={"help": "model folder to write (default: checkpoints/merged_model)"})
    storage_directory: str = field(default=".", metadata={"help": "where checkpoints/ is"})
    overwrite: bool = field(default=False, metadata={"help": "replace the --output folder an earlier run of this job wrote"})


def run(args: BuildMergedArgs) -> Path:
    storage = Path(args.storage_directory)
    output = check_output(Path(args.output) if args.output else storage / "checkpoints" / "merged_model", JOB, args.overwrite)
    config = models.load_config(args.teacher)
    folders = [Path(c) for c in args.checkpoints] or merge_runs(storage / "checkpoints", args.teacher)
    where = {}
    for folder in folders:  # every check from the run folders' args.json, before any weights load
        start = merge_run_start(folder, args.teacher)
        if start in where:
            raise UsageError(f"--checkpoints: several runs merge layers ({start},{start + 1}) ({where[start]}, {folder}); "
                             "name the ones to use")
        where[start] = folder
    starts = sorted(where)
    for a, b in zip(starts, starts[1:]):
        if b == a + 1:
            raise UsageError(f"--checkpoints: the pairs ({a},{a + 1}) and ({b},{b + 1}) overlap")
    if not args.checkpoints:
        missing = [f"({i},{i + 1})" for i in range(0, config.num_hidden_layers - 1, 2) if i not in where]
        if missing:
            raise UsageError(f"--checkpoints: no finished merge run of {args.teacher} for layers {', '.join(missing)} "
                             f"under {storage / 'checkpoints'}; train them or name the runs to use")
    teacher = models.load_model(args.teacher)
    merged = {start: read_merged(folder, teacher, args.teacher)[1] for start, folder in where.items()}
    model = models.with_merged_layers(teacher, merged)
    save_model_folder(model, models.load_tokenizer(args.teacher), output, JOB)
    same = outputs_equal(model, models.load_model(str(output), flag="--output"))
    for start in starts:
        print(f"layers ({start},{start + 1}) <- {where[start]}")
    print(f"saved {output}: {model.config.num_hidden_layers} layers instead of {config.num_hidden_layers}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters (teacher {sum(p.numel() for p in teacher.parameters()):,}); "
          f"reload check: {'identical' if same else 'DIFFERENT'}")
    if not same:
        raise RuntimeError(f"{output} does not reload to the same outputs")
    return output


ARGS = BuildMergedArgs
