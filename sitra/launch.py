"""Launch any sitra job locally or as one SLURM job array, and survive preemption.

`python jobs/launch.py JOB [job flags] [--blocks 0-11] [--sweep FLAG=V1,V2 ...] [launcher flags]`
expands the grid of sweep values, checks every task's flags, and submits the tasks through
submitit's `AutoExecutor.map_array` as one array. Each task calls the job's `run(args)`, the same
function `jobs/JOB.py` calls, so a task's results equal a direct run's.
"""
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from sitra import runtime
from sitra.args import as_used, check_values, marked
from sitra.cli import OneLineParser, apply_preset, fail, typed_fields
from sitra.errors import Interrupted, UsageError
from sitra.recipes import JOBS, job_module
from sitra.recipes.collect_results import CollectArgs
from sitra.recipes.collect_results import run as collect
from sitra.results import (
    RunLog,
    atomic_write,
    check_run_name,
    config_dict,
    diff_configs,
)
from sitra.train import request_stop


@dataclass(kw_only=True)
class LaunchArgs:
    sweep: list[str] = field(default_factory=list, metadata={
        "action": "append", "help": "a sweep axis FLAG=V1,V2,... of the job (repeatable); the grid of all axes is run"})
    blocks: str | None = field(default=None, metadata={"help": "shorthand for --sweep block=...: 0-11, 0,2,4 or 6"})
    fuse: str | None = field(default=None, metadata={
        "help": "sweep axes trained together in one task against one teacher pass, e.g. block_d_k,block_heads"})
    sweep_name: str | None = field(default=None, metadata={"help": "folder of this sweep under eval_results/ and checkpoints/ (default: the job name)"})
    storage_directory: str = field(default=".", metadata={"help": "where checkpoints/, eval_results/ and slurm_logs/ go (e.g. scratch)"})
    cluster: str | None = field(default=None, metadata={"help": "slurm, local or debug (default: slurm where sbatch exists, else local)"})
    partition: str | None = field(default=None, metadata={"help": "SLURM partition"})
    time: str = field(default="4:00:00", metadata={"help": "time limit per task: minutes, HH:MM:SS or D-HH:MM:SS"})
    nodes: int = field(default=1, metadata={"help": "nodes per task (several: data-parallel over them, SLURM only)"})
    tasks_per_node: int = field(default=1, metadata={"help": "processes per node, one per GPU (several: data-parallel training)"})
    gpus_per_task: int = field(default=0, metadata={"help": "GPUs per process"})
    cpus_per_task: int = field(default=2, metadata={"help": "CPU cores per task"})
    mem_gb: float = field(default=8, metadata={"help": "memory per task in GB"})
    array_parallelism: int = field(default=256, metadata={"help": "tasks of the array running at once"})
    account: str | None = field(default=None, metadata={"help": "SLURM account"})
    constraint: str | None = field(default=None, metadata={"help": "SLURM constraint, e.g. a GPU type"})
    slurm_setup: list[str] = field(default_factory=list, metadata={
        "action": "append", "help": "a shell line run before each task, e.g. 'module load stack/2024-06' (repeatable)"})
    wait: bool = field(default=False, metadata={"help": "wait for the array with a progress bar, then merge the results"})


def parse_time(text: str) -> int:
    """Minutes from SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text.strip())
    if not m:
        raise UsageError(f"--time {text}: use minutes, HH:MM:SS or D-HH:MM:SS")
    parts = [int(x) for x in m[2].split(":")]
    if m[1] is not None:
        h, mi, s = (parts + [0, 0])[:3]
    else:
        h, mi, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    minutes = int(m[1] or 0) * 1440 + h * 60 + mi + math.ceil(s / 60)
    if minutes < 1:
        raise UsageError(f"--time {text}: must be at least one minute")
    return minutes


def parse_blocks(text: str) -> list[str]:
    values = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(f"--blocks {text}: use a range like 0-11, a list like 0,2,4, or one block")
        lo, hi = int(m[1]), int(m[2] or m[1])
        values += [str(b) for b in range(lo, hi + 1)]
    if not values:
        raise UsageError(f"--blocks {text}: the range is empty")
    return values


def sweep_axes(largs: LaunchArgs, args_class) -> dict[str, list[str]]:
    """{flag: [values as typed]} in the order given; every flag must be one of the job's."""
    fields = {f.name for f in dataclasses.fields(args_class)}
    axes = {}
    if largs.blocks is not None:
        axes["block"] = parse_blocks(largs.blocks)
    for item in (v for group in largs.sweep for v in group):
        name, sep, values = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep:
            raise UsageError(f"--sweep {item}: write FLAG=V1,V2,...")
        if name not in fields:
            raise UsageError(f"--sweep {item}: {name} is not a flag of {args_class.__name__}; "
                             f"see its flags with --help")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise UsageError(f"--sweep {item}: no values; the grid would be empty")
        if name in axes:
            raise UsageError(f"--sweep {item}: {name} is swept twice")
        axes[name] = vals
    return axes


def task_name(values: dict) -> str:
    """A file-name-safe name from the sweep values: block6-block_d_k64-block_heads8."""
    def short(v):
        v = str(v)
        return re.sub(r"[^\w.=+-]+", "_", Path(v).name if "/" in v else v)

    return "-".join(f"{k}{short(v)}" for k, v in values.items()) or "task"


def job_args_class(module, job_argv: list[str]):
    """The job's flags: its ARGS, or for a job whose flags depend on its others (record_teacher
    --job JOB) what its `args_class(argv)` says."""
    return module.args_class(job_argv) if hasattr(module, "args_class") else module.ARGS


@dataclass
class Task:
    values: dict
    args: object
    run_name: str


def expand(job: str, job_argv: list[str], axes: dict, largs: LaunchArgs, sweep: str) -> list[Task]:
    """Every grid point parsed and checked like a direct run would be; bad values fail here."""
    module = job_module(job)
    args_class = job_args_class(module, job_argv)
    fields = {f.name for f in dataclasses.fields(args_class)}
    tasks = []
    grid = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] if axes else [{}]
    names = [task_name(values) for values in grid]
    if len(set(names)) < len(names):  # e.g. two files of the same name in different folders
        names = [f"task{i}" for i in range(len(grid))]
    for values, short_name in zip(grid, names):
        argv = list(job_argv) + [x for k, v in values.items() for x in (f"--{k}", v)]
        if "storage_directory" in fields:
            argv += ["--storage_directory", largs.storage_directory]
        name = f"{sweep}/{short_name}"
        if "run_name" in fields:
            argv += ["--run_name", name]
        parser = OneLineParser(args_class)
        args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True, look_for_args_file=False)
        if rest:
            raise UsageError(f"unrecognized arguments for {job}: {' '.join(rest)}")
        args = apply_preset(args, typed_fields(parser, argv))
        check_values(args)
        if hasattr(module, "check"):
            module.check(args)
        tasks.append(Task({k: getattr(args, k) for k in values}, args, name))  # typed, as the job saw them
    return tasks


def refuse_changed_tasks(tasks: list[Task], storage: Path):
    """A task folder that already holds a run with other arguments would refuse to start later;
    say so now, before submitting."""
    for t in tasks:
        saved = storage / "checkpoints" / t.run_name / "args.json"
        if saved.exists():
            differ = diff_configs(as_used(json.loads(saved.read_text())), config_dict(t.args), marked(t.args, "not_part_of_run"))
            if differ:
                raise UsageError(f"--sweep_name: {saved.parent} holds a run with other arguments ({differ}); "
                                 "choose another --sweep_name")


def check_storage(storage: Path, sweep: str):
    try:
        for sub in ("eval_results", "checkpoints", "slurm_logs"):
            (storage / sub / sweep).mkdir(parents=True, exist_ok=True)
        probe = storage / "eval_results" / sweep / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--storage_directory {storage}: cannot write there ({e.strerror or e})") from None


class JobTask(submitit.helpers.Checkpointable):
    """What each array task runs: the job's own `run(args)`.

    On SLURM's preemption/timeout signal the task does not die mid-step: the signal only asks
    the training loop to save at the end of the current step; then submitit's own handler
    requeues the task, which resumes from that checkpoint (the job's normal resume).
    """

    def __init__(self, job: str):
        self.job = job

    def __call__(self, args):
        request_stop(False)
        runtime.setup()  # several processes per task: rendezvous from submitit's environment
        sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        submitit_handler = signal.getsignal(sig)
        if callable(submitit_handler):
            signal.signal(sig, lambda *_: request_stop())
        try:
            module = job_module(self.job)
            return module.run_fused(args) if isinstance(args, list) else module.run(args)
        except Interrupted as e:
            if not runtime.is_main():  # rank 0 requeues the whole job; the others leave quietly
                sys.exit(0)
            print(f"{e} (preempted: requeueing)", flush=True)
            if callable(submitit_handler):
                signal.signal(sig, submitit_handler)
                submitit_handler(sig, None)  # checkpoint() -> requeue -> exit
            raise
        except Exception:
            self.record_failure(args)
            raise
        finally:
            runtime.teardown()

    def record_failure(self, args):
        """A task that failed before its job opened a log still leaves a `failed` log behind,
        so collect_results reports it as failed, with the error, not as missing."""
        import traceback

        for a in args if isinstance(args, list) else [args]:
            if getattr(a, "run_name", None) and hasattr(a, "storage_directory"):
                path = Path(a.storage_directory) / "eval_results" / f"{a.run_name}.h5"
                if not path.exists():
                    RunLog(path, self.job, a.run_name, config_dict(a)).fail(traceback.format_exc())


def fuse_groups(tasks: list[Task], axes: dict, largs: LaunchArgs, module) -> list[list[Task]]:
    """Tasks grouped for --fuse: one group per value of the axes not fused (each task alone
    without --fuse); every group is checked as the job will check it, memory included."""
    if not largs.fuse:
        return [[t] for t in tasks]
    fused = [a.strip().lstrip("-") for a in largs.fuse.split(",") if a.strip()]
    fusable = getattr(module, "FUSABLE", ())
    for axis in fused:
        if axis not in axes:
            raise UsageError(f"--fuse {largs.fuse}: {axis} is not a sweep axis ({', '.join(axes) or 'none'})")
        if axis not in fusable:
            raise UsageError(f"--fuse {largs.fuse}: this job can fuse only {', '.join(fusable) or 'nothing'}")
    groups = {}
    for t in tasks:
        groups.setdefault(tuple((k, str(v)) for k, v in t.values.items() if k not in fused), []).append(t)
    for group in groups.values():
        args_list = [t.args for t in group]
        flag = "--max_memory_gb" if args_list[0].max_memory_gb else "--mem_gb"
        for a in args_list:
            a.max_memory_gb = a.max_memory_gb or largs.mem_gb  # a group must fit the memory its task asks for
        module.check_fused(args_list, flag)
    return list(groups.values())


def check_cluster(largs: LaunchArgs) -> str:
    """The cluster to submit to, after checking every launcher flag (before any folder is made)."""
    cluster = largs.cluster or ("slurm" if shutil.which("sbatch") else "local")
    if cluster not in ("slurm", "local", "debug"):
        raise UsageError(f"--cluster {cluster}: choose slurm, local or debug")
    if cluster == "slurm" and not shutil.which("sbatch"):
        raise UsageError("--cluster slurm: sbatch is not on PATH here; use --cluster local")
    for flag in ("nodes", "tasks_per_node"):
        if getattr(largs, flag) < 1:
            raise UsageError(f"--{flag} {getattr(largs, flag)}: must be at least 1")
    if largs.nodes > 1 and cluster != "slurm":
        raise UsageError(f"--nodes {largs.nodes}: several nodes need SLURM (--cluster slurm); on one machine use --tasks_per_node")
    if largs.tasks_per_node > 1 and cluster == "debug":
        raise UsageError("--tasks_per_node: the debug cluster runs one process; use --cluster local or slurm")
    parse_time(largs.time)
    return cluster


def make_executor(largs: LaunchArgs, cluster: str, folder: Path, job: str, n_tasks: int):
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    params = dict(name=f"sitra-{job}", timeout_min=parse_time(largs.time), cpus_per_task=largs.cpus_per_task,
                  mem_gb=largs.mem_gb, gpus_per_node=largs.gpus_per_task * largs.tasks_per_node,
                  tasks_per_node=largs.tasks_per_node, nodes=largs.nodes)
    if cluster == "slurm":
        params.update(slurm_array_parallelism=min(largs.array_parallelism, n_tasks),
                      slurm_srun_args=["--kill-on-bad-exit=1"],  # a process that dies ends the job, no hang
                      slurm_setup=[line for group in largs.slurm_setup for line in group])
        for key in ("partition", "account", "constraint"):
            if getattr(largs, key):
                params[f"slurm_{key}"] = getattr(largs, key)
    executor.update_parameters(**params)
    return executor


def launch(job: str, job_argv: list[str], largs: LaunchArgs):
    """Check everything, submit the array, write the sweep manifest; returns (jobs, manifest path)."""
    module = job_module(job)
    cluster = check_cluster(largs)
    axes = sweep_axes(largs, job_args_class(module, job_argv))
    sweep = largs.sweep_name or job
    storage = Path(largs.storage_directory)
    check_run_name(sweep, storage, "--sweep_name")
    tasks = expand(job, job_argv, axes, largs, sweep)
    refuse_changed_tasks(tasks, storage)
    groups = fuse_groups(tasks, axes, largs, module)
    check_storage(storage, sweep)  # the sweep's folders are made only once everything is checked
    executor = make_executor(largs, cluster, storage / "slurm_logs" / sweep, job, len(groups))
    jobs = executor.map_array(JobTask(job), [[t.args for t in g] if largs.fuse else g[0].args for g in groups])
    manifest = storage / "eval_results" / sweep / "sweep.json"
    record = {"job": job, "axes": axes, "fused": largs.fuse, "cluster": cluster,
              "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": [job, *job_argv], "tasks": [
                  {"run_name": t.run_name, "values": t.values, "job_id": j.job_id} for g, j in zip(groups, jobs) for t in g]}
    atomic_write(manifest, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    first, last = jobs[0].job_id, jobs[-1].job_id
    fused = f" ({len(tasks)} students, {len(tasks) // len(groups)} per task)" if largs.fuse else ""
    print(f"submitted {len(jobs)} task(s) of {job}{fused} to {cluster}: job ids {first}" + (f" .. {last}" if last != first else ""))
    print(f"  results:     {storage / 'eval_results' / sweep}/")
    print(f"  checkpoints: {storage / 'checkpoints' / sweep}/")
    print(f"  task logs:   {storage / 'slurm_logs' / sweep}/")
    print(f"  merge:       python jobs/collect_results.py {storage / 'eval_results' / sweep}")
    return jobs, manifest


def wait(jobs) -> dict:
    """Wait for every task with a progress bar; {job_id: error text or ''}."""
    from tqdm.auto import tqdm

    errors = {}
    with tqdm(total=len(jobs), desc="tasks done", unit="task") as bar:
        for j in submitit.helpers.as_completed(jobs, poll_frequency=2):
            try:
                j.results()  # one per process of the task
                errors[j.job_id] = ""
            except Exception as e:  # a failed task is reported, the others still count
                errors[j.job_id] = error_line(str(e)) or type(e).__name__
            bar.update(1)
            bar.set_postfix(failed=sum(bool(v) for v in errors.values()))
    for job_id, err in errors.items():
        if err:
            print(f"task {job_id} failed: {err}")
    return errors


def error_line(text: str) -> str:
    """The `SomeError: message` line of a (remote) traceback, else its first line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b.*:", line):
            return line
    return lines[0] if lines else ""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        OneLineParser(LaunchArgs, prog="python jobs/launch.py JOB", epilog=f"jobs: {', '.join(JOBS)}; the job's own "
                      "flags follow the launcher's (a comma list sweeps a flag)").print_help()
        sys.exit(0)
    if not argv or argv[0].startswith("-"):
        fail(f"name the job first: python jobs/launch.py JOB [flags]; jobs: {', '.join(JOBS)}")
    job, rest = argv[0], argv[1:]
    parser = OneLineParser(LaunchArgs)
    largs, job_argv = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True, look_for_args_file=False)
    try:
        check_values(largs)
        jobs, manifest = launch(job, job_argv, largs)
        cluster = largs.cluster or ("slurm" if shutil.which("sbatch") else "local")
        if largs.wait or cluster == "local":  # local tasks are children of this process
            wait(jobs)

            collect(CollectArgs(sweep_dir=str(manifest.parent)))
    except UsageError as e:
        fail(str(e))
