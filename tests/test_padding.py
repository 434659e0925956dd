"""No compute on padding: length-grouped batches by default, logits only at scored positions."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sitra import data, losses, models
from sitra.data.mlm import Batches, LengthGroupedBatches, padding_fraction
from sitra.errors import UsageError
from sitra.recipes import distill_pythia


def keep(xs, gens):
    return list(xs)


def line_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts like WikiText lines: log-normal, median 25, cut to 2-256."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(25), 0.7, n)), 2, 256).astype(int).tolist()


@pytest.mark.parametrize("n, batch, group, world", [(203, 8, 4, 1), (64, 8, 100, 1), (97, 4, 3, 2)])
def test_grouped_batches_read_every_example_once_an_epoch(n, batch, group, world):
    lengths = line_lengths(n)
    whole = LengthGroupedBatches(list(range(n)), batch, keep, lengths, seed=5, group_size=group)
    for epoch in range(3):
        parts = [whole.shard(r, world) for r in range(world)] if world > 1 else [whole]
        read = [i for part in parts for b in part.epoch(epoch) for i in b]
        assert sorted(read) == list(range(n)), epoch
    assert list(whole.order(0)) != list(whole.order(1))  # a new order every epoch


def test_resumed_grouped_batches_are_the_uninterrupted_ones():
    lengths = line_lengths(150, seed=1)
    batches = LengthGroupedBatches(list(range(150)), 8, keep, lengths, seed=2, group_size=5)
    again = LengthGroupedBatches(list(range(150)), 8, keep, lengths, seed=2, group_size=5)  # a restarted process
    for epoch, start in ((0, 7), (1, 0), (2, 18)):
        assert list(again.epoch(epoch, start=start)) == list(batches.epoch(epoch))[start:]


def test_grouped_batches_pad_little():
    lengths = line_lengths(2000, seed=3)
    examples = [[1] * n for n in lengths]
    grouped = LengthGroupedBatches(examples, 8, data.CausalCollator(0), lengths, seed=0)
    masks = [b["attention_mask"] for b in grouped.epoch(0)]
    real, positions = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
    assert real == sum(lengths)  # every token once, counted apart from the batches
    assert 1 - real / positions == pytest.approx(padding_fraction(grouped.order(0), lengths, 8))
    random_share = padding_fraction(Batches(examples, 8, None, seed=0).order(0), lengths, 8)
    assert random_share > 0.5 and 1 - real / positions < random_share / 8  # 56% and 4.9% here


# ---------------------------------------------------------------------------------------------
# distill_pythia


@pytest.fixture(scope="module")
def pair(tiny_teacher, tmp_path_factory):
    from conftest import build_neox

    d = tmp_path_factory.mktemp("pad")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    lines = data.python_docs_paragraphs()
    (d / "train.txt").write_text("\n".join(lines[:300]))
    (d / "eval.txt").write_text("\n".join(lines[1000:1020]))
    return {"teacher": build_neox(d / "teacher", tok, 64, 2, 0), "student": build_neox(d / "student", tok, 32, 2, 1),
            "tokenizer": tok, "lines": lines[:300], "dir": d}


def pythia_args(pair, storage, **kw):
    d = pair["dir"]
    values = {"teacher": pair["teacher"], "student": pair["student"], "train_file": str(d / "train.txt"),
              "eval_file": str(d / "eval.txt"), "max_seq_length": 256, "batch_size": 8, "max_steps": 2, "device": "cpu",
              "storage_directory": str(storage)}
    return distill_pythia.DistillLMArgs(**values | kw)


class Stop(Exception):
    pass


def train_batches_of(args, monkeypatch):
    """The training batches distill_pythia.run hands to the training loop (which is not run)."""
    got = {}

    def stop(module, batches, *rest, **kw):
        got["batches"] = batches
        raise Stop

    monkeypatch.setattr(distill_pythia, "train", stop)
    with pytest.raises(Stop):
        distill_pythia.run(args)
    return got["batches"]


def test_default_run_pads_little_and_reads_every_token(pair, tmp_path, monkeypatch):
    tok, lines = pair["tokenizer"], pair["lines"]
    ids = [x for x in tok(lines, truncation=True, max_length=256)["input_ids"] if len(x) >= 2]  # the job's examples, counted apart
    shares = {}
    for grouped in (True, False):
        args = pythia_args(pair, tmp_path / str(grouped), **({} if grouped else {"group_by_length": False}))
        masks = [b["attention_mask"] for b in train_batches_of(args, monkeypatch).epoch(0)]
        assert sum(int(m.sum()) for m in masks) == sum(map(len, ids))
        shares[grouped] = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert shares[True] < 0.05 and shares[False] > 0.25, shares  # 52% at random here


def test_length_group_size_is_checked_before_any_model_loads(pair, tmp_path):
    with pytest.raises(UsageError, match="--length_group_size 0"):
        distill_pythia.check(pythia_args(pair, tmp_path, length_group_size=0, teacher="/nonexistent"))


@pytest.mark.parametrize("chunks", [1, 3])
def test_logits_only_at_scored_positions_and_the_loss_is_unchanged(pair, tmp_path, chunks):
    args = pythia_args(pair, tmp_path, loss_chunks=chunks, temperature=2.0, kd_weight=0.6, ce_weight=0.4)
    setup = distill_pythia.check(args)
    teacher = models.load_model(pair["teacher"], "cpu", auto=AutoModelForCausalLM)
    student = models.load_model(pair["student"], auto=AutoModelForCausalLM, trainable=True, dtype=torch.float32).train()
    module = distill_pythia.Distillation(student, 32, 64, 1)
    step_loss, _ = distill_pythia.distillation_loss(args, setup, module, teacher, pair["tokenizer"])
    ids = pair["tokenizer"](pair["lines"][:6], truncation=True, max_length=40)["input_ids"]
    batch = data.CausalCollator(0)(ids)
    scored, next_tokens = data.shifted(batch)
    assert not scored.all()  # the batch has padding

    rows = []
    hook = student.get_output_embeddings().register_forward_hook(lambda m, inp, out: rows.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0]))
    loss, _ = step_loss(batch)
    hook.remove()
    assert sum(rows) == int(scored.sum())  # padded positions never reach the head
    grads = torch.autograd.grad(loss, list(student.parameters()))

    # the plain computation: full logits at every position, the mask leaving padding out
    with torch.no_grad():
        t_logits = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1, :setup.vocab]
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :setup.vocab]
    plain = losses.distill_loss(s_logits, t_logits, scored, next_tokens, **args.objective())[0]
    plain_grads = torch.autograd.grad(plain, list(student.parameters()))
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    for g, p in zip(grads, plain_grads):
        torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-7)


def test_a_padded_batch_scores_each_line_as_if_it_were_alone(pair, tmp_path):
    """Per document: the loss of a padded, length-grouped batch is the token-weighted mean of each
    line's loss computed alone (no padding, no neighbours), gradients too: padding changes nothing."""
    args = pythia_args(pair, tmp_path, temperature=1.0, kd_weight=0.5, ce_weight=0.5)
    setup = distill_pythia.check(args)
    teacher = models.load_model(pair["teacher"], "cpu", auto=AutoModelForCausalLM)
    student = models.load_model(pair["student"], auto=AutoModelForCausalLM, trainable=True, dtype=torch.float32).train()
    module = distill_pythia.Distillation(student, 32, 64, 1)
    step_loss, _ = distill_pythia.distillation_loss(args, setup, module, teacher, pair["tokenizer"])
    ids = pair["tokenizer"](pair["lines"][10:16], truncation=True, max_length=40)["input_ids"]
    collate = data.CausalCollator(0)
    batch = collate(ids)
    assert not data.shifted(batch)[0].all()
    loss, _ = step_loss(batch)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    weights = [len(x) - 1 for x in ids]  # scored positions of each line
    alone_loss, alone_grads = 0.0, [torch.zeros_like(p) for p in student.parameters()]
    for x, w in zip(ids, weights):
        one, _ = step_loss(collate([x]))
        alone_loss += one.item() * w / sum(weights)
        for acc, g in zip(alone_grads, torch.autograd.grad(one, list(student.parameters()))):
            acc.add_(g, alpha=w / sum(weights))
    assert loss.item() == pytest.approx(alone_loss, rel=1e-5)
    for g, want in zip(grads, alone_grads):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sampling", ["top_k", "random"])
def test_records_do_not_depend_on_the_batches_they_were_recorded_in(pair, tmp_path, sampling):
    """Recording pads little (length-grouped batches); every example's record equals the one made
    alone (batch size 1: no padding at all), in the order of the examples."""
    from sitra import records
    from sitra.recipes import record_teacher

    d = pair["dir"]
    got = {}
    for batch_size in (1, 8):
        folder = tmp_path / f"b{batch_size}"
        record_teacher.run(record_teacher.RecordArgs(
            teacher=pair["teacher"], output=str(folder), train_file=str(d / "train.txt"), eval_file=str(d / "eval.txt"),
            max_seq_length=64, top_k=8, teacher_logits_sampling=sampling, log_prob_dtype="float32", device="cpu",
            batch_size=batch_size, storage_directory=str(tmp_path)))
        got[batch_size] = records.TeacherRecords(folder, "--teacher_logits")
    lines = [x for x in pair["tokenizer"](pair["lines"], truncation=True, max_length=64)["input_ids"] if len(x) >= 2]
    assert len({len(x) for x in lines}) > 10  # lengths vary, so grouping reorders
    for i in range(len(lines)):
        alone, grouped = got[1].example(i), got[8].example(i)
        assert len(grouped["teacher_rest" if sampling == "top_k" else "entries"]) == len(lines[i]) - 1  # its own positions
        assert np.array_equal(alone["teacher_ids"], grouped["teacher_ids"]), i
        np.testing.assert_allclose(alone["teacher_logp"], grouped["teacher_logp"], rtol=1e-4, atol=1e-5)
