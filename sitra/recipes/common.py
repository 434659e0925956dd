"""Argument groups and checks that several jobs share."""
from dataclasses import dataclass, field
from pathlib import Path

from sitra import data
from sitra.cli import UsageError
from sitra.data.text import BUILTIN


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
    if not 0 < args.percentage_data <= 1:
        raise UsageError(f"--percentage_data {args.percentage_data}: must be in (0, 1]")
    if not 0 < args.mlm_probability < 1:
        raise UsageError(f"--mlm_probability {args.mlm_probability}: must be in (0, 1)")
    if args.max_seq_length < 8:
        raise UsageError(f"--max_seq_length {args.max_seq_length}: must be at least 8")
    for flag in ("train_file", "eval_file"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise UsageError(f"--{flag} {path}: no such file")


def text_batches(args: TextDataArgs, tokenizer, batch_size: int, seed: int, need_train: bool = True):
    """(train batches or None, held-out batches with fixed masks) of tokenised, masked text."""
    train_lines, eval_lines = data.load_texts(args.dataset_name, args.dataset_config, args.train_file, args.eval_file)
    collate = data.MLMCollator(tokenizer, args.mlm_probability)
    held_out = data.tokenize_lines(data.take_fraction(eval_lines, args.percentage_data), tokenizer, args.max_seq_length)
    if not held_out:
        raise UsageError("the held-out text is empty: give --eval_file or more data")
    eval_batches = data.Batches(held_out, batch_size, collate, seed=seed, shuffle=False)
    if not need_train:
        return None, eval_batches
    train = data.tokenize_lines(data.take_fraction(train_lines, args.percentage_data), tokenizer, args.max_seq_length)
    if not train:
        raise UsageError("the training text is empty: give --train_file or more data")
    return data.Batches(train, batch_size, collate, seed=seed), eval_batches


def check_block(block, num_layers: int, flag: str = "--block", needs_successor: bool = False):
    last = num_layers - 2 if needs_successor else num_layers - 1
    if block is None:
        raise UsageError(f"{flag} is required: a layer index 0-{last}")
    if not 0 <= block <= last:
        why = " (it needs a following layer)" if needs_successor else ""
        raise UsageError(f"{flag} {block}: the teacher has {num_layers} layers, allowed 0-{last}{why}")


def student_shape(hidden_size: int, heads: int, d_k: int | None) -> tuple[int, int]:
    """(heads, d_k) of a student block; d_k defaults to hidden_size / heads."""
    if heads < 1:
        raise UsageError(f"--block_heads {heads}: must be at least 1")
    if d_k is None:
        if hidden_size % heads:
            divisors = [h for h in range(1, hidden_size + 1) if hidden_size % h == 0 and h <= 64]
            raise UsageError(f"--block_heads {heads} does not divide the hidden size {hidden_size}: "
                             f"give --block_d_k or use one of {', '.join(map(str, divisors))}")
        d_k = hidden_size // heads
    if d_k < 1:
        raise UsageError(f"--block_d_k {d_k}: must be at least 1")
    return heads, d_k
