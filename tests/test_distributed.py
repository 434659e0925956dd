"""Data-parallel training: real torchrun processes on gloo, against one process on the whole batch."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sitra.errors import UsageError
from sitra.data import Batches
from sitra.recipes.retrain_single_block import BlockArgs, run
from sitra.results import read_log

ROOT = Path(__file__).resolve().parents[1]
NAME = "block1_h2_dk8_MSE"


# ---------------------------------------------------------------------------------------------
# sharding


@pytest.mark.parametrize("n, batch, world", [(53, 4, 2), (53, 8, 3), (16, 4, 2), (17, 4, 4), (9, 2, 4), (5, 1, 5)])
def test_shards_read_every_example_once_per_epoch(n, batch, world):
    whole = Batches(list(range(n)), batch, lambda xs, gens: xs, seed=3)
    parts = [whole.shard(r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # every process runs the same number of steps
    for epoch in range(2):
        batches = [list(p.epoch(epoch)) for p in parts]
        seen = [x for rank in batches for b in rank for x in b]
        assert sorted(seen) == list(range(n))  # once each: nothing twice, nothing skipped
        for b in range(len(parts[0])):
            sizes = [len(rank[b]) for rank in batches]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            shares = [p.share(b) for p in parts]
            assert sum(shares) == pytest.approx(world)
            assert shares == pytest.approx([s * world / sum(sizes) for s in sizes])
        # the global batches are the one-process batches of batch * world (up to a merged tail)
        one = Batches(list(range(n)), batch * world, lambda xs, gens: xs, seed=3)
        flat = [sorted(x for rank in batches for x in rank[b]) for b in range(len(parts[0]))]
        single = [sorted(b) for b in one.epoch(epoch)]
        if len(single) == len(flat):
            assert flat == single
        else:  # a tail smaller than the world joined the batch before it
            assert flat[:-1] == single[:-2] and flat[-1] == sorted(single[-2] + single[-1])
            assert len(single[-1]) < world


def test_resumed_shard_starts_at_the_same_batch():
    whole = Batches(list(range(40)), 3, lambda xs, gens: xs, seed=1)
    part = whole.shard(1, 2)
    assert list(part.epoch(2, start=4)) == list(part.epoch(2))[4:]


def test_fewer_examples_than_processes():
    with pytest.raises(UsageError, match="3 training examples cannot be shared by 4 processes"):
        Batches([1, 2, 3], 1, None).shard(0, 4)


# ---------------------------------------------------------------------------------------------
# torchrun with 2 processes on gloo


def flags(teacher, text, storage, **kw) -> dict:
    values = dict(teacher=teacher, train_file=str(text / "train.txt"), eval_file=str(text / "eval.txt"),
                  storage_directory=str(storage), block=1, block_heads=2, block_d_k=8, block_dropout=0.0,
                  max_seq_length=16, batch_size=4, gradient_accumulation_steps=2, max_steps=6, eval_steps=3,
                  save_steps=2, warmup_steps=1, lr=3e-3, device="cpu")
    values.update(kw)
    return values


def torchrun(values: dict, nproc: int = 2, timeout: float = 300, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "jobs" / "retrain_single_block.py")]
    for k, v in values.items():
        cmd += [f"--{k}", str(v)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **popen)


def weights(storage, file="best.safetensors"):
    path = Path(storage) / "checkpoints" / NAME / file
    return load_file(str(path)) if file.endswith(".safetensors") else torch.load(path, weights_only=False)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_equal_one_process_on_the_whole_batch(tiny_teacher, equal_length_text, tmp_path):
    one = tmp_path / "one"
    run(BlockArgs(**flags(tiny_teacher, equal_length_text, one, batch_size=8)))
    two = tmp_path / "two"
    result = torchrun(flags(tiny_teacher, equal_length_text, two))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = weights(one, "latest.pt"), weights(two, "latest.pt")
    best_a, best_b = a["progress"].pop("best"), b["progress"].pop("best")
    assert a["progress"] == b["progress"] and best_a == pytest.approx(best_b, rel=1e-6)
    # key.bias shifts every score of a softmax row by the same amount: its true gradient is 0,
    # and Adam turns the float noise that stands in for it into steps, different in each run.
    assert "key.bias" in a["model"]
    for k in a["model"].keys() - {"key.bias"}:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    assert len(b["rng"]) == 2 and len(a["rng"]) == 1  # every process's random state
    assert not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])
    la, lb = read_log(one / "eval_results" / f"{NAME}.h5"), read_log(two / "eval_results" / f"{NAME}.h5")
    assert lb["attrs"]["status"] == "complete" and lb["attrs"]["world_size"] == 2
    assert lb["attrs"]["effective_batch_size"] == la["attrs"]["effective_batch_size"] == 16
    assert lb["train"]["step"].tolist() == list(range(1, 7))  # one writer: no step logged twice
    torch.testing.assert_close(torch.tensor(lb["train"]["loss"]), torch.tensor(la["train"]["loss"]), rtol=1e-5, atol=0)
    assert (lb["train"]["tokens_per_s_total"] > lb["train"]["tokens_per_s"]).all()
    assert result.stdout.count("effective batch: 4 per process x 2 processes x 2 accumulation = 16") == 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_stopped_and_resumed_equal_uninterrupted(tiny_teacher, equal_length_text, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert torchrun(flags(tiny_teacher, equal_length_text, straight, block_dropout=0.2)).returncode == 0
    first = torchrun(flags(tiny_teacher, equal_length_text, stopped, block_dropout=0.2, stop_after_steps=3))
    assert first.returncode == 0 and "stopped at step 3 of 6" in first.stdout
    assert read_log(stopped / "eval_results" / f"{NAME}.h5")["attrs"]["status"] == "running"
    assert torchrun(flags(tiny_teacher, equal_length_text, stopped, block_dropout=0.2)).returncode == 0
    a, b = weights(straight, "latest.pt"), weights(stopped, "latest.pt")
    for k in a["model"]:  # dropout on: each process's restored random stream matters
        assert torch.equal(a["model"][k], b["model"][k]), k
    log = read_log(stopped / "eval_results" / f"{NAME}.h5")
    assert log["train"]["step"].tolist() == list(range(1, 7)) and log["attrs"]["status"] == "complete"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resuming_with_another_process_count_is_refused(tiny_teacher, equal_length_text, tmp_path):
    values = flags(tiny_teacher, equal_length_text, tmp_path, stop_after_steps=2)
    assert torchrun(values).returncode == 0
    values.pop("stop_after_steps")
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "retrain_single_block.py"),
                             *[f"--{k}={v}" for k, v in values.items()]], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "written by 2 processes and this run has 1" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.kill
def test_a_dying_process_fails_the_job_instead_of_hanging(tiny_teacher, equal_length_text, tmp_path, gate):
    values = flags(tiny_teacher, equal_length_text, tmp_path, max_steps=100000, eval_steps=100000, save_steps=1)
    # rank 0 (the only writer) is held at its save of step 2 while rank 1 trains on into the
    # next all-reduce and waits there for it; then rank 0 dies: training provably under way
    held = gate(2)
    cmd_log = tmp_path / "out.txt"
    with open(cmd_log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(ROOT / "jobs" / "retrain_single_block.py"), *[f"--{k}={v}" for k, v in values.items()]],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=held.env())
        try:
            rank0 = held.wait_paused(running=lambda: proc.poll() is None)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2 and str(rank0) in workers
        os.kill(rank0, signal.SIGKILL)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the job hung after one of its processes died")
    assert code != 0
    text = cmd_log.read_text()
    assert "Signal 9 (SIGKILL)" in text or "SIGKILL" in text, text[-2000:]


@pytest.mark.slow
@pytest.mark.subprocess
def test_world_size_without_rendezvous_is_one_line(tiny_teacher, equal_length_text, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="0")
    values = flags(tiny_teacher, equal_length_text, tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / "retrain_single_block.py"),
                             *[f"--{k}={v}" for k, v in values.items()]], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == ("retrain_single_block.py: error: WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT not set: start "
                         "several processes with torchrun, srun or jobs/launch.py --tasks_per_node")
    assert not (tmp_path / "checkpoints").exists()  # before any compute


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.multiprocess
def test_srun_starts_the_processes(tiny_teacher, equal_length_text, tmp_path):
    """Plain `srun -n 2 python jobs/...` (no torchrun): the rendezvous comes from SLURM's variables."""
    from test_launch import slurm_ready

    if not slurm_ready():
        pytest.skip("no running SLURM cluster (.ci/slurm-cluster start)")
    values = flags(tiny_teacher, equal_length_text, tmp_path / "srun")
    result = subprocess.run(["srun", "-n", "2", "-c", "1", "--mem-per-cpu=1024", "--kill-on-bad-exit=1", "--time=10",
                             sys.executable, str(ROOT / "jobs" / "retrain_single_block.py"),
                             *[f"--{k}={v}" for k, v in values.items()]],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path / "srun" / "eval_results" / f"{NAME}.h5")
    assert log["attrs"]["world_size"] == 2 and log["attrs"]["status"] == "complete"
    run(BlockArgs(**flags(tiny_teacher, equal_length_text, tmp_path / "one", batch_size=8)))
    a, b = weights(tmp_path / "srun", "latest.pt")["model"], weights(tmp_path / "one", "latest.pt")["model"]
    for k in a.keys() - {"key.bias"}:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("job, extra", [
    ("train_block_till_end", {"alpha": 0.5}),
    ("retrain_merge", {"intermediate_size": 48}),
])
def test_other_training_jobs_run_unchanged_under_torchrun(tiny_teacher, equal_length_text, tmp_path, job, extra):
    values = {**flags(tiny_teacher, equal_length_text, tmp_path, max_steps=4, eval_steps=2), **extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "jobs" / f"{job}.py"),
           *[f"--{k}={v}" for k, v in values.items()]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (log_path,) = (tmp_path / "eval_results").glob("*.h5")
    log = read_log(log_path)
    assert log["attrs"]["status"] == "complete" and log["attrs"]["world_size"] == 2
    assert log["train"]["step"].tolist() == [1, 2, 3, 4] and log["eval"]["step"].tolist() == [0, 2, 4]
