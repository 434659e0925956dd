"""The one training loop every sitra job uses, resumable from its latest checkpoint.

A checkpoint (`checkpoints/<run>/latest.pt`) holds the trainable weights, optimizer, scheduler,
grad scaler, RNG states and the data position (epoch, batch within the epoch); it is written to a
temporary file and renamed. Rerunning the same command resumes from it and, on CPU, ends with the
same parameters bit for bit as a run that was never stopped.

Under torchrun, srun or the launcher's --tasks_per_node the loop runs data-parallel: the trained
module is wrapped in DistributedDataParallel, every process reads its own slice of each batch,
gradients are all-reduced once per optimizer step (not on the accumulation micro-steps), and only
rank 0 evaluates, logs and writes checkpoints (which hold every process's random state).
"""
import hashlib
import json
import math
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_scheduler

from sitra import runtime
from sitra.args import RunArgs
from sitra.errors import Interrupted, UsageError
from sitra.runtime import autocast_for, peak_memory_mb, pick_device, progress_bar
from sitra.results import atomic_write

SCHEDULERS = ("linear", "cosine", "constant_with_warmup", "constant")


@dataclass(kw_only=True)
class TrainArgs(RunArgs):
    """Flags every training job shares."""
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps to train; 0: as many as --epochs give"})
    batch_size: int = field(default=32, metadata={"help": "examples per micro-batch on each process (device)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    adam_weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    lr_scheduler: Literal[SCHEDULERS] = field(default="linear", metadata={"help": "learning-rate shape after warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip gradients to this norm; 0: no clipping"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps; 0: at the end of each epoch"})
    save_checkpoint_every: float = field(default=1.0, metadata={"help": "save a checkpoint every N epochs (fractions allowed)"})
    save_steps: int = field(default=0, metadata={"help": "save a checkpoint every N steps (overrides --save_checkpoint_every)"})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "autocast dtype; auto: bf16 on a GPU that has it, else fp32"})
    stop_after_steps: int = field(default=0, metadata={"help": "save and stop once this step is reached (rerun to resume); 0: off", "not_part_of_run": True})
    max_memory_gb: float = field(default=0, metadata={"help": "refuse a fused group of students estimated to need more memory; 0: no limit", "not_part_of_run": True})


def check_train_args(args: TrainArgs):
    """One-line errors for loop flags, before any compute."""
    positive = {"batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "epochs": args.epochs if not args.max_steps else 1}
    for name, v in positive.items():
        if v < 1:
            raise UsageError(f"--{name} {v}: must be at least 1")
    for name in ("max_steps", "warmup_steps", "eval_steps", "save_steps", "stop_after_steps"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} {getattr(args, name)}: must be 0 or more")
    if not args.lr > 0:
        raise UsageError(f"--lr {args.lr}: must be positive")
    if not args.save_checkpoint_every > 0:
        raise UsageError(f"--save_checkpoint_every {args.save_checkpoint_every}: must be positive (epochs)")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise UsageError(f"--device {args.device}: choose auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device here; use --device cpu or auto")


_stop_requested = threading.Event()


def request_stop(stop: bool = True):
    """Ask the running loop to save and stop after the current step (safe in a signal handler);
    request_stop(False) withdraws the request."""
    _stop_requested.set() if stop else _stop_requested.clear()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _swap_stream(state: dict) -> dict:
    """Make `state` the global torch RNG (dropout); return the one it replaced."""
    old = _rng_state()
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return old


def _freeze_modes(model):
    """Train mode for modules being trained; frozen modules run as at inference (no dropout)."""
    model.train()
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


def _optimizer(model, args):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.adam_weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def trainable_state(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class StepLoss(nn.Module):
    """The trained model and its loss as one module: DistributedDataParallel must see the forward
    that produces the loss to all-reduce the gradients of the parameters it used."""

    def __init__(self, model, step_loss):
        super().__init__()
        self.model, self.step_loss = model, step_loss

    def forward(self, batch):
        return self.step_loss(batch)


def data_parallel(model, step_loss, device):
    """step_loss itself in one process; a DistributedDataParallel module over it in several.

    The frozen teacher is never wrapped: DDP reduces only parameters that require grad, and
    find_unused_parameters lets a job leave some trained parameters out of a step."""
    if runtime.world_size() == 1:
        return step_loss
    return DistributedDataParallel(StepLoss(model, step_loss), device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=True)


@dataclass
class Progress:
    step: int = 0          # optimizer steps done
    epoch: int = 0         # current epoch
    batch: int = 0         # micro-batches of the current epoch already consumed
    best: float = math.inf
    best_step: int = -1
    last_eval_step: int = -1


@dataclass
class Trainee:
    """One trained module with its loss, run folder and log; several may share one loop (a fused
    sweep), each with its own optimizer, schedule, checkpoints, best-model choice and random stream."""
    model: nn.Module
    step_loss: object
    run: object
    log: object
    evaluate: object = None
    select: str = "eval_loss"


def random_stream(seed: int, student_config: dict, rank: int) -> dict:
    """The RNG state (dropout) of one trainee in one process, derived from the seed, the flags
    that make the student (`Run.student_config`: not its name or folder, nor whether its teacher
    runs live or from records) and the rank: what a student draws does not depend on which other
    students share its loop."""
    identity = json.dumps(student_config, sort_keys=True, default=str)
    key = [int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "little"), rank]
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))
        return _rng_state()


class _State:
    """A trainee's optimizer, schedule, scaler, progress, random stream and checkpoint paths."""

    def __init__(self, t: Trainee, args, total, device, use_scaler):
        self.t = t
        self.forward = data_parallel(t.model, t.step_loss, device)
        self.optimizer = _optimizer(t.model, args)
        self.scheduler = get_scheduler(args.lr_scheduler, self.optimizer, num_warmup_steps=args.warmup_steps,
                                       num_training_steps=total)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.params = [p for p in t.model.parameters() if p.requires_grad]
        self.latest, self.best_path = t.run.checkpoint_dir / "latest.pt", t.run.checkpoint_dir / "best.safetensors"
        self.next = t.run.checkpoint_dir / "latest.next.pt"
        self.progress = Progress()
        self.rng = random_stream(args.seed, t.run.student_config, runtime.rank())


def _settle_checkpoints(states):
    """Finish or undo a save that stopped half-way: a fused save writes every trainee's
    latest.next.pt, then renames them to latest.pt. If all next files were written (or already
    renamed) the renames are completed, else the next files are dropped: all trainees resume
    from one step."""
    pending = [s for s in states if s.next.exists()]
    if not pending or not runtime.is_main():
        return
    step = torch.load(pending[0].next, map_location="cpu", weights_only=False)["progress"]["step"]
    def at_step(s):
        f = s.next if s.next.exists() else s.latest
        return f.exists() and torch.load(f, map_location="cpu", weights_only=False)["progress"]["step"] == step
    complete = all(at_step(s) for s in states)
    for s in pending:
        os.replace(s.next, s.latest) if complete else s.next.unlink()


def train(model, batches, step_loss, args: TrainArgs, run, log, evaluate=None, select: str = "eval_loss"):
    """Train the parameters of `model` that require grad; returns the final `Progress`.

    step_loss(batch) -> (loss, {name: float}) computes one micro-batch's loss (the mean over its
    positions); micro-batch losses are averaged over the accumulation group and over processes
    (each weighted by its share of the batch's examples). evaluate() -> dict gives held-out
    metrics; the checkpoint with the lowest `select` is kept as best.safetensors.
    """
    return train_many([Trainee(model, step_loss, run, log, evaluate, select)], batches, args)[0]


def train_many(trainees: list[Trainee], batches, args: TrainArgs, prepare=None, evaluate_all=None) -> list[Progress]:
    """Train several modules on the same batches in one loop (see `train` for one).

    prepare(batch) -> batch runs once per micro-batch before any trainee's step_loss, e.g. the
    frozen teacher's forward, whose outputs every trainee then reads: a fused sweep pays for
    one teacher pass per batch. evaluate_all() -> [metrics of each trainee] may likewise share
    the teacher's passes over the held-out batches. Each trainee's result is what it would be alone.
    """
    device = pick_device(args.device)
    autocast, use_scaler = autocast_for(device, args.precision)
    world, main = runtime.world_size(), runtime.is_main()
    if world > 1:
        batches = batches.shard(runtime.rank(), world)
    accum = args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(batches) / accum)
    total = args.max_steps or args.epochs * steps_per_epoch
    save_every = args.save_steps or max(1, round(args.save_checkpoint_every * steps_per_epoch))
    eval_every = args.eval_steps or steps_per_epoch
    states = [_State(t, args, total, device, use_scaler) for t in trainees]
    effective = args.batch_size * world * accum
    if world > 1 or accum > 1:
        print(f"effective batch: {args.batch_size} per process x {world} processes x {accum} accumulation = {effective}")
    if len(states) > 1:
        print(f"{len(states)} students share each teacher pass: " + ", ".join(s.t.run.name for s in states))

    _settle_checkpoints(states)
    runtime.barrier()
    for s in states:
        s.t.log.note(world_size=world, effective_batch_size=effective, fused_students=len(states))
        if s.latest.exists():
            ckpt = torch.load(s.latest, map_location=device, weights_only=False)
            if len(ckpt["rng"]) != world:
                raise UsageError(f"{s.latest} was written by {len(ckpt['rng'])} processes and this run has {world}: "
                                 "resume with as many processes, or pass --overwrite")
            s.t.model.load_state_dict(ckpt["model"], strict=False)
            s.optimizer.load_state_dict(ckpt["optimizer"])
            s.scheduler.load_state_dict(ckpt["scheduler"])
            s.scaler.load_state_dict(ckpt["scaler"])
            s.progress = Progress(**ckpt["progress"])
            s.rng = ckpt["rng"][runtime.rank()]
            s.t.log.start(resume_step=s.progress.step)
            print(f"resuming {s.t.run.name} from step {s.progress.step} of {total}")
        else:
            s.t.log.start()
    if len({(s.progress.step, s.progress.epoch, s.progress.batch) for s in states}) > 1:
        raise UsageError("the fused runs were saved at different steps: rerun them separately or pass --overwrite")
    progress = states[0].progress  # the shared data position; each state keeps its own best

    def save():
        rngs = runtime.all_gather_object([s.rng for s in states])
        if not main:
            return
        for i, s in enumerate(states):
            s.t.log.flush()
            s.progress.step, s.progress.epoch, s.progress.batch = progress.step, progress.epoch, progress.batch
            state = {"model": trainable_state(s.t.model), "optimizer": s.optimizer.state_dict(),
                     "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(),
                     "progress": vars(s.progress).copy(), "rng": [r[i] for r in rngs], "config": s.t.run.config}
            atomic_write(s.next, lambda tmp: torch.save(state, tmp))
        for s in states:  # every trainee's checkpoint is written: now they all move on together
            os.replace(s.next, s.latest)

    def evaluate_each():
        return [s.t.evaluate() for s in states]

    def run_evals():
        for s in states:
            s.t.model.eval()
        with torch.inference_mode(), autocast():
            all_metrics = (evaluate_all or evaluate_each)()
        for s, metrics in zip(states, all_metrics):
            _freeze_modes(s.t.model)
            s.progress.last_eval_step = progress.step
            s.t.log.eval(progress.step, **metrics)
            if metrics[s.t.select] < s.progress.best:
                s.progress.best, s.progress.best_step = float(metrics[s.t.select]), progress.step
                meta = {"step": str(progress.step), s.t.select: str(metrics[s.t.select])}
                atomic_write(s.best_path, lambda tmp: save_file(
                    {k: v.contiguous() for k, v in trainable_state(s.t.model).items()}, str(tmp), metadata=meta))
            if len(states) == 1:
                bar.write(f"step {progress.step}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if len(states) > 1:
            bar.write(f"step {progress.step}: {states[0].t.select} " + "  ".join(
                f"{s.t.run.name} {m[s.t.select]:.4g}" for s, m in zip(states, all_metrics)))

    def stop_and_raise():
        save()
        bar.close()
        raise Interrupted(f"stopped at step {progress.step} of {total}; rerun the same command to resume")

    # only rank 0 evaluates: the other processes wait for it at the next all-reduce
    evaluating = main and (evaluate_all is not None or all(s.t.evaluate for s in states))
    name = states[0].t.run.name + (f" (+{len(states) - 1} fused)" if len(states) > 1 else "")
    bar = progress_bar(total=total, initial=progress.step, desc=name)
    if evaluating and progress.step == 0 and progress.last_eval_step < 0:
        run_evals()  # the starting point, so every log shows how far training moved
    for s in states:
        _freeze_modes(s.t.model)
    while progress.step < total:
        if runtime.all_reduce_sum([_stop_requested.is_set()], device)[0]:
            stop_and_raise()  # asked to stop before this step: the state is saved already
        micro = []
        tick, tokens = time.perf_counter(), 0
        for batch in batches.epoch(progress.epoch, start=progress.batch):
            micro.append((batch, batches.share(progress.batch)))
            progress.batch += 1
            epoch_done = progress.batch == len(batches)
            if len(micro) < accum and not epoch_done:
                continue
            parts_sums = [{} for _ in states]
            for i, (b, share) in enumerate(micro):
                b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
                tokens += int(b["attention_mask"].sum())
                if prepare is not None:
                    with autocast():
                        b = prepare(b)
                no_sync = world > 1 and i < len(micro) - 1  # all-reduce once, after the last micro-batch
                for s, parts_sum in zip(states, parts_sums):
                    global_rng = _swap_stream(s.rng)
                    with s.forward.no_sync() if no_sync else nullcontext():
                        with autocast():
                            loss, parts = s.forward(b)
                        s.scaler.scale(loss * share / len(micro)).backward()
                    s.rng = _swap_stream(global_rng)
                    for k, v in {"loss": float(loss.detach()), **parts}.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + float(v) * share / len(micro)
            micro = []
            lrs, norms = [], []
            for s in states:
                s.scaler.unscale_(s.optimizer)
                norms.append(float(torch.nn.utils.clip_grad_norm_(s.params, args.max_grad_norm or math.inf)))
                s.scaler.step(s.optimizer)
                s.scaler.update()
                s.optimizer.zero_grad(set_to_none=True)
                lrs.append(s.scheduler.get_last_lr()[0])
                s.scheduler.step()
            progress.step += 1
            if epoch_done:
                progress.epoch, progress.batch = progress.epoch + 1, 0
            elapsed = max(time.perf_counter() - tick, 1e-9)
            stop = _stop_requested.is_set() or progress.step == args.stop_after_steps
            flat = [v for parts_sum in parts_sums for v in parts_sum.values()]
            total_tokens, stop, *flat = runtime.all_reduce_sum([tokens, stop, *flat], device)
            tok_s, tok_s_total = tokens / elapsed, total_tokens / elapsed
            for s, parts_sum, lr, norm in zip(states, parts_sums, lrs, norms):
                n = len(parts_sum)
                mean = {k: v / world for k, v in zip(parts_sum, flat[:n])}  # the mean over processes
                flat = flat[n:]
                s.t.log.train(progress.step, lr=lr, grad_norm=norm, tokens_per_s=tok_s, tokens_per_s_total=tok_s_total, **mean)
                parts_sum.update(mean)
            bar.update(1)
            bar.set_postfix(loss=f"{parts_sums[0]['loss']:.4g}", tok_s=f"{tok_s:.0f}",
                            **({"tok_s_total": f"{tok_s_total:.0f}"} if world > 1 else {}), refresh=False)
            tick, tokens = time.perf_counter(), 0
            done = progress.step >= total
            if evaluating and (progress.step % eval_every == 0 or done):
                run_evals()
            if progress.step % save_every == 0 or done:
                save()
            if stop and not done:
                stop_and_raise()
            if done or epoch_done:
                break
    bar.close()
    peak = peak_memory_mb(device)
    for s in states:
        if not s.best_path.exists() or not evaluating:
            atomic_write(s.best_path, lambda tmp: save_file(
                {k: v.contiguous() for k, v in trainable_state(s.t.model).items()}, str(tmp),
                metadata={"step": str(progress.step)}))
        s.t.log.note(peak_memory_mb=peak)
        s.progress.step, s.progress.epoch, s.progress.batch = progress.step, progress.epoch, progress.batch
    runtime.barrier()  # the others may read best.safetensors next
    return [s.progress for s in states]
