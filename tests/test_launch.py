"""The launcher: arrays on the real single-node SLURM cluster (or locally), preemption, merging."""
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sitra.launch import LaunchArgs, launch, parse_time, wait
from sitra.recipes import retrain_single_block
from sitra.recipes.collect_results import CollectArgs, run as collect
from sitra.results import read_log

ROOT = Path(__file__).resolve().parents[1]


def slurm_ready() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


needs_slurm = pytest.mark.skipif(not slurm_ready(), reason="no running SLURM cluster (.ci/slurm-cluster start)")
# the local cluster runs each task as a process of its own (submitit's local executor)
CLUSTERS = [pytest.param("slurm", marks=[needs_slurm, pytest.mark.slurm, pytest.mark.slow]),
            pytest.param("local", marks=[pytest.mark.multiprocess, pytest.mark.slow])]


def job_flags(teacher, text_files, **kw):
    files = dict(train_file=text_files / "train.txt", eval_file=text_files / "eval.txt") if text_files else {}
    flags = dict(teacher=teacher, **files, block_heads=2, block_d_k=8, max_seq_length=32, batch_size=8, max_steps=6, lr=3e-3,
                 device="cpu", block_dropout=0.1)
    flags.update(kw)
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def launch_args(storage, cluster, **kw):
    return LaunchArgs(storage_directory=str(storage), cluster=cluster, time="30", cpus_per_task=1, mem_gb=2, **kw)


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_array_finishes_and_merges(tiny_teacher, text_files, tmp_path, cluster):
    started = time.time()
    jobs, manifest = launch("retrain_single_block", job_flags(tiny_teacher, text_files),
                            launch_args(tmp_path, cluster, blocks="0-1", sweep=[["block_heads=2,4"]]))
    assert len(jobs) == 4
    if cluster == "slurm":
        assert len({j.job_id.split("_")[0] for j in jobs}) == 1, "one array, not four jobs"
    assert not any(wait(jobs).values())
    merged = collect(CollectArgs(sweep_dir=str(manifest.parent)))
    elapsed = time.time() - started
    print(f"4-task array on {cluster}: submit to merged table in {elapsed:.1f} s")
    import h5py

    with h5py.File(merged) as f:
        assert [s.decode() for s in f["status"][:]] == ["complete"] * 4
        assert sorted(zip(f["block"][:], f["block_heads"][:])) == [(0, 2), (0, 4), (1, 2), (1, 4)]
        assert (f["block_mse"][:] > 0).all() and (f["wall_time_s"][:] > 0).all()
    assert (manifest.parent / "results.csv").exists() and (manifest.parent / "results.md").exists()
    assert (manifest.parent / "results_block_mse.png").stat().st_size > 1000
    # a task computes exactly what a direct run of the same flags computes
    task = json.loads(manifest.read_text())["tasks"][3]
    direct = retrain_single_block.run(dataclasses.replace(
        jobs[3].submission().args[0], storage_directory=str(tmp_path / "direct"), run_name="d"))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "checkpoints" / task["run_name"] / "best.safetensors"))
    b = load_file(str(direct.checkpoint_dir / "best.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_a_raising_task_is_reported_failed(tiny_teacher, text_files, tmp_path, cluster, capsys):
    jobs, manifest = launch("retrain_single_block", job_flags(tiny_teacher, text_files, block=1),
                            launch_args(tmp_path, cluster, sweep=[[f"train_file={text_files / 'train.txt'},{text_files / 'too_short.txt'}"]]))
    errors = wait(jobs)
    assert not errors[jobs[0].job_id] and "training text is empty" in errors[jobs[1].job_id]
    collect(CollectArgs(sweep_dir=str(manifest.parent)))
    out = capsys.readouterr().out
    assert "1 of 2 tasks complete" in out
    assert "not merged: train_file" in out and "failed" in out and "training text is empty" in out


def task_id(job) -> str:
    return job.job_id  # ARRAYJOBID_TASKID for arrays, JOBID otherwise


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.kill
@needs_slurm
@pytest.mark.parametrize("how", ["scontrol requeue", "USR2 preemption"])
def test_requeued_task_resumes_to_the_same_parameters(tiny_teacher, text_files, tmp_path, how, gate):
    flags = job_flags(tiny_teacher, text_files, block=1, max_steps=60, save_steps=1, eval_steps=20)
    # the interrupted task's first attempt is held at its save of step 31 (latest.pt: step 30)
    # until the requeue kills it, or until the USR2 reached the job's handler: provably mid-run,
    # however fast the machine (its rerun passes the gate)
    held = gate(31, release_on="USR2" if how == "USR2 preemption" else None)
    straight, _ = launch("retrain_single_block", flags, launch_args(tmp_path, "slurm", sweep_name="straight"))
    interrupted, _ = launch("retrain_single_block", flags, launch_args(
        tmp_path, "slurm", sweep_name="interrupted", slurm_setup=[held.slurm_setup()]))
    latest = tmp_path / "checkpoints" / "interrupted" / "task" / "latest.pt"
    held.wait_paused(running=lambda: not interrupted[0].done())
    if how == "scontrol requeue":
        subprocess.run(["scontrol", "requeue", task_id(interrupted[0])], check=True)
    else:
        subprocess.run(["scancel", "--signal=USR2", task_id(interrupted[0])], check=True)
    assert not any(wait(straight + interrupted).values())
    out = Path(interrupted[0].paths.stdout).read_text()
    assert "resuming interrupted/task from step" in out
    resumed_at = int(out.split("resuming interrupted/task from step ")[1].split()[0])
    assert 30 <= resumed_at < 60
    a = torch.load(tmp_path / "checkpoints" / "straight" / "task" / "latest.pt", weights_only=False)
    b = torch.load(latest, weights_only=False)
    assert a["progress"] == b["progress"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    log = read_log(tmp_path / "eval_results" / "interrupted" / "task.h5")
    assert log["train"]["step"].tolist() == list(range(1, 61))  # continued, nothing repeated
    assert log["attrs"]["status"] == "complete"
    if how == "USR2 preemption":  # saved at the step where the signal arrived, nothing lost
        assert "stopped at step" in out


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.kill
@needs_slurm
def test_cancelled_task_leaves_the_others_complete(tiny_teacher, text_files, tmp_path, capsys, gate):
    flags = job_flags(tiny_teacher, text_files, block=1, save_steps=50)
    # the long task is held at its save of step 100 (latest.pt: step 50) until it is cancelled
    held = gate(100, match="max_steps20000")
    jobs, manifest = launch("retrain_single_block", flags, launch_args(
        tmp_path, "slurm", sweep=[["max_steps=60,20000,61"]], slurm_setup=[held.slurm_setup()]))
    held.wait_paused(running=lambda: not jobs[1].done())
    subprocess.run(["scancel", task_id(jobs[1])], check=True)
    errors = wait(jobs)
    assert not errors[jobs[0].job_id] and not errors[jobs[2].job_id] and errors[jobs[1].job_id]
    collect(CollectArgs(sweep_dir=str(manifest.parent)))
    out = capsys.readouterr().out
    assert "2 of 3 tasks complete" in out and "not merged: max_steps20000: running" in out


BAD = [
    (["no_such_job"], "job 'no_such_job': unknown; choose from"),
    (["retrain_single_block", "--sweep", "bogus=1,2"], "--sweep bogus=1,2: bogus is not a flag of BlockArgs"),
    (["retrain_single_block", "--sweep", "block_heads="], "--sweep block_heads=: no values; the grid would be empty"),
    (["retrain_single_block", "--blocks", "0-11"], "--block 4: the teacher has 4 layers, allowed 0-3"),
    (["retrain_single_block", "--blocks", "0-1", "--storage_directory", "/proc/no-write"], "--storage_directory /proc/no-write: cannot write there"),
    (["retrain_single_block", "--blocks", "0-1", "--time", "soon"], "--time soon: use minutes"),
    (["retrain_single_block", "--blocks", "0-1", "--cluster", "cloud"], "--cluster cloud: choose slurm, local or debug"),
    (["retrain_single_block", "--blocks", "0", "--cluster", "local", "--nodes", "2"],
     "--nodes 2: several nodes need SLURM (--cluster slurm); on one machine use --tasks_per_node"),
    (["retrain_single_block", "--blocks", "0", "--tasks_per_node", "0"], "--tasks_per_node 0: must be at least 1"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_launches_are_one_line_errors(tiny_teacher, tmp_path, argv, message, capsys):
    from sitra.launch import main

    extra = ["--teacher", tiny_teacher, "--block_heads", "2"] if argv[0] == "retrain_single_block" else []
    if "--storage_directory" not in argv:
        extra += ["--storage_directory", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main([*argv, *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "slurm_logs").exists() or not any((tmp_path / "slurm_logs").rglob("*_submitted.pkl"))


def test_time_formats():
    assert [parse_time(t) for t in ("90", "1:30", "4:00:00", "1-00", "2-04:30", "0-00:00:30")] == [90, 2, 240, 1440, 3150, 1]


def test_collect_reports_corrupt_and_partial_logs(tiny_teacher, text_files, tmp_path, capsys):
    from sitra.errors import Interrupted

    sweep = tmp_path / "eval_results" / "s"
    base = dict(teacher=tiny_teacher, train_file=str(text_files / "train.txt"), block=1, block_heads=2,
                max_seq_length=32, batch_size=8, max_steps=4, device="cpu", storage_directory=str(tmp_path))
    retrain_single_block.run(retrain_single_block.BlockArgs(**base, run_name="s/a", seed=1))
    with pytest.raises(Interrupted):
        retrain_single_block.run(retrain_single_block.BlockArgs(**base, run_name="s/b", seed=2, stop_after_steps=2))
    (sweep / "c.h5").write_bytes(b"this is not hdf5")
    collect(CollectArgs(sweep_dir=str(sweep)))
    out = capsys.readouterr().out
    assert "1 of 3 tasks complete" in out
    assert "not merged: b: running" in out and "not merged: c.h5: unreadable, skipped" in out
    import h5py

    with h5py.File(sweep / "results.h5") as f:
        assert [s.decode() for s in f["status"][:]] == ["complete", "running", "corrupt"]
        assert f["seed"][:].tolist() == [1, 2, float("nan")] or f["seed"][0] == 1
        assert not (f["block_mse"][1:] == f["block_mse"][1:]).any()  # NaN: partial logs are not merged


@pytest.mark.slow
@pytest.mark.multiprocess
def test_block_sweep_then_eval_sweep_like_the_euler_scripts(tiny_teacher, text_files, tmp_path, capsys):
    """.train's sweep, then .eval's matching evaluations (one per block run), merged with heatmaps."""
    flags = job_flags(tiny_teacher, text_files, max_steps=4)  # --block_heads given here is swept below
    jobs, _ = launch("retrain_single_block", flags, launch_args(
        tmp_path, "local", blocks="0-1", sweep=[["block_heads=1,2"]], sweep_name="blocks"))
    assert not any(wait(jobs).values())
    eval_flags = ["--teacher", tiny_teacher, "--train_file", str(text_files / "train.txt"), "--eval_file",
                  str(text_files / "eval.txt"), "--max_seq_length", "32", "--block_sweep", "blocks", "--device", "cpu"]
    jobs, manifest = launch("eval_retrained", eval_flags, launch_args(
        tmp_path, "local", blocks="0-1", sweep=[["block_heads=1,2"]], sweep_name="evals"))
    assert not any(wait(jobs).values())
    collect(CollectArgs(sweep_dir=str(manifest.parent)))
    assert "4 of 4 tasks complete" in capsys.readouterr().out
    import h5py

    with h5py.File(manifest.parent / "results.h5") as f:
        acc, cos = f["model/mlm_accuracy"][:], f["model/hidden_cosine"][:]
        assert ((0 <= acc) & (acc <= 1)).all() and (cos < 1).all()
    assert (manifest.parent / "results_model_mlm_accuracy.png").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_euler_scripts_run_end_to_end(tiny_teacher, text_files, tmp_path):
    """`bash .train` and `bash .eval` as a user runs them, shrunk by their environment knobs."""
    import os

    env = dict(os.environ, TEACHER=tiny_teacher, LAYERS="0-1", D_K="8", HEADS="1,2", GPUS="0", STORAGE=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    data = ["--train_file", str(text_files / "train.txt"), "--eval_file", str(text_files / "eval.txt"),
            "--max_seq_length", "32", "--device", "cpu", "--cluster", "local", "--cpus_per_task", "1", "--mem_gb", "2"]
    for script, extra in ((".train", ["--max_steps", "3", "--batch_size", "8"]), (".eval", [])):
        out = subprocess.run(["bash", str(ROOT / script), *data, *extra], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "4 of 4 tasks complete" in out.stdout
    assert (tmp_path / "eval_results" / "eval_sweep" / "results_model_mlm_accuracy.png").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("cluster", CLUSTERS)
def test_two_processes_per_task_train_data_parallel(tiny_teacher, equal_length_text, tmp_path, cluster):
    """--tasks_per_node 2: the task's two processes meet through submitit's environment and end
    where one process with twice the batch ends (see tests/test_distributed.py)."""
    flags = dict(train_file=equal_length_text / "train.txt", eval_file=equal_length_text / "eval.txt", block_heads=2,
                 block_d_k=8, max_seq_length=16, block_dropout=0.0, max_steps=4, gradient_accumulation_steps=2, lr=3e-3)
    jobs, manifest = launch("retrain_single_block", job_flags(tiny_teacher, text_files=None, **flags, batch_size=4),
                            launch_args(tmp_path, cluster, blocks="1", tasks_per_node=2))
    assert not any(wait(jobs).values())
    task = json.loads(manifest.read_text())["tasks"][0]
    log = read_log(tmp_path / "eval_results" / f"{task['run_name']}.h5")
    assert log["attrs"]["status"] == "complete" and log["attrs"]["world_size"] == 2
    direct = retrain_single_block.run(dataclasses.replace(
        jobs[0].submission().args[0], storage_directory=str(tmp_path / "direct"), run_name="d", batch_size=8))
    a = torch.load(tmp_path / "checkpoints" / task["run_name"] / "latest.pt", weights_only=False)["model"]
    b = torch.load(direct.checkpoint_dir / "latest.pt", weights_only=False)["model"]
    for k in a.keys() - {"key.bias"}:  # key.bias has no true gradient: see tests/test_distributed.py
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
