"""Evaluate causal LMs side by side on held-out text: sliding-window perplexity, next-token
accuracy@1 and @5, and LAMBADA-style last-word accuracy when a LAMBADA file is given; with
--lm_eval_tasks also lm-eval-harness tasks, in the same table. Ternary students load ternary,
trained (config marker) or exported (packed file) alike, and the table shows each model's weight
memory."""
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM

from sitra import data, lm_eval_tasks, models, results, runtime
from sitra.args import PlaceArgs, check_values
from sitra.data.text import TextDataArgs, check_data_args
from sitra.errors import UsageError
from sitra.evaluate import evaluate_lm, format_table, lambada_accuracy, sliding_windows
from sitra.models.lowbit import MIB, weight_bytes

JOB = "eval_lm"


@dataclass(kw_only=True)
class EvalLMArgs(TextDataArgs, PlaceArgs):
    models: list[str] = field(default_factory=list, metadata={"help": "causal LM folders, hub ids or .gguf files (also positional)"})
    stride: int | None = field(default=None, metadata={"help": "sliding-window stride (default: half of --max_seq_length)"})
    lambada_file: str | None = field(default=None, metadata={"help": "LAMBADA-style text, one passage a line; its last word is predicted"})
    batch_size: int = field(default=8, metadata={"help": "windows per batch (and lm-eval requests per batch)"})
    lm_eval_tasks: str | None = field(default=None, metadata={
        "help": "lm-eval-harness tasks, comma-separated (e.g. lambada_openai,hellaswag): their metrics join the table; "
                "pip install 'sitra[lm_eval]'"})
    lm_eval_limit: int | None = field(default=None, metadata={
        "help": "examples per lm-eval task (the first N; for quick runs, not for reporting)", "bounds": {"min": 1}})
    lm_eval_include: str | None = field(default=None, metadata={
        "help": "folder of local lm-eval task YAML files, added to lm-eval's own tasks"})
    run_name: str = field(default="eval_lm", metadata={"not_part_of_run": True, "help": "name of the results file in eval_results/"})


def label(path: str) -> str:
    """A column name: the run folder for `.../RUN/model` and `.../RUN/model_ternary` (export_ternary's default)."""
    p = Path(path)
    if p.name == "model":
        return p.parent.name
    if p.name == "model_ternary":
        return f"{p.parent.name} (packed)"
    return p.name


def run(args: EvalLMArgs) -> dict:
    check_values(args)
    check_data_args(args)
    results.check_results_place(args)
    if not args.models:
        raise UsageError("--models: name at least one causal LM folder")
    if args.lambada_file and not Path(args.lambada_file).is_file():
        raise UsageError(f"--lambada_file {args.lambada_file}: no such file")
    for m in args.models:
        models.load_config(m, "--models")
    tokenizer = models.load_tokenizer(args.models[0], "--models")
    for m in args.models[1:]:
        if models.load_tokenizer(m, "--models").get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"--models {m}: its tokenizer differs from {args.models[0]}'s; the same tokens cannot be scored")
    harness = None  # (task manager, tasks) when lm-eval tasks are asked for
    if args.lm_eval_tasks is not None or args.lm_eval_include or args.lm_eval_limit:
        harness = lm_eval_tasks.load_tasks(lm_eval_tasks.task_names(args.lm_eval_tasks or ""), args.lm_eval_include)
    _, eval_lines = data.load_texts(args.dataset_name, args.dataset_config, args.train_file, args.eval_file)
    stream = [t for block in data.causal_texts(data.take_fraction(eval_lines, args.percentage_data), tokenizer,
                                               args.max_seq_length, packing=True) for t in block]
    windows = sliding_windows(stream, args.max_seq_length, args.stride or max(1, args.max_seq_length // 2))
    passages = [line for line in Path(args.lambada_file).read_text().splitlines() if line.strip()] if args.lambada_file else []
    device = runtime.pick_device(args.device)
    table = {}
    for m in args.models:
        model = models.load_model(m, device, flag="--models", auto=AutoModelForCausalLM)
        name = label(m) if label(m) not in table else m
        table[name] = evaluate_lm(model, windows, device, args.batch_size)
        table[name]["parameters"] = sum(p.numel() for p in model.parameters())
        table[name]["weights_mib"] = weight_bytes(model) / MIB
        if passages:
            table[name]["lambada_accuracy"] = lambada_accuracy(model, tokenizer, passages, device)
        if harness:
            table[name] |= lm_eval_tasks.evaluate(model, tokenizer, *harness, args.lm_eval_limit, args.batch_size)
    log_path = Path(args.storage_directory) / "eval_results" / f"{args.run_name}.h5"
    with results.RunLog(log_path, JOB, args.run_name, results.config_dict(args)) as log:
        if harness:
            log.note(lm_eval_version=lm_eval_tasks.version())
        log.complete({f"{n}/{k}": v for n, m in table.items() for k, v in m.items()})
    print(format_table(table))
    print(f"results: {log_path}")
    return table


ARGS = EvalLMArgs
