"""sitra never deletes or replaces what it did not make: an --output that holds anything else is
refused in one line before any compute; its own output is replaced only with --overwrite, and
then whole (a rename after the new folder is complete)."""
import subprocess
import sys
from pathlib import Path

import pytest

from sitra.errors import UsageError
from sitra.outputs import MARKER, check_output, made_by, write_folder

ROOT = Path(__file__).resolve().parents[1]


def fill_with(name, text):
    def fill(tmp):
        tmp.mkdir()
        (tmp / name).write_text(text)
    return fill


def test_a_folder_of_someone_else_is_refused_and_kept(tmp_path):
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="sitra never replaces what it did not make"):
            check_output(mine, "build_merged", overwrite)
        with pytest.raises(UsageError, match="not replacing it"):
            write_folder(mine, "build_merged", fill_with("model.safetensors", "new"))
    assert (mine / "notes.txt").read_text() == "a user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_is_refused_and_kept(tmp_path):
    f = tmp_path / "model"
    f.write_text("not a folder")
    with pytest.raises(UsageError, match="exists and is a file"):
        check_output(f, "build_retrained", overwrite=True)
    assert f.read_text() == "not a folder"


def test_own_output_needs_overwrite_then_is_replaced_whole(tmp_path):
    out = tmp_path / "model"
    write_folder(out, "export_ternary", fill_with("a.txt", "first"))
    assert made_by(out) == "export_ternary" and (out / "a.txt").read_text() == "first"
    with pytest.raises(UsageError, match="pass --overwrite"):
        check_output(out, "export_ternary", overwrite=False)
    with pytest.raises(UsageError, match="did not make"):  # another job's output is not this job's to replace
        check_output(out, "build_merged", overwrite=True)
    check_output(out, "export_ternary", overwrite=True)
    write_folder(out, "export_ternary", fill_with("b.txt", "second"))
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "b.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folder left


def test_a_failed_fill_leaves_the_previous_folder(tmp_path):
    out = tmp_path / "model"
    write_folder(out, "build_merged", fill_with("a.txt", "first"))

    def broken(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_folder(out, "build_merged", broken)
    assert (out / "a.txt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_temporary_folders_of_a_killed_save_are_removed(tmp_path):
    stale = tmp_path / ".model.tmp12345"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    write_folder(tmp_path / "model", "build_merged", fill_with("a.txt", "x"))
    assert not stale.exists()


@pytest.mark.subprocess
@pytest.mark.parametrize("job,argv", [
    ("build_merged", ["--teacher", "TEACHER"]),
    ("build_retrained", ["--teacher", "TEACHER"]),
    ("export_ternary", ["MODEL"]),
    ("tokenize_cells", ["--h5ad", "H5AD"]),
])
def test_jobs_refuse_an_output_holding_user_data(job, argv, tmp_path):
    """Exit 2, one line naming --output, the user's file intact, before anything loads."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("precious")
    argv = [a.replace("TEACHER", str(tmp_path / "no-teacher")).replace("MODEL", str(tmp_path / "no-model"))
            .replace("H5AD", str(tmp_path / "cells.h5ad")) for a in argv]
    (tmp_path / "cells.h5ad").write_bytes(b"")  # the parser checks that input paths exist
    if job == "export_ternary":  # its check reads MODEL_DIR's config first: give it a ternary one
        model = tmp_path / "no-model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "bert", "architectures": ["BertForMaskedLM"], '
                                           '"sitra_quantization": {"student_bits": 1.58, "modules": []}}')
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *argv, "--output", str(out), "--overwrite"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and f"--output {out}" in lines[0], proc.stderr[-2000:]
    assert (out / "results.csv").read_text() == "precious" and [p.name for p in out.iterdir()] == ["results.csv"]


def fake_log(folder, name, job, config):
    from sitra.results import RunLog

    log = RunLog(folder / f"{name}.h5", job, name, config)
    log.train(1, loss=1.0)
    log.complete({"block_mse": 0.5})


def test_collect_without_a_manifest_keeps_each_runs_name(tmp_path):
    from sitra.results import sweep_rows

    for i in range(2):
        fake_log(tmp_path, f"run{i}", "retrain_single_block", {"block": i, "run_name": None})
    rows, axes, _ = sweep_rows(tmp_path)
    assert [r["run_name"] for r in rows] == ["run0", "run1"] and axes == ["block"]


def test_collect_refuses_logs_of_several_jobs(tmp_path):
    from sitra.results import sweep_rows

    fake_log(tmp_path, "a", "retrain_single_block", {"block": 1})
    fake_log(tmp_path, "b", "retrain_merge", {"block": 1, "init": "first"})
    with pytest.raises(UsageError, match="several jobs"):
        sweep_rows(tmp_path)


def test_a_truncated_weights_file_is_named(tmp_path):
    from safetensors.torch import save_file

    from sitra.models.assembly import load_weights

    import torch

    save_file({"w": torch.ones(100)}, str(tmp_path / "best.safetensors"))
    (tmp_path / "best.safetensors").write_bytes((tmp_path / "best.safetensors").read_bytes()[:60])
    with pytest.raises(UsageError, match=r"best.safetensors: unreadable weights"):
        load_weights(tmp_path)


def test_files_written_whole_follow_the_umask(tmp_path):
    import os

    from sitra.results import atomic_write

    def private(tmp):
        tmp.write_text("x")
        os.chmod(tmp, 0o600)  # as some writers (safetensors) do

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "best.safetensors", private)
    finally:
        os.umask(old)
    assert (tmp_path / "best.safetensors").stat().st_mode & 0o777 == 0o644


def test_block_runs_leave_merge_runs_out(tmp_path):
    """build_retrained over a checkpoints/ that also holds merge runs (the README's workflow)."""
    import json

    from sitra.models.assembly import block_runs

    for name, extra in (("block1", {}), ("merge0", {"init": "first"})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "args.json").write_text(json.dumps({"teacher": "T", "block": 1, "block_heads": 2, **extra}))
        (folder / "best.safetensors").write_bytes(b"x")
    assert block_runs(tmp_path, "T") == [tmp_path / "block1"]


def test_relation_layers_errors_name_that_flag():
    from sitra.recipes.distill_pythia import parse_layer_map

    with pytest.raises(UsageError, match=r"^--relation_layers abc: "):
        parse_layer_map("abc", 2, 4, "--relation_layers")


@pytest.mark.parametrize("flags,message", [
    (["--time", "soon"], "--time soon"),
    (["--cluster", "moon"], "--cluster moon"),
    (["--nodes", "2", "--cluster", "local"], "--nodes 2"),
    (["--sweep_name", "../../x"], "--sweep_name ../../x"),
    (["--mem_gb", "-1"], "--mem_gb -1"),
])
def test_launcher_flags_are_checked_before_any_folder(tmp_path, monkeypatch, capsys, flags, message):
    from sitra import launch

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        launch.main(["retrain_single_block", "--storage_directory", str(tmp_path / "store"), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "store").exists() and not (tmp_path.parent / "x").exists()


def test_launch_help_lists_its_flags_and_the_jobs(capsys):
    from sitra import launch
    from sitra.recipes import JOBS

    with pytest.raises(SystemExit) as stop:
        launch.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "--array_parallelism" in out and all(job in out for job in JOBS)
