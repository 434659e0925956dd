"""Finished runs into models: the best weights of block and merge runs, read back and put into
the teacher, and model folders written whole."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sitra.errors import UsageError
from sitra.models.attention import StudentSelfAttention
from sitra.models.merged import new_merged_layer
from sitra.outputs import write_folder


def load_weights(checkpoint_dir: Path) -> dict:
    """The best weights a finished run folder holds (best.safetensors)."""
    path = Path(checkpoint_dir) / "best.safetensors"
    if not path.exists():
        raise UsageError(f"{checkpoint_dir}: no best.safetensors (the run did not finish)")
    try:
        return load_file(str(path))
    except Exception as e:  # truncated or not safetensors: name the file
        raise UsageError(f"{path}: unreadable weights ({type(e).__name__}: {str(e)[:120]}); rerun its job "
                         "to write it again") from None


def save_model_folder(model, tokenizer, output: Path, job: str, own: bool = False, files: dict | None = None):
    """An ordinary model folder (save_pretrained, the tokenizer where given, and `files` {name: text})
    written whole by sitra.outputs.write_folder; `own`: the folder lies in the job's own run folder."""
    def fill(tmp):
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)

    return write_folder(output, job, fill, own=own)


BEFORE = "student_before"


def save_student_before(student, tokenizer, run_dir: Path, job: str, about: str) -> Path:
    """The student as training starts, as a model folder beside the result (RUN/student_before),
    so teacher, student before and distilled student compare in one evaluation command. Written
    once, whole (renamed into place), when the run folder has none: a resumed run keeps the one
    its first start wrote. Call it before the loop restores any trained weights. `about`: one
    line for its README.md (how the student was initialised)."""
    output = Path(run_dir) / BEFORE
    if not output.exists():
        readme = f"# Student before distillation\n\n{about}\n\nThe distilled student of the same run is `../model`.\n"
        save_model_folder(student, tokenizer, output, job, own=True, files={"README.md": readme})
    return output


@torch.inference_mode()
def outputs_equal(a, b, seed: int = 0) -> bool:
    """Same outputs on a random padded batch (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(a.config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return torch.equal(a.eval()(input_ids=ids, attention_mask=mask)[0], b.eval()(input_ids=ids, attention_mask=mask)[0])


def block_runs(checkpoints: Path, teacher: str) -> list[Path]:
    """Finished block runs (a best.safetensors beside args.json) made from `teacher`, anywhere
    under the `checkpoints` folder."""
    found = []
    for args_file in sorted(checkpoints.glob("**/args.json")):
        config = json.loads(args_file.read_text())
        is_block = "block_heads" in config and "init" not in config  # merge runs have block_heads and init
        if is_block and config.get("teacher") == teacher and (args_file.parent / "best.safetensors").exists():
            found.append(args_file.parent)
    return found


def read_block(folder: Path, teacher: str, hidden_size: int):
    """(layer, StudentSelfAttention with the run's best weights) of one block run folder."""
    args_file = folder / "args.json"
    if not args_file.exists():
        raise UsageError(f"--checkpoints {folder}: not a block run folder (no args.json)")
    config = json.loads(args_file.read_text())
    if "block_heads" not in config or "init" in config:
        raise UsageError(f"--checkpoints {folder}: not a retrain_single_block run")
    if config["teacher"] != teacher:
        raise UsageError(f"--checkpoints {folder}: trained against {config['teacher']}, not --teacher {teacher}")
    if not (folder / "best.safetensors").exists():
        raise UsageError(f"--checkpoints {folder}: no best.safetensors (the block run has not finished)")
    weights = load_weights(folder)
    heads = config["block_heads"]
    d_k = weights["query.weight"].shape[0] // heads
    block = StudentSelfAttention(hidden_size, heads, d_k, config["block_dropout"])
    block.load_state_dict(weights)
    return config["block"], block


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
        raise UsageError(f"{flag} {folder}: not a retrain_merge run folder")
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
    layer = new_merged_layer(teacher_model, config["block"], heads, d_k, config["block_dropout"], inter, "random")
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
