"""The one training loop every sitra job uses, resumable from its latest checkpoint.

A checkpoint (`checkpoints/<run>/latest.pt`) holds the trainable weights, optimizer, scheduler,
grad scaler, RNG states and the data position (epoch, batch within the epoch); it is written to a
temporary file and renamed. Rerunning the same command resumes from it and, on CPU, ends with the
same parameters bit for bit as a run that was never stopped.

Under torchrun, srun or the launcher's --tasks_per_node the loop runs data-parallel: the trained
module is wrapped in DistributedDataParallel, every process reads its own slice of each batch,
gradients are all-reduced once per optimizer step (not on the accumulation micro-steps), and only
rank 0 evaluates, logs and writes checkpoints (which hold every process's random state).

Reading order: `Student` (one trained module: its optimizer, schedule, random stream, checkpoint,
best weights and log), the fusion section (students sharing one loop start and save together),
then the loop itself, `train_many`, with the helpers for one step before it.
"""
import hashlib
import json
import math
import os
import pickle
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_scheduler

from sitra import runtime
from sitra.args import RunArgs, check_values
from sitra.errors import Interrupted, UsageError
from sitra.models.assembly import load_weights
from sitra.results import RunLog, atomic_write
from sitra.runtime import autocast_for, peak_memory_mb, pick_device, progress_bar

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
    """One-line errors before any compute: the range of every flag of the job (the parser's own
    check, sitra.args.check_values, so that jobs built in Python get it too), and a CUDA device."""
    check_values(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device here; use --device cpu or auto")


_stop_requested = threading.Event()


_stop_reason = {"why": ""}


def request_stop(stop: bool = True, reason: str = ""):
    """Ask the running loop to save and stop after the current step (safe in a signal handler);
    request_stop(False) withdraws the request. `reason` (e.g. SIGTERM) goes into the message."""
    _stop_reason["why"] = reason if stop else ""
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
    """Where a student is. step, epoch and batch are the data position, which fused students share."""
    step: int = 0          # optimizer steps done
    epoch: int = 0         # current epoch
    batch: int = 0         # micro-batches of the current epoch already consumed
    best: float = math.inf
    best_step: int = -1
    last_eval_step: int = -1


@dataclass
class Trainee:
    """What a job gives the loop for one student: the trained module with its loss, run folder and
    log, and how it is evaluated; several may share one loop (a fused sweep)."""
    model: nn.Module
    step_loss: object
    run: object
    log: object
    evaluate: object = None
    select: str = "eval_loss"


def _without_folders(value):
    """A flag's value with every path cut to its last part: a folder moved, a clone elsewhere or
    data staged to a node's scratch disk keep the student's random stream."""
    if isinstance(value, str) and ("/" in value or os.sep in value):
        return os.path.basename(os.path.normpath(value))
    if isinstance(value, (list, tuple)):
        return [_without_folders(v) for v in value]
    return value


def random_stream(seed: int, student_config: dict, rank: int) -> dict:
    """The RNG state (dropout) of one trainee in one process, derived from the seed, the flags
    that make the student (`Run.student_config`: not its name or folder, nor whether its teacher
    runs live or from records; of paths, only their last part) and the rank: what a student draws
    does not depend on which other students share its loop, nor on where its files lie."""
    identity = json.dumps({k: _without_folders(v) for k, v in student_config.items()}, sort_keys=True, default=str)
    key = [int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "little"), rank]
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))
        return _rng_state()


def _detached(value):
    """A loss part as it is summed over micro-batches: a float64 tensor left on its device (read
    on the host only when the step is logged), or a float."""
    return value.detach().double().reshape(()) if torch.is_tensor(value) else float(value)


def _host_floats(values: list) -> list[float]:
    """Python floats of numbers and 0-dim tensors; the tensors are read in one device-to-host copy."""
    tensors = [v for v in values if torch.is_tensor(v)]
    read = iter(torch.stack([t.to(tensors[0].device, torch.float64) for t in tensors]).tolist() if tensors else [])
    return [next(read) if torch.is_tensor(v) else float(v) for v in values]


class Student:
    """One trained module and all the loop keeps for it: its step_loss (data-parallel when several
    processes train), optimizer, LR schedule, grad scaler, random stream (dropout), progress and
    best choice, its checkpoint files (latest.pt, best.safetensors) and its log."""

    def __init__(self, spec: Trainee, args: TrainArgs, total: int, device, use_scaler: bool):
        self.model, self.step_loss, self.run, self.log = spec.model, spec.step_loss, spec.run, spec.log
        self.evaluate, self.select = spec.evaluate, spec.select
        self.forward = data_parallel(self.model, self.step_loss, device)
        self.optimizer = _optimizer(self.model, args)
        self.scheduler = get_scheduler(args.lr_scheduler, self.optimizer, num_warmup_steps=args.warmup_steps,
                                       num_training_steps=total)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        folder = self.run.checkpoint_dir
        self.latest, self.next, self.best_path = folder / "latest.pt", folder / "latest.next.pt", folder / "best.safetensors"
        self.previous = folder / "previous.pt"  # the checkpoint before latest.pt, kept until the next one is on disk
        self.progress = Progress()
        self.rng = random_stream(args.seed, self.run.student_config, runtime.rank())
        self.sums, self.lr, self.grad_norm = {}, None, None  # of the step being taken

    # -- its checkpoint

    def resume(self, device, total: int):
        """Continue from latest.pt if there is one: weights, optimizer, schedule, scaler, progress and
        this process's random stream. The log starts (or continues) either way."""
        if not self.latest.exists():
            self.log.start()
            return
        ckpt = self._read_checkpoint(device)
        if len(ckpt["rng"]) != runtime.world_size():
            raise UsageError(f"{self.latest} was written by {len(ckpt['rng'])} processes and this run has "
                             f"{runtime.world_size()}: resume with as many processes, or pass --overwrite")
        self.model.load_state_dict(ckpt["model"], strict=False)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress(**ckpt["progress"])
        self.rng = ckpt["rng"][runtime.rank()]
        self.log.start(resume_step=self.progress.step)
        print(f"resuming {self.run.name} from step {self.progress.step} of {total}")

    def _read_checkpoint(self, device) -> dict:
        """latest.pt, or previous.pt where latest.pt cannot be read (said in one line and in the log).
        Checkpoints hold tensors and plain data only and load with weights_only: reading one runs no code."""
        for path in (self.latest, self.previous):
            try:
                ckpt = torch.load(path, map_location=device, weights_only=True)
                if not isinstance(ckpt, dict) or not {"model", "optimizer", "progress", "rng"} <= set(ckpt):
                    raise ValueError("not a sitra checkpoint")
            except FileNotFoundError:
                continue
            except Exception as e:  # truncated, corrupt, or holding objects that are not plain data
                reason = ("holds objects that are not plain data, which sitra never unpickles" if isinstance(e, pickle.UnpicklingError)
                          else (str(e).strip().splitlines() or [type(e).__name__])[0][:160])
                if path == self.latest and self.previous.exists():
                    print(f"{path}: unreadable ({reason}); resuming from {self.previous}")
                    self.log.note(resumed_from_previous=f"{path}: {reason}")
                    continue
                raise UsageError(f"{path}: unreadable checkpoint ({reason}); nothing was deleted: restore it, or "
                                 "pass --overwrite to start the run over") from None
            return ckpt
        raise UsageError(f"{self.latest}: unreadable and no earlier checkpoint to resume from; pass --overwrite to start over")

    def save(self, path, at: Progress, rngs: list):
        """Write the checkpoint at data position `at` to `path` (rank 0); rngs: this student's
        random stream in every process. The log is flushed first: it never lags a checkpoint."""
        self.log.flush()
        self.move_to(at)
        state = {"model": trainable_state(self.model), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "progress": vars(self.progress).copy(), "rng": rngs, "config": self.run.config}
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def move_to(self, at: Progress):
        self.progress.step, self.progress.epoch, self.progress.batch = at.step, at.epoch, at.batch

    def write_best(self, metadata: dict):
        weights = {k: v.contiguous() for k, v in trainable_state(self.model).items()}
        atomic_write(self.best_path, lambda tmp: save_file(weights, str(tmp), metadata=metadata))

    # -- one optimizer step

    def micro_step(self, batch, share: float, n: int, autocast, no_sync: bool):
        """Forward and backward of one of the step's n micro-batches (`share`: world x this process's
        fraction of it), drawing dropout from the student's own stream. The loss and its parts add
        to the step's sums, weighted alike, as detached tensors: no host sync per micro-batch."""
        outer = _swap_stream(self.rng)
        with self.forward.no_sync() if no_sync else nullcontext():
            with autocast():
                loss, parts = self.forward(batch)
            self.scaler.scale(loss * share / n).backward()
        self.rng = _swap_stream(outer)
        for k, v in {"loss": loss, **parts}.items():
            self.sums[k] = self.sums.get(k, 0.0) + _detached(v) * share / n

    def optimizer_step(self, max_grad_norm: float):
        self.scaler.unscale_(self.optimizer)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm or math.inf)  # read when logged
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()

    def log_step(self, step: int, means: dict, grad_norm: float, tokens: float, tokens_per_s: float, tokens_per_s_total: float):
        self.log.train(step, lr=self.lr, grad_norm=grad_norm, tokens=tokens, tokens_per_s=tokens_per_s,
                       tokens_per_s_total=tokens_per_s_total, **means)
        self.log.flush(durable=False)  # one appended line: a running job's log shows every step
        self.sums = {}

    # -- evaluation and the end

    def evaluated(self, step: int, metrics: dict):
        """Back to training modes; log the held-out metrics; a new lowest `select` is the best."""
        _freeze_modes(self.model)
        self.progress.last_eval_step = step
        self.log.eval(step, **metrics)
        if metrics[self.select] < self.progress.best:
            self.progress.best, self.progress.best_step = float(metrics[self.select]), step
            self.write_best({"step": str(step), self.select: str(metrics[self.select])})

    def finish(self, at: Progress, evaluated: bool, peak_mb: float):
        if not self.best_path.exists() or not evaluated:  # nothing chose a best: the final weights
            self.write_best({"step": str(at.step)})
        self.log.note(peak_memory_mb=peak_mb)
        self.move_to(at)


# ---------------------------------------------------------------------------------------------
# Fusion: the students of one loop read the same batches (one teacher pass) and move together.
# They resume from one data position, and their checkpoints are committed together (every
# latest.next.pt written, then all renamed to latest.pt), so a stop at any moment, even in the
# middle of a save, leaves them all at one step.


def _settle_checkpoints(students):
    """Finish or undo a save that stopped half-way: a fused save writes every trainee's
    latest.next.pt, then renames them to latest.pt. If all next files were written (or already
    renamed) the renames are completed, else the next files are dropped: all trainees resume
    from one step."""
    pending = [s for s in students if s.next.exists()]
    if not pending or not runtime.is_main():
        return

    def step_of(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["progress"]["step"]
        except Exception:  # unreadable: never the step the others are at
            return None

    step = step_of(pending[0].next)
    complete = step is not None and all(step_of(s.next if s.next.exists() else s.latest) == step for s in students)
    for s in pending:
        if complete:
            _commit(s)
        else:
            s.next.unlink()


def _commit(s: Student):
    """latest.pt becomes previous.pt, latest.next.pt becomes latest.pt."""
    if s.latest.exists():
        os.replace(s.latest, s.previous)
    os.replace(s.next, s.latest)


def _start_together(students: list[Student], args: TrainArgs, device, total: int) -> Progress:
    """Say how the batch is made, settle a save cut short, resume every student (or start its log)
    and return the data position (step, epoch, batch) they all continue from."""
    world, accum = runtime.world_size(), args.gradient_accumulation_steps
    effective = args.batch_size * world * accum
    if world > 1 or accum > 1:
        print(f"effective batch: {args.batch_size} per process x {world} processes x {accum} accumulation = {effective}")
    if len(students) > 1:
        print(f"{len(students)} students share each teacher pass: " + ", ".join(s.run.name for s in students))
    _settle_checkpoints(students)
    runtime.barrier()
    for s in students:
        s.log.note(world_size=world, effective_batch_size=effective, fused_students=len(students))
        s.resume(device, total)
    if len({(s.progress.step, s.progress.epoch, s.progress.batch) for s in students}) > 1:
        raise UsageError("the fused runs were saved at different steps: rerun them separately or pass --overwrite")
    first = students[0].progress
    return Progress(step=first.step, epoch=first.epoch, batch=first.batch)


def _save_together(students: list[Student], at: Progress):
    """Every student's checkpoint at `at`: all latest.next.pt files, then all renames (rank 0)."""
    rngs = runtime.all_gather_object([s.rng for s in students])  # each process's stream of each student
    if not runtime.is_main():
        return
    for i, s in enumerate(students):
        s.save(s.next, at, [r[i] for r in rngs])
    for s in students:  # every student's checkpoint is written: now they all move on together
        _commit(s)


# ---------------------------------------------------------------------------------------------
# The loop and its steps


def _cadence(args: TrainArgs, n_batches: int) -> tuple[int, int, int]:
    """(optimizer steps to train, evaluate every N steps, save every N steps)."""
    steps_per_epoch = math.ceil(n_batches / args.gradient_accumulation_steps)
    total = args.max_steps or args.epochs * steps_per_epoch
    save_every = args.save_steps or max(1, round(args.save_checkpoint_every * steps_per_epoch))
    return total, args.eval_steps or steps_per_epoch, save_every


def _step_batches(batches, at: Progress, accum: int):
    """The micro-batches of each optimizer step from data position `at` to the end of its epoch:
    ([(batch, this process's share of it)], whether the epoch ends with them). at.batch counts
    the micro-batches read."""
    micro = []
    for batch in batches.epoch(at.epoch, start=at.batch):
        micro.append((batch, batches.share(at.batch)))
        at.batch += 1
        epoch_done = at.batch == len(batches)
        if len(micro) == accum or epoch_done:
            yield micro, epoch_done
            micro = []


def _log_step(students: list[Student], step: int, tokens: int, tick: float, stop: bool, device, bar) -> bool:
    """Log the step of every student: its loss parts (summed over micro-batches, then averaged over
    processes), lr, grad norm, the step's non-pad tokens (all processes) and tokens/s. The values are read on the host here, once per step,
    and all-reduced in one collective with the token count and the stop flag; returns whether any
    process asks to stop."""
    world = runtime.world_size()
    numbers = _host_floats([s.grad_norm for s in students] + [v for s in students for v in s.sums.values()])
    norms, flat = numbers[:len(students)], numbers[len(students):]
    elapsed = max(time.perf_counter() - tick, 1e-9)
    total_tokens, stop, *flat = runtime.all_reduce_sum([tokens, stop, *flat], device)
    tok_s, tok_s_total = tokens / elapsed, total_tokens / elapsed
    means = []
    for s in students:
        means.append({k: v / world for k, v in zip(s.sums, flat)})  # the mean over processes
        flat = flat[len(s.sums):]
    for s, mean, norm in zip(students, means, norms):
        s.log_step(step, mean, norm, total_tokens, tok_s, tok_s_total)
    bar.update(1)
    bar.set_postfix(loss=f"{means[0]['loss']:.4g}", tok_s=f"{tok_s:.0f}",
                    **({"tok_s_total": f"{tok_s_total:.0f}"} if world > 1 else {}), refresh=False)
    return stop


def _evaluate(students: list[Student], evaluate_all, autocast, step: int, bar):
    """Evaluate every student (evaluate_all() may share the teacher's passes), log, keep the best."""
    for s in students:
        s.model.eval()
    with torch.inference_mode(), autocast():
        all_metrics = evaluate_all() if evaluate_all is not None else [s.evaluate() for s in students]
    for s, metrics in zip(students, all_metrics):
        s.evaluated(step, metrics)
    if len(students) == 1:
        bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in all_metrics[0].items()))
    else:
        bar.write(f"step {step}: {students[0].select} " + "  ".join(
            f"{s.run.name} {m[s.select]:.4g}" for s, m in zip(students, all_metrics)))


def _stop(students: list[Student], at: Progress, total: int, bar):
    _save_together(students, at)
    bar.close()
    why = f" by {_stop_reason['why']}" if _stop_requested.is_set() and _stop_reason["why"] else ""
    raise Interrupted(f"stopped at step {at.step} of {total}{why}; rerun the same command to resume")


def train(model, batches, step_loss, args: TrainArgs, run, log, evaluate=None, select: str = "eval_loss"):
    """Train the parameters of `model` that require grad; returns the final `Progress`.

    step_loss(batch) -> (loss, {name: float or 0-dim tensor}) computes one micro-batch's loss (the
    mean over its positions); micro-batch losses are averaged over the accumulation group and over
    processes (each weighted by its share of the batch's examples). evaluate() -> dict gives
    held-out metrics; the checkpoint with the lowest `select` is kept as best.safetensors.
    """
    return train_many([Trainee(model, step_loss, run, log, evaluate, select)], batches, args)[0]


def train_many(trainees: list[Trainee], batches, args: TrainArgs, prepare=None, evaluate_all=None) -> list[Progress]:
    """Train several modules on the same batches in one loop (see `train` for one).

    prepare(batch) -> batch runs once per micro-batch before any trainee's step_loss, e.g. the
    frozen teacher's forward, whose outputs every trainee then reads: a fused sweep pays for
    one teacher pass per batch. evaluate_all() -> [metrics of each trainee] may likewise share
    the teacher's passes over the held-out batches. Each trainee's result is what it would be alone.
    """
    device, world = pick_device(args.device), runtime.world_size()
    autocast, use_scaler = autocast_for(device, args.precision)
    if world > 1:
        batches = batches.shard(runtime.rank(), world)
    total, eval_every, save_every = _cadence(args, len(batches))
    students = [Student(t, args, total, device, use_scaler) for t in trainees]
    at = _start_together(students, args, device, total)  # the data position all students share
    # only rank 0 evaluates: the other processes wait for it at the next all-reduce
    evaluating = runtime.is_main() and (evaluate_all is not None or all(s.evaluate for s in students))
    name = students[0].run.name + (f" (+{len(students) - 1} fused)" if len(students) > 1 else "")
    bar = progress_bar(total=total, initial=at.step, desc=name)
    if evaluating and at.step == 0 and students[0].progress.last_eval_step < 0:
        _evaluate(students, evaluate_all, autocast, at.step, bar)  # the start: every log shows how far training moved
    for s in students:
        _freeze_modes(s.model)
    while at.step < total:  # one pass per epoch (the rest of one when resumed)
        if runtime.all_reduce_sum([_stop_requested.is_set()], device)[0]:
            _stop(students, at, total, bar)  # asked to stop before this step: the state is saved already
        tick, tokens = time.perf_counter(), 0
        for micro, epoch_done in _step_batches(batches, at, args.gradient_accumulation_steps):
            for i, (batch, share) in enumerate(micro):
                tokens += int(batch["attention_mask"].sum())  # on the host, before the copy to the device
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                if prepare is not None:
                    with autocast():
                        batch = prepare(batch)  # e.g. the teacher's forward, once for all students
                for s in students:  # gradients are all-reduced once, after the last micro-batch
                    s.micro_step(batch, share, len(micro), autocast, no_sync=world > 1 and i < len(micro) - 1)
            for s in students:
                s.optimizer_step(args.max_grad_norm)
            at.step += 1
            if epoch_done:
                at.epoch, at.batch = at.epoch + 1, 0
            stop = _stop_requested.is_set() or at.step == args.stop_after_steps
            stop = _log_step(students, at.step, tokens, tick, stop, device, bar)  # any process asks to stop
            tick, tokens = time.perf_counter(), 0
            done = at.step >= total
            if evaluating and (at.step % eval_every == 0 or done):
                _evaluate(students, evaluate_all, autocast, at.step, bar)
            if at.step % save_every == 0 or done:
                _save_together(students, at)
            if stop and not done:
                _stop(students, at, total, bar)
            if done:
                break
    bar.close()
    peak = peak_memory_mb(device)
    for s in students:
        s.finish(at, evaluating, peak)
    runtime.barrier()  # the others may read best.safetensors next
    return [s.progress for s in students]


# ---------------------------------------------------------------------------------------------
# held-out means, and the shape of the module-level jobs (a block, a merged layer, alone or fused)


def held_out_mean(step_loss, batches, device) -> dict:
    """The mean over held-out batches of the loss and the numbers `step_loss` reports."""
    return held_out_means([step_loss], batches, device)[0]


def held_out_means(step_losses, batches, device, prepare=None) -> list[dict]:
    """held_out_mean of several step losses, with one `prepare` (teacher pass) per batch."""
    sums, n = [{} for _ in step_losses], 0
    for batch in batches.epoch(0):
        batch = {k: v.to(device) for k, v in batch.items()}
        if prepare is not None:
            batch = prepare(batch)
        for step_loss, total in zip(step_losses, sums):
            loss, parts = step_loss(batch)
            for k, v in {"eval_loss": loss, **parts}.items():  # summed as float64 tensors: no host sync per batch
                total[k] = total.get(k, 0.0) + torch.as_tensor(v).detach().double()
        n += 1
    return [{k: float(v) / n for k, v in total.items()} for total in sums]


def train_modules(modules, job: str, runs, args, train_batches, eval_batches, step_losses, device, prepare=None) -> list[dict]:
    """The shape of every module-level job, for one module or a fused group: train each module
    (its held-out mean of its step_loss selects its best checkpoint), load the best weights back,
    and log the final held-out numbers. `prepare(batch)` (the shared teacher pass) runs once per
    batch before every module's step_loss, in training and in evaluation."""

    def evaluate_all():
        return held_out_means(step_losses, eval_batches, device, prepare)

    finals = []
    with ExitStack() as stack:
        logs = [stack.enter_context(RunLog(r.log_path, job, r.name, r.config)) for r in runs]
        trainees = [Trainee(m, loss, r, log) for m, loss, r, log in zip(modules, step_losses, runs, logs)]
        progresses = train_many(trainees, train_batches, args, prepare, evaluate_all)
        for t in trainees:
            t.model.load_state_dict(load_weights(t.run.checkpoint_dir))
            t.model.eval()
        with torch.inference_mode():
            all_final = evaluate_all()
        for t, progress, final in zip(trainees, progresses, all_final):
            final["best_step"] = progress.best_step
            t.log.complete(final)
            finals.append(final)
            print(f"{t.run.name}: best step {progress.best_step}, held-out " +
                  ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k != "best_step"))
            print(f"checkpoint: {t.run.checkpoint_dir / 'best.safetensors'}; log: {t.run.log_path}")
    return finals
