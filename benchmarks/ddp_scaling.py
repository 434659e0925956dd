"""Data-parallel scaling of sitra's training loop: 1 process against N processes (torchrun).

What it runs: block retraining (`jobs/retrain_single_block.py`) of the MiniLM teacher's block 3
(or --teacher), WikiText-2 text from ../shared (or the built-in corpus), the same global batch and
the same number of optimizer steps in every setting:

- 1 process, 1 thread, batch B
- 1 process, N threads, batch B (what one process makes of the same cores)
- N processes (torchrun, gloo on CPU / NCCL on GPUs), 1 thread each, batch B / N per process

Each setting is a fresh job; throughput is the median over the logged steps (the first two
skipped) of the loop's own `tokens_per_s_total`, and wall time is the whole command. On GPUs pass
--device cuda and --nproc the number of GPUs: the N-process row is then N GPUs.

    python benchmarks/ddp_scaling.py                   # 1 vs 2 processes on CPU
    python benchmarks/ddp_scaling.py --steps 6 --seq 64  # quick
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sitra.results import read_log  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2"


def job_flags(args, storage, batch):
    if args.teacher:
        teacher = args.teacher
    else:
        from sitra.models import minilm_path

        teacher = minilm_path()
    data = (["--train_file", str(WIKITEXT / "valid.txt"), "--eval_file", str(WIKITEXT / "test.txt")]
            if (WIKITEXT / "valid.txt").exists() else ["--dataset_name", "python-docs"])
    return ["--teacher", teacher, *data, "--block", "3", "--block_heads", "4", "--block_d_k", "32",
            "--max_seq_length", str(args.seq), "--batch_size", str(batch), "--max_steps", str(args.steps),
            "--eval_steps", str(10 * args.steps), "--percentage_data", "0.2", "--device", args.device,
            "--storage_directory", str(storage), "--run_name", "bench"]


def measure(label, cmd, threads, storage, args):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
    log = read_log(Path(storage) / "eval_results" / "bench.h5")
    tok_s = statistics.median(log["train"]["tokens_per_s_total"][2:].tolist())
    return {"setting": label, "tokens_per_s": tok_s, "wall_s": wall}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="BERT-like teacher folder (default: the MiniLM teacher)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    n = args.nproc
    script = str(ROOT / "jobs" / "retrain_single_block.py")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = [("1 process x 1 thread", [sys.executable, script], 1, args.batch),
                    (f"1 process x {n} threads", [sys.executable, script], n, args.batch),
                    (f"{n} processes x 1 thread", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={n}", script], 1, args.batch // n)]
        for i, (label, cmd, threads, batch) in enumerate(settings):
            storage = Path(tmp) / str(i)
            rows.append(measure(label, cmd + job_flags(args, storage, batch), threads, storage, args))
            print(f"  {label}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    base = rows[0]["tokens_per_s"]
    print(f"\nglobal batch {args.batch} x {args.seq} tokens, {args.steps} steps, device {args.device}\n")
    print("| setting | tokens/s (total) | speed-up vs 1 process x 1 thread | wall s |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['setting']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | {r['wall_s']:.1f} |")
    print(f"\nscaling efficiency of {n} processes: {rows[2]['tokens_per_s'] / base / n:.0%} "
          f"(ratio {n} processes / 1 process: {rows[2]['tokens_per_s'] / base:.2f}x); "
          f"against one process on {n} threads: {rows[2]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
