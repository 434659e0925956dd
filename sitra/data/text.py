"""Text corpora: WikiText through `datasets`, local text files, and a built-in offline corpus."""
from dataclasses import dataclass, field
from pathlib import Path

from sitra.args import check_values
from sitra.errors import UsageError

BUILTIN = "python-docs"  # English prose that every CPython ships (pydoc's help topics)


def python_docs_paragraphs() -> list[str]:
    """The prose paragraphs of CPython's help topics text, one string each (about 1,100)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for _, text in sorted(topics.items()):
        for block in text.split("\n\n"):
            words = block.split()
            if len(words) >= 8 and not block.startswith(("   ", ">>>")):  # prose, not code
                paragraphs.append(" ".join(words))
    return paragraphs


def _read_lines(path: str, flag: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: cannot read ({e.__class__.__name__}: {e})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"{flag} {path}: no text lines in the file")
    return lines


def load_texts(dataset_name: str, dataset_config: str | None, train_file: str | None,
               eval_file: str | None) -> tuple[list[str], list[str]]:
    """(train lines, held-out lines). Local files win over `dataset_name`.

    With a train file but no eval file, or with the built-in corpus, every tenth line is held out.
    """
    if train_file or eval_file:
        if not train_file:
            return [], _read_lines(eval_file, "--eval_file")
        train = _read_lines(train_file, "--train_file")
        if eval_file:
            return train, _read_lines(eval_file, "--eval_file")
        return _every_tenth_held_out(train)
    if dataset_name == BUILTIN:
        return _every_tenth_held_out(python_docs_paragraphs())
    return _hub_texts(dataset_name, dataset_config)


def _every_tenth_held_out(lines):
    return ([t for i, t in enumerate(lines) if i % 10 != 9],
            [t for i, t in enumerate(lines) if i % 10 == 9])


def _hub_texts(name, config):
    import datasets

    try:
        ds = datasets.load_dataset(name, config)
    except (ConnectionError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"--dataset_name {name}: cannot load it ({first}); give --train_file/--eval_file "
            f"or --dataset_name {BUILTIN}"
        ) from None
    held_out = "validation" if "validation" in ds else "test"

    def lines(split):
        return [t.strip() for t in ds[split]["text"] if t.strip() and not t.strip().startswith("=")]

    return lines("train"), lines(held_out)


def take_fraction(items: list, fraction: float) -> list:
    """`fraction` of `items`, evenly spread and in order, the same on every call."""
    n = len(items)
    k = max(1, round(n * fraction)) if n else 0
    return [items[(i * n) // k] for i in range(k)]


@dataclass(kw_only=True)
class TextDataArgs:
    """Where masked-language-model text comes from."""
    dataset_name: str = field(default="wikitext", metadata={
        "help": f"datasets hub name, or '{BUILTIN}' for the offline corpus every Python ships"})
    dataset_config: str | None = field(default="wikitext-2-raw-v1", metadata={"help": "datasets config name"})
    train_file: str | None = field(default=None, metadata={"help": "local text file, one example per line"})
    eval_file: str | None = field(default=None, metadata={"help": "local held-out text file, one example per line"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per example (longer lines are cut)"})
    percentage_data: float = field(default=1.0, metadata={"help": "fraction in (0, 1] of the data to use, taken evenly"})
    mlm_probability: float = field(default=0.15, metadata={"help": "fraction of tokens chosen for masking"})


def check_data_args(args: TextDataArgs):
    """The group's ranges and files (sitra.args.check_values), and room for BERT's special tokens."""
    check_values(args, TextDataArgs)
    if args.max_seq_length < 8:
        raise UsageError(f"--max_seq_length {args.max_seq_length}: must be at least 8")
