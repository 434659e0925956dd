"""Causal-LM distillation step, sitra's `distill_pythia` with default flags vs TRL's GKDTrainer.

The setup of the causal rows of BENCHMARKS.md: a random GPT-NeoX teacher of 4 layers x 256 and a
random student of 2 x 128 (vocabulary 50,304, built here; speed does not depend on the weights),
batches of 8 examples of at most 256 tokens, AdamW at lr 1e-4. Text: the WikiText-2 validation
split (one sentence a line), whose consecutive sentences are joined into paragraphs of 1-8
sentences (seeded), one paragraph an example; a byte-level BPE tokenizer trained on that text,
its vocabulary filled up to 50,304 ids with unused tokens, so both sides compute all 50,304 logits.
Without the WikiText-2 files the built-in Python-docs paragraphs are used (and the script says so).

- sitra: `distill_pythia --teacher T --student S --train_file F --eval_file E --max_seq_length 256
  --batch_size 8 --max_steps N`: nothing else, so its default batching (length-grouped, padded to
  the longest line of the batch), loss (forward KL at T 1 plus CE, 0.5 each) and chunked logits.
- TRL: `GKDTrainer` with lmbda 0 and beta 0 (off-policy forward KL), the same models, examples,
  batch, steps and learning rate, every example padded to 256 as in BENCHMARKS.md (its default
  collator expects chat messages; plain text needs a collator, and this one pads to max_length).

Each side runs in a fresh process with `MALLOC_MMAP_THRESHOLD_=131072`, the two interleaved for
--rounds rounds. Per run: non-pad tokens/s (the median over the steps after the first two of
non-pad tokens / step wall time; sitra's from its own log, TRL's timed by a callback around its
steps, tokens counted in compute_loss), the same per CPU-second of the process (steadier than wall
time on a machine other work shares), the padding share of the batches it trained on, the peak RSS
of the training phase (VmHWM reset as training starts: model loading and sitra's perplexity tables
before and after are not in it, its held-out loss at the start and end is) and of the whole
process, in MiB.

Needs TRL beside sitra (`pip install trl` once torch is installed). Run (about 15 minutes on 2 busy CPU cores):

    python benchmarks/causal_kd.py

Quick smoke test:

    python benchmarks/causal_kd.py --steps 4 --rounds 1 --paragraphs 200

Targets: sitra at least 2x TRL's non-pad tokens/s at no more than half its peak RSS.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

VOCAB, MAX_LEN, BATCH, LR = 50_304, 256, 8, 1e-4
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2"


def status(key: str) -> int:
    """A field of /proc/self/status, in KiB."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> float:
    """The peak so far (MiB); then VmHWM := VmRSS, so the next reading is the peak of what follows."""
    before = status("VmHWM") / 1024
    Path("/proc/self/clear_refs").write_text("5")
    return before


# ---------------------------------------------------------------------------------------------
# inputs (built once by the parent)


def paragraphs(n: int, seed: int) -> tuple[list[str], list[str], str]:
    """(training paragraphs, held-out paragraphs, source): 1-8 consecutive sentences joined."""
    if (WIKITEXT / "valid.txt").exists():
        train_lines = (WIKITEXT / "valid.txt").read_text().splitlines()
        held_lines = (WIKITEXT / "test.txt").read_text().splitlines()[:120]
        source = "WikiText-2 validation split"
    else:
        from sitra.data.text import python_docs_paragraphs

        lines = python_docs_paragraphs()
        train_lines, held_lines, source = lines[:-40], lines[-40:], "the built-in Python-docs corpus (WikiText-2 is absent)"
        print(f"{WIKITEXT} is absent: using {source}")
    rng = np.random.default_rng(seed)

    def join(lines):
        out, i = [], 0
        lines = [x.strip() for x in lines if x.strip()]
        while i < len(lines):
            k = int(rng.integers(1, 9))
            out.append(" ".join(lines[i:i + k]))
            i += k
        return out

    return join(train_lines)[:n], join(held_lines), source


def build_tokenizer(folder: Path, lines: list[str]):
    """Byte-level BPE trained on the text, its vocabulary filled up to VOCAB ids with unused tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(VOCAB - len(vocab)):
        vocab[f"<|unused{i}|>"] = len(vocab)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert len(fast) == VOCAB, len(fast)
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, tokenizer, layers: int, hidden: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=4 * hidden, max_position_embeddings=2 * MAX_LEN,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------
# the two sides (each in its own process)


def median_rate(rates) -> float:
    rates = list(rates)
    return statistics.median(rates[2:] if len(rates) > 2 else rates)


def run_sitra(work: Path, steps: int) -> dict:
    import types

    import sitra.train
    from sitra.recipes import distill_pythia
    from sitra.results import read_log

    measured, clock = {}, []

    def perf_counter():  # the training loop's step clock, read with the process's CPU time beside it
        now = time.perf_counter()
        clock.append((now, time.process_time()))
        return now

    sitra.train.time = types.SimpleNamespace(perf_counter=perf_counter)
    real_train = distill_pythia.train

    def train(module, batches, *rest, **kw):  # the training phase: its peak, and the batches it read
        measured["peak_before_train_mib"] = reset_peak()
        measured["rss_before_train_mib"] = status("VmRSS") / 1024
        got = real_train(module, batches, *rest, **kw)
        measured["train_peak_mib"] = status("VmHWM") / 1024
        masks = [b["attention_mask"] for _, b in zip(range(steps), batches.epoch(0))]
        measured["padding"] = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        return got

    distill_pythia.train = train
    args = distill_pythia.DistillLMArgs(teacher=str(work / "teacher"), student=str(work / "student"),
                                        train_file=str(work / "train.txt"), eval_file=str(work / "eval.txt"),
                                        max_seq_length=MAX_LEN, batch_size=BATCH, max_steps=steps,
                                        storage_directory=str(work / f"sitra{os.getpid()}"))
    run = distill_pythia.run(args)
    rates = read_log(run.log_path)["train"]["tokens_per_s"]
    # the loop reads the clock at the start, then at each step's end and the next step's start
    spans = [(clock[2 * i], clock[2 * i + 1]) for i in range(len(rates))]
    cpu_rates = [r * (end[0] - start[0]) / (end[1] - start[1]) for r, (start, end) in zip(rates, spans)]
    return measured | {"tokens_per_s": median_rate(rates), "tokens_per_cpu_s": median_rate(cpu_rates)}


def run_trl(work: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(work / "teacher")
    lines = [x for x in (work / "train.txt").read_text().splitlines() if x.strip()]
    ids = [x for x in tokenizer(lines, truncation=True, max_length=MAX_LEN)["input_ids"] if len(x) >= 2]

    def collate(examples):
        out = tokenizer.pad({"input_ids": [e["input_ids"] for e in examples]}, padding="max_length", max_length=MAX_LEN,
                            return_tensors="pt")
        out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return out

    tokens, ends, seen = [], [], []  # ends: (wall, CPU) clock at the start and after each step

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                tokens.append(int(inputs["attention_mask"].sum()))
                seen.append(inputs["attention_mask"].numel())
            return super().compute_loss(model, inputs, *a, **kw)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            if not ends:
                ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **kw):
            ends.append((time.perf_counter(), time.process_time()))

    config = GKDConfig(output_dir=str(work / f"trl{os.getpid()}"), per_device_train_batch_size=BATCH, max_steps=steps,
                       learning_rate=LR, lmbda=0.0, beta=0.0, max_length=MAX_LEN, save_strategy="no", report_to=[],
                       logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, use_cpu=True, seed=0)
    trainer = Counting(model=AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32),
                       teacher_model=AutoModelForCausalLM.from_pretrained(work / "teacher", dtype=torch.float32),
                       args=config, data_collator=collate, train_dataset=Dataset.from_dict({"input_ids": ids}),
                       processing_class=tokenizer, callbacks=[Clock()])
    measured = {"peak_before_train_mib": reset_peak(), "rss_before_train_mib": status("VmRSS") / 1024}
    trainer.train()
    measured["train_peak_mib"] = status("VmHWM") / 1024
    rates = [n / (b[0] - a[0]) for n, a, b in zip(tokens, ends, ends[1:])]
    cpu_rates = [n / (b[1] - a[1]) for n, a, b in zip(tokens, ends, ends[1:])]
    return measured | {"tokens_per_s": median_rate(rates), "tokens_per_cpu_s": median_rate(cpu_rates),
                       "padding": 1 - sum(tokens) / sum(seen)}


def worker(side: str, work: Path, steps: int):
    got = (run_sitra if side == "sitra" else run_trl)(work, steps)
    print("RESULT " + json.dumps(got | {"process_peak_mib": max(got["peak_before_train_mib"], status("VmHWM") / 1024)}))


# ---------------------------------------------------------------------------------------------


def spawn(side: str, work: Path, steps: int) -> dict:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--worker", side, "--work", str(work), "--steps", str(steps)],
                         env=env, capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        sys.exit(f"{side} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs of each side")
    p.add_argument("--paragraphs", type=int, default=0, help="training paragraphs (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=("sitra", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--work", help="folder for the models and text (default: a temporary one)")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.work), args.steps)
    if args.rounds < 1 or args.steps < 3:
        sys.exit("--rounds must be at least 1 and --steps at least 3 (the first two steps are warm-up)")
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("TRL is not installed: pip install trl")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        train, held_out, source = paragraphs(args.paragraphs or 10**9, args.seed)
        (work / "train.txt").write_text("\n".join(train))
        (work / "eval.txt").write_text("\n".join(held_out))
        tokenizer = build_tokenizer(work / "tokenizer", train)
        build_model(work / "teacher", tokenizer, 4, 256, 0)
        build_model(work / "student", tokenizer, 2, 128, 1)
        lengths = [min(len(x), MAX_LEN) for x in tokenizer(train)["input_ids"]]
        print(f"text: {len(train):,} paragraphs of {source}, median {statistics.median(lengths):.0f} tokens "
              f"(mean {statistics.mean(lengths):.0f}, {np.mean(np.asarray(lengths) == MAX_LEN):.1%} cut at {MAX_LEN})")
        results = {"sitra": [], "trl": []}
        for r in range(args.rounds):
            for side in ("trl", "sitra") if r % 2 else ("sitra", "trl"):
                got = spawn(side, work, args.steps)
                results[side].append(got)
                print(f"round {r + 1} {side:5s}: {got['tokens_per_s']:7.0f} non-pad tokens/s, "
                      f"{got['tokens_per_cpu_s']:5.0f} per CPU-second, padding {got['padding']:.1%}, "
                      f"training peak {got['train_peak_mib']:,.0f} MiB RSS, process peak {got['process_peak_mib']:,.0f} MiB",
                      flush=True)

    def summary(side):
        rs = results[side]
        return (statistics.median(x["tokens_per_s"] for x in rs), statistics.mean(x["padding"] for x in rs),
                max(x["train_peak_mib"] for x in rs), max(x["process_peak_mib"] for x in rs),
                statistics.median(x["tokens_per_cpu_s"] for x in rs))

    s, t = summary("sitra"), summary("trl")
    print(f"\n| batch {BATCH} x {MAX_LEN}, {args.steps} steps, {args.rounds} interleaved runs each | non-pad tokens/s "
          "| non-pad tokens per CPU-second | padding | training peak RSS | process peak RSS |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| sitra `distill_pythia` (default flags) | {s[0]:,.0f} | {s[4]:,.0f} | {s[1]:.1%} | {s[2]:,.0f} MiB | {s[3]:,.0f} MiB |")
    print(f"| TRL `GKDTrainer` (lmbda 0, beta 0, padded to {MAX_LEN}) | {t[0]:,.0f} | {t[4]:,.0f} | {t[1]:.1%} | {t[2]:,.0f} MiB "
          f"| {t[3]:,.0f} MiB |")
    print(f"| sitra / TRL | {s[0] / t[0]:.2f}x | {s[4] / t[4]:.2f}x | | {s[2] / t[2]:.2f}x | {s[3] / t[3]:.2f}x |")
    fast, small = s[0] / t[0] >= 2, s[3] / t[3] <= 0.5
    print(f"\ntarget >= 2x tokens/s: {'met' if fast else 'missed'} ({s[4] / t[4]:.2f}x per CPU-second); "
          f"<= 1/2 peak RSS (whole process): {'met' if small else 'missed'}")


if __name__ == "__main__":
    main()
