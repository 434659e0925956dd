"""What the task jobs (finetune_classifier, distill_classifier, distill_summarizer) share: where
the splits come from, checks that keep the test split out of model selection, classification
batches and the model card."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sitra import data, results
from sitra.cli import command_line
from sitra.errors import UsageError
from sitra.data import tasks


@dataclass(kw_only=True)
class TaskDataArgs:
    """Where the train, validation and test splits come from."""
    train_file: str | None = field(default=None, metadata={"help": "training split: .tsv (GLUE style), .csv or .jsonl"})
    validation_file: str | None = field(default=None, metadata={"help": "validation split: checkpoints are chosen on it"})
    test_file: str | None = field(default=None, metadata={"help": "test split (optional): evaluated once, with the chosen checkpoint"})
    dataset_dir: str | None = field(default=None, metadata={
        "help": "instead of files: a datasets folder (DatasetDict.save_to_disk) with train, validation and optional test splits"})
    validation_from_train: int = field(default=0, metadata={
        "help": "hold out this many training examples (taken evenly) as the validation split, instead of --validation_file; "
                "then a published dev set can be the --test_file"})
    train_fraction: float = field(default=1.0, metadata={"help": "fraction in (0, 1] of the training split to use, taken evenly"})


def check_task_data(args: TaskDataArgs):
    """One-line errors for the data flags, before any compute."""
    if not 0 < args.train_fraction <= 1:
        raise UsageError(f"--train_fraction {args.train_fraction}: must be in (0, 1]")
    if args.validation_from_train < 0:
        raise UsageError(f"--validation_from_train {args.validation_from_train}: must be 0 (off) or more")
    if args.validation_from_train and args.validation_file:
        raise UsageError(f"--validation_from_train {args.validation_from_train}: give it or --validation_file, not both")
    files = {s: getattr(args, f"{s}_file") for s in tasks.SPLITS}
    if args.dataset_dir:
        given = [f"--{s}_file" for s, f in files.items() if f]
        if given:
            raise UsageError(f"--dataset_dir {args.dataset_dir}: give it or {', '.join(given)}, not both")
        if not Path(args.dataset_dir).is_dir():
            raise UsageError(f"--dataset_dir {args.dataset_dir}: no such folder")
        return
    for split, path in files.items():
        if path and not Path(path).is_file():
            raise UsageError(f"--{split}_file {path}: no such file")
    if not files["train"]:
        raise UsageError("--train_file is required (or --dataset_dir)")
    if not files["validation"] and not args.validation_from_train:
        raise UsageError("--validation_file is required (or --validation_from_train N, or --dataset_dir)")
    given = [(s, Path(p).resolve()) for s, p in files.items() if p]
    for i, (a, pa) in enumerate(given):
        for b, pb in given[i + 1:]:
            if pa == pb:
                raise UsageError(f"--{b}_file {files[b]}: the same file as --{a}_file; the {b} split must be "
                                 "held out from it")


def load_splits(args: TaskDataArgs) -> dict[str, tuple[list[dict], str]]:
    """{split: (rows, how error messages name the source)}: the validation rows held out from the
    training rows where --validation_from_train asks, then the training rows thinned to
    --train_fraction."""
    if args.dataset_dir:
        found = tasks.read_dataset_dir(args.dataset_dir)
        out = {s: (rows, f"--dataset_dir {args.dataset_dir} ({s})") for s, rows in found.items()}
    else:
        out = {}
        for split in tasks.SPLITS:
            path = getattr(args, f"{split}_file")
            if path:
                out[split] = (tasks.read_rows(path, f"--{split}_file"), f"--{split}_file {path}")
    n = args.validation_from_train
    if n:
        if "train" not in out:
            raise UsageError(f"--validation_from_train {n}: there is no training split to take it from")
        rows, source = out["train"]
        if n >= len(rows):
            raise UsageError(f"--validation_from_train {n}: the training split has only {len(rows)} examples")
        held = set(data.take_fraction(list(range(len(rows))), n / len(rows))[:n])
        out["validation"] = ([r for i, r in enumerate(rows) if i in held], f"{source} (held-out part)")
        out["train"] = ([r for i, r in enumerate(rows) if i not in held], source)
    if "validation" not in out:
        raise UsageError(f"--dataset_dir {args.dataset_dir}: has no validation split (it has: {', '.join(out)}); "
                         "give --validation_from_train N")
    if "train" in out:
        rows, source = out["train"]
        out["train"] = (data.take_fraction(rows, args.train_fraction), source)
    return out


@dataclass(kw_only=True)
class ClassifierDataArgs(TaskDataArgs):
    text_column: str | None = field(default=None, metadata={"help": "column of the text (default: sentence or content)"})
    label_column: str = field(default="label", metadata={"help": "column of the label (an integer id or a label name)"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per example (longer texts are cut)"})
    select_on: Literal["accuracy", "macro_f1"] = field(default="accuracy", metadata={
        "help": "validation metric whose best value chooses the checkpoint"})


def check_classifier_data(args: ClassifierDataArgs):
    check_task_data(args)
    if args.max_seq_length < 4:
        raise UsageError(f"--max_seq_length {args.max_seq_length}: must be at least 4")


def labelled_splits(args: ClassifierDataArgs) -> dict[str, tuple[list[str], list[str], str]]:
    """{split: (texts, label strings, source)}; a missing column is a one-line error."""
    out = {}
    for split, (rows, source) in load_splits(args).items():
        text = tasks.pick_column(rows, args.text_column, tasks.TEXT_COLUMNS, "--text_column", source)
        label = tasks.pick_column(rows, args.label_column, (), "--label_column", source)
        out[split] = (tasks.column_values(rows, text, source), tasks.column_values(rows, label, source), source)
    return out


def classification_batches(splits: dict, id2label: dict, tokenizer, max_length: int, batch_size: int, seed: int,
                           teacher_tokenizer=None) -> dict:
    """{split: Batches}: training batches shuffled per epoch, held-out splits in a fixed order
    sorted by length (less padding; metrics do not depend on the order). With a
    `teacher_tokenizer` each example also carries the teacher's token ids."""
    pad_id = tokenizer.pad_token_id
    teacher_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer is not None else None
    collate = tasks.ClassificationCollator(pad_id, teacher_pad)
    out = {}
    for split, (texts, labels, source) in splits.items():
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        y = tasks.label_ids(labels, id2label, source)
        examples = [(a, b) for a, b in zip(ids, y)]
        if teacher_tokenizer is not None:
            t_ids = teacher_tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
            examples = [(*e, t) for e, t in zip(examples, t_ids)]
        if split == "train":
            out[split] = data.Batches(examples, batch_size, collate, seed=seed)
        else:
            examples.sort(key=lambda e: len(e[0]))
            out[split] = data.Batches(examples, batch_size, collate, seed=seed, shuffle=False)
    return out


def check_padding(tokenizer, flag: str, name: str):
    """Dynamic padding needs a padding token (GPT-style tokenizers may lack one)."""
    if tokenizer.pad_token_id is None:
        raise UsageError(f"{flag} {name}: its tokenizer has no padding token; save it with one (e.g. pad_token = eos_token)")


def is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def declared_labels(name: str, config) -> int | None:
    """The label count a model folder declares (a classifier, or a config.json that names its
    labels); None for an encoder whose head will be new."""
    import json

    raw = json.loads((Path(name) / "config.json").read_text()) if (Path(name) / "config.json").is_file() else {}
    if is_classifier(config) or "id2label" in raw or "num_labels" in raw:
        return config.num_labels
    return None


def write_card(folder: Path, job: str, args, title: str, about: list[str], method: list[str], data_lines: list[str],
               table_title: str, table: str, extra: list[str] = ()):
    """README.md in a model folder: what was made, how, on which data, the results, the command."""
    lines = [f"# {title}", "", *about, "", "## Method", "", *(f"- {m}" for m in method), "",
             "## Data", "", *(f"- {d}" for d in data_lines), "", f"## {table_title}", "", table, "", *extra,
             "## Reproduce", "", "```bash", command_line(f"jobs/{job}.py", args), "```", ""]
    results.atomic_write(folder / "README.md", lambda tmp: tmp.write_text("\n".join(lines)))


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


def validation_scores(model, batches, device, select_on: str) -> dict:
    """The held-out numbers the training loop logs; `selection_error` (1 - the --select_on
    metric, lower is better) chooses the checkpoint."""
    from sitra.evaluate import classification_metrics

    m = classification_metrics(model, batches, device)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "ce": m["ce"], "selection_error": 1 - m[select_on]}


def classifier_table(models: dict, batches: dict, device) -> dict:
    """{model: {validation_accuracy, validation_macro_f1, [test_...], parameters, examples_per_s}};
    examples/s is timed on the validation split, every model on the same batches in turn."""
    from sitra.evaluate import compare_classifiers

    table, speed = {n: {} for n in models}, {}
    for split in ("validation", "test"):
        if split in batches:
            for n, m in compare_classifiers(models, batches[split], device, desc=f"evaluating on {split}").items():
                table[n].update({f"{split}_accuracy": m["accuracy"], f"{split}_macro_f1": m["macro_f1"]})
                speed.setdefault(n, {"parameters": m["parameters"], "examples_per_s": m["examples_per_s"]})
    return {n: table[n] | speed[n] for n in models}


def flat(table: dict) -> dict:
    """{model/metric: value} for the HDF5 log's final numbers."""
    return {f"{n}/{k}": v for n, m in table.items() for k, v in m.items()}
