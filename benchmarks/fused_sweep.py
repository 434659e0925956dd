"""Cost of a block sweep as one fused task against one task (process) per configuration.

What it runs: the same sweep, 2 blocks x 4 student shapes (d_k {32,16} x heads {4,2}) of the
MiniLM teacher, on WikiText-2 text from ../shared (valid.txt to train, test.txt held out; or the
built-in corpus), with fixed steps:

- separate: 8 processes `jobs/retrain_single_block.py --block B --block_d_k D --block_heads H`,
  one after another (each pays its own start-up, data, teacher passes and evaluations);
- fused:    1 process `jobs/retrain_single_block.py --block B1,B2 --block_d_k 32,16 --block_heads 4,2`
  (one teacher pass per batch for all 8 students, in training and evaluation).

It prints total CPU-seconds (user + system of the child processes: what a cluster bills), wall
time, peak resident memory (the jobs' own `peak_memory_mb`), the largest difference between a
fused student's parameters and its separate run's, and the CPU-second ratio (target: fused at most
1/5 of separate). Then a model-based projection (FLOPs per step of the teacher passes and of the
students' forward and backward, fitted to nothing) for the full 12 x 9 grid of BERT-base at 128
tokens: teacher passes saved and the compute ratio, for fusing the 9 shapes of each block (12
tasks) and for fusing everything (1 task). Each child runs with one thread.

    python benchmarks/fused_sweep.py                  # the measured configuration (~10 min on 2 cores)
    python benchmarks/fused_sweep.py --steps 4        # quick
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2"

D_KS, HEADS = (32, 16), (4, 2)


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def job(argv, storage) -> tuple[float, float]:
    """(CPU-seconds, wall seconds) of one job process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "retrain_single_block.py"), *argv,
                          "--storage_directory", str(storage)], env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"job failed: {' '.join(argv)}\n{out.stderr[-3000:]}")
    return children_cpu_s() - cpu0, time.perf_counter() - t0


def attention_flops(T, H, inner):
    """Forward FLOPs of one sequence through an attention block of `inner` width (q, k, v,
    scores, context, output projection to H)."""
    return 2 * T * H * inner * 3 + 4 * T * T * inner + 2 * T * inner * H


def layer_flops(T, H, I):
    return attention_flops(T, H, H) + 4 * T * H * I


def sweep_flops(blocks, shapes, T, H, I, fuse_blocks: bool, fuse_shapes: bool):
    """FLOPs per sequence of one training step of the whole sweep: teacher passes up to each
    block's attention output (one per task), student forward + backward (x3)."""
    teacher = {b: b * layer_flops(T, H, I) + attention_flops(T, H, H) for b in blocks}
    students = sum(3 * attention_flops(T, H, h * d) for h, d in shapes) * len(blocks)
    if fuse_blocks and fuse_shapes:
        passes = [max(blocks)]
    elif fuse_shapes:
        passes = list(blocks)
    else:
        passes = [b for b in blocks for _ in shapes]
    return sum(teacher[b] for b in passes) + students, len(passes)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="BERT-like teacher folder (default: the MiniLM teacher)")
    p.add_argument("--blocks", default="4,5", help="the two blocks of the sweep (deeper blocks: longer teacher passes to share)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--percentage_data", type=float, default=0.05)
    args = p.parse_args()
    from safetensors.torch import load_file

    from sitra.models import load_config, minilm_path
    from sitra.results import read_log

    teacher = args.teacher or minilm_path()
    data = (["--train_file", str(WIKITEXT / "valid.txt"), "--eval_file", str(WIKITEXT / "test.txt")]
            if (WIKITEXT / "valid.txt").exists() else ["--dataset_name", "python-docs"])
    common = ["--teacher", teacher, *data, "--max_seq_length", str(args.seq), "--batch_size", str(args.batch),
              "--max_steps", str(args.steps), "--eval_steps", str(args.steps), "--percentage_data", str(args.percentage_data),
              "--block_dropout", "0.1", "--lr", "5e-4", "--device", "cpu"]
    blocks = [int(b) for b in args.blocks.split(",")]
    shapes = [(h, d) for d in D_KS for h in HEADS]
    with tempfile.TemporaryDirectory() as tmp:
        sep_cpu = sep_wall = 0.0
        for b in blocks:
            for h, d in shapes:
                cpu, wall = job([*common, "--block", str(b), "--block_heads", str(h), "--block_d_k", str(d)], Path(tmp) / "separate")
                sep_cpu, sep_wall = sep_cpu + cpu, sep_wall + wall
                print(f"  separate block {b} h{h} dk{d}: {cpu:.1f} CPU-s", flush=True)
        fused_cpu, fused_wall = job([*common, "--block", args.blocks, "--block_heads", ",".join(map(str, HEADS)),
                                     "--block_d_k", ",".join(map(str, D_KS))], Path(tmp) / "fused")
        print(f"  fused: {fused_cpu:.1f} CPU-s", flush=True)
        diff, sep_peak, fused_peak = 0.0, 0.0, 0.0
        for log in sorted((Path(tmp) / "separate" / "eval_results").glob("*.h5")):
            other = Path(tmp) / "fused" / "eval_results" / log.name
            sep_peak = max(sep_peak, read_log(log)["attrs"]["peak_memory_mb"])
            fused_peak = read_log(other)["attrs"]["peak_memory_mb"]
            a = load_file(str(Path(tmp) / "separate" / "checkpoints" / log.stem / "best.safetensors"))
            f = load_file(str(Path(tmp) / "fused" / "checkpoints" / log.stem / "best.safetensors"))
            diff = max(diff, max(float((a[k] - f[k]).abs().max()) for k in a))
    n = len(blocks) * len(shapes)
    print(f"\n{len(blocks)} blocks ({args.blocks}) x {len(shapes)} shapes of {Path(teacher).name}, {args.steps} steps, "
          f"batch {args.batch} x {args.seq} tokens, one thread per process\n")
    print("| way | processes | CPU-seconds | wall s | peak memory MiB |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| separate | {n} | {sep_cpu:.1f} | {sep_wall:.1f} (one after another) | {sep_peak:.0f} (largest) |")
    print(f"| fused | 1 | {fused_cpu:.1f} | {fused_wall:.1f} | {fused_peak:.0f} |")
    ratio = fused_cpu / sep_cpu
    print(f"\nCPU-second ratio fused / separate: {ratio:.3f} (target <= 0.2: {'PASS' if ratio <= 0.2 else 'FAIL'}); "
          f"largest parameter difference fused vs separate: {diff:.3g}")
    config = load_config(teacher)
    H, I = config.hidden_size, config.intermediate_size
    s, _ = sweep_flops(blocks, shapes, args.seq, H, I, False, False)
    f, _ = sweep_flops(blocks, shapes, args.seq, H, I, True, True)
    print(f"model for this configuration (training steps only, no start-up or evaluation): fused / separate {f / s:.3f}")
    grid = [(h, d) for d in (64, 32, 16) for h in (8, 4, 1)]
    s, sp = sweep_flops(range(12), grid, 128, 768, 3072, False, False)
    print("\nprojection, BERT-base, 12 blocks x 9 shapes, 128 tokens (model, training steps):")
    print("| way | tasks | teacher passes per batch | compute / separate |")
    print("| --- | --- | --- | --- |")
    print(f"| separate | 108 | {sp} | 1.000 |")
    for label, tasks, fb in (("fuse shapes (--fuse block_d_k,block_heads)", 12, False), ("fuse everything", 1, True)):
        f, fp = sweep_flops(range(12), grid, 128, 768, 3072, fb, True)
        print(f"| {label} | {tasks} | {fp} | {f / s:.3f} |")


if __name__ == "__main__":
    main()
