"""Evaluate any list of model folders (teacher, retrained, merged, fine-tuned) on the same fixed
masks: MLM accuracy, top-5, perplexity, hidden-state fidelity, size and forward latency."""
from dataclasses import dataclass, field
from pathlib import Path

from sitra import models, results, runtime
from sitra.args import PlaceArgs
from sitra.data.mlm import text_batches
from sitra.data.text import TextDataArgs, check_data_args
from sitra.errors import UsageError
from sitra.evaluate import bar_plot, evaluate_models, format_table
from sitra.results import atomic_write

JOB = "eval_merged"


@dataclass(kw_only=True)
class EvalMergedArgs(TextDataArgs, PlaceArgs):
    teacher: str = field(default="bert-base-uncased", metadata={"teacher_source": True, "help": "hub id or local model folder"})
    models: list[str] = field(default_factory=list, metadata={
        "help": "model folders to compare (default: every model folder under checkpoints/)"})
    batch_size: int = field(default=32, metadata={"help": "examples per batch"})
    seed: int = field(default=42, metadata={"help": "seed of the fixed masks"})
    run_name: str = field(default="eval_merged", metadata={"not_part_of_run": True, "help": "name of the results files in eval_results/"})


def model_folders(checkpoints: Path) -> list[Path]:
    """Model folders sitra wrote under checkpoints/ (a config.json beside weights)."""
    return sorted(p.parent for p in checkpoints.glob("**/config.json") if any(p.parent.glob("*.safetensors")))


def label(path: Path) -> str:
    return path.parent.name if path.name == "model" else path.name


def run(args: EvalMergedArgs) -> dict:
    check_data_args(args)
    results.check_results_place(args)
    folders = [Path(m) for m in args.models] or model_folders(Path(args.storage_directory) / "checkpoints")
    if not folders:
        raise UsageError(f"--models: none given and no model folders under {Path(args.storage_directory) / 'checkpoints'}")
    names = {"teacher": args.teacher}
    for f in folders:
        names[label(f) if label(f) not in names else str(f)] = str(f)
    for name, path in names.items():
        models.load_config(path, "--teacher" if name == "teacher" else "--models")
    tokenizer = models.load_tokenizer(args.teacher)
    if tokenizer.mask_token_id is None:
        raise UsageError(f"--teacher {args.teacher}: its tokenizer has no mask token; eval_merged compares masked language "
                         "models (causal LMs, GGUF files among them: jobs/eval_lm.py)")
    for name, path in names.items():
        if name != "teacher" and models.load_tokenizer(path, "--models").get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"--models {path}: its tokenizer differs from the teacher's; the same masks cannot apply")
    _, batches = text_batches(args, tokenizer, args.batch_size, args.seed, need_train=False)
    device = runtime.pick_device(args.device)
    loaded = {name: models.load_model(path, device, flag="--teacher" if name == "teacher" else "--models")
              for name, path in names.items()}
    for name, m in loaded.items():
        print(f"{name}: {names[name]} ({m.config.num_hidden_layers} layers)")
    log_path = Path(args.storage_directory) / "eval_results" / f"{args.run_name}.h5"
    with results.RunLog(log_path, JOB, args.run_name, results.config_dict(args)) as log:
        metrics = evaluate_models(loaded, "teacher", batches, device)
        plot = log_path.with_suffix(".png")
        atomic_write(plot, lambda tmp: bar_plot(metrics, tmp))
        log.complete({f"{n}/{k}": v for n, m in metrics.items() for k, v in m.items()})
    print(format_table(metrics))
    print(f"results: {log_path}; plot: {plot}")
    return metrics


ARGS = EvalMergedArgs
