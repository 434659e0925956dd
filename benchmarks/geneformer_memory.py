"""Peak memory and non-pad tokens/s of `distill_geneformer` against the seed-style loop, and where the job's peak comes from.

The setup is BENCHMARKS.md's Geneformer row, built as benchmarks/length_grouping.py builds it: a random
Geneformer-shaped BertForMaskedLM teacher (4 layers x 128, vocabulary 25,426, 2,048 positions, attention
dropout 0.02 as Geneformer's) distilled into a 2 x 64 student, 8 cells a batch, cells with Geneformer-like gene
counts (median 1,000, 7% at 2,048).

1. Side by side. Each variant runs --steps optimizer steps in a fresh process with MALLOC_MMAP_THRESHOLD_=131072
   (freed blocks go back to the system, so the high-water mark is what was live), the variants interleaved,
   --rounds times:
   - the seed-style loop (the Geneformer-Distilled training loop): teacher and student compute full-vocabulary
     logits at every position though only 15% are masked; KD (T 2.5) over the masked genes, weighted 0.65, plus
     0.35 cross-entropy; AdamW; the job's own length-grouped batches (the longest first), so both see the same
     cells with the same masks;
   - the real job, `distill_geneformer.run`, with default flags beyond the model pair, the data and 8 cells a batch;
   - the job with the student's attention dropout at 0 (change A below), made without touching the job by handing
     it a copy of the teacher whose config says attention_probs_dropout_prob 0 (the student copies the teacher's
     config; the teacher runs in eval mode, where dropout does nothing).
   Peak memory is VmHWM minus the resident size before the measured work (after the imports, before any model or
   data is loaded), taken alike for every variant. The job's own `peak_memory_mb` note is ru_maxrss of the whole
   process, imports included, so it is larger by the start-up size; it is printed beside. Tokens/s is non-pad
   tokens over seconds of the steps after the first (batch, teacher, student, loss, backward, optimizer: what the
   job's `tokens_per_s` log times; the job's step seconds are its logged rate over the step's tokens).
2. Profile. One training step on the job's longest batch (8 x 2,048, one cell with 16 padded genes, as most
   length-grouped batches have some padding), replayed in a fresh process per variant: the resident high-water
   mark of each phase (teacher forward, student forward and loss, backward, optimizer step) and a ledger of the
   tensors autograd holds for backward at the end of the forward, by the student module that saved them. The
   variants are the changes that could bring the job's peak down:
   A. student attention dropout 0: SDPA's CPU flash kernel does not take dropout, so with Geneformer's 0.02 every
      student layer runs the math kernel, which keeps batch x heads x length^2 attention matrices for backward;
   B. the padding as a [B, 1, 1, L] key mask: BertModel turns a 2-D mask into [B, 1, L, L], which the flash kernel
      copies to float and keeps per layer;
   C. the KD loss chunked over the masked genes (sitra.losses.chunked_logit_loss, as distill_pythia uses it):
      the [masked genes x vocabulary] logits, softmaxes and their temporaries never exist whole;
   and, for reference, activation checkpointing, eager attention, the teacher under no_grad.

Run (about 15 minutes on 2 busy CPU cores, 6 CPU-minutes):

    python benchmarks/geneformer_memory.py

Quick smoke test (a few minutes):

    python benchmarks/geneformer_memory.py --steps 2 --rounds 1 --cells 120 --replays job,chunked_loss

Targets (BENCHMARKS.md): the job at >= 2x the seed loop's non-pad tokens/s and <= 1/3 of its peak memory.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from length_grouping import MAX_LENGTH, VOCAB, gene_counts, write_corpus, write_teacher  # noqa: E402

SPEED_TARGET, MEMORY_TARGET = 2.0, 1 / 3
TEMPERATURE, KD_WEIGHT = 2.5, 0.65
MMAP_THRESHOLD = "131072"
MIB = 2**20

# end-to-end variants: (key, label)
RUNS = [("seed", "seed-style loop"), ("job", "distill_geneformer (default flags)"),
        ("job_no_attn_dropout", "distill_geneformer, student attention dropout 0 (proposed)")]
# replay variants: key -> (label, changes to the job's step)
REPLAYS = {
    "seed": ("seed-style step", {"seed": True}),
    "job": ("job as it is", {}),
    "eager": ("job, eager attention", {"attn": "eager"}),
    "checkpointing": ("job + activation checkpointing", {"checkpointing": True}),
    "teacher_no_grad": ("job, teacher under no_grad (not inference_mode)", {"teacher_no_grad": True}),
    "no_attn_dropout": ("A: student attention dropout 0", {"attention_dropout": 0.0}),
    "no_attn_dropout_checkpointing": ("A + activation checkpointing", {"attention_dropout": 0.0, "checkpointing": True}),
    "key_mask": ("A + B: key-padding mask [B,1,1,L]", {"attention_dropout": 0.0, "key_mask": True}),
    "chunked_loss": ("A + B + C: chunked KD loss (16 pieces)", {"attention_dropout": 0.0, "key_mask": True, "chunks": 16}),
}
DEFAULT_REPLAYS = ["job", "no_attn_dropout", "key_mask", "chunked_loss"]


# ---------------------------------------------------------------------------------------------
# memory of this process


def status_mib(key: str) -> float:
    """VmRSS or VmHWM of this process, MiB."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def reset_high_water():
    """Start VmHWM again from the current resident size (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------------------------------------
# the pieces both the seed loop and the job read


def job_args(teacher, corpus, storage, batch_size: int, steps: int, run_name: str):
    """The job's flags: defaults beyond the model pair, the data, the batch and the step count."""
    from sitra.recipes.distill_geneformer import DistillGeneformerArgs

    return DistillGeneformerArgs(teacher=str(teacher), data=str(corpus), hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, batch_size=batch_size, max_steps=steps, device="cpu",
                                 storage_directory=str(storage), run_name=run_name, overwrite=True)


def job_batches(args):
    """The job's training batches (length-grouped, the longest first) and its student config."""
    from sitra.data.cells import masking
    from sitra.data.mlm import LengthGroupedBatches
    from sitra.data.mlm import MLMCollator
    from sitra.recipes.distill_geneformer import check

    setup = check(args)
    collate = MLMCollator(*masking(setup.cells, args))
    batches = LengthGroupedBatches(setup.train_cells, args.batch_size, collate, setup.train_cells.lengths,
                                   seed=args.seed, group_size=args.length_group_size)
    return batches, setup.student_config


def seed_loss(teacher, student, batch):
    """The seed loop's loss: both models' MLM logits at every position (full vocabulary), KD over the
    masked genes (KL at temperature T, times T^2) weighted 0.65, cross-entropy at the masked genes 0.35.
    The teacher's logits go out of scope with this function, before backward."""
    import torch
    import torch.nn.functional as F

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t = teacher(**inputs).logits
    s = student(**inputs).logits
    chosen = batch["labels"] != -100
    kd = F.kl_div(F.log_softmax(s[chosen] / TEMPERATURE, -1), F.softmax(t[chosen] / TEMPERATURE, -1),
                  reduction="batchmean") * TEMPERATURE**2
    ce = F.cross_entropy(s.view(-1, s.shape[-1]), batch["labels"].view(-1))
    return KD_WEIGHT * kd + (1 - KD_WEIGHT) * ce


def student_model(config, attn: str | None = None, attention_dropout: float | None = None, checkpointing=False, **_):
    """The job's student (BertForMaskedLM from the student config), with a replay variant's changes."""
    import copy

    import torch
    from transformers import BertForMaskedLM

    config = copy.deepcopy(config)
    if attn:
        config._attn_implementation = attn
    if attention_dropout is not None:
        config.attention_probs_dropout_prob = attention_dropout
    torch.manual_seed(42)
    student = BertForMaskedLM(config)
    if checkpointing:
        student.activation_checkpointing_enable({"use_reentrant": False})
    return student.train()


# ---------------------------------------------------------------------------------------------
# children: each measurement in its own fresh process


def run_seed(spec) -> dict:
    """The seed-style loop for spec["steps"] steps on the job's batches."""
    import torch

    from sitra import models

    base = status_mib("VmRSS")
    args = job_args(spec["teacher"], spec["corpus"], spec["storage"], spec["batch_size"], spec["steps"], "seed")
    batches, config = job_batches(args)
    teacher = models.load_model(args.teacher, "cpu", mlm=True)
    student = student_model(config)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.adam_weight_decay)
    tokens, seconds, batch_iter = [], [], iter(batches.epoch(0))
    for _ in range(spec["steps"]):
        tick = time.perf_counter()
        batch = next(batch_iter)
        tokens.append(int(batch["attention_mask"].sum()))
        seed_loss(teacher, student, batch).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - tick)
    return {"tokens": tokens, "seconds": seconds, "peak_mib": status_mib("VmHWM") - base, "start_mib": base}


def run_job(spec) -> dict:
    """The real distill_geneformer job; its own log gives tokens/s and its peak_memory_mb note."""
    from sitra.recipes import distill_geneformer
    from sitra.results import read_log

    base = status_mib("VmRSS")
    args = job_args(spec["teacher"], spec["corpus"], spec["storage"], spec["batch_size"], spec["steps"], spec["key"])
    run = distill_geneformer.run(args)
    peak = status_mib("VmHWM") - base
    log = read_log(run.log_path)
    batches, _ = job_batches(args)  # the job's batches again: the non-pad tokens of each logged step
    tokens = [int(b["attention_mask"].sum()) for b, _ in zip(batches.epoch(0), range(args.max_steps))]
    seconds = [n / float(rate) for n, rate in zip(tokens, log["train"]["tokens_per_s"])]
    return {"tokens": tokens, "seconds": seconds, "peak_mib": peak, "start_mib": base,
            "logged_peak_mb": float(log["attrs"]["peak_memory_mb"])}


def attention_kernels(student, batch, key_mask=False) -> dict:
    """The SDPA kernel the student's training step takes, without and with padding (a 2 x 128 slice)."""
    from torch.profiler import profile

    small = {k: v[:2, :128].clone() for k, v in batch.items()}
    small["attention_mask"][:] = 1
    found = {}
    for padded in (False, True):
        if padded:
            small["attention_mask"][1, 64:] = 0
        mask = key_padding_mask(small["attention_mask"]) if key_mask else small["attention_mask"]
        with profile() as prof:
            student(input_ids=small["input_ids"], attention_mask=mask).logits.sum().backward()
        names = {e.key for e in prof.key_averages()}
        kernel = ("flash (CPU)" if "aten::_scaled_dot_product_flash_attention_for_cpu" in names else
                  "math" if "aten::_scaled_dot_product_attention_math" in names else
                  "eager (matmul, softmax)" if "aten::scaled_dot_product_attention" not in names else "other")
        found["padded" if padded else "unpadded"] = kernel
    student.zero_grad(set_to_none=True)
    return found


class SavedTensorLedger:
    """Bytes autograd keeps for backward, by the student module that saved them (the innermost of
    embeddings, a layer's self-attention, the rest of a layer, the MLM head; outside them: the loss).
    Only tensors the graph still holds when asked count (a chunked loss frees its pieces' graphs in
    the forward); storages are counted once; parameters are left out (counted as weights)."""

    def __init__(self, student):
        self.stack, self.entries = ["loss"], []
        self.params = {p.untyped_storage().data_ptr() for p in student.parameters()}
        named = {"embeddings": student.bert.embeddings, "MLM head": student.cls}
        for i, layer in enumerate(student.bert.encoder.layer):
            named[f"layer {i} self-attention"] = layer.attention.self
            named[f"layer {i} (rest)"] = layer
        for label, module in named.items():
            module.register_forward_pre_hook(lambda m, a, label=label: self.stack.append(label))  # returns None
            module.register_forward_hook(lambda m, a, o: self.stack.pop() and None)  # None: the output stays

    def pack(self, t):
        label = self.stack[-1]
        if label == "loss":
            label = "loss (student side)" if t.requires_grad else "loss (teacher side, constants)"
        storage = t.untyped_storage()
        self.entries.append((label, storage.data_ptr(), storage.nbytes(), weakref.ref(t)))
        return t  # autograd keeps this very object: it lives as long as the graph holds it

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def held(self) -> dict:
        """{label: MiB} of the saved tensors alive now."""
        out, seen = {}, set(self.params)
        for label, key, nbytes, ref in self.entries:
            if key and key not in seen and ref() is not None:
                seen.add(key)
                out[label] = out.get(label, 0.0) + nbytes / MIB
        return out


def key_padding_mask(attention_mask):
    """The padding as a [B, 1, 1, L] boolean mask (True: attend), or None without padding. BertModel
    passes a 4-D mask on as it is; a 2-D one becomes a [B, 1, L, L] mask that SDPA's CPU flash kernel
    turns into a float copy per layer and keeps for backward (B x L^2 x 4 bytes each)."""
    if bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, :].bool()


def replay_batch(batches, padding: int) -> dict:
    """The job's first batch (the longest cells), with the last `padding` genes of its first cell made
    padding: most length-grouped batches have some, and with it an attention mask."""
    batch = {k: v.clone() for k, v in next(iter(batches.epoch(0))).items()}
    if padding and bool(batch["attention_mask"].all()):
        batch["input_ids"][0, -padding:] = 0
        batch["attention_mask"][0, -padding:] = 0
        batch["labels"][0, -padding:] = -100
    return batch


def run_replay(spec) -> dict:
    """One training step of a variant on the job's longest batch, phase by phase: the high-water mark
    of each phase (above the resident size before the step) and what is held for backward."""
    import torch

    from sitra import losses, models
    from sitra.evaluate import masked_logits

    change = REPLAYS[spec["key"]][1]
    base0 = status_mib("VmRSS")
    args = job_args(spec["teacher"], spec["corpus"], spec["storage"], spec["batch_size"], 1, "replay")
    batches, config = job_batches(args)
    batch = replay_batch(batches, spec["padding"])
    teacher = models.load_model(args.teacher, "cpu", mlm=True)
    student = student_model(config, **change)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.adam_weight_decay)
    objective = args.objective()
    sizes, saved = {}, {}

    def dense(s_logits, t_logits, mask, targets):
        return losses.distill_loss(s_logits, t_logits, mask, targets, **objective)[0]

    def step(batch, ledger=None, phases=None):
        def phase(name):
            if phases is not None:
                phases[name] = status_mib("VmHWM") - base
                phases[name + " held"] = status_mib("VmRSS") - base
                reset_high_water()

        saving = ledger.hooks() if ledger else torch.enable_grad()
        if change.get("seed"):
            with saving:
                loss = seed_loss(teacher, student, batch)  # its teacher forward is inside
            phase("teacher + student forward and loss")
        else:
            if change.get("key_mask"):
                batch = batch | {"attention_mask": key_padding_mask(batch["attention_mask"])}
            chosen = batch["labels"] != -100
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            with torch.no_grad() if change.get("teacher_no_grad") else torch.inference_mode():
                if change.get("chunks"):  # the teacher's hidden states at the masked genes; its head runs per piece
                    teacher_out = teacher.base_model(**inputs).last_hidden_state[chosen]
                else:
                    teacher_out = masked_logits(teacher, batch)[0]
            teacher_out = teacher_out.clone()
            sizes["teacher output kept for the loss"] = teacher_out.untyped_storage().nbytes() / MIB
            phase("teacher forward")
            with saving:
                labels = batch["labels"][chosen]
                everywhere = torch.ones(labels.shape, dtype=torch.bool)
                if change.get("chunks"):
                    hidden = student.base_model(**inputs).last_hidden_state[chosen]
                    loss = losses.chunked_logit_loss(dense, hidden, student.cls, teacher_out, teacher.cls, everywhere,
                                                     chunks=change["chunks"], targets=labels)
                else:
                    s_logits = masked_logits(student, batch)[0]
                    loss = dense(s_logits, teacher_out, everywhere, labels)
                    del s_logits
            del teacher_out  # the job's step_loss returns before backward
            phase("student forward and loss")
        if ledger:
            saved.update(ledger.held())
        loss.backward()
        phase("backward")
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phase("optimizer step")

    step({k: v[:, :64].clone() for k, v in batch.items()})  # warm-up: AdamW state and lazy buffers exist
    ledger = SavedTensorLedger(student)
    phases = {}
    base = status_mib("VmRSS")
    reset_high_water()
    tick = time.perf_counter()
    step(batch, ledger, phases)
    seconds = time.perf_counter() - tick
    kernels = attention_kernels(student, batch, change.get("key_mask"))  # after the measured step: the profiler takes memory

    def size(tensors):
        return sum(t.untyped_storage().nbytes() for t in tensors) / MIB

    params = list(student.parameters())
    static = {"teacher weights": size(list(teacher.parameters()) + list(teacher.buffers())),
              "student weights": size(params + list(student.buffers())),
              "AdamW state": size([v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]),
              "batch": size(batch.values())}
    return {"phases": phases, "base_mib": base - base0, "static": static, "gradients": size(params), "kernels": kernels,
            "seconds": seconds, "tokens": int(batch["attention_mask"].sum()), "shape": list(batch["input_ids"].shape),
            "saved": saved, "sizes": sizes}


CHILDREN = {"seed": run_seed, "job": run_job, "job_no_attn_dropout": run_job, "replay": run_replay}


def child_main(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    result = CHILDREN[spec["kind"]](spec)
    print("RESULT " + json.dumps(result), flush=True)


def in_fresh_process(spec: dict, scratch: Path) -> dict:
    """Run one measurement in a new Python process with a low mmap threshold; its RESULT line."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    err = scratch / "child.err"
    with open(err, "w") as stderr:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, stdout=subprocess.PIPE,
                              stderr=stderr, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = err.read_text().strip().splitlines()[-15:]
        raise SystemExit(f"{spec['kind']} {spec.get('key', '')} failed (exit {done.returncode}):\n" + "\n".join(tail))
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# the report


def tokens_per_s(r: dict) -> float:
    """Non-pad tokens over seconds of the steps after the first (the longest batch, with the one-off
    start-up of the first step); of all steps when there is only one."""
    skip = 1 if len(r["tokens"]) > 1 else 0
    return sum(r["tokens"][skip:]) / sum(r["seconds"][skip:])


def side_by_side(results: dict, rounds: int) -> str:
    seed = results["seed"]
    rows = ["| variant | non-pad tokens/s | peak RSS above start (MiB) | job's peak_memory_mb note | tokens/s vs seed | "
            "peak RSS vs seed |", "| --- | --- | --- | --- | --- | --- |"]
    verdicts = []
    for key, label in RUNS:
        rs = results[key]
        rate = statistics.median(tokens_per_s(r) for r in rs)
        peak = statistics.median(r["peak_mib"] for r in rs)
        note = f"{statistics.median(r['logged_peak_mb'] for r in rs):,.0f}" if "logged_peak_mb" in rs[0] else "-"
        if key == "seed":
            rows.append(f"| {label} | {rate:,.0f} | {peak:,.0f} | {note} | 1 | 1 |")
            continue
        speed = [tokens_per_s(r) / tokens_per_s(s) for r, s in zip(rs, seed)]
        memory = [r["peak_mib"] / s["peak_mib"] for r, s in zip(rs, seed)]
        span = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}x" if len(xs) > 1 else f"{xs[0]:.2f}x"  # noqa: E731
        rows.append(f"| {label} | {rate:,.0f} | {peak:,.0f} | {note} | {span(speed)} | {span(memory)} |")
        met = min(speed) >= SPEED_TARGET and max(memory) <= MEMORY_TARGET
        verdicts.append(f"{label}: {statistics.median(speed):.2f}x tokens/s at {statistics.median(memory):.2f}x peak RSS "
                        f"(target >= {SPEED_TARGET:g}x at <= 1/3): {'met' if met else 'MISSED'}")
    per_round = [f"round {i + 1}: " + "; ".join(f"{key} {tokens_per_s(results[key][i]):,.0f} tokens/s, {results[key][i]['peak_mib']:,.0f} MiB"
                                            for key, _ in RUNS) for i in range(rounds)]
    return ("\n".join(rows) + f"\n\n(ratio ranges over {rounds} interleaved round(s))\n" + "\n".join(per_round) + "\n\n"
            + "\n".join(verdicts))


PHASES = ["teacher forward", "student forward and loss", "teacher + student forward and loss", "backward", "optimizer step"]


def phase_table(replays: dict) -> str:
    rows = ["| variant | teacher fwd peak | student fwd + loss peak | held after fwd (RSS) | saved for backward (ledger) | "
            "backward peak | step peak | peak above start (loading included) | step s | tokens/s | "
            "attention kernel (unpadded / padded) |", "| --- " * 11 + "|"]
    for key, r in replays.items():
        p = r["phases"]
        fwd = "student forward and loss" if "student forward and loss" in p else "teacher + student forward and loss"
        peak = max(v for k, v in p.items() if not k.endswith("held"))
        teacher = f"{p['teacher forward']:,.0f}" if "teacher forward" in p else "(in the next)"
        rows.append(f"| {REPLAYS[key][0]} | {teacher} | {p[fwd]:,.0f} | {p[fwd + ' held']:,.0f} | {sum(r['saved'].values()):,.0f} | "
                    f"{p['backward']:,.0f} | {peak:,.0f} | {r['base_mib'] + peak:,.0f} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} | "
                    f"{r['kernels']['unpadded']} / {r['kernels']['padded']} |")
    return "\n".join(rows)


def components(r: dict) -> dict:
    """MiB at the step's peak, above the resident size before the models were loaded: weights, optimizer,
    batch, what autograd holds for backward (by module), what the peak's phase holds besides (teacher
    output, loss temporaries, gradients), and the resident growth of loading the models and corpus."""
    p = r["phases"]
    peak_phase = max((k for k in p if not k.endswith(" held")), key=p.get)
    parts = dict(r["static"])
    parts["resident growth of loading (runtime, corpus pages; not tensors)"] = r["base_mib"] - sum(r["static"].values())
    saved = sorted(r["saved"].items(), key=lambda kv: -kv[1])
    parts.update((f"saved for backward: {k}", v) for k, v in saved)
    held = sum(r["saved"].values())
    if peak_phase == "backward":
        parts["gradients"] = r["gradients"]
        parts["backward working memory"] = p["backward"] - held - r["gradients"]
    elif peak_phase.endswith("forward and loss"):
        teacher = r["sizes"].get("teacher output kept for the loss", 0.0)
        if teacher:
            parts["teacher output kept for the loss"] = teacher
        parts["loss temporaries (working memory at the end of the forward)"] = p[peak_phase] - held - teacher
    else:
        parts[f"working memory of the {peak_phase}"] = p[peak_phase]
    parts[f"total: peak RSS above the start (in: {peak_phase})"] = r["base_mib"] + p[peak_phase]
    return parts


def component_table(replays: dict, keys: list[str]) -> str:
    tables = {k: components(replays[k]) for k in keys if k in replays}
    names = list(dict.fromkeys(n for t in tables.values() for n in t if not n.startswith("total")))
    rows = ["| component | " + " | ".join(REPLAYS[k][0] for k in tables) + " |", "| --- " * (len(tables) + 1) + "|"]
    for n in names:
        rows.append(f"| {n} | " + " | ".join(f"{t[n]:,.0f}" if n in t else "-" for t in tables.values()) + " |")
    rows.append("| total: peak RSS above the start | " + " | ".join(
        next(f"{v:,.0f} ({k.split('in: ')[1][:-1]})" for k, v in t.items() if k.startswith("total")) for t in tables.values()) + " |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of each side-by-side run (the longest batch first)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the side-by-side runs")
    p.add_argument("--cells", type=int, default=400, help="cells in the synthetic corpus")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    p.add_argument("--replays", default=",".join(DEFAULT_REPLAYS), help=f"profile variants, comma-separated from {','.join(REPLAYS)}; none: skip")
    p.add_argument("--replay_padding", type=int, default=16, help="padded genes in one cell of the replayed (longest) batch")
    p.add_argument("--no_side_by_side", action="store_true", help="only the profile")
    args = p.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    replays = [] if args.replays == "none" else args.replays.split(",")
    unknown = [k for k in replays if k not in REPLAYS]
    if unknown:
        p.error(f"--replays {unknown[0]}: allowed {', '.join(REPLAYS)} or none")

    from sitra.runtime import progress_bar

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lengths = gene_counts(args.cells, seed=2)
        write_corpus(tmp / "corpus", lengths, seed=3)
        write_teacher(tmp / "teacher", 4, 128)
        # the same teacher whose config gives the student (which copies it) attention dropout 0
        shutil.copytree(tmp / "teacher", tmp / "teacher_no_attn_dropout")
        config_path = tmp / "teacher_no_attn_dropout" / "config.json"
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"attention_probs_dropout_prob": 0.0}))
        common = {"corpus": str(tmp / "corpus"), "storage": str(tmp), "batch_size": args.batch_size, "threads": args.threads}
        teachers = {"seed": "teacher", "job": "teacher", "job_no_attn_dropout": "teacher_no_attn_dropout"}
        plan = [] if args.no_side_by_side else [(key, r) for r in range(args.rounds) for key, _ in RUNS]
        results, profiled = {key: [] for key, _ in RUNS}, {}
        bar = progress_bar(total=len(plan) + len(replays), desc="fresh-process runs")
        for key, _ in plan:
            spec = common | {"kind": key, "key": key, "steps": args.steps, "teacher": str(tmp / teachers[key])}
            results[key].append(in_fresh_process(spec, tmp))
            bar.update(1)
        for key in replays:
            spec = common | {"kind": "replay", "key": key, "teacher": str(tmp / "teacher"), "padding": args.replay_padding}
            profiled[key] = in_fresh_process(spec, tmp)
            bar.update(1)
        bar.close()
    print(f"\ncells: {args.cells}, median {int(statistics.median(lengths))} genes, {(lengths == MAX_LENGTH).mean():.0%} at "
          f"{MAX_LENGTH}; batch {args.batch_size} cells; teacher 4 x 128 -> student 2 x 64, vocabulary {VOCAB:,}; "
          f"{args.threads} threads; MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}\n")
    if plan:
        print(f"## Side by side: {args.steps} steps a run, fresh processes, interleaved\n")
        print(side_by_side(results, args.rounds) + "\n")
    if profiled:
        r = next(iter(profiled.values()))
        print(f"## One training step on the longest batch ({r['shape'][0]} x {r['shape'][1]}, {r['tokens']:,} non-pad tokens), "
              "MiB above the resident size before the step\n")
        print(phase_table(profiled) + "\n")
        print("## What holds the peak (MiB at the step's peak, above the resident size before the models were loaded)\n")
        print(component_table(profiled, [k for k in ("seed", "job", "no_attn_dropout", "key_mask", "chunked_loss") if k in profiled]))


if __name__ == "__main__":
    main()
