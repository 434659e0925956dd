"""Evaluate a teacher, a retrained model and an optional reference on the same fixed masks."""
from dataclasses import dataclass, field
from pathlib import Path

from sitra import models, results
from sitra.cli import UsageError, apply_preset
from sitra.evaluate import evaluate_models, format_table
from sitra.presets import PRESETS
from sitra.recipes.common import TextDataArgs, check_data_args, text_batches

JOB = "eval_retrained"


@dataclass(kw_only=True)
class EvalArgs(TextDataArgs):
    teacher: str = field(default="bert-base-uncased", metadata={"help": "hub id or local model folder"})
    model: str | None = field(default=None, metadata={"help": "model folder to evaluate (default: checkpoints/retrained_model)"})
    reference: str | None = field(default=None, metadata={"help": "another model to compare, e.g. bert-large-uncased"})
    batch_size: int = field(default=32, metadata={"help": "examples per batch"})
    seed: int = field(default=42, metadata={"help": "seed of the fixed masks"})
    storage_directory: str = field(default=".", metadata={"help": "where checkpoints/ and eval_results/ are"})
    run_name: str | None = field(default=None, metadata={"help": "name of the results file (default: eval_<model folder>)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    preset: str | None = field(default=None, metadata={"help": f"fill unset flags from a preset: {', '.join(PRESETS)}"})


def run(args: EvalArgs) -> dict:
    args = apply_preset(args, PRESETS)
    check_data_args(args)
    model_path = args.model or str(Path(args.storage_directory) / "checkpoints" / "retrained_model")
    names = {"teacher": (args.teacher, "--teacher"), "model": (model_path, "--model")}
    if args.reference:
        names["reference"] = (args.reference, "--reference")
    for path, flag in names.values():
        models.load_config(path, flag)
    tokenizer = models.load_tokenizer(args.teacher)
    for name, (path, flag) in names.items():
        if name != "teacher" and models.load_tokenizer(path, flag).get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"{flag} {path}: its tokenizer differs from the teacher's; the same masks cannot apply")
    _, batches = text_batches(args, tokenizer, args.batch_size, args.seed, need_train=False)
    device = models.pick_device(args.device)
    loaded = {name: models.load_model(path, device, flag=flag) for name, (path, flag) in names.items()}
    run_name = args.run_name or f"eval_{Path(model_path).name}"
    log_path = Path(args.storage_directory) / "eval_results" / f"{run_name}.h5"
    with results.RunLog(log_path, JOB, run_name, results.config_dict(args)) as log:
        metrics = evaluate_models(loaded, "teacher", batches, device)
        final = {f"{name}/{k}": v for name, m in metrics.items() for k, v in m.items()}
        log.complete(final)
    print(format_table(metrics, gap=("model", "teacher")))
    print(f"results: {log_path}")
    return metrics


ARGS = EvalArgs
