"""The training loop: a stopped or killed run resumes to exactly the uninterrupted result."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sitra.data import python_docs_paragraphs
from sitra.recipes.retrain_single_block import BlockArgs, run
from sitra.results import read_log
from sitra.errors import Interrupted

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    paragraphs = python_docs_paragraphs()
    (d / "train.txt").write_text("\n".join(paragraphs[:160]))
    (d / "eval.txt").write_text("\n".join(paragraphs[1000:1040]))
    return d


def block_args(teacher, text_files, storage, **kw):
    values = dict(teacher=teacher, train_file=str(text_files / "train.txt"), eval_file=str(text_files / "eval.txt"),
                  storage_directory=str(storage), block=1, block_heads=2, block_d_k=8, block_dropout=0.2,
                  max_seq_length=32, batch_size=8, gradient_accumulation_steps=2, max_steps=8, eval_steps=3,
                  save_steps=2, warmup_steps=2, lr=3e-3, device="cpu")
    values.update(kw)
    return BlockArgs(**values)


def latest_state(storage, name="block1_h2_dk8_MSE"):
    ckpt = torch.load(Path(storage) / "checkpoints" / name / "latest.pt", weights_only=False)
    return ckpt["model"], ckpt["optimizer"]["state"], ckpt["progress"]


def assert_same_run(a, b):
    (wa, oa, pa), (wb, ob, pb) = latest_state(a), latest_state(b)
    assert pa == pb
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for i in oa:
        assert torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"])
    la, lb = (read_log(Path(s) / "eval_results" / "block1_h2_dk8_MSE.h5") for s in (a, b))
    for group in ("train", "eval"):
        for k in la[group]:
            if not k.startswith("tokens_per_s"):  # timings
                assert la[group][k].tolist() == lb[group][k].tolist(), (group, k)
    assert la["attrs"]["status"] == lb["attrs"]["status"] == "complete"
    assert la["final"]["block_mse"] == lb["final"]["block_mse"]


def test_stopped_and_resumed_equals_uninterrupted(tiny_teacher, text_files, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(block_args(tiny_teacher, text_files, straight))
    # stop at step 3 (odd: between two saves, mid-epoch, after an evaluation), then rerun to the end
    with pytest.raises(Interrupted):
        run(block_args(tiny_teacher, text_files, stopped, stop_after_steps=3))
    log = read_log(stopped / "eval_results" / "block1_h2_dk8_MSE.h5")
    assert log["attrs"]["status"] == "running"  # a partial log never looks complete
    assert log["train"]["step"].tolist() == [1, 2, 3]
    run(block_args(tiny_teacher, text_files, stopped))
    assert_same_run(straight, stopped)
    steps = read_log(stopped / "eval_results" / "block1_h2_dk8_MSE.h5")["train"]["step"].tolist()
    assert steps == list(range(1, 9))  # nothing lost, nothing repeated


def test_the_same_command_from_another_folder_trains_the_same(tiny_teacher, text_files, tmp_path):
    """The teacher and the data copied elsewhere (a clone in another folder, data staged to a
    node's scratch disk): the same flags train bit for bit the same student, dropout included."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_teacher, moved / "teacher")
    shutil.copytree(text_files, moved / "text")
    run(block_args(tiny_teacher, text_files, tmp_path / "here"))
    run(block_args(str(moved / "teacher"), moved / "text", tmp_path / "there"))
    assert_same_run(tmp_path / "here", tmp_path / "there")


def test_resume_across_epochs_with_accumulation(tiny_teacher, text_files, tmp_path):
    # 160 lines / 8 = 20 micro-batches = 10 steps per epoch; 25 steps cross two epoch ends
    kw = dict(max_steps=25, eval_steps=0, save_steps=0, save_checkpoint_every=0.5)
    run(block_args(tiny_teacher, text_files, tmp_path / "a", **kw))
    with pytest.raises(Interrupted):
        run(block_args(tiny_teacher, text_files, tmp_path / "b", stop_after_steps=10, **kw))
    with pytest.raises(Interrupted):
        run(block_args(tiny_teacher, text_files, tmp_path / "b", stop_after_steps=17, **kw))
    run(block_args(tiny_teacher, text_files, tmp_path / "b", **kw))
    assert_same_run(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
@pytest.mark.kill
def test_killed_process_resumes_to_the_same_parameters(tiny_teacher, text_files, tmp_path, gate):
    """SIGKILL a real job while it trains; rerunning the same command finishes it identically."""
    flags = ["--teacher", tiny_teacher, "--train_file", str(text_files / "train.txt"), "--eval_file",
             str(text_files / "eval.txt"), "--block", "1", "--block_heads", "2", "--block_d_k", "8",
             "--block_dropout", "0.2", "--max_seq_length", "32", "--batch_size", "8", "--max_steps", "12",
             "--save_steps", "1", "--eval_steps", "4", "--lr", "3e-3", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "jobs" / "retrain_single_block.py"), *flags]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*cmd, "--storage_directory", str(straight)], env=env, check=True, capture_output=True)
    # held at its save of step 6 (step 6 trained and logged, latest.pt still at step 5, an
    # evaluation behind it) and killed there: mid-run however fast the machine
    held = gate(6)
    proc = subprocess.Popen([*cmd, "--storage_directory", str(killed)], env=held.env(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "block1_h2_dk8_MSE" / "latest.pt"
    assert held.wait_paused(running=lambda: proc.poll() is None) == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(latest, weights_only=False)["progress"]["step"]
    assert 5 <= step_at_kill < 12, "the job finished before it could be killed"
    assert read_log(killed / "eval_results" / "block1_h2_dk8_MSE.h5")["attrs"]["status"] == "running"
    out = subprocess.run([*cmd, "--storage_directory", str(killed)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming block1_h2_dk8_MSE from step {step_at_kill}" in out.stdout
    assert_same_run(straight, killed)


def test_failed_job_is_marked_failed(tiny_teacher, text_files, tmp_path, monkeypatch):
    import sitra.recipes.retrain_single_block as recipe

    calls = {"n": 0}
    real = recipe.block_loss

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(recipe, "block_loss", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(block_args(tiny_teacher, text_files, tmp_path))
    log = read_log(tmp_path / "eval_results" / "block1_h2_dk8_MSE.h5")
    assert log["attrs"]["status"] == "failed"
    assert "disk on fire" in log["attrs"]["error"]


def test_rerun_with_other_arguments_is_refused(tiny_teacher, text_files, tmp_path):
    from sitra.errors import UsageError

    run(block_args(tiny_teacher, text_files, tmp_path, max_steps=2))
    with pytest.raises(UsageError, match=r"lr: 0.003 there, 0.01 here"):
        run(block_args(tiny_teacher, text_files, tmp_path, max_steps=2, lr=1e-2))
    # --overwrite starts over; a rerun of a finished run changes nothing
    run(block_args(tiny_teacher, text_files, tmp_path, max_steps=2, lr=1e-2, overwrite=True))
    before = latest_state(tmp_path)[0]
    run(block_args(tiny_teacher, text_files, tmp_path, max_steps=2, lr=1e-2))
    after = latest_state(tmp_path)[0]
    assert all(torch.equal(before[k], after[k]) for k in before)
