"""Padding and non-pad tokens/s of Geneformer distillation: length-grouped versus random batches.

What it measures, on a corpus of cells whose gene counts follow a Geneformer-like distribution
(log-normal, median 1,000 genes, cut at 2,048 so about 7% of the cells sit at the maximum, as in
Genecorpus-30M), saved with `datasets` and read back memory-mapped as the job reads it:

- padding: the share of padded positions over a whole epoch of batches of --batch_size cells,
  for random batches (`Batches`), length-grouped batches (`LengthGroupedBatches`, mega-batches of
  --group_size batches sorted by length, then shuffled), and length-grouped batches padded to the
  8 bucket lengths that `--compile` uses;
- tokens/s: real `distill_geneformer` runs (the job itself: masked-only KD loss, AdamW, warm-up
  and cosine) of --steps optimizer steps with random and with length-grouped batches; the figure is
  the median over the steps after the first two of the job's own `tokens_per_s` log (non-pad tokens
  per second of the training step, teacher forward included).

The teacher is a random Geneformer-shaped BertForMaskedLM (vocabulary 25,426, <pad> 0, <mask> 1,
2,048 positions; no Geneformer weights exist offline, and speed does not depend on them); by
default 4 layers x 128 -> student 2 x 64, 8 cells a batch: the setup of the Geneformer-Distilled
figures in BENCHMARKS.md (690 non-pad tokens/s; 1.4% padding per epoch, random batches 40%).

Run (about 15 minutes on 2 busy CPU cores):

    python benchmarks/length_grouping.py

Quick smoke test:

    python benchmarks/length_grouping.py --cells 400 --steps 4 --teacher_hidden 64 --student_hidden 32

Target: at most 1% padding per epoch with length grouping.
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VOCAB, MAX_LENGTH = 25_426, 2048
PADDING_TARGET = 0.01


def gene_counts(n: int, seed: int) -> np.ndarray:
    """Genes per cell: log-normal with median 1,000 and sigma 0.486, so P(> 2,048) is 7%; cut to
    50-2,048."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(1000), 0.486, n)), 50, MAX_LENGTH).astype(int)


def write_corpus(folder: Path, lengths: np.ndarray, seed: int):
    from datasets import Dataset

    rng = np.random.default_rng(seed)

    def cells():
        for n in lengths:
            yield {"input_ids": rng.choice(np.arange(2, VOCAB), size=n, replace=False).astype(np.int32), "length": int(n)}

    Dataset.from_list(list(cells())).save_to_disk(str(folder))


def write_teacher(folder: Path, layers: int, hidden: int):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=MAX_LENGTH, pad_token_id=0,
                        hidden_act="relu", hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)


def padding_table(lengths, batch_size: int, group_size: int, epochs: int = 3) -> dict:
    from sitra.data.cells import bucket_sizes
    from sitra.data.mlm import LengthGroupedBatches, padding_fraction
    from sitra.data.mlm import Batches

    examples = list(range(len(lengths)))
    plain = Batches(examples, batch_size, None, seed=0)
    grouped = LengthGroupedBatches(examples, batch_size, None, lengths, seed=0, group_size=group_size)
    buckets = bucket_sizes(MAX_LENGTH)
    to_bucket = lambda t: next(b for b in buckets if b >= t)  # noqa: E731
    mean = lambda f: statistics.mean(f(e) for e in range(epochs))  # noqa: E731
    return {"random": mean(lambda e: padding_fraction(plain.order(e), lengths, batch_size)),
            "length-grouped": mean(lambda e: padding_fraction(grouped.order(e), lengths, batch_size)),
            "length-grouped, 8 buckets (--compile)": mean(lambda e: padding_fraction(grouped.order(e), lengths, batch_size, to_bucket))}


def tokens_per_s(teacher, corpus, storage, args, grouped: bool) -> float:
    """Median non-pad tokens/s of a real distill_geneformer run (steps after the first two)."""
    from sitra.recipes import distill_geneformer
    from sitra.results import read_log

    run_args = distill_geneformer.DistillGeneformerArgs(
        teacher=str(teacher), data=str(corpus), hidden_size=args.student_hidden, num_hidden_layers=args.student_layers,
        num_attention_heads=4, batch_size=args.batch_size, max_steps=args.steps, warmup_steps=2, max_eval_cells=8,
        eval_steps=args.steps, validation_fraction=0.02, group_by_length=grouped, length_group_size=args.group_size,
        device="cpu", storage_directory=str(storage), run_name="grouped" if grouped else "random")
    run = distill_geneformer.run(run_args)
    rates = read_log(run.log_path)["train"]["tokens_per_s"][2:]
    return float(np.median(rates))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=2000, help="cells in the synthetic corpus")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--group_size", type=int, default=100, help="batches per length-sorted mega-batch")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps timed per variant")
    p.add_argument("--teacher_layers", type=int, default=4)
    p.add_argument("--teacher_hidden", type=int, default=128)
    p.add_argument("--student_layers", type=int, default=2)
    p.add_argument("--student_hidden", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--padding_cells", type=int, default=100_000, help="cells of the padding-only measurement")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    big = gene_counts(args.padding_cells, seed=1)
    padding = padding_table(big, args.batch_size, args.group_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lengths = gene_counts(args.cells, seed=2)
        write_corpus(tmp / "corpus", lengths, seed=3)
        write_teacher(tmp / "teacher", args.teacher_layers, args.teacher_hidden)
        speed = {grouped: tokens_per_s(tmp / "teacher", tmp / "corpus", tmp, args, grouped) for grouped in (False, True)}
    print(f"\ncells: median {int(np.median(big))} genes, {np.mean(big == MAX_LENGTH):.1%} at {MAX_LENGTH}; "
          f"batch {args.batch_size} cells; mega-batches of {args.group_size} batches; teacher {args.teacher_layers} x "
          f"{args.teacher_hidden} -> student {args.student_layers} x {args.student_hidden}, vocabulary {VOCAB:,}; "
          f"{args.threads} threads\n")
    rows = ["| batching | padding per epoch | non-pad tokens/s |", "| --- | --- | --- |"]
    rows.append(f"| random | {padding['random']:.1%} | {speed[False]:,.0f} |")
    rows.append(f"| length-grouped | {padding['length-grouped']:.2%} | {speed[True]:,.0f} |")
    rows.append(f"| length-grouped, 8 buckets (--compile) | {padding['length-grouped, 8 buckets (--compile)']:.1%} | - |")
    print("\n".join(rows))
    ok = padding["length-grouped"] <= PADDING_TARGET
    print(f"\nlength-grouped / random: padding {padding['length-grouped'] / padding['random']:.3f}x, "
          f"tokens/s {speed[True] / speed[False]:.2f}x; padding target <= {PADDING_TARGET:.0%}: {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
