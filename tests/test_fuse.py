"""Fused sweeps: several students against one teacher pass end exactly where they end alone."""
import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from safetensors.torch import load_file

from sitra.fuse import expand_argv
from sitra.launch import LaunchArgs, launch, main as launch_main, wait
from sitra.recipes import retrain_merge, retrain_single_block, train_block_till_end
from sitra.recipes.collect_results import CollectArgs, run as collect
from sitra.results import read_log
from sitra.train import Progress, _settle_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def common(teacher, text_files, storage, **kw):
    values = dict(teacher=teacher, train_file=str(text_files / "train.txt"), eval_file=str(text_files / "eval.txt"),
                  storage_directory=str(storage), max_seq_length=32, batch_size=8, max_steps=6, eval_steps=3,
                  save_steps=2, warmup_steps=1, lr=3e-3, device="cpu")
    values.update(kw)
    return values


CONFIGS = [dict(block=1, block_heads=2, block_d_k=8), dict(block=1, block_heads=4, block_d_k=4),
           dict(block=2, block_heads=2, block_d_k=8), dict(block=2, block_heads=1, block_d_k=16)]


def state(run, file="best.safetensors"):
    path = run.checkpoint_dir / file
    return load_file(str(path)) if file.endswith("safetensors") else torch.load(path, weights_only=False)["model"]


def assert_equal_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("recipe, extra", [
    (retrain_single_block, {}),
    (train_block_till_end, {"alpha": 0.5}),
    (retrain_merge, {"intermediate_size": 48}),
], ids=["block", "block_to_end", "merge"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_students_equal_their_separate_runs(tiny_teacher, text_files, tmp_path, recipe, extra, dropout):
    """Bit-identical on CPU, with and without dropout: each student draws from its own stream."""
    configs = CONFIGS if recipe is not retrain_merge else [c for c in CONFIGS if c["block"] < 3]
    make = [recipe.ARGS(**common(tiny_teacher, text_files, tmp_path / "fused", **c, block_dropout=dropout, **extra))
            for c in configs]
    fused = recipe.run_fused(make)
    assert len({r.name for r in fused}) == len(configs)
    for c, run in zip(configs, fused):
        alone = recipe.run(recipe.ARGS(**common(tiny_teacher, text_files, tmp_path / "alone", **c, block_dropout=dropout, **extra)))
        assert alone.name == run.name
        assert_equal_weights(state(run), state(alone))
        assert_equal_weights(state(run, "latest.pt"), state(alone, "latest.pt"))
        a, b = read_log(run.log_path), read_log(alone.log_path)
        assert a["train"]["loss"].tolist() == b["train"]["loss"].tolist()
        assert a["eval"]["eval_loss"].tolist() == b["eval"]["eval_loss"].tolist()
        assert a["attrs"]["status"] == "complete" and a["attrs"]["fused_students"] == len(configs)
        assert a["attrs"]["peak_memory_mb"] > 0
    if recipe is retrain_single_block:  # a test that could fail: the students did learn different things
        assert not torch.equal(state(fused[0])["query.weight"], state(fused[2])["query.weight"])


def test_a_students_result_does_not_depend_on_its_companions(tiny_teacher, text_files, tmp_path):
    def student_of(companions, where):
        args = [retrain_single_block.BlockArgs(**common(tiny_teacher, text_files, tmp_path / where, **c, block_dropout=0.3))
                for c in [CONFIGS[0], *companions]]
        return state(retrain_single_block.run_fused(args)[0])
    assert_equal_weights(student_of(CONFIGS[1:2], "one"), student_of(CONFIGS[1:], "three"))


def test_a_stopped_fused_task_resumes_all_students_to_the_uninterrupted_result(tiny_teacher, text_files, tmp_path):
    def args(where, **kw):
        return [retrain_single_block.BlockArgs(**common(tiny_teacher, text_files, tmp_path / where, **c, block_dropout=0.2, **kw))
                for c in CONFIGS[:3]]
    straight = retrain_single_block.run_fused(args("straight"))
    from sitra.errors import Interrupted

    with pytest.raises(Interrupted):
        retrain_single_block.run_fused(args("stopped", stop_after_steps=3))
    for run in straight:
        stopped_log = read_log(Path(tmp_path / "stopped" / "eval_results" / f"{run.name}.h5"))
        assert stopped_log["attrs"]["status"] == "running" and stopped_log["train"]["step"].tolist() == [1, 2, 3]
    resumed = retrain_single_block.run_fused(args("stopped"))
    for a, b in zip(straight, resumed):
        assert_equal_weights(state(a, "latest.pt"), state(b, "latest.pt"))
        assert read_log(b.log_path)["train"]["step"].tolist() == list(range(1, 7))


def _checkpoint(path, step):
    torch.save({"progress": vars(Progress(step=step))}, path)


class _S:  # what _settle_checkpoints reads of a trainee's state
    def __init__(self, folder):
        folder.mkdir()
        self.latest, self.next, self.previous = folder / "latest.pt", folder / "latest.next.pt", folder / "previous.pt"


@pytest.mark.parametrize("written, renamed, outcome", [
    (3, 0, 4),  # every next file written, none renamed: finish the renames
    (3, 2, 4),  # stopped half-way through the renames: finish them
    (2, 0, 2),  # stopped while writing the next files: drop them, all resume from step 2
])
def test_a_save_cut_short_settles_to_one_step(tmp_path, written, renamed, outcome):
    states = [_S(tmp_path / f"s{i}") for i in range(3)]
    for i, s in enumerate(states):
        _checkpoint(s.latest, 2)
        if i < written:
            _checkpoint(s.next, 4)
        if i < renamed:
            s.next.replace(s.latest)
    _settle_checkpoints(states)
    assert [torch.load(s.latest, weights_only=False)["progress"]["step"] for s in states] == [outcome] * 3
    assert not any(s.next.exists() for s in states)


def test_expand_argv_grid():
    argv = ["--teacher", "t", "--block", "0,1", "--block_heads=8,4", "--block_d_k", "32", "--lr", "1e-3"]
    grid = expand_argv(argv, ("block", "block_heads", "block_d_k"))
    assert grid == [["--teacher", "t", "--block", b, "--block_heads", h, "--block_d_k", "32", "--lr", "1e-3"]
                    for b in ("0", "1") for h in ("8", "4")]
    assert expand_argv(["--block", "3", "--lr", "1,2"], ("block",)) is None


@pytest.mark.slow
@pytest.mark.subprocess
def test_job_script_fuses_comma_lists(tiny_teacher, text_files, tmp_path):
    values = common(tiny_teacher, text_files, tmp_path, max_steps=2, eval_steps=2)
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "retrain_single_block.py"), "--block", "1,2",
                          "--block_heads", "2,4", *[f"--{k}={v}" for k, v in values.items()]],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "4 students share each teacher pass" in out.stdout
    logs = sorted(p.name for p in (tmp_path / "eval_results").glob("*.h5"))
    assert logs == ["block1_h2_dk16_MSE.h5", "block1_h4_dk8_MSE.h5", "block2_h2_dk16_MSE.h5", "block2_h4_dk8_MSE.h5"]


@pytest.mark.parametrize("argv, message", [
    (["--block", "1,2", "--block_heads", "2", "--run_name", "x"], "--run_name x: fused runs need one name each; leave --run_name out"),
    (["--block", "1,2", "--block_heads", "2,4", "--max_memory_gb", "0.0001"], "--max_memory_gb 0.0001: the 4 fused students need about"),
    (["--block", "1,9", "--block_heads", "2"], "--block 9: the teacher has 4 layers, allowed 0-3"),
])
@pytest.mark.slow
@pytest.mark.subprocess
def test_bad_fused_runs_are_one_line_errors(tiny_teacher, text_files, tmp_path, argv, message):
    values = common(tiny_teacher, text_files, tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "retrain_single_block.py"), *argv,
                          *[f"--{k}={v}" for k, v in values.items()]], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert message in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_launcher_groups_students_into_fused_tasks(tiny_teacher, text_files, tmp_path):
    flags = common(tiny_teacher, text_files, tmp_path, max_steps=3, eval_steps=3)
    flags.pop("storage_directory")
    argv = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    largs = LaunchArgs(storage_directory=str(tmp_path), cluster="local", time="30", cpus_per_task=1, mem_gb=4,
                       blocks="1-2", sweep=[["block_d_k=8,4"], ["block_heads=2,4"]], fuse="block_d_k,block_heads")
    jobs, manifest = launch("retrain_single_block", argv, largs)
    assert len(jobs) == 2  # one task per block, 4 students each
    assert not any(wait(jobs).values())
    record = json.loads(manifest.read_text())
    assert len(record["tasks"]) == 8 and len({t["job_id"] for t in record["tasks"]}) == 2
    merged = collect(CollectArgs(sweep_dir=str(manifest.parent)))
    with h5py.File(merged) as f:
        assert [s.decode() for s in f["status"][:]] == ["complete"] * 8
        assert sorted(zip(f["block"][:], f["block_d_k"][:], f["block_heads"][:])) == sorted(
            (b, d, h) for b in (1, 2) for d in (8, 4) for h in (2, 4))
    # each fused student equals a lone run of its flags (under any name: its dropout stream derives from its flags)
    task = record["tasks"][5]
    lone = retrain_single_block.run(retrain_single_block.BlockArgs(**common(
        tiny_teacher, text_files, tmp_path / "lone", max_steps=3, eval_steps=3, **task["values"])))
    assert_equal_weights(load_file(str(tmp_path / "checkpoints" / task["run_name"] / "best.safetensors")), state(lone))


@pytest.mark.parametrize("extra, message", [
    (["--fuse", "block_d_k", "--mem_gb", "0.0001"], "--mem_gb 0.0001: the 2 fused students need about"),
    (["--fuse", "block_heads"], "--fuse block_heads: block_heads is not a sweep axis (block, block_d_k)"),
    (["--sweep", "lr=1e-3,1e-4", "--fuse", "lr"], "--fuse lr: this job can fuse only block, block_heads, block_d_k, block_dropout"),
])
def test_bad_fused_launches_are_refused_before_submitting(tiny_teacher, tmp_path, extra, message, capsys):
    argv = ["retrain_single_block", "--teacher", tiny_teacher, "--block_heads", "2", "--blocks", "1",
            "--sweep", "block_d_k=8,4", "--storage_directory", str(tmp_path), "--cluster", "local", *extra]
    with pytest.raises(SystemExit) as e:
        launch_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not any((tmp_path / "slurm_logs").rglob("*_submitted.pkl"))
