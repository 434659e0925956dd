"""Cost of a block sweep as one fused task against one task (process) per configuration.

What it runs: the same sweep, 2 blocks x 4 student shapes (d_k {32,16} x heads {4,2}) of the
MiniLM teacher, on WikiText-2 text from ../shared (valid.txt to train, test.txt held out; or the
built-in corpus):

- separate: 8 processes `jobs/retrain_single_block.py --block B --block_d_k D --block_heads H`,
  one after another (each pays its own start-up, data, teacher passes and evaluations);
- fused:    1 process `jobs/retrain_single_block.py --block B1,B2 --block_d_k 32,16 --block_heads 4,2`
  (one teacher pass per batch for all 8 students, in training and evaluation).

Every configuration runs twice, for `--steps` and for `--long_steps` optimizer steps (evaluation at
step 0 and at the end in both). The difference of the two runs' CPU-seconds (user + system of the
child processes: what a cluster bills) divided by the difference in steps is the steady-state cost
of one training step, with start-up, data loading and the evaluations cancelled out; what is left
at zero steps is reported on its own as the fixed cost. The ratio of steady-state costs, fused
against the sum of the separate runs, is what sharing the teacher pass saves; it is printed next
to the model's prediction (FLOPs per step of the teacher passes and of the students' forward and
backward, fitted to nothing). Also printed: peak resident memory (the jobs' own
`peak_memory_mb`) and the largest difference between a fused student's parameters and its
separate run's. Then the model's projection for the full 12 x 9 grid of BERT-base at 128 tokens.
Each child runs with one thread.

    python benchmarks/fused_sweep.py                           # the measured configuration (~10 min on 2 cores)
    python benchmarks/fused_sweep.py --steps 2 --long_steps 6  # quick
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
    p.add_argument("--steps", type=int, default=10, help="optimizer steps of the short runs")
    p.add_argument("--long_steps", type=int, default=50, help="optimizer steps of the long runs")
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
              "--percentage_data", str(args.percentage_data), "--block_dropout", "0.1", "--lr", "5e-4", "--device", "cpu"]
    blocks = [int(b) for b in args.blocks.split(",")]
    shapes = [(h, d) for d in D_KS for h in HEADS]
    runs = {"separate": [["--block", str(b), "--block_heads", str(h), "--block_d_k", str(d)] for b in blocks for h, d in shapes],
            "fused": [["--block", args.blocks, "--block_heads", ",".join(map(str, HEADS)), "--block_d_k", ",".join(map(str, D_KS))]]}
    cpu = {}  # (way, steps) -> CPU-seconds, wall seconds summed over the way's processes
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (args.steps, args.long_steps):
            for way, argvs in runs.items():
                total_cpu = total_wall = 0.0
                for argv in argvs:
                    c, w = job([*common, *argv, "--max_steps", str(steps), "--eval_steps", str(steps)], Path(tmp) / f"{way}{steps}")
                    total_cpu, total_wall = total_cpu + c, total_wall + w
                cpu[way, steps] = (total_cpu, total_wall)
                print(f"  {way}, {steps} steps: {total_cpu:.1f} CPU-s in {len(argvs)} process(es)", flush=True)
        diff, sep_peak, fused_peak = 0.0, 0.0, 0.0
        separate, fused = Path(tmp) / f"separate{args.long_steps}", Path(tmp) / f"fused{args.long_steps}"
        for log in sorted((separate / "eval_results").glob("*.h5")):
            sep_peak = max(sep_peak, read_log(log)["attrs"]["peak_memory_mb"])
            fused_peak = read_log(fused / "eval_results" / log.name)["attrs"]["peak_memory_mb"]
            a = load_file(str(separate / "checkpoints" / log.stem / "best.safetensors"))
            f = load_file(str(fused / "checkpoints" / log.stem / "best.safetensors"))
            diff = max(diff, max(float((a[k] - f[k]).abs().max()) for k in a))
    n, extra = len(blocks) * len(shapes), args.long_steps - args.steps
    per_step = {way: (cpu[way, args.long_steps][0] - cpu[way, args.steps][0]) / extra for way in runs}
    fixed = {way: cpu[way, args.steps][0] - args.steps * per_step[way] for way in runs}
    print(f"\n{len(blocks)} blocks ({args.blocks}) x {len(shapes)} shapes of {Path(teacher).name}, "
          f"{args.steps} and {args.long_steps} steps, batch {args.batch} x {args.seq} tokens, one thread per process\n")
    print("| way | processes | CPU-s per training step (steady state) | fixed CPU-s (start-up, data, evaluations) "
          f"| total CPU-s at {args.long_steps} steps | peak memory MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| separate | {n} | {per_step['separate']:.3f} (sum) | {fixed['separate']:.1f} (sum) "
          f"| {cpu['separate', args.long_steps][0]:.1f} | {sep_peak:.0f} (largest) |")
    print(f"| fused | 1 | {per_step['fused']:.3f} | {fixed['fused']:.1f} | {cpu['fused', args.long_steps][0]:.1f} | {fused_peak:.0f} |")
    config = load_config(teacher)
    H, I = config.hidden_size, config.intermediate_size
    s, _ = sweep_flops(blocks, shapes, args.seq, H, I, False, False)
    f, _ = sweep_flops(blocks, shapes, args.seq, H, I, True, True)
    if min(per_step.values()) <= 0:
        sys.exit(f"the {args.long_steps - args.steps} extra steps cost less than the noise of start-up: raise --long_steps")
    steady = per_step["fused"] / per_step["separate"]
    print(f"\nsteady-state ratio fused / separate (CPU-s per step): {steady:.3f}; the FLOP model predicts {f / s:.3f} "
          f"(target <= 0.2: {'PASS' if steady <= 0.2 else 'FAIL'})")
    print(f"fixed cost ratio fused / separate: {fixed['fused'] / fixed['separate']:.3f} (one start-up instead of {n}); "
          f"total ratio at {args.long_steps} steps: {cpu['fused', args.long_steps][0] / cpu['separate', args.long_steps][0]:.3f}")
    print(f"largest parameter difference fused vs separate: {diff:.3g}")
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
