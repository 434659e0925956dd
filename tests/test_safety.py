"""Nothing lost, nothing run: crafted and corrupt checkpoints, corrupt logs, two writers of one
run, SIGTERM / SIGUSR2 in a direct run, a full disk, leftovers of killed saves, run names that
leave the storage folder. Each case names the file in one line and deletes nothing."""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sitra.cli import STOPPED_BY_SIGNAL
from sitra.results import journal_path, read_log

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess  # every test runs job scripts (slow tier)
NAME = "block1_h2_dk8_MSE"


def command(teacher, text_files, storage, *extra):
    return [sys.executable, str(ROOT / "jobs" / "retrain_single_block.py"), "--teacher", teacher,
            "--train_file", str(text_files / "train.txt"), "--eval_file", str(text_files / "eval.txt"),
            "--storage_directory", str(storage), "--block", "1", "--block_heads", "2", "--block_d_k", "8",
            "--block_dropout", "0.2", "--max_seq_length", "32", "--batch_size", "8", "--eval_steps", "3",
            "--save_steps", "2", "--warmup_steps", "2", "--lr", "3e-3", "--device", "cpu", *extra]


def job(teacher, text_files, storage, *extra, **kw):
    return subprocess.run(command(teacher, text_files, storage, *extra), capture_output=True, text=True, timeout=600, **kw)


def one_line_error(proc, code=2):
    """The error line; progress bars of model loading (tqdm, on stderr) are not lines of the error."""
    lines = [line for line in proc.stderr.strip().splitlines() if not ("it/s]" in line or "s/it]" in line)]
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    return lines[0]


def folder(storage):
    return Path(storage) / "checkpoints" / NAME


def log_path(storage):
    return Path(storage) / "eval_results" / f"{NAME}.h5"


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_nothing_and_deletes_nothing(tiny_teacher, text_files, tmp_path):
    assert job(tiny_teacher, text_files, tmp_path, "--max_steps", "8", "--stop_after_steps", "4").returncode == 0
    rows_before = read_log(log_path(tmp_path))["train"]["step"].tolist()
    marker = tmp_path / "ran"
    ckpt = torch.load(folder(tmp_path) / "latest.pt", weights_only=True)
    ckpt["progress"] = Payload(marker)
    torch.save(ckpt, folder(tmp_path) / "latest.pt")
    (folder(tmp_path) / "previous.pt").unlink()
    line = one_line_error(job(tiny_teacher, text_files, tmp_path, "--max_steps", "8"))
    assert f"{folder(tmp_path) / 'latest.pt'}: unreadable checkpoint" in line and "nothing was deleted" in line
    assert not marker.exists()
    log = read_log(log_path(tmp_path))
    assert log["train"]["step"].tolist() == rows_before and log["attrs"]["status"] == "failed"
    assert (folder(tmp_path) / "latest.pt").exists()


def test_a_corrupt_latest_resumes_from_the_previous_checkpoint(tiny_teacher, text_files, tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert job(tiny_teacher, text_files, straight, "--max_steps", "8").returncode == 0
    assert job(tiny_teacher, text_files, cut, "--max_steps", "8", "--stop_after_steps", "6").returncode == 0
    latest = folder(cut) / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    proc = job(tiny_teacher, text_files, cut, "--max_steps", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{latest}: unreadable" in proc.stdout and "resuming from" in proc.stdout
    assert same(weights(folder(straight) / "latest.pt"), weights(latest))
    log = read_log(log_path(cut))
    assert log["attrs"]["status"] == "complete" and log["train"]["step"].tolist() == list(range(1, 9))
    assert "resumed_from_previous" in log["attrs"]


def test_a_corrupt_log_is_kept_and_the_new_one_is_never_complete(tiny_teacher, text_files, tmp_path):
    assert job(tiny_teacher, text_files, tmp_path, "--max_steps", "8", "--stop_after_steps", "4").returncode == 0
    log_path(tmp_path).write_bytes(b"not an hdf5 file")
    proc = job(tiny_teacher, text_files, tmp_path, "--max_steps", "8")
    assert proc.returncode == 0 and "unreadable" in proc.stdout, proc.stderr[-3000:]
    assert Path(str(log_path(tmp_path)) + ".corrupt").read_bytes() == b"not an hdf5 file"
    log = read_log(log_path(tmp_path))
    assert log["attrs"]["status"] == "incomplete" and log["train"]["step"].tolist() == [5, 6, 7, 8]
    from sitra.results import sweep_rows

    rows, _, problems = sweep_rows(log_path(tmp_path).parent)
    assert rows[0]["status"] == "incomplete" and "block_mse" not in rows[0]  # never merged as a whole run


def test_a_second_writer_is_refused_naming_the_holder(tiny_teacher, text_files, tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        folder(tmp_path).mkdir(parents=True)
        (folder(tmp_path) / ".lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": holder.pid, "job_id": "", "started_at": "2026-12-05T10:00:00"}))
        line = one_line_error(job(tiny_teacher, text_files, tmp_path, "--max_steps", "2"))
        assert f"in use by pid {holder.pid} on {socket.gethostname()}" in line
        assert not log_path(tmp_path).exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, the run takes it over and releases it at the end
    assert job(tiny_teacher, text_files, tmp_path, "--max_steps", "2").returncode == 0
    assert not (folder(tmp_path) / ".lock").exists()


@pytest.mark.kill
def test_two_writers_at_once_one_refuses_the_log_stays_whole(tiny_teacher, text_files, tmp_path):
    first = subprocess.Popen(command(tiny_teacher, text_files, tmp_path, "--max_steps", "1000000"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # a pipe nobody reads could fill
    try:
        wait_for_rows(tmp_path, 2, first)
        line = one_line_error(job(tiny_teacher, text_files, tmp_path, "--max_steps", "1000000"))
        assert f"in use by pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    steps = read_log(log_path(tmp_path))["train"]["step"].tolist()
    assert steps == list(range(1, len(steps) + 1))  # no duplicated, no missing step


def wait_for_rows(storage, n, proc, timeout=300):
    """Until the running job has logged n training steps (it runs a million: no race with its end)."""
    start = time.time()
    while time.time() - start < timeout:
        assert proc.poll() is None, f"the job ended early (exit {proc.returncode})"
        try:
            if len(read_log(log_path(storage))["train"].get("step", [])) >= n:
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the job logged no steps")


@pytest.mark.kill
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_a_signal_saves_at_the_next_step_and_the_rerun_is_bit_exact(tiny_teacher, text_files, tmp_path, sig):
    cut, straight = tmp_path / "cut", tmp_path / "straight"
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_file, "w") as out, open(err_file, "w") as err:  # files, not pipes: they never fill up
        proc = subprocess.Popen(command(tiny_teacher, text_files, cut, "--max_steps", "1000000", "--save_steps", "1000000"),
                                stdout=out, stderr=err)
        wait_for_rows(cut, 3, proc)
        proc.send_signal(sig)
        proc.wait(timeout=300)
    out, err = out_file.read_text(), err_file.read_text()
    assert proc.returncode == STOPPED_BY_SIGNAL, err[-3000:]
    stopped = torch.load(folder(cut) / "latest.pt", weights_only=True)["progress"]["step"]
    assert stopped >= 3 and f"stopped at step {stopped} of 1000000 by {sig.name}" in out
    log = read_log(log_path(cut))
    assert log["attrs"]["status"] == "running" and sig.name in log["attrs"]["stopped"]
    assert log["train"]["step"].tolist() == list(range(1, stopped + 1))
    # the rerun continues; both stop two steps later (--stop_after_steps is not part of the run)
    until = str(stopped + 2)
    assert job(tiny_teacher, text_files, cut, "--max_steps", "1000000", "--save_steps", "1000000",
               "--stop_after_steps", until).returncode == 0
    assert job(tiny_teacher, text_files, straight, "--max_steps", "1000000", "--save_steps", "1000000",
               "--stop_after_steps", until).returncode == 0
    assert same(weights(folder(cut) / "latest.pt"), weights(folder(straight) / "latest.pt"))


def test_a_full_disk_is_one_line_and_the_earlier_files_stay(tiny_teacher, text_files, tmp_path):
    """Writes beyond a file-size limit fail as on a full disk (EFBIG instead of ENOSPC)."""
    assert job(tiny_teacher, text_files, tmp_path, "--max_steps", "8", "--stop_after_steps", "2").returncode == 0
    before = weights(folder(tmp_path) / "latest.pt")
    rows = read_log(log_path(tmp_path))["train"]["step"].tolist()
    size = (folder(tmp_path) / "latest.pt").stat().st_size

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    proc = job(tiny_teacher, text_files, tmp_path, "--max_steps", "8", preexec_fn=small_files)
    line = one_line_error(proc, code=1)
    assert "cannot write" in line and NAME in line and "intact" in line  # the log or the checkpoint, whichever is written first
    assert same(before, weights(folder(tmp_path) / "latest.pt"))
    log = read_log(log_path(tmp_path))
    assert log["attrs"]["status"] != "complete" and log["train"]["step"].tolist()[:len(rows)] == rows
    assert not list(folder(tmp_path).glob(".*.tmp*"))
    # with room again, the rerun resumes and finishes
    assert job(tiny_teacher, text_files, tmp_path, "--max_steps", "8").returncode == 0
    assert read_log(log_path(tmp_path))["attrs"]["status"] == "complete"


def test_leftovers_of_killed_saves_are_removed_on_the_next_start(tiny_teacher, text_files, tmp_path):
    assert job(tiny_teacher, text_files, tmp_path, "--max_steps", "4", "--stop_after_steps", "2").returncode == 0
    left = [folder(tmp_path) / ".latest.next.pt.tmp99999", log_path(tmp_path).with_name(f".{NAME}.h5.tmp99999")]
    for p in left:
        p.write_bytes(b"0" * 4096)
    assert job(tiny_teacher, text_files, tmp_path, "--max_steps", "4").returncode == 0
    assert not any(p.exists() for p in left)


@pytest.mark.kill
def test_journal_rows_cost_what_they_hold(tiny_teacher, text_files, tmp_path):
    """A flush appends its rows; the HDF5 file is written at the start and the end only."""
    proc = subprocess.Popen(command(tiny_teacher, text_files, tmp_path, "--max_steps", "1000000", "--save_steps", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_rows(tmp_path, 3, proc)
        mtime = log_path(tmp_path).stat().st_mtime_ns
        n = len(journal_path(log_path(tmp_path)).read_text().splitlines())
        wait_for_rows(tmp_path, 8, proc)
        assert log_path(tmp_path).stat().st_mtime_ns == mtime  # not rewritten by the flushes in between
        assert len(journal_path(log_path(tmp_path)).read_text().splitlines()) > n
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/../../b"])
def test_run_names_stay_inside_the_storage_folder(tiny_teacher, text_files, tmp_path, name):
    storage = tmp_path / "store"
    line = one_line_error(job(tiny_teacher, text_files, storage, "--max_steps", "2", "--run_name", name))
    assert f"--run_name {name}" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists() and not storage.exists()
