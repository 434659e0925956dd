"""Peak memory and time of large-vocabulary logit distillation: the plain loss, chunked_logit_loss, chunked_distill_loss.

What it measures: forward + backward of the forward-KL distillation loss (temperature 2) from the
hidden states through the LM heads, at vocab 50,304, batch 4 x 512 positions, hidden 128 for both
models (student head a trainable `nn.Linear(128, 50304, bias=False)`, teacher head frozen), fp32,
with ~10% of the positions masked out as padding. Three ways of computing it:

- plain:      LOGIT_LOSSES["forward_kl"](student_head(h_s), teacher_head(h_t), mask, T)
              (the full [positions, vocab] logits of both models exist, plus their softmaxes)
- chunked K:  chunked_logit_loss(LOGIT_LOSSES["forward_kl"], h_s, student_head, h_t,
              teacher_head, mask, chunks=K, temperature=T)
              (each chunk's logits are computed inside the loop together with that chunk's
              gradients into h_s and the head weight, then freed; backward only scales the
              stored gradients: nothing is recomputed)
- analytic K: chunked_distill_loss(h_s, student_head, h_t, teacher_head, mask, chunks=K,
              temperature=T)
              (the same pieces, but each piece's gradient in its logits is computed directly,
              T (softmax(s/T) - softmax(t/T)) / n on buffers kept across pieces, and taken through
              the head by matmul: no autograd graph over the [piece, vocab] softmaxes)

How memory is measured (see BENCHMARKS.md): each variant runs in a fresh process started with
`MALLOC_MMAP_THRESHOLD_=131072` and a fixed number of torch threads. Inside it, after the inputs
and heads are built, the resident size (VmRSS) is read, the peak (VmHWM) is reset where the
kernel allows it, the measured work runs once, and "peak MiB above inputs" is VmHWM minus that
resident size. Each variant runs in --rounds processes, the variants interleaved (plain,
chunked 16, chunked 32, analytic 16, analytic 32, plain, ...) so that load from other processes
falls on all alike; the peak is the largest of them and the time the median over all their
--reps runs (the first ones included). The child
saves the loss and the gradients of h_s and of the student head weight to a .pt file, and the
parent compares every other variant with plain: relative difference = max |variant - plain|
over the tensor / max |plain| (for the loss, |variant - plain| / |plain|).

Run (the real configuration, 5-10 minutes on 2 loaded CPU cores):

    python benchmarks/chunked_kd_loss.py

Quick smoke test:

    python benchmarks/chunked_kd_loss.py --vocab 5000 --positions 256

Targets (checked for both chunked variants at 16 and 32 chunks): peak memory at most 1/8 of the
plain loss's, time at most 1.3x the plain loss's, and loss and gradients equal to the plain ones
within 1e-6 relative.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from sitra.losses import LOGIT_LOSSES, chunked_distill_loss, chunked_logit_loss

MIB = 2**20
TOLERANCE = 1e-6  # relative difference of loss and gradients to plain
MEMORY_TARGET = 1 / 8  # chunked peak at most this fraction of the plain peak
TIME_TARGET = 1.3  # chunked time at most this multiple of the plain time


def proc_status_kib(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_inputs(args):
    """Hidden states [N, H], heads H -> V, and a padding mask [N] (~10% False), all seeded."""
    torch.manual_seed(0)
    batch, positions = args.batch, args.positions
    n = batch * positions
    h_s = torch.randn(n, args.hidden, requires_grad=True)
    h_t = torch.randn(n, args.hidden)
    student_head = nn.Linear(args.hidden, args.vocab, bias=False)
    teacher_head = nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    # Padding at the end of each sequence, 4%..16% of it, 10% on average over the batch.
    mask = torch.ones(batch, positions, dtype=torch.bool)
    for b in range(batch):
        pad = round(args.padding * positions * 2 * (b + 1) / (batch + 1))
        mask[b, positions - pad:] = False
    return h_s, student_head, h_t, teacher_head, mask.reshape(n)


def run_variant(args):
    """Child process: measure one variant, print one JSON line, save loss and gradients."""
    torch.set_num_threads(args.threads)
    h_s, student_head, h_t, teacher_head, mask = build_inputs(args)
    loss_fn = LOGIT_LOSSES["forward_kl"]

    def work():
        kind, _, chunks = args.variant.partition("_")
        if kind == "plain":
            loss = loss_fn(student_head(h_s), teacher_head(h_t), mask, args.temperature)
        elif kind == "chunked":
            loss = chunked_logit_loss(loss_fn, h_s, student_head, h_t, teacher_head, mask,
                                      chunks=int(chunks), temperature=args.temperature)
        else:
            loss = chunked_distill_loss(h_s, student_head, h_t, teacher_head, mask, chunks=int(chunks),
                                        temperature=args.temperature)
        loss.backward()
        return loss.detach()

    rss_before = proc_status_kib("VmRSS")
    hwm_reset = reset_peak_rss()
    start = time.perf_counter()
    loss = work()
    times = [time.perf_counter() - start]
    peak = proc_status_kib("VmHWM")
    grads = {"loss": loss, "h_s": h_s.grad.clone(), "weight": student_head.weight.grad.clone()}
    torch.save(grads, args.out)

    for _ in range(args.reps - 1):
        h_s.grad = None
        student_head.weight.grad = None
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)

    print(json.dumps({
        "variant": args.variant,
        "peak_mib": (peak - rss_before) / 1024,
        "rss_before_mib": rss_before / 1024,
        "hwm_reset": hwm_reset,
        "times_s": times,
        "loss": loss.item(),
        "checksum_h_s": grads["h_s"].double().abs().sum().item(),
        "checksum_weight": grads["weight"].double().abs().sum().item(),
    }))


def launch(variant, args, out):
    """Run one variant in a fresh interpreter; return its JSON report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--out", out,
           "--vocab", str(args.vocab), "--positions", str(args.positions),
           "--batch", str(args.batch), "--hidden", str(args.hidden),
           "--temperature", str(args.temperature), "--padding", str(args.padding),
           "--threads", str(args.threads), "--reps", str(args.reps)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"variant {variant} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(args):
    n = args.batch * args.positions
    full_logits_mib = n * args.vocab * 4 / MIB
    print(f"forward KL, T {args.temperature}: vocab {args.vocab:,}, {args.batch} x {args.positions} "
          f"positions, hidden {args.hidden}, fp32, {args.threads} threads, {args.padding:.0%} padding; "
          f"one full [{n}, {args.vocab}] logits tensor = {full_logits_mib:.0f} MiB, "
          f"student weight gradient = {args.vocab * args.hidden * 4 / MIB:.1f} MiB\n")
    load_before = os.getloadavg()[0]

    variants = ["plain"] + [f"{kind}_{k}" for kind in ("chunked", "analytic") for k in args.chunks]
    reports, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):  # interleaved, so load from elsewhere hits every variant alike
            for variant in variants:
                out = os.path.join(tmp, variant + ".pt")
                r = launch(variant, args, out)
                if variant not in reports:
                    reports[variant], results[variant] = r, torch.load(out)
                else:
                    reports[variant]["peak_mib"] = max(reports[variant]["peak_mib"], r["peak_mib"])
                    reports[variant]["hwm_reset"] &= r["hwm_reset"]
                    reports[variant]["times_s"] += r["times_s"]
    for r in reports.values():
        r["time_s"] = statistics.median(r["times_s"])

    def rel(v, key):
        got, want = results[v][key].double(), results["plain"][key].double()
        return ((got - want).abs().max() / want.abs().max()).item()

    plain = reports["plain"]
    print("| variant | peak MiB above inputs | memory / plain | time s (median) | time / plain "
          "| rel diff loss | rel diff grad h_s | rel diff grad weight | loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    verdicts = []
    for variant in variants:
        r = reports[variant]
        mem, tim = r["peak_mib"] / plain["peak_mib"], r["time_s"] / plain["time_s"]
        if variant == "plain":
            name, diffs = "plain", "| - | - | - "
        else:
            kind, k = variant.split("_")
            name = f"{kind}, {k} chunks"
            d = [rel(variant, key) for key in ("loss", "h_s", "weight")]
            diffs = "".join(f"| {x:.1e} " for x in d)
            verdicts += [(mem <= MEMORY_TARGET, f"{name}: peak memory {mem:.3f} of plain (target <= {MEMORY_TARGET:.3f})"),
                         (tim <= TIME_TARGET, f"{name}: time {tim:.2f}x plain (target <= {TIME_TARGET}x)"),
                         (max(d) <= TOLERANCE, (f"{name}: largest relative difference of loss and gradients "
                                                f"{max(d):.1e} (target <= {TOLERANCE:.0e})"))]
        print(f"| {name} | {r['peak_mib']:,.1f} | {mem:.3f} | {r['time_s']:.3f} | {tim:.2f} {diffs}| {r['loss']:.7f} |")
    if not all(r["hwm_reset"] for r in reports.values()):
        print("\n(VmHWM could not be reset: peaks include anything reached while building the inputs)")
    print(f"\n(memory: the largest of {args.rounds} fresh processes; times: median of {args.rounds} x {args.reps} "
          f"runs of forward + backward each, the variants' processes interleaved; 1-minute load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after: other processes on the cores slow the "
          f"multithreaded chunks more than the plain loss)\n")
    for ok, text in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--positions", type=int, default=512, help="positions per sequence")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128, help="hidden size of student and teacher")
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32])
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--padding", type=float, default=0.1, help="fraction of positions masked out")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each variant")
    p.add_argument("--reps", type=int, default=4, help="timed runs per process; memory is taken on the first")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, interleaved")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set when the script runs one variant
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    if args.variant:
        run_variant(args)
    else:
        main(args)
