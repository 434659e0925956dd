"""Assemble retrained attention blocks into one runnable model folder."""
from dataclasses import dataclass, field
from pathlib import Path

from sitra import models
from sitra.args import PresetArgs
from sitra.errors import UsageError
from sitra.models.assembly import (
    block_runs,
    outputs_equal,
    read_block,
    save_model_folder,
)
from sitra.outputs import check_output

JOB = "build_retrained"


@dataclass(kw_only=True)
class BuildArgs(PresetArgs):
    teacher: str = field(default="bert-base-uncased", metadata={"teacher_source": True, "help": "the teacher the blocks were trained against"})
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "block run folders to use (default: every finished block run of --teacher under checkpoints/)"})
    output: str | None = field(default=None, metadata={"help": "model folder to write (default: checkpoints/retrained_model)"})
    storage_directory: str = field(default=".", metadata={"help": "where checkpoints/ is"})
    overwrite: bool = field(default=False, metadata={"help": "replace the --output folder an earlier run of this job wrote"})


def run(args: BuildArgs) -> Path:
    storage = Path(args.storage_directory)
    output = check_output(Path(args.output) if args.output else storage / "checkpoints" / "retrained_model", JOB, args.overwrite)
    config = models.load_config(args.teacher)
    folders = [Path(c) for c in args.checkpoints] or block_runs(storage / "checkpoints", args.teacher)
    if not folders:
        raise UsageError(f"--checkpoints: no finished block runs of {args.teacher} under {storage / 'checkpoints'}")
    blocks = {}
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"--checkpoints {folder}: no such folder")
        layer, block = read_block(folder, args.teacher, config.hidden_size)
        if layer in blocks:
            raise UsageError(f"--checkpoints: several runs retrain block {layer} ({blocks[layer][0]}, {folder}); "
                             "name the ones to use")
        blocks[layer] = (folder, block)
    teacher = models.load_model(args.teacher)
    model = models.with_student_blocks(teacher, {i: b for i, (_, b) in blocks.items()})
    save_model_folder(model, models.load_tokenizer(args.teacher), output, JOB)
    reloaded = models.load_model(str(output), flag="--output")
    same = outputs_equal(model, reloaded)
    for i, (folder, b) in sorted(blocks.items()):
        print(f"block {i}: {b.heads} heads x d_k {b.d_k} from {folder}")
    print(f"saved {output} ({sum(p.numel() for p in model.parameters()):,} parameters, teacher "
          f"{sum(p.numel() for p in teacher.parameters()):,}); reload check: {'identical' if same else 'DIFFERENT'}")
    if not same:
        raise RuntimeError(f"{output} does not reload to the same outputs")
    return output


ARGS = BuildArgs
