"""Task data: labelled sentences and (document, summary) pairs from GLUE-style TSV, CSV, JSONL or a
`datasets` folder, their label ids, prompts with masked labels, and the collators that pad them."""
import csv
import json
from pathlib import Path

import torch

from sitra.errors import UsageError
from sitra.data.mlm import pad

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
