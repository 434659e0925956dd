"""Causal-LM distillation online against distillation from recorded teacher logits, side by side.

What it runs, all on the same data, pair and flags (packed blocks, forward KL at --temperature,
alpha 0.5, the same seed and number of optimizer steps):

- online:           `distill_pythia --teacher T`: the teacher runs forward on every batch
- records, top-k:   `record_teacher --top_k K` once, then `distill_pythia --teacher_logits DIR`
                    (sparse KL: the k recorded terms plus the missing-mass term)
- records, sampled: `record_teacher --teacher_logits_sampling random --top_k K` once, then
                    `distill_pythia --teacher_logits DIR --teacher_logits_sampling random`
                    (K draws from the teacher per token: unbiased gradients)

and reports per variant: the step time (median over the steps after the first two of the job's own
tokens/s log, as ms per step of batch x length tokens), the peak memory of the job (each job runs
`run(args)` in a fresh process started with MALLOC_MMAP_THRESHOLD_=131072; after the imports the
peak is reset, and the figure is the high-water mark VmHWM minus the resident size then: models,
data, activations and records, not the libraries; see BENCHMARKS.md), the bytes per token of the
records on disk, the one-off recording time, the teacher forwards of training, and the held-out
(sliding-window) perplexity each student reaches after the same steps.

The pair: a GPT-NeoX teacher (default 4 layers x 192) first trained for --teacher_steps steps of
plain next-token cross-entropy on the training text (a random teacher has nothing to teach), and
a random 2 x 96 student; a byte-level BPE tokenizer of --vocab ids trained on the same text. Text:
WikiText-2 validation as training text and test as held-out text from ../shared, or the built-in
corpus where ../shared is absent.

Every job runs with one torch thread (--threads): on a machine whose cores other work also uses,
two threads per small op wait on each other and run several times slower than one.

Run (about 15 minutes on 2 busy CPU cores):

    python benchmarks/teacher_records.py

Quick smoke test:

    python benchmarks/teacher_records.py --steps 6 --teacher_steps 10 --lines 400
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2"


def texts(lines: int) -> tuple[list[str], list[str], str]:
    if (WIKITEXT / "valid.txt").exists():
        read = lambda name: [t.strip() for t in (WIKITEXT / name).read_text().splitlines() if t.strip()]  # noqa: E731
        return read("valid.txt")[:lines], read("test.txt")[: max(lines // 8, 50)], "WikiText-2 (valid -> train, test -> held out)"
    from sitra.data import python_docs_paragraphs

    p = python_docs_paragraphs()
    print("../shared/data/wikitext2 is absent: using the built-in Python-docs corpus instead")
    return p[:-100][:lines], p[-100:], "built-in Python-docs corpus"


def build_tokenizer(folder: Path, lines: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def neox(tokenizer, layers: int, hidden: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=512,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def pretrain_teacher(model, tokenizer, lines: list[str], args):
    """Plain next-token cross-entropy on packed blocks: a teacher that knows the text a little."""
    import torch

    from sitra.data import causal_texts

    blocks = torch.tensor([b for b in causal_texts(lines, tokenizer, args.max_seq_length, True) if len(b) == args.max_seq_length])
    opt = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    started = time.time()
    for step in range(args.teacher_steps):
        batch = blocks[torch.randint(len(blocks), (args.batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == args.teacher_steps - 1:
            print(f"teacher pre-training step {step}: loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    return model.eval()


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(job_name: str, argv: list[str]):
    """In a fresh process: run one job's `run(args)`, print its wall time and peak memory above
    the resident size after the imports (VmHWM reset where the kernel allows it)."""
    import importlib
    import json

    from sitra.cli import parse

    module = importlib.import_module(f"sitra.recipes.{job_name}")
    args = parse(module.ARGS, argv)
    before = proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    started = time.time()
    module.run(args)
    print("MEASURED " + json.dumps({"seconds": time.time() - started, "peak_mib": (proc_status_kib("VmHWM") - before) / 1024}))


def job(name: str, flags: dict, threads: int) -> dict:
    """Run the job `name` with flags in a fresh process: {seconds, peak_mib}."""
    import json

    argv = [sys.executable, __file__, "--child", name]
    for k, v in flags.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not None:
            argv += [f"--{k}", str(v)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("MEASURED "))[9:])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("shard-*.safetensors"))


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every student")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--top_k", type=int, default=64, help="recorded ids (top-k) or draws (sampled) per token")
    p.add_argument("--vocab", type=int, default=4096, help="ids of the BPE tokenizer")
    p.add_argument("--lines", type=int, default=4000, help="training lines of the text")
    p.add_argument("--teacher_layers", type=int, default=4)
    p.add_argument("--teacher_hidden", type=int, default=192)
    p.add_argument("--student_layers", type=int, default=2)
    p.add_argument("--student_hidden", type=int, default=96)
    p.add_argument("--teacher_steps", type=int, default=400, help="cross-entropy steps that make the teacher")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (recorded and trained)")
    p.add_argument("--teacher_lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=1e-3, help="the students' peak learning rate")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every job")
    p.add_argument("--keep", type=str, default=None, help="keep the work folder here instead of a temporary one")
    args = p.parse_args()

    import numpy as np
    import torch

    from sitra.results import read_log

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        train, held_out, source = texts(args.lines)
        (work / "train.txt").write_text("\n".join(train))
        (work / "eval.txt").write_text("\n".join(held_out))
        tokenizer = build_tokenizer(work / "tokenizer", train, args.vocab)
        teacher = pretrain_teacher(neox(tokenizer, args.teacher_layers, args.teacher_hidden, 0), tokenizer, train, args)
        teacher.save_pretrained(work / "teacher")
        tokenizer.save_pretrained(work / "teacher")
        neox(tokenizer, args.student_layers, args.student_hidden, 1).save_pretrained(work / "student")
        tokenizer.save_pretrained(work / "student")
        data = dict(train_file=work / "train.txt", eval_file=work / "eval.txt", max_seq_length=args.max_seq_length,
                    packing=True, device="cpu")
        recordings = {}
        for sampling in ("top_k", "random"):
            out = work / f"records_{sampling}"
            seconds = job("record_teacher", dict(teacher=work / "teacher", output=out, top_k=args.top_k, temperature=args.temperature,
                                                 teacher_logits_sampling=sampling, storage_directory=work, **data),
                          args.threads)["seconds"]
            recordings[sampling] = (out, seconds)
            print(f"recorded {sampling}: {seconds:.0f} s", flush=True)
        common = dict(student=work / "student", student_init="pretrained", loss="forward_kl", alpha=0.5, temperature=args.temperature,
                      batch_size=args.batch_size, max_steps=args.steps, eval_steps=args.steps, lr=args.lr, warmup_steps=0,
                      storage_directory=work, **data)
        variants = {
            "online (teacher forward every step)": dict(teacher=work / "teacher"),
            f"records, top-{args.top_k} + missing mass": dict(teacher_logits=recordings["top_k"][0]),
            f"records, {args.top_k} sampled tokens": dict(teacher_logits=recordings["random"][0],
                                                          teacher_logits_sampling="random"),
        }
        kept, distinct = record_coverage(recordings["top_k"][0], recordings["random"][0])
        rows = {}
        for i, (name, flags) in enumerate(variants.items()):
            run_name = f"variant{i}"
            measured = job("distill_pythia", dict(common, run_name=run_name, **flags), args.threads)
            log = read_log(work / "eval_results" / f"{run_name}.h5")
            rate = float(np.median(log["train"]["tokens_per_s"][2:] if args.steps > 4 else log["train"]["tokens_per_s"]))
            sampling = "random" if flags.get("teacher_logits_sampling") == "random" else "top_k"
            recorded = "teacher_logits" in flags
            rows[name] = {
                "step_ms": 1000 * args.batch_size * args.max_seq_length / rate, "tokens_per_s": rate,
                "peak_mib": measured["peak_mib"],
                "bytes_per_token": (folder_bytes(recordings[sampling][0]) / records_tokens(recordings[sampling][0])) if recorded else None,
                "recording_s": recordings[sampling][1] if recorded else None,
                "perplexity": float(log["final"]["distilled/perplexity"]),
                "teacher_forwards": float(np.sum(log["train"].get("teacher_forwards", [np.nan]))),
            }
            if not recorded:
                teacher_ppl, base_ppl = float(log["final"]["teacher/perplexity"]), float(log["final"]["student base/perplexity"])
            print(f"{name}: done", flush=True)

    print(f"\n{source}: {len(train):,} training lines, packed in blocks of {args.max_seq_length}; BPE vocabulary "
          f"{len(tokenizer):,}; teacher {args.teacher_layers} x {args.teacher_hidden} ({args.teacher_steps} CE steps, held-out "
          f"perplexity {teacher_ppl:.1f}) -> student {args.student_layers} x {args.student_hidden} (random, perplexity "
          f"{base_ppl:.1f}); forward KL at T = {args.temperature:g}, alpha 0.5, batch {args.batch_size}, {args.steps} steps, "
          f"{args.threads} thread(s). The top-{args.top_k} ids hold {kept:.1%} of the teacher's probability (mean over "
          f"tokens); {args.top_k} draws give {distinct:.1f} distinct ids a token.\n")
    print("| variant | step time | tokens/s | peak memory above imports | on disk | recording (once) | teacher forwards in training | held-out perplexity |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        disk = f"{r['bytes_per_token']:.0f} bytes/token" if r["bytes_per_token"] else "-"
        rec = f"{r['recording_s']:.0f} s" if r["recording_s"] else "-"
        print(f"| {name} | {r['step_ms']:.0f} ms | {r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} MiB | {disk} | {rec} | "
              f"{r['teacher_forwards']:.0f} | {r['perplexity']:.2f} |")
    online = next(iter(rows.values()))
    for name, r in list(rows.items())[1:]:
        print(f"{name} / online: step time {r['step_ms'] / online['step_ms']:.2f}x, peak memory "
              f"{r['peak_mib'] / online['peak_mib']:.2f}x, perplexity {r['perplexity'] / online['perplexity']:.3f}x")


def record_coverage(top_k: Path, sampled: Path, examples: int = 200) -> tuple[float, float]:
    """(mean teacher mass of the top-k ids, mean distinct ids of the draws) over the first examples."""
    import numpy as np

    from sitra.records import TeacherRecords

    a, b = TeacherRecords(top_k), TeacherRecords(sampled)
    first = range(min(examples, len(a.split("train"))))
    mass = np.concatenate([np.exp(a.example(i)["teacher_logp"].astype(np.float64)).sum(-1) for i in first])
    distinct = np.concatenate([b.example(i)["entries"] for i in first])
    return float(mass.mean()), float(distinct.mean())


def records_tokens(folder: Path) -> int:
    from sitra.records import TeacherRecords

    return TeacherRecords(folder).positions()


if __name__ == "__main__":
    main()
