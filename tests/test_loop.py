"""The training loop itself, on a toy regression: resume, accumulation, cadence, best choice, fusion.

Everything here runs in-process on the CPU in a few seconds: a two-layer MLP (dropout optional)
learns y = x . w from 32 examples, read through the real `sitra.data.Batches`, with a real
`sitra.results.Run` folder and `RunLog`.
"""
import math
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sitra.data import Batches
from sitra.errors import Interrupted
from sitra.results import Run, RunLog, read_log
from sitra.train import TrainArgs, Trainee, train, train_many, trainable_state

N = 32  # examples


def examples(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def collate(items, generators):
    return {"x": torch.stack([e["x"] for e in items]), "y": torch.stack([e["y"] for e in items]),
            "attention_mask": torch.ones(len(items), 3, dtype=torch.long)}  # 3 "tokens" per example


def batches(batch_size, n=N):
    return Batches(examples(n), batch_size, collate, seed=7)


def toy(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 1))


def loss_of(model):
    def step_loss(batch):
        pred = model(batch["x"]).squeeze(-1)
        loss = F.mse_loss(pred, batch.get("target", batch["y"]))
        return loss, {"mse": loss.detach(), "pred_mean": float(pred.detach().mean())}  # a tensor and a float
    return step_loss


def held_out(model):
    def evaluate():
        held = collate(examples(16, seed=1), None)
        return {"eval_loss": float(F.mse_loss(model(held["x"]).squeeze(-1), held["y"]))}
    return evaluate


def loop_args(**kw):
    values = dict(device="cpu", batch_size=4, gradient_accumulation_steps=2, max_steps=10, lr=1e-2,
                  warmup_steps=2, eval_steps=3, save_steps=4)
    values.update(kw)
    return TrainArgs(**values)


def make_run(where, name, config):
    return Run(name, where / "checkpoints" / name, where / "eval_results" / f"{name}.h5", config)


def train_toy(where, args, dropout=0.0, seed=0, name="toy", evaluate=held_out, select="eval_loss"):
    """One student trained by `train`, as a job would: a fresh model (the initial weights) each call."""
    model = toy(dropout, seed)
    run = make_run(where, name, {"name": name, "dropout": dropout, "seed": seed})
    with RunLog(run.log_path, "toy", name, run.config) as log:
        progress = train(model, batches(args.batch_size), loss_of(model), args, run, log,
                         evaluate(model) if evaluate else None, select)
        log.complete({})
    return model, run, progress


def latest(run):
    return torch.load(run.checkpoint_dir / "latest.pt", weights_only=False)


def best(run):
    return load_file(str(run.checkpoint_dir / "best.safetensors"))


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------


def test_stopped_and_resumed_equals_uninterrupted(tmp_path):
    # 32 examples / 4 = 8 micro-batches = 4 steps per epoch: 11 steps cross two epoch ends;
    # stop at step 5: mid-epoch, between two saves (4, 8), after no evaluation (3, 6)
    args = dict(max_steps=11)
    model_a, run_a, prog_a = train_toy(tmp_path / "straight", loop_args(**args), dropout=0.3)
    with pytest.raises(Interrupted, match="stopped at step 5 of 11; rerun the same command to resume"):
        train_toy(tmp_path / "stopped", loop_args(stop_after_steps=5, **args), dropout=0.3)
    run_b = make_run(tmp_path / "stopped", "toy", {})
    assert latest(run_b)["progress"]["step"] == 5
    log = read_log(run_b.log_path)
    assert log["attrs"]["status"] == "running" and log["train"]["step"].tolist() == [1, 2, 3, 4, 5]
    model_b, run_b, prog_b = train_toy(tmp_path / "stopped", loop_args(**args), dropout=0.3)

    assert_equal_states(trainable_state(model_a), trainable_state(model_b))
    ca, cb = latest(run_a), latest(run_b)
    assert ca["progress"] == cb["progress"] == vars(prog_a) == vars(prog_b)
    assert ca["progress"]["step"] == 11 and ca["progress"]["epoch"] == 2 and ca["progress"]["batch"] == 6
    assert_equal_states(ca["model"], cb["model"])
    for i in ca["optimizer"]["state"]:
        assert_equal_states(ca["optimizer"]["state"][i], cb["optimizer"]["state"][i])
    assert ca["scheduler"] == cb["scheduler"]
    assert torch.equal(ca["rng"][0]["torch"], cb["rng"][0]["torch"])
    assert_equal_states(best(run_a), best(run_b))
    la, lb = read_log(run_a.log_path), read_log(run_b.log_path)
    assert lb["train"]["step"].tolist() == list(range(1, 12))  # nothing lost, nothing repeated
    assert lb["eval"]["step"].tolist() == [0, 3, 6, 9, 11]
    for group in ("train", "eval"):
        for k in la[group]:
            if not k.startswith("tokens_per_s"):
                assert la[group][k].tolist() == lb[group][k].tolist(), (group, k)
    # a test that can fail: dropout draws from the restored stream (another stream ends elsewhere)
    model_c, _, _ = train_toy(tmp_path / "other", loop_args(**args), dropout=0.3, name="other")
    assert not torch.equal(model_c[0].weight, model_a[0].weight)


def test_a_stop_request_saves_and_stops_after_the_current_step(tmp_path):
    from sitra import train as loop

    def evaluate(model):
        def once():
            if calls.append(1) or len(calls) == 2:  # the evaluation at step 4 (an epoch's end) asks to stop
                loop.request_stop()
            return held_out(model)()
        return once

    calls = []
    try:
        with pytest.raises(Interrupted, match="stopped at step 4 of 10"):
            train_toy(tmp_path, loop_args(eval_steps=4), evaluate=evaluate)
    finally:
        loop.request_stop(False)
    run = make_run(tmp_path, "toy", {})
    assert latest(run)["progress"]["step"] == 4
    assert read_log(run.log_path)["train"]["step"].tolist() == [1, 2, 3, 4]


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path):
    model_a, run_a, _ = train_toy(tmp_path / "a", loop_args(batch_size=4, gradient_accumulation_steps=2, max_steps=8))
    model_b, run_b, _ = train_toy(tmp_path / "b", loop_args(batch_size=8, gradient_accumulation_steps=1, max_steps=8))
    a, b = trainable_state(model_a), trainable_state(model_b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    la, lb = read_log(run_a.log_path), read_log(run_b.log_path)
    assert la["attrs"]["effective_batch_size"] == lb["attrs"]["effective_batch_size"] == 8
    # the mean over the step's examples (Adam would hide gradients scaled by the micro-batch count)
    for k in ("loss", "mse", "pred_mean", "grad_norm"):
        torch.testing.assert_close(torch.tensor(la["train"][k]), torch.tensor(lb["train"][k]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(la["eval"]["eval_loss"]), torch.tensor(lb["eval"]["eval_loss"]),
                               rtol=1e-6, atol=1e-7)
    assert la["train"]["loss"].tolist() == la["train"]["mse"].tolist()  # a tensor part is logged as the loss
    model_c, _, _ = train_toy(tmp_path / "c", loop_args(batch_size=4, gradient_accumulation_steps=1, max_steps=8))
    assert not torch.allclose(trainable_state(model_c)["0.weight"], a["0.weight"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("cadence, evals, saves", [
    (dict(eval_steps=3, save_steps=4), [0, 3, 6, 9, 10], [4, 8, 10]),
    # 4 steps per epoch: evaluate at each epoch's end, save every half epoch
    (dict(eval_steps=0, save_steps=0, save_checkpoint_every=0.5), [0, 4, 8, 10], [2, 4, 6, 8, 10]),
    (dict(eval_steps=5, save_steps=0, save_checkpoint_every=1.0), [0, 5, 10], [4, 8, 10]),
])
def test_eval_and_save_cadence(tmp_path, monkeypatch, cadence, evals, saves):
    saved, save = [], torch.save

    def spy(obj, f, *a, **kw):
        saved.append(obj["progress"]["step"])
        return save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", spy)
    _, run, progress = train_toy(tmp_path, loop_args(max_steps=10, **cadence))
    log = read_log(run.log_path)
    assert log["eval"]["step"].tolist() == evals
    assert log["train"]["step"].tolist() == list(range(1, 11))
    assert saved == saves
    assert latest(run)["progress"]["step"] == progress.step == 10
    assert latest(run)["progress"]["last_eval_step"] == 10
    assert not (run.checkpoint_dir / "latest.next.pt").exists()
    assert log["attrs"]["fused_students"] == 1 and log["attrs"]["peak_memory_mb"] > 0
    train_rows = {k: v for k, v in log["train"].items()}
    assert set(train_rows) == {"step", "loss", "mse", "pred_mean", "lr", "grad_norm", "tokens", "tokens_per_s", "tokens_per_s_total"}
    assert train_rows["tokens"].tolist() == [4 * 2 * 3] * 10  # batch x accumulation x the 3 tokens of each example
    assert train_rows["lr"][:3].tolist() == pytest.approx([0.0, 5e-3, 1e-2])  # warm-up: the step's lr before it moves
    assert (train_rows["tokens_per_s"] > 0).all()


@pytest.mark.parametrize("select, scripted, best_step", [
    ("eval_loss", {"eval_loss": [5.0, 3.0, 4.0, 1.5, 2.0], "error": [1, 2, 3, 4, 5]}, 6),
    ("error", {"eval_loss": [5.0, 3.0, 4.0, 1.5, 2.0], "error": [9, 4, 3, 5, 6]}, 4),
])
def test_the_best_step_by_the_select_key_is_kept(tmp_path, select, scripted, best_step):
    snapshots = []

    def evaluate(model):
        def scripted_metrics():
            i = len(snapshots)
            snapshots.append({k: v.clone() for k, v in trainable_state(model).items()})
            return {k: v[i] for k, v in scripted.items()}
        return scripted_metrics

    _, run, progress = train_toy(tmp_path, loop_args(max_steps=8, eval_steps=2), evaluate=evaluate, select=select)
    assert len(snapshots) == 5  # steps 0, 2, 4, 6, 8
    assert progress.best_step == best_step and progress.best == min(scripted[select])
    assert_equal_states(best(run), snapshots[best_step // 2])
    with safe_open(str(run.checkpoint_dir / "best.safetensors"), "pt") as f:
        assert f.metadata()["step"] == str(best_step)
    assert latest(run)["progress"]["best_step"] == best_step
    assert not torch.equal(snapshots[best_step // 2]["0.weight"], snapshots[-1]["0.weight"])


def test_without_evaluation_the_final_weights_are_the_best(tmp_path):
    model, run, progress = train_toy(tmp_path, loop_args(max_steps=6), evaluate=None)
    assert_equal_states(best(run), trainable_state(model))
    assert progress.best_step == -1 and math.isinf(progress.best)
    assert read_log(run.log_path)["eval"] == {}


def fused_or_alone(where, args, students, counts):
    """students: (name, dropout, seed); all of them in one train_many over one teacher pass."""
    torch.manual_seed(99)
    teacher = nn.Linear(4, 1).requires_grad_(False)

    def prepare(batch):
        counts.append(1)
        return {**batch, "target": teacher(batch["x"]).squeeze(-1) + batch["y"]}

    models = [toy(dropout, seed) for _, dropout, seed in students]
    with ExitStack() as stack:
        trainees = []
        for model, (name, dropout, seed) in zip(models, students):
            run = make_run(where, name, {"name": name, "dropout": dropout, "seed": seed})
            log = stack.enter_context(RunLog(run.log_path, "toy", name, run.config))
            trainees.append(Trainee(model, loss_of(model), run, log, held_out(model)))
        progresses = train_many(trainees, batches(args.batch_size), args, prepare=prepare)
    return [(m, t.run, p) for m, t, p in zip(models, trainees, progresses)]


def test_fused_students_equal_each_trained_alone(tmp_path):
    students = [("a", 0.3, 0), ("b", 0.1, 1)]
    args = loop_args(max_steps=7, gradient_accumulation_steps=2)
    counts = []
    fused = fused_or_alone(tmp_path / "fused", args, students, counts)
    assert len(counts) == 7 * 2  # one teacher pass per micro-batch, shared by both students
    for student, (model, run, progress) in zip(students, fused):
        alone_model, alone_run, alone_progress = fused_or_alone(tmp_path / "alone", args, [student], [])[0]
        assert_equal_states(trainable_state(model), trainable_state(alone_model))
        assert_equal_states(latest(run)["model"], latest(alone_run)["model"])
        assert_equal_states(best(run), best(alone_run))
        assert vars(progress) == vars(alone_progress)
        a, b = read_log(run.log_path), read_log(alone_run.log_path)
        assert a["train"]["loss"].tolist() == b["train"]["loss"].tolist()
        assert a["eval"]["eval_loss"].tolist() == b["eval"]["eval_loss"].tolist()
        assert a["attrs"]["fused_students"] == 2 and b["attrs"]["fused_students"] == 1
    assert not torch.equal(fused[0][0][0].weight, fused[1][0][0].weight)


def test_fused_students_stopped_and_resumed_equal_uninterrupted(tmp_path):
    students = [("a", 0.3, 0), ("b", 0.1, 1)]
    straight = fused_or_alone(tmp_path / "straight", loop_args(max_steps=7), students, [])
    with pytest.raises(Interrupted):
        fused_or_alone(tmp_path / "stopped", loop_args(max_steps=7, stop_after_steps=3), students, [])
    resumed = fused_or_alone(tmp_path / "stopped", loop_args(max_steps=7), students, [])
    for (ma, ra, _), (mb, rb, _) in zip(straight, resumed):
        assert_equal_states(trainable_state(ma), trainable_state(mb))
        assert read_log(rb.log_path)["train"]["step"].tolist() == list(range(1, 8))


def _host_read(name):
    def read(self, *a, **kw):
        Counted.reads += 1
        return getattr(torch.Tensor, name)(self.as_subclass(torch.Tensor), *a, **kw)
    return read


class Counted(torch.Tensor):
    """A loss part that counts how often it (or a tensor computed from it) is read on the host."""
    reads = 0
    __float__, __int__, __bool__ = _host_read("__float__"), _host_read("__int__"), _host_read("__bool__")
    item, tolist = _host_read("item"), _host_read("tolist")


@pytest.mark.parametrize("accumulation", [1, 4])
def test_loss_parts_are_read_on_the_host_once_per_step(tmp_path, accumulation):
    """Parts stay tensors over the micro-batches (no device sync each); they are read when logged."""
    model = toy()
    run = make_run(tmp_path, "toy", {})

    def step_loss(batch):
        loss, parts = loss_of(model)(batch)
        return loss, {**parts, "mse": parts["mse"].as_subclass(Counted)}

    Counted.reads = 0
    args = loop_args(batch_size=2, gradient_accumulation_steps=accumulation, max_steps=4, eval_steps=0)
    with RunLog(run.log_path, "toy", "toy", run.config) as log:
        train(model, batches(2, n=2 * accumulation * 4), step_loss, args, run, log)
    assert 1 <= Counted.reads <= 4  # at most once per step: not once per micro-batch
    log = read_log(run.log_path)
    assert log["train"]["mse"].tolist() == log["train"]["loss"].tolist()
