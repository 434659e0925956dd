"""Evaluate a teacher, a retrained model and an optional reference on the same fixed masks."""
import json
from dataclasses import dataclass, field
from pathlib import Path

from sitra import models, results, runtime
from sitra.args import PlaceArgs
from sitra.data.mlm import text_batches
from sitra.data.text import TextDataArgs, check_data_args
from sitra.errors import UsageError
from sitra.evaluate import evaluate_models, format_table
from sitra.models.assembly import block_runs, read_block

JOB = "eval_retrained"


@dataclass(kw_only=True)
class EvalArgs(TextDataArgs, PlaceArgs):
    teacher: str = field(default="bert-base-uncased", metadata={"teacher_source": True, "help": "hub id or local model folder"})
    model: str | None = field(default=None, metadata={"help": "model folder to evaluate (default: checkpoints/retrained_model)"})
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "instead of --model: block run folders, evaluated as the teacher with those blocks in place"})
    block_sweep: str | None = field(default=None, metadata={
        "help": "instead of --model: a block sweep under checkpoints/; with --block (and --block_heads, --block_d_k) picks its run"})
    block: int | None = field(default=None, metadata={"help": "with --block_sweep: the block of the run to evaluate"})
    block_heads: int | None = field(default=None, metadata={"help": "with --block_sweep: the heads of the run to evaluate"})
    block_d_k: int | None = field(default=None, metadata={"help": "with --block_sweep: the d_k of the run to evaluate"})
    reference: str | None = field(default=None, metadata={"help": "another model to compare, e.g. bert-large-uncased"})
    batch_size: int = field(default=32, metadata={"help": "examples per batch"})
    seed: int = field(default=42, metadata={"help": "seed of the fixed masks"})


def block_folders(args: EvalArgs) -> list[Path]:
    """The block runs to evaluate: --checkpoints, or the one run of --block_sweep that matches."""
    if args.checkpoints:
        return [Path(c) for c in args.checkpoints]
    if args.block is None:
        raise UsageError("--block_sweep needs --block (and --block_heads / --block_d_k where the sweep varies them)")
    sweep = Path(args.storage_directory) / "checkpoints" / args.block_sweep
    if not sweep.is_dir():
        raise UsageError(f"--block_sweep {args.block_sweep}: no such folder {sweep}")
    config = models.load_config(args.teacher)
    matches = []
    for folder in block_runs(sweep, args.teacher):
        run_args = json.loads((folder / "args.json").read_text())
        heads = run_args["block_heads"]
        d_k = run_args["block_d_k"] or config.hidden_size // heads
        if (run_args["block"], heads, d_k) == (args.block, args.block_heads or heads, args.block_d_k or d_k):
            matches.append(folder)
    if len(matches) != 1:
        want = f"block {args.block}, heads {args.block_heads or 'any'}, d_k {args.block_d_k or 'any'}"
        found = "none" if not matches else ", ".join(m.name for m in matches)
        raise UsageError(f"--block_sweep {args.block_sweep}: {want} matches {found} of its finished runs; need exactly one")
    return matches


def run(args: EvalArgs) -> dict:
    check_data_args(args)
    results.check_results_place(args)
    if args.model and (args.checkpoints or args.block_sweep):
        raise UsageError("--model, --checkpoints and --block_sweep: give one")
    blocks = block_folders(args) if args.checkpoints or args.block_sweep else []
    model_path = None if blocks else args.model or str(Path(args.storage_directory) / "checkpoints" / "retrained_model")
    names = {"teacher": (args.teacher, "--teacher")}
    if model_path:
        names["model"] = (model_path, "--model")
    if args.reference:
        names["reference"] = (args.reference, "--reference")
    for path, flag in names.values():
        models.load_config(path, flag)
    tokenizer = models.load_tokenizer(args.teacher)
    for name, (path, flag) in names.items():
        if name != "teacher" and models.load_tokenizer(path, flag).get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"{flag} {path}: its tokenizer differs from the teacher's; the same masks cannot apply")
    config = models.load_config(args.teacher)
    students = dict(read_block(f, args.teacher, config.hidden_size) for f in blocks)
    _, batches = text_batches(args, tokenizer, args.batch_size, args.seed, need_train=False)
    device = runtime.pick_device(args.device)
    loaded = {name: models.load_model(path, device, flag=flag) for name, (path, flag) in names.items()}
    if students:
        loaded = {"teacher": loaded["teacher"], "model": models.with_student_blocks(loaded["teacher"], students),
                  **{k: v for k, v in loaded.items() if k != "teacher"}}
    default_name = f"eval_{Path(model_path).name}" if model_path else "eval_" + "+".join(f.name for f in blocks)
    run_name = args.run_name or default_name
    log_path = Path(args.storage_directory) / "eval_results" / f"{run_name}.h5"
    with results.RunLog(log_path, JOB, run_name, results.config_dict(args)) as log:
        metrics = evaluate_models(loaded, "teacher", batches, device)
        final = {f"{name}/{k}": v for name, m in metrics.items() for k, v in m.items()}
        log.complete(final)
    print(format_table(metrics, gap=("model", "teacher")))
    print(f"results: {log_path}")
    return metrics


ARGS = EvalArgs
