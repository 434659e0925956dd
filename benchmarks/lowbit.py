"""Low-bit distillation side by side: full precision, an 8-bit teacher, a ternary student.

What it runs (WikiText-2 from ../shared: validation split as training text, the first lines of
the test split held out), every step a real sitra job in its own process:

1. a byte-level BPE tokenizer (4,096 tokens) and a GPT-NeoX teacher (4 layers x 128) trained
   from scratch on the training text: `distill_pythia --alpha 1` (cross-entropy only; its
   "teacher" there is a 1-layer x 32 placeholder whose logits get weight 0);
2. three distillations of a 2-layer student cut from the teacher's layers, the same flags and
   steps: `fp32` (both in full precision), `8-bit teacher` (--teacher_bits 8) and `ternary`
   (--student_bits 1.58);
3. `export_ternary` of the ternary student, and `eval_lm` of the packed folder.

What it prints, one column per setting: the student's size on disk (float32, bfloat16 and packed
files of the same student), its weights in memory (as sitra's loaders hold it: the packed student
keeps int8 codes), its held-out perplexity and accuracy, the teacher's weights in memory and the
KL between the 8-bit and full-precision teacher, and the training job's wall time and peak
resident memory (each job in a fresh process with MALLOC_MMAP_THRESHOLD_=131072, peak read from
the kernel's rusage of that child).

Run (about 30 minutes on 2 busy CPU cores):

    python benchmarks/lowbit.py

Quick smoke test (a minute or two; the numbers mean nothing):

    python benchmarks/lowbit.py --quick
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
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2"
MIB = 2**20


def build_tokenizer(lines: list[str], folder: Path, vocab: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def random_lm(folder: Path, tokenizer, hidden: int, layers: int):
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden, max_position_embeddings=512,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def job(script: str, flags: list[str], threads: int, log: Path) -> dict:
    """Run jobs/<script>.py in a fresh process; its wall time and peak resident memory."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.time()
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, str(ROOT / "jobs" / f"{script}.py"), *flags], stdout=out,
                             stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{script} failed; its output: {log}\n" + log.read_text()[-3000:])
    return {"wall_s": time.time() - start, "peak_rss_mib": usage.ru_maxrss / 1024}


def size_on_disk(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / MIB


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline, not the numbers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher_steps", type=int, default=300)
    p.add_argument("--student_steps", type=int, default=150)
    p.add_argument("--eval_lines", type=int, default=1000, help="held-out lines of the WikiText-2 test split")
    a = p.parse_args()
    if not (WIKITEXT / "valid.txt").exists():
        raise SystemExit(f"skipped: {WIKITEXT} is absent (a fresh clone without ../shared); this benchmark needs WikiText-2")
    if a.quick:
        a.teacher_steps, a.student_steps, a.eval_lines = 20, 10, 100
    work = Path(a.work or tempfile.mkdtemp(prefix="sitra_lowbit_"))
    work.mkdir(parents=True, exist_ok=True)
    train_lines = [x for x in (WIKITEXT / "valid.txt").read_text().splitlines() if x.strip()]
    eval_lines = [x for x in (WIKITEXT / "test.txt").read_text().splitlines() if x.strip()][: a.eval_lines]
    (work / "train.txt").write_text("\n".join(train_lines))
    (work / "eval.txt").write_text("\n".join(eval_lines))

    import torch
    from transformers import AutoModelForCausalLM

    from sitra import models
    from sitra.models.lowbit import weight_bytes
    from sitra.results import read_log

    tok = build_tokenizer(train_lines, work / "seed")
    random_lm(work / "seed", tok, hidden=128, layers=4)
    random_lm(work / "placeholder", tok, hidden=32, layers=1)
    common = ["--train_file", str(work / "train.txt"), "--eval_file", str(work / "eval.txt"), "--max_seq_length", "128",
              "--packing", "--batch_size", "8", "--device", "cpu", "--storage_directory", str(work), "--warmup_steps", "20",
              "--loss_chunks", "4"]
    print(f"1/3 teacher: 4 x 128 GPT-NeoX, vocab {len(tok):,}, {a.teacher_steps} steps on {len(train_lines):,} lines", flush=True)
    job("distill_pythia", common + ["--teacher", str(work / "placeholder"), "--student", str(work / "seed"),
                                    "--alpha", "1", "--lr", "3e-3", "--max_steps", str(a.teacher_steps),
                                    "--eval_steps", str(a.teacher_steps), "--run_name", "teacher"], a.threads, work / "teacher.log")
    teacher = work / "checkpoints" / "teacher" / "model"

    settings = {"fp32": [], "8-bit teacher": ["--teacher_bits", "8"], "ternary": ["--student_bits", "1.58"]}
    runs = {}
    for i, (name, flags) in enumerate(settings.items()):
        print(f"2/3 student {i + 1}/3 ({name}): 2 of the teacher's layers, {a.student_steps} steps", flush=True)
        run_name = "student_" + name.replace(" ", "_").replace("-", "")
        runs[name] = job("distill_pythia", common + ["--teacher", str(teacher), "--student_init", "teacher_layers",
                                                     "--student_layers", "2", "--lr", "2e-3", "--max_steps", str(a.student_steps),
                                                     "--eval_steps", str(a.student_steps), "--run_name", run_name, *flags],
                         a.threads, work / f"{run_name}.log")
        runs[name]["folder"] = work / "checkpoints" / run_name / "model"
        runs[name]["log"] = read_log(work / "eval_results" / f"{run_name}.h5")

    print("3/3 export and evaluation of the packed ternary student", flush=True)
    ternary = runs["ternary"]["folder"]
    job("export_ternary", [str(ternary)], a.threads, work / "export.log")
    job("export_ternary", [str(ternary), "--output", str(ternary.with_name("model_ternary_bf16")), "--dtype", "bfloat16"],
        a.threads, work / "export_bf16.log")
    packed, packed_bf16 = ternary.with_name("model_ternary"), ternary.with_name("model_ternary_bf16")
    job("eval_lm", [str(packed), "--eval_file", str(work / "eval.txt"), "--max_seq_length", "128", "--device", "cpu",
                    "--storage_directory", str(work), "--run_name", "packed"], a.threads, work / "eval_packed.log")
    packed_eval = read_log(work / "eval_results" / "packed.h5")["final"]

    latent = models.load_model(str(ternary), auto=AutoModelForCausalLM)
    layers = [m.weight.numel() for m in latent.modules() if type(m).__name__ == "TernaryLinear"]
    linear = sum(layers)
    rows = {}
    for name, r in runs.items():
        final, attrs = r["log"]["final"], r["log"]["attrs"]
        student = "ternary student" if name == "ternary" else "distilled"
        t = "teacher (8-bit)" if name == "8-bit teacher" else "teacher"
        folder = r["folder"]
        bf16 = folder.with_name("model_bf16")
        model = models.load_model(str(folder), auto=AutoModelForCausalLM)
        model.to(torch.bfloat16).save_pretrained(bf16)
        in_memory = models.load_model(str(packed if name == "ternary" else folder), auto=AutoModelForCausalLM)
        rows[name] = {
            "teacher weights in memory (MiB)": attrs.get("teacher_weights_mib_8bit", None),
            "KL(fp32 teacher || 8-bit teacher), nats/token": attrs.get("teacher_8bit_kl", None),
            "teacher perplexity": final[f"{t}/perplexity"],
            "student base perplexity (before distillation)": final["student base/perplexity"],
            "student perplexity": final[f"{student}/perplexity"],
            "student next-token accuracy": final[f"{student}/accuracy"],
            "student latent weights without quantisation, perplexity": final.get("full-precision student/perplexity"),
            "student on disk, float32 (MiB)": size_on_disk(folder),
            "student on disk, bfloat16 (MiB)": size_on_disk(bf16),
            "student on disk, packed (MiB)": size_on_disk(packed) if name == "ternary" else None,
            "student on disk, packed + bfloat16 rest (MiB)": size_on_disk(packed_bf16) if name == "ternary" else None,
            "transformer-layer linear weights as stored (MiB)": (sum(-(-k // 5) + 4 for k in layers) if name == "ternary"
                                                                else 4 * linear) / MIB,
            "student weights in memory (MiB)": weight_bytes(in_memory) / MIB,
            "training job wall time (s)": r["wall_s"],
            "training job peak RSS (MiB)": r["peak_rss_mib"],
        }
        if rows[name]["teacher weights in memory (MiB)"] is None:
            rows[name]["teacher weights in memory (MiB)"] = weight_bytes(
                models.load_model(str(teacher), auto=AutoModelForCausalLM)) / MIB
    names = list(rows)
    print()
    print(f"| setting | {' | '.join(names)} |")
    print("| --- |" + " --- |" * len(names))
    for metric in rows[names[0]]:
        cells = []
        for n in names:
            v = rows[n][metric]
            cells.append("-" if v is None else f"{v:.3g}" if "KL" in metric else f"{v:.4f}" if abs(v) < 1
                         else f"{v:,.2f}" if abs(v) < 100 else f"{v:,.1f}")
        print(f"| {metric} | {' | '.join(cells)} |")
    same = packed_eval[f"{packed.parent.name} (packed)/perplexity"] == rows["ternary"]["student perplexity"]
    print(f"\npacked ternary student through eval_lm: perplexity {packed_eval[f'{packed.parent.name} (packed)/perplexity']:.4f} "
          f"({'equal to' if same else 'DIFFERENT from'} the trained ternary student's)")
    total = sum(p.numel() for p in model.parameters())
    print(f"student: {total:,} parameters, {linear:,} of them in the ternary linear layers "
          f"(the rest: embeddings, output head, norms, biases); runs in {work}")


if __name__ == "__main__":
    main()
