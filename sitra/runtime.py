"""Where and how a job runs: its device, precision, random seed, progress bar and, for
data-parallel jobs, its processes (one per device, started by torchrun, by srun, or by the launcher.

`setup()` reads the rendezvous from the environment (torchrun's RANK/WORLD_SIZE/MASTER_ADDR/
MASTER_PORT, or SLURM's task variables, which are turned into those) and joins the process group:
NCCL on GPUs, gloo on CPU. Every process runs the whole job; only rank 0 writes files and prints.
Without any of these variables sitra runs as one process and nothing here does anything.
"""
import builtins
import os
import random
import resource
import sys
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sitra.errors import UsageError

TIMEOUT = timedelta(minutes=60)  # rank 0 evaluates alone while the others wait at the next all-reduce


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def _export_slurm_env():
    """Under `srun` (or a submitit task) with several tasks and no torchrun, write the torchrun
    variables from SLURM's (or submitit's) description of the job."""
    if "WORLD_SIZE" in os.environ:
        return
    if os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit import JobEnvironment

        env = JobEnvironment()
    elif int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # srun; not the batch script itself
        from submitit.slurm.slurm import SlurmJobEnvironment

        env = SlurmJobEnvironment()
    else:
        return
    if env.num_tasks <= 1:
        return
    port = os.environ.get("MASTER_PORT") or str(random.Random(env.job_id).randint(20000, 60000))
    os.environ.update(MASTER_ADDR=os.environ.get("MASTER_ADDR", env.hostnames[0]), MASTER_PORT=port,
                      RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank))


def setup():
    """Join the process group the environment describes; a one-line error if it is incomplete."""
    if dist.is_initialized():
        return
    _export_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start several processes with "
                         "torchrun, srun or jobs/launch.py --tasks_per_node")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    if dist.get_rank() != 0:
        _silence_print()


def _silence_print():
    """Rank 0 speaks for the job; the others print only errors (print(..., force=True))."""
    plain = builtins.print

    def quiet(*args, force=False, **kwargs):
        if force:
            plain(*args, **kwargs)

    builtins.print = quiet


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """The sums over all processes of a few numbers (one collective)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return nullcontext, False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision == "fp16"


def progress_bar(**kwargs):
    """tqdm that redraws every second on a terminal, and every 30 s into a log file (SLURM)."""
    interactive = sys.stderr.isatty()
    kwargs.setdefault("disable", not is_main())
    return tqdm(mininterval=1.0 if interactive else 30.0, dynamic_ncols=interactive, **kwargs)


def peak_memory_mb(device) -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, resident size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
