"""Assemble retrained attention blocks into one runnable model folder."""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sitra import models
from sitra.cli import apply_preset
from sitra.errors import UsageError
from sitra.presets import PRESETS
from sitra.recipes.common import load_weights
from sitra.recipes.retrain_single_block import JOB as BLOCK_JOB


@dataclass(kw_only=True)
class BuildArgs:
    teacher: str = field(default="bert-base-uncased", metadata={"teacher_source": True, "help": "the teacher the blocks were trained against"})
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "block run folders to use (default: every finished block run of --teacher under checkpoints/)"})
    output: str | None = field(default=None, metadata={"help": "model folder to write (default: checkpoints/retrained_model)"})
    storage_directory: str = field(default=".", metadata={"help": "where checkpoints/ is"})
    preset: str | None = field(default=None, metadata={"help": f"fill unset flags from a preset: {', '.join(PRESETS)}"})


def block_runs(checkpoints: Path, teacher: str) -> list[Path]:
    """Finished block runs (a best.safetensors beside args.json) made from `teacher`, anywhere
    under the `checkpoints` folder."""
    found = []
    for args_file in sorted(checkpoints.glob("**/args.json")):
        config = json.loads(args_file.read_text())
        if "block_heads" in config and config.get("teacher") == teacher and (args_file.parent / "best.safetensors").exists():
            found.append(args_file.parent)
    return found


def read_block(folder: Path, teacher: str, hidden_size: int):
    """(layer, StudentSelfAttention with the run's best weights) of one block run folder."""
    args_file = folder / "args.json"
    if not args_file.exists():
        raise UsageError(f"--checkpoints {folder}: not a block run folder (no args.json)")
    config = json.loads(args_file.read_text())
    if "block_heads" not in config:
        raise UsageError(f"--checkpoints {folder}: not a {BLOCK_JOB} run")
    if config["teacher"] != teacher:
        raise UsageError(f"--checkpoints {folder}: trained against {config['teacher']}, not --teacher {teacher}")
    if not (folder / "best.safetensors").exists():
        raise UsageError(f"--checkpoints {folder}: no best.safetensors (the block run has not finished)")
    weights = load_weights(folder)
    heads = config["block_heads"]
    d_k = weights["query.weight"].shape[0] // heads
    block = models.StudentSelfAttention(hidden_size, heads, d_k, config["block_dropout"])
    block.load_state_dict(weights)
    return config["block"], block


def run(args: BuildArgs) -> Path:
    args = apply_preset(args, PRESETS)
    storage = Path(args.storage_directory)
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
    output = Path(args.output) if args.output else storage / "checkpoints" / "retrained_model"
    teacher = models.load_model(args.teacher)
    model = models.with_student_blocks(teacher, {i: b for i, (_, b) in blocks.items()})
    save_model_folder(model, models.load_tokenizer(args.teacher), output)
    reloaded = models.load_model(str(output), flag="--output")
    same = outputs_equal(model, reloaded)
    for i, (folder, b) in sorted(blocks.items()):
        print(f"block {i}: {b.heads} heads x d_k {b.d_k} from {folder}")
    print(f"saved {output} ({sum(p.numel() for p in model.parameters()):,} parameters, teacher "
          f"{sum(p.numel() for p in teacher.parameters()):,}); reload check: {'identical' if same else 'DIFFERENT'}")
    if not same:
        raise RuntimeError(f"{output} does not reload to the same outputs")
    return output


def save_model_folder(model, tokenizer, output: Path):
    """save_pretrained into a temporary folder, then rename it into place (rank 0 only)."""
    import shutil

    from sitra import runtime

    if not runtime.is_main():
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = output.with_name(f".{output.name}.old")
    if output.exists():
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)


@torch.inference_mode()
def outputs_equal(a, b, seed: int = 0) -> bool:
    """Same outputs on a random padded batch (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(a.config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return torch.equal(a.eval()(input_ids=ids, attention_mask=mask)[0], b.eval()(input_ids=ids, attention_mask=mask)[0])


ARGS = BuildArgs
