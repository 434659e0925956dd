"""One HDF5 log per job, and where each run keeps its files.

Layout of `<storage>/eval_results/<run>.h5`:
  attrs   job, run_name, config (JSON of the arguments), sitra_version, git_commit, job_id,
          host, started_at, finished_at, wall_time_s, status (running | complete | incomplete | failed), error,
          journal (the name of the row journal that belongs to this file)
  train/  step, loss, lr, grad_norm, tokens_per_s, ... (one 1-D dataset per number, on `step`)
  eval/   step and one dataset per metric
  final/  attrs: the final metrics

The HDF5 file is only ever written whole (a copy renamed into place); while a job runs its rows
go to `<run>.h5.rows`, an append-only journal (RunLog). `status` becomes `complete` only in the
last write of a job; `incomplete` marks a run whose first steps were lost with an unreadable log.
"""
import atexit
import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np

from sitra import reporting, runtime
from sitra.args import as_used, marked
from sitra.errors import Interrupted, StorageError, UsageError
from sitra.version import __version__


def config_dict(args) -> dict:
    """The arguments as the log and args.json record them: what the job used (sitra.args.as_used)."""
    return as_used(json.loads(json.dumps(dataclasses.asdict(args), default=str)))


def git_commit() -> str:
    """The commit of the sitra checkout that runs (empty outside a git checkout): logs and results name it."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def job_id() -> str:
    e = os.environ
    if "SLURM_ARRAY_JOB_ID" in e:
        return f"{e['SLURM_ARRAY_JOB_ID']}_{e.get('SLURM_ARRAY_TASK_ID', '')}"
    return e.get("SLURM_JOB_ID", e.get("SUBMITIT_LOCAL_JOB_ID", ""))


def write_h5(path: Path, fill):
    """An HDF5 file built in memory by fill(h5py.File), then written whole by atomic_write: a
    failing disk raises an ordinary OSError (named in one line), never an error inside HDF5's own
    I/O, which can end the process with a segmentation fault."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        fill(f)
    data = buffer.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write):
    """Call write(tmp_path), then rename tmp_path to path: readers see the old or the new file.
    Of several data-parallel processes only rank 0 writes."""
    if not runtime.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before it takes the name: a crash never leaves a torn file
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would (some writers make their files 0600)
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, permissions: name the file; the previous one is intact
        raise StorageError(f"{path}: cannot write ({e.strerror or e}); what was saved before is intact") from None
    finally:
        tmp.unlink(missing_ok=True)


class RunLog:
    """The HDF5 log of one job.

    Numbers are buffered; `flush()` appends them to the log's row journal (`<run>.h5.rows`, one
    JSON line per row, fsynced), which costs O(rows), not O(log). The HDF5 file itself is written
    whole (a copy renamed into place) only when the job starts, resumes and ends, and names its
    journal (`journal` attribute): read_log reads both, a journal left by an earlier session is
    ignored, and a line cut by a kill is dropped. On resume the rows after the checkpoint's step
    are dropped, so the log always matches the checkpoint it continues from.

    The rows and final numbers also go to the reporters of the config's `report_to`
    (sitra.reporting), which write into the run folder `checkpoints/<run_name>/`.
    """

    def __init__(self, path: Path, job: str, run_name: str, config: dict, not_part_of_run=frozenset()):
        self.path = Path(path)
        self.journal = journal_path(self.path)
        self._pending = {"train": [], "eval": []}
        self._session_start = time.time()
        self._prior_wall, self._started_at = 0.0, time.strftime("%Y-%m-%dT%H:%M:%S")
        self._attrs = {
            "job": job, "run_name": run_name, "config": json.dumps(config, sort_keys=True),
            "sitra_version": __version__, "git_commit": git_commit(), "job_id": job_id(),
            "host": socket.gethostname(), "status": "running", "error": "",
            "not_part_of_run": json.dumps(sorted(not_part_of_run)),
        }
        self._started = False
        self._config, self._report_to, self._reporters = config, config.get("report_to"), None

    def start(self, resume_step: int | None = None):
        """Begin a fresh log, or continue the log of a run resumed at `resume_step`.

        A log that cannot be read is never deleted: it is kept as `<run>.h5.corrupt` and the new
        log says from which step it starts, so it can never pass for a whole run."""
        self._started = True
        if not runtime.is_main():
            return
        rows = {"train": [], "eval": []}
        logged_upto = self._last_logged_step()
        if resume_step is not None and self.path.exists():
            try:
                old = read_log(self.path)
            except (OSError, KeyError, ValueError) as e:
                aside = self.path.with_name(self.path.name + ".corrupt")
                os.replace(self.path, aside)
                self._attrs["missing_steps_before"] = resume_step + 1
                print(f"{self.path}: unreadable ({type(e).__name__}), kept as {aside}; the new log starts at step "
                      f"{resume_step + 1} and will be marked incomplete")
            else:
                self._prior_wall = float(old["attrs"].get("wall_time_s", 0.0))
                self._started_at = str(old["attrs"].get("started_at", self._started_at))
                if "missing_steps_before" in old["attrs"]:
                    self._attrs["missing_steps_before"] = old["attrs"]["missing_steps_before"]
                rows = _rows_of(old, upto=resume_step)
        elif resume_step is not None:
            self._attrs["missing_steps_before"] = resume_step + 1  # the log of the first steps is gone
        self._rewrite(rows)
        if reporting.parse_report_to(self._report_to):
            name = self._attrs["run_name"]
            self._reporters = reporting.open_reporters(self._report_to, run_folder(self.path, name), name,
                                                       self._config, resume_step, logged_upto)

    def _last_logged_step(self) -> int | None:
        """The last step an earlier session logged (its journal included), for reporters that
        cannot take a step back; None without reporters, log or steps."""
        if not reporting.parse_report_to(self._report_to) or not self.path.exists():
            return None
        try:
            log = read_log(self.path)
        except (OSError, KeyError, ValueError):
            return None
        steps = [s for g in ("train", "eval") for s in log[g].get("step", [])]
        return int(max(steps)) if steps else None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        """A job that raised is marked failed. One that was stopped to be resumed (Interrupted, a
        requeue's SystemExit, Ctrl-C) stays `running`, with the reason."""
        if kind is not None and issubclass(kind, Exception) and not issubclass(kind, Interrupted):
            import traceback

            self.fail("".join(traceback.format_exception(kind, error, tb)))
        elif kind is not None:
            self.note(stopped=str(error) or kind.__name__)
            if self._started:
                self.flush()
                self._rewrite(self._rows())  # rows and attributes in the HDF5 file itself
        self._close_reporters("stopped")  # a finished or failed log closed them already
        return False

    def _close_reporters(self, status: str):
        if self._reporters is not None:
            reporters, self._reporters = self._reporters, None
            reporters.close(status)

    def note(self, **attrs):
        """Facts about the run kept as attributes (e.g. world size, effective batch)."""
        self._attrs.update(attrs)

    def train(self, step: int, **numbers):
        self._pending["train"].append({"step": step, **numbers})

    def eval(self, step: int, **numbers):
        self._pending["eval"].append({"step": step, **numbers})

    def flush(self, durable: bool = True):
        """Append the buffered rows to the journal: O(rows); on disk when it returns if `durable`
        (before every checkpoint), else left to the OS (after every step: readers see progress)."""
        if not self._started:
            self.start()
        pending, self._pending = self._pending, {"train": [], "eval": []}
        if not runtime.is_main() or not (pending["train"] or pending["eval"]):
            return
        lines = "".join(json.dumps({"group": g, **{k: float(v) for k, v in r.items()}}) + "\n"
                        for g, rows in pending.items() for r in rows)
        with open(self.journal, "a") as f:
            f.write(lines)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if self._reporters is not None:
            self._reporters.rows(pending)

    def complete(self, final: dict):
        status = "incomplete" if "missing_steps_before" in self._attrs else "complete"
        self._finish(final, status, "" if status == "complete" else
                     f"steps before {self._attrs['missing_steps_before']} were lost with an unreadable log")

    def fail(self, error: str):
        """Mark the log failed, keeping its rows; where even that cannot be written (a full disk),
        the log stays as it was (`running`, never `complete`)."""
        try:
            if not self._started:
                self._mark_failed_only(error[-2000:])
            else:
                self._finish(None, "failed", error[-2000:])
        except (OSError, StorageError) as e:
            print(f"{self.path}: could not mark the log failed ({e})")

    def _finish(self, final, status, error):
        self.flush()
        self.note(status=status, error=error, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self._rewrite(self._rows(), final)
        if self._reporters is not None and final:
            self._reporters.final(final)
        self._close_reporters("failed" if status == "failed" else "complete")

    def _rows(self) -> dict:
        """Every row logged so far: the HDF5 file's and its journal's."""
        return _rows_of(read_log(self.path)) if self.path.exists() else {"train": [], "eval": []}

    def _rewrite(self, rows: dict, final: dict | None = None):
        """Write the whole HDF5 file (rows, attributes, final numbers) with a new, empty journal."""
        if not runtime.is_main():
            return
        token = os.urandom(8).hex()
        attrs = dict(self._attrs, started_at=self._started_at, journal=token,
                     wall_time_s=self._prior_wall + time.time() - self._session_start)

        def fill(f):
            for group, group_rows in rows.items():
                _append_rows(f.require_group(group), group_rows)
            if final is not None:
                g = f.require_group("final")
                for k, v in final.items():
                    g.attrs[k] = v
            for k, v in attrs.items():
                f.attrs[k] = v

        write_h5(self.path, fill)
        self.journal.unlink(missing_ok=True)  # its rows are in the file now; a leftover would not match `token`
        with open(self.journal, "w") as f:
            f.write(json.dumps({"journal": token}) + "\n")

    def _mark_failed_only(self, error: str):
        """A job that failed before its log started (e.g. an unreadable checkpoint): the rows an
        earlier session logged stay; only the status says what happened."""
        if not runtime.is_main():
            return
        if self.path.exists():
            try:
                rows = self._rows()
            except (OSError, KeyError, ValueError):
                return  # an unreadable log is left as it is
            self._started = True
            self.note(status="failed", error=error, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            self._rewrite(rows)
        else:
            self._started = True
            self._finish(None, "failed", error)


def _rows_of(log: dict, upto: int | None = None) -> dict:
    """A read_log's train/eval tables as rows (a number that is nan was not logged at that step),
    those after step `upto` left out."""
    rows = {}
    for group in ("train", "eval"):
        table, steps = log[group], log[group].get("step", [])
        rows[group] = [{k: v[i] for k, v in table.items() if not np.isnan(v[i])} for i in range(len(steps))
                       if upto is None or steps[i] <= upto]
    return rows


def run_folder(log_path: Path, run_name: str) -> Path:
    """`<storage>/checkpoints/<run>/` of the log `<storage>/eval_results/<run>.h5` (open_run's layout)."""
    return Path(log_path).parents[len(Path(run_name).parts)] / "checkpoints" / run_name


def journal_path(log_path: Path) -> Path:
    return Path(log_path).with_name(Path(log_path).name + ".rows")


def _append_rows(group, rows):
    if not rows:
        return
    keys = sorted({k for r in rows for k in r})
    n0 = len(group["step"]) if "step" in group else 0
    for k in keys:
        if k not in group:
            group.create_dataset(k, shape=(n0,), maxshape=(None,), dtype="f8", fillvalue=np.nan)
    for k, ds in group.items():
        ds.resize((n0 + len(rows),))
        ds[n0:] = [r.get(k, np.nan) for r in rows]


def _journal_rows(path: Path, token: str) -> dict:
    """The rows of the journal that belongs to the HDF5 file whose `journal` attribute is `token`."""
    rows = {"train": [], "eval": []}
    journal = journal_path(path)
    if not token or not journal.exists():
        return rows
    lines = journal.read_text().split("\n")
    try:
        if json.loads(lines[0]).get("journal") != token:
            return rows  # left by an earlier session: its rows are in the file already
    except ValueError:
        return rows
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:
            break  # the last line of a killed flush: cut short
        rows[row.pop("group")].append(row)
    return rows


def read_log(path) -> dict:
    """Everything in a log as plain Python: attrs, train/eval arrays (the journal's rows of a
    running job included), final metrics."""
    with h5py.File(path, "r") as f:
        out = {"attrs": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}}
        for group in ("train", "eval"):
            out[group] = {k: ds[:] for k, ds in f[group].items()} if group in f else {}
        out["final"] = dict(f["final"].attrs) if "final" in f else {}
    out["config"] = json.loads(out["attrs"]["config"])
    extra = _journal_rows(Path(path), out["attrs"].get("journal", ""))
    for group, rows in extra.items():
        if rows:
            keys = set(out[group]) | {k for r in rows for k in r}
            n = len(out[group].get("step", []))
            out[group] = {k: np.concatenate([out[group].get(k, np.full(n, np.nan)), [r.get(k, np.nan) for r in rows]])
                          for k in keys}
    return out


@dataclasses.dataclass
class Run:
    """Where one run keeps its files: `checkpoints/<name>/` and `eval_results/<name>.h5`."""
    name: str
    checkpoint_dir: Path
    log_path: Path
    config: dict
    not_part_of_run: frozenset = frozenset()  # fields a rerun may change and still resume
    teacher_source: frozenset = frozenset()   # fields that say only where the teacher's outputs come from

    @property
    def student_config(self) -> dict:
        """The flags that make the student: what it draws from its random stream depends on these only."""
        return {k: v for k, v in self.config.items() if k not in self.not_part_of_run | self.teacher_source}


def open_run(args, default_name: str) -> Run:
    """The run's paths, locked for this process; refuses to mix a different configuration into an
    existing run, and a run folder outside the storage folder."""
    name = args.run_name or default_name
    root = Path(args.storage_directory)
    check_run_name(name, root)
    run = Run(name, root / "checkpoints" / name, root / "eval_results" / f"{name}.h5", config_dict(args),
              marked(args, "not_part_of_run"), marked(args, "teacher_source"))
    saved = run.checkpoint_dir / "args.json"
    if runtime.is_main():
        try:
            run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            run.log_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--storage_directory {root}: cannot write there ({e.strerror})") from None
        lock_run(run.checkpoint_dir)
        remove_stale_temporaries(run)
    if args.overwrite:
        if runtime.is_main():
            if any(p.name != LOCK for p in run.checkpoint_dir.iterdir()) and not saved.exists():
                raise UsageError(f"--overwrite: {run.checkpoint_dir} is not a sitra run folder (no args.json); "
                                 "sitra never deletes what it did not make")
            for p in run.checkpoint_dir.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            run.log_path.unlink(missing_ok=True)
            journal_path(run.log_path).unlink(missing_ok=True)
        runtime.barrier()
    elif saved.exists():
        differ = diff_configs(as_used(json.loads(saved.read_text())), run.config, run.not_part_of_run)
        if differ:
            raise UsageError(
                f"--run_name {name}: {run.checkpoint_dir} holds a run with other arguments "
                f"({differ}); choose another --run_name or pass --overwrite"
            )
    try:
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--storage_directory {root}: cannot write there ({e.strerror})") from None
    atomic_write(saved, lambda tmp: tmp.write_text(json.dumps(run.config, indent=1, sort_keys=True)))
    return run


def check_results_place(args):
    """Before an evaluation runs: its --run_name stays inside the storage folder, and its log can
    be written there (a file or a read-only folder is found now, not after the evaluation)."""
    root = Path(args.storage_directory)
    if args.run_name:
        check_run_name(args.run_name, root)
    folder = root / "eval_results"
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--storage_directory {root}: cannot write {folder} ({e.strerror or e})") from None


def check_run_name(name: str, root: Path, flag: str = "--run_name"):
    """A run name is a relative path that stays inside the storage folder's checkpoints/."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UsageError(f"{flag} {name}: must be a relative name inside {root / 'checkpoints'} (no '..', not absolute)")


# ---------------------------------------------------------------------------------------------
# One writer per run folder

LOCK = ".lock"
_held: set[Path] = set()


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _stale(holder: dict) -> bool:
    """A lock whose holder is gone: a dead process on this host, or an earlier attempt of this same
    SLURM task (a requeue). A live process, or any process on another host, holds it."""
    if holder.get("job_id") and holder.get("job_id") == job_id():
        return True
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("pid") == os.getpid():
        return True  # this process opened the run before (a job run twice in one process)
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def lock_run(folder: Path):
    """Take the run folder's lock file (created with O_EXCL, which shared file systems honour),
    holding host, pid, SLURM job and start time; refuse in one line while another process holds it.
    It is removed when this process exits."""
    path = Path(folder) / LOCK
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}  # being written this instant, or cut short: look again
                time.sleep(0.2)
                if path.exists() and time.time() - path.stat().st_mtime < 5:
                    continue
            if holder and not _stale(holder):
                raise UsageError(f"{folder}: in use by pid {holder.get('pid')} on {holder.get('host')} since "
                                 f"{holder.get('started_at')}" + (f" (SLURM job {holder['job_id']})" if holder.get("job_id") else "")
                                 + f"; one process writes a run at a time (if it is gone, delete {path})")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(_holder()))
        _held.add(path)
        return
    raise UsageError(f"{folder}: could not take its lock {path}")


def release_locks():
    for path in list(_held):
        path.unlink(missing_ok=True)
        _held.discard(path)


atexit.register(release_locks)


def remove_stale_temporaries(run: Run):
    """Temporary files of saves cut short by a kill (`.NAME.tmp<pid>`): with the lock held, no one
    else is writing them."""
    for folder, prefix in ((run.checkpoint_dir, "."), (run.log_path.parent, f".{run.log_path.name}")):
        for p in folder.glob(f"{prefix}*.tmp*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def diff_configs(old: dict, new: dict, ignore=frozenset()) -> str:
    keys = sorted((set(old) | set(new)) - set(ignore))
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in keys if old.get(k) != new.get(k))


def sweep_rows(sweep_dir: Path) -> tuple[list[dict], list[str], list[str]]:
    """(one row per task, axis names, problems) of a sweep folder of HDF5 logs.

    Tasks come from the launcher's `sweep.json` where present (so a task that never wrote a log
    is listed as missing), else from the `*.h5` files. Only `complete` logs contribute metrics;
    running, failed, missing and unreadable tasks are rows with their status and no metrics.
    """
    sweep_dir = Path(sweep_dir)
    manifest = sweep_dir / "sweep.json"
    if manifest.exists():
        record = json.loads(manifest.read_text())
        axes = list(record["axes"])
        tasks = [(Path(t["run_name"]).name, t["values"]) for t in record["tasks"]]
    else:
        axes, tasks = [], [(p.stem, {}) for p in sorted(sweep_dir.glob("*.h5")) if p.name != "results.h5"]
    rows, problems, ignore, jobs = [], [], set(), set()
    for name, values in tasks:
        path = sweep_dir / f"{name}.h5"
        row = {"run_name": name, **values, "status": "missing", "wall_time_s": np.nan, "job_id": ""}
        if not path.exists():
            problems.append(f"{name}: no log (the task never started)")
        else:
            try:
                log = read_log(path)
            except (OSError, KeyError, ValueError) as e:
                row["status"] = "corrupt"
                problems.append(f"{path.name}: unreadable, skipped ({type(e).__name__})")
            else:
                row.update(status=log["attrs"]["status"], wall_time_s=float(log["attrs"].get("wall_time_s", np.nan)),
                           job_id=log["attrs"].get("job_id", ""))
                jobs.add(log["attrs"].get("job", ""))
                if not manifest.exists():
                    row.update({k: v for k, v in log["config"].items() if k != "run_name"})  # the log's name is the row's
                    ignore |= set(json.loads(log["attrs"].get("not_part_of_run", "[]")))
                if row["status"] == "complete":
                    row.update({k: float(v) for k, v in log["final"].items()})
                else:
                    error = log["attrs"].get("error", "").strip().splitlines()
                    problems.append(f"{name}: {row['status']}" + (f" ({error[-1]})" if error else ""))
        rows.append(row)
    if len(jobs) > 1:
        raise UsageError(f"--sweep_dir {sweep_dir}: holds the logs of several jobs ({', '.join(sorted(jobs))}); "
                         "collect one job's logs at a time (one folder each)")
    if not manifest.exists() and rows:  # axes: the arguments that differ between tasks
        keys = [k for k in rows[0] if k not in ("run_name", "status", "wall_time_s", "job_id")]
        axes = [k for k in keys if len({json.dumps(r.get(k), default=str) for r in rows}) > 1 and k not in ignore]
        rows = [{k: v for k, v in r.items() if k in axes or k in ("run_name", "status", "wall_time_s", "job_id")
                 or k not in keys} for r in rows]
    return rows, axes, problems
