"""Folders a job writes as a whole (a model folder, a cell corpus): sitra replaces only what it made.

Each such folder holds `.sitra-output.json` naming the job that wrote it. Before any compute,
`check_output` refuses an `--output` that exists and holds anything sitra did not write there
for the same job, and asks for `--overwrite` before replacing sitra's own. `write_folder` fills a
temporary folder beside the target and renames it into place only once it is complete, so a
killed job leaves the previous folder (or none), never half of one.
"""
import json
import os
import shutil
import time
from pathlib import Path

from sitra import runtime
from sitra.errors import UsageError
from sitra.version import __version__

MARKER = ".sitra-output.json"


def made_by(folder: Path) -> str | None:
    """The job that wrote `folder` (from its marker), or None for anything else."""
    try:
        return json.loads((Path(folder) / MARKER).read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def check_output(path, job: str, overwrite: bool, flag: str = "--output") -> Path:
    """Refuse, in one line and before any compute, to write `path` where that could lose data."""
    path = Path(path)
    if path.is_dir() and not any(path.iterdir()):
        pass  # an empty folder holds nothing to lose
    elif path.exists():
        if made_by(path) != job:
            what = "a file" if not path.is_dir() else "a folder sitra's " + job + " did not write"
            raise UsageError(f"{flag} {path}: exists and is {what}; sitra never replaces what it did not make: "
                             "choose another path")
        if not overwrite:
            raise UsageError(f"{flag} {path}: holds the output of an earlier {job}; pass --overwrite to replace it")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write under {parent}")
    return path


def write_folder(path, job: str, fill, own: bool = False) -> Path:
    """fill(tmp) writes the folder's files into the new folder `tmp`; then it replaces `path` by one rename (rank 0
    only). `path` must have passed check_output, or be the job's `own` (inside its run folder)."""
    path = Path(path)
    if not runtime.is_main():
        return path
    if not own and path.exists() and made_by(path) != job and not (path.is_dir() and not any(path.iterdir())):
        raise UsageError(f"{path}: exists and was not written by sitra's {job}; not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed save of this folder
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fill(tmp)
        tmp.mkdir(exist_ok=True)
        (tmp / MARKER).write_text(json.dumps({"job": job, "sitra_version": __version__,
                                              "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
