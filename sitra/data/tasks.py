"""Task data: labelled sentences and (document, summary) pairs from GLUE-style TSV, CSV, JSONL or a
`datasets` folder, their label ids, prompts with masked labels, and the collators that pad them."""
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sitra.data.mlm import Batches, pad
from sitra.data.text import take_fraction
from sitra.errors import UsageError

SPLITS = ("train", "validation", "test")
TEXT_COLUMNS = ("sentence", "content")  # GLUE SST-2 train.tsv has `sentence`, some dev.tsv copies `content`


def read_rows(path: str, flag: str) -> list[dict]:
    """The rows of a .tsv (GLUE: tab-separated, no quoting), .csv or .jsonl file as dicts."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    suffix = p.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl", ".json"):
        raise UsageError(f"{flag} {path}: unknown format {suffix or '(no suffix)'}; give a .tsv, .csv or .jsonl file")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            if suffix == ".tsv":
                rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            elif suffix == ".csv":
                rows = list(csv.DictReader(f))
            else:
                rows = [json.loads(line) for line in f if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise UsageError(f"{flag} {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"{flag} {path}: no rows (a header line and one row per example, or one JSON object a line)")
    return rows


def read_dataset_dir(path: str, flag: str = "--dataset_dir") -> dict[str, list[dict]]:
    """{split: rows} of a DatasetDict saved with `save_to_disk`."""
    import datasets

    if not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: no such folder")
    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"{flag} {path}: not a datasets folder ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(ds, datasets.DatasetDict):
        raise UsageError(f"{flag} {path}: holds one split; save a DatasetDict with {', '.join(SPLITS)} splits")
    return {split: ds[split].to_list() for split in SPLITS if split in ds}


def pick_column(rows: list[dict], wanted: str | None, candidates: tuple, flag: str, source: str) -> str:
    """The column `wanted` (given by `flag`), or the first of `candidates` the rows have."""
    have = list(rows[0])
    if wanted is not None:
        if wanted not in have:
            raise UsageError(f"{flag} {wanted}: {source} has no such column (it has: {', '.join(map(str, have))})")
        return wanted
    for name in candidates:
        if name in have:
            return name
    raise UsageError(f"{source}: no {' or '.join(candidates)} column (it has: {', '.join(map(str, have))}); "
                     f"name it with {flag}")


def column_values(rows: list[dict], column: str, source: str) -> list[str]:
    values = []
    for i, r in enumerate(rows):
        v = r.get(column)
        if v is None:
            raise UsageError(f"{source}: row {i + 1} has no {column!r} value")
        values.append(str(v))
    return values


def label_names(labels: list[str]) -> dict[int, str]:
    """id2label of a new classifier from its training labels: integers 0..max keep their values,
    other names are sorted."""
    if all(x.strip().lstrip("-").isdigit() for x in labels):
        values = sorted({int(x) for x in labels})
        if values[0] < 0:
            raise UsageError(f"label {values[0]}: integer labels must be 0 or more")
        return {i: str(i) for i in range(values[-1] + 1)}
    return dict(enumerate(sorted(set(labels))))


def label_ids(labels: list[str], id2label: dict, source: str) -> list[int]:
    """Label ids under a model's id2label: a label is its name there, or an integer id in range."""
    n = len(id2label)
    by_name = {str(name): int(i) for i, name in id2label.items()}
    out = []
    for x in labels:
        x = x.strip()
        if x in by_name:
            out.append(by_name[x])
        elif x.lstrip("-").isdigit() and 0 <= int(x) < n:
            out.append(int(x))
        else:
            raise UsageError(f"{source}: label {x!r} is not one of the model's {n} labels "
                             f"({', '.join(str(id2label[i]) for i in sorted(id2label))} or ids 0-{n - 1})")
    return out


class ClassificationCollator:
    """Pads each batch to its longest example (dynamic padding).

    An example is (token ids, label) or (token ids, label, teacher token ids) when the teacher
    has a tokenizer of its own; those come back as teacher_input_ids / teacher_attention_mask.
    """

    def __init__(self, pad_id: int, teacher_pad_id: int | None = None):
        self.pad_id, self.teacher_pad_id = pad_id, teacher_pad_id

    def __call__(self, examples: list[tuple], generators=None) -> dict:
        input_ids, attention_mask = pad([e[0] for e in examples], self.pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": torch.tensor([e[1] for e in examples], dtype=torch.long)}
        if len(examples[0]) > 2:
            batch["teacher_input_ids"], batch["teacher_attention_mask"] = pad([e[2] for e in examples], self.teacher_pad_id)
        return batch


def split_template(template: str, flag: str = "--prompt_template") -> tuple[str, str]:
    """(text before, text after) the one `{document}` of a prompt template."""
    if template.count("{document}") != 1:
        raise UsageError(f"{flag} {template!r}: must contain {{document}} exactly once")
    before, after = template.split("{document}")
    return before, after


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every text with its BOS token (Llama does, GPT-NeoX does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def encode_prompt(tokenizer, template: str, document: str, max_length: int) -> list[int]:
    """Token ids of the template around the document; the document is cut so that the whole
    prompt fits in `max_length` and the template's ending (e.g. `Summary:`) is always kept."""
    before, after = split_template(template)
    head = ([tokenizer.bos_token_id] if adds_bos(tokenizer) else []) + tokenizer(before, add_special_tokens=False)["input_ids"]
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    body = tokenizer(document, add_special_tokens=False)["input_ids"]
    room = max(0, max_length - len(head) - len(tail))
    return head + body[:room] + tail


def summary_example(prompt_ids: list[int], summary_ids: list[int], eos_id: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one training pair: the prompt, the summary and an EOS; labels are
    -100 on the prompt (not learned) and the token itself on the summary and the EOS."""
    target = list(summary_ids) + [eos_id]
    return list(prompt_ids) + target, [-100] * len(prompt_ids) + target


class SummaryCollator:
    """Right-pads (input_ids, labels) pairs: padding is out of the attention mask and its labels
    are -100, so neither the loss nor the KD term sees it."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[tuple], generators=None) -> dict:
        input_ids, attention_mask = pad([e[0] for e in examples], self.pad_id)
        labels, _ = pad([e[1] for e in examples], -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
    files = {s: getattr(args, f"{s}_file") for s in SPLITS}
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
        found = read_dataset_dir(args.dataset_dir)
        out = {s: (rows, f"--dataset_dir {args.dataset_dir} ({s})") for s, rows in found.items()}
    else:
        out = {}
        for split in SPLITS:
            path = getattr(args, f"{split}_file")
            if path:
                out[split] = (read_rows(path, f"--{split}_file"), f"--{split}_file {path}")
    n = args.validation_from_train
    if n:
        if "train" not in out:
            raise UsageError(f"--validation_from_train {n}: there is no training split to take it from")
        rows, source = out["train"]
        if n >= len(rows):
            raise UsageError(f"--validation_from_train {n}: the training split has only {len(rows)} examples")
        held = set(take_fraction(list(range(len(rows))), n / len(rows))[:n])
        out["validation"] = ([r for i, r in enumerate(rows) if i in held], f"{source} (held-out part)")
        out["train"] = ([r for i, r in enumerate(rows) if i not in held], source)
    if "validation" not in out:
        raise UsageError(f"--dataset_dir {args.dataset_dir}: has no validation split (it has: {', '.join(out)}); "
                         "give --validation_from_train N")
    if "train" in out:
        rows, source = out["train"]
        out["train"] = (take_fraction(rows, args.train_fraction), source)
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
        text = pick_column(rows, args.text_column, TEXT_COLUMNS, "--text_column", source)
        label = pick_column(rows, args.label_column, (), "--label_column", source)
        out[split] = (column_values(rows, text, source), column_values(rows, label, source), source)
    return out


def classification_batches(splits: dict, id2label: dict, tokenizer, max_length: int, batch_size: int, seed: int,
                           teacher_tokenizer=None) -> dict:
    """{split: Batches}: training batches shuffled per epoch, held-out splits in a fixed order
    sorted by length (less padding; metrics do not depend on the order). With a
    `teacher_tokenizer` each example also carries the teacher's token ids."""
    pad_id = tokenizer.pad_token_id
    teacher_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer is not None else None
    collate = ClassificationCollator(pad_id, teacher_pad)
    out = {}
    for split, (texts, labels, source) in splits.items():
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        y = label_ids(labels, id2label, source)
        examples = [(a, b) for a, b in zip(ids, y)]
        if teacher_tokenizer is not None:
            t_ids = teacher_tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
            examples = [(*e, t) for e, t in zip(examples, t_ids)]
        if split == "train":
            out[split] = Batches(examples, batch_size, collate, seed=seed)
        else:
            examples.sort(key=lambda e: len(e[0]))
            out[split] = Batches(examples, batch_size, collate, seed=seed, shuffle=False)
    return out


def check_padding(tokenizer, flag: str, name: str):
    """Dynamic padding needs a padding token (GPT-style tokenizers may lack one)."""
    if tokenizer.pad_token_id is None:
        raise UsageError(f"{flag} {name}: its tokenizer has no padding token; save it with one (e.g. pad_token = eos_token)")
