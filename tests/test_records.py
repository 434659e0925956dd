"""Recorded teachers (sitra.records, record_teacher): the format, the sparse and sampled losses,
vocabulary alignment, on-policy sampling, and students trained from records, on tiny GPT-NeoX models.

Numbers are checked against independent computations: the recorded values against the teacher's
own log_softmax, the sparse KL against a plain-Python formula, the sampled estimator's mean
gradient against the dense gradient, records-trained losses against online ones."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sitra import data, losses, records
from sitra.errors import UsageError
from sitra.data import python_docs_paragraphs
from sitra.models.causal import on_policy_prompts, sample_continuations, shared_vocab
from sitra.recipes import record_teacher

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lms(tiny_teacher, tmp_path_factory):
    """A peaked teacher (init 0.5: top-k matters), students of the same tokenizer (one with 8
    padding rows more), a model with another tokenizer, and text files."""
    from conftest import build_neox, build_tokenizer

    d = tmp_path_factory.mktemp("records")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    paragraphs = python_docs_paragraphs()
    (d / "train.txt").write_text("\n".join(paragraphs[:120]))
    (d / "eval.txt").write_text("\n".join(paragraphs[1000:1030]))
    (d / "other_train.txt").write_text("\n".join(paragraphs[200:320]))
    other_tok = build_tokenizer(d / "other_tok", vocab_size=300)
    return {"teacher": build_neox(d / "teacher", tok, 64, 2, 0, init=0.5), "student": build_neox(d / "student", tok, 32, 2, 1),
            "padded_student": build_neox(d / "padded", tok, 32, 2, 2, vocab=len(tok) + 8),
            "other_tokenizer": build_neox(d / "other", other_tok, 32, 2, 3), "dir": d, "vocab": len(tok)}


def record(lms, out, **kw):
    d = lms["dir"]
    values = dict(teacher=lms["teacher"], output=str(out), train_file=str(d / "train.txt"), eval_file=str(d / "eval.txt"),
                  max_seq_length=32, top_k=16, device="cpu", storage_directory=str(Path(out).parent), batch_size=8)
    values.update(kw)
    return record_teacher.run(record_teacher.RecordArgs(**values))


def corpus(lms, max_seq_length=32, packing=False, train="train.txt"):
    tok = AutoTokenizer.from_pretrained(lms["teacher"])
    d = lms["dir"]
    return data.lm_corpus(tok, "wikitext", None, str(d / train), str(d / "eval.txt"), max_seq_length, packing, 1.0)


def own_positions(rec, lms, indices, length):
    """rec.lookup with each example's own scored positions (its first len - 1), padded to length - 1."""
    train, held_out = corpus(lms)
    everything = train + held_out
    scored = torch.zeros(len(indices), length - 1, dtype=torch.bool)
    for b, i in enumerate(indices):
        scored[b, :len(everything[i]) - 1] = True
    return rec.lookup(indices, scored)


@torch.no_grad()
def teacher_log_probs(lms, example, temperature):
    model = AutoModelForCausalLM.from_pretrained(lms["teacher"]).eval()
    logits = model(input_ids=torch.tensor([example])).logits[0, :-1]
    return torch.log_softmax(logits / temperature, -1)


# ---------------------------------------------------------------------------------------------
# the format


@pytest.mark.parametrize("bits", [1, 3, 8, 9, 13, 16, 17, 32])
def test_ids_pack_and_unpack_at_any_offset(bits):
    rng = np.random.default_rng(bits)
    ids = rng.integers(0, 2**bits, size=203, dtype=np.int64)
    stream = records.pack_ids(ids, bits)
    assert stream.dtype == np.uint8 and len(stream) == math.ceil(203 * bits / 8)
    for start, count in [(0, 203), (5, 17), (200, 3), (7, 0), (203, 0)]:
        assert records.unpack_ids(stream, start, count, bits).tolist() == ids[start:start + count].tolist()
    assert records.id_bits(400) == 9 and records.id_bits(50_277) == 16 and records.id_bits(128_256) == 17


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_records_hold_the_teachers_top_k_and_rest_mass(lms, tmp_path, dtype, tol):
    record(lms, tmp_path / "rec", log_prob_dtype=dtype, temperature=2.0, num_shards=1)
    rec = records.TeacherRecords(tmp_path / "rec")
    train, held_out = corpus(lms)
    assert list(rec.split("train")) == list(range(len(train)))
    assert list(rec.split("eval")) == list(range(len(train), len(train) + len(held_out)))
    for index, example in [(0, train[0]), (7, train[7]), (len(train) + 1, held_out[1])]:
        lp = teacher_log_probs(lms, example, 2.0)
        got = own_positions(rec, lms, [index], len(example) + 3)  # padded past the example: zeros there
        ids, logp, rest = got["teacher_ids"][0], got["teacher_logp"][0], got["teacher_rest"][0]
        n = len(example) - 1
        top = lp.topk(16, -1)
        assert torch.equal(ids[:n], top.indices)
        # float16: |error of log p| <= |log p| / 2048
        assert torch.allclose(logp[:n], top.values, rtol=tol / 2, atol=1e-6)
        expected_rest = torch.log1p(-top.values.exp().sum(-1))
        assert torch.allclose(rest[:n], expected_rest, rtol=tol, atol=1e-5)
        assert not ids[n:].any() and not logp[n:].any()
    assert rec.disk_bytes() / rec.positions() == pytest.approx(16 * (9 / 8 + (2 if dtype == "float16" else 4))
                                                               + (2 if dtype == "float16" else 4), rel=0.02)


def test_shards_together_equal_one_recording_and_resume(lms, tmp_path, capsys):
    record(lms, tmp_path / "one")
    for shard in (2, 0, 1):
        record(lms, tmp_path / "three", shard=shard, num_shards=3)
    first = tmp_path / "three" / records.shard_name(0, 3)
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    record(lms, tmp_path / "three", shard=0, num_shards=3)  # rerun: resumes by skipping the finished shard
    assert "recorded already" in capsys.readouterr().out and first.stat().st_mtime_ns == stamp
    one, three = records.TeacherRecords(tmp_path / "one"), records.TeacherRecords(tmp_path / "three")
    n = len(one.split("train")) + len(one.split("eval"))
    indices = [0, n // 3, n // 3 + 1, n - 1, 5]
    a, b = own_positions(one, lms, indices, 33), own_positions(three, lms, indices, 33)
    assert all(torch.equal(a[k], b[k]) for k in a)
    index = json.loads((tmp_path / "three" / "index.json").read_text())
    assert index["identity"]["teacher"] == lms["teacher"] and index["identity"]["top_k"] == 16
    assert (tmp_path / "three" / "tokenizer").is_dir() and (tmp_path / "three" / "teacher_config.json").exists()


def test_missing_shards_and_changed_settings_are_refused(lms, tmp_path):
    record(lms, tmp_path / "rec", shard=1, num_shards=2)
    with pytest.raises(UsageError, match=r"shard\(s\) 0 of 2 are missing"):
        records.TeacherRecords(tmp_path / "rec")
    with pytest.raises(UsageError, match="holds records of another teacher, data or settings .*top_k: 16 there, 8 here"):
        record(lms, tmp_path / "rec", shard=0, num_shards=2, top_k=8)
    with pytest.raises(UsageError, match="--num_shards 3: .* is being recorded in 2 shards"):
        record(lms, tmp_path / "rec", shard=0, num_shards=3)
    with pytest.raises(UsageError, match="no readable index.json"):
        records.TeacherRecords(tmp_path)


def test_sampled_records_are_draws_from_the_teacher(lms, tmp_path, monkeypatch):
    record(lms, tmp_path / "a", teacher_logits_sampling="random", top_k=64, log_prob_dtype="float32", batch_size=8,
           temperature=2.0)
    monkeypatch.setattr(record_teacher, "POSITIONS_PER_PIECE", 40)  # other batches, other logit pieces: the same draws
    record(lms, tmp_path / "b", teacher_logits_sampling="random", top_k=64, log_prob_dtype="float32", batch_size=3,
           temperature=2.0)
    a, b = records.TeacherRecords(tmp_path / "a"), records.TeacherRecords(tmp_path / "b")
    train, _ = corpus(lms)
    got = own_positions(a, lms, list(range(10)), 33)
    assert all(torch.equal(got[k], own_positions(b, lms, list(range(10)), 33)[k]) for k in got), "draws depend on the batch"
    real = got["teacher_weight"] > 0
    for i in range(10):
        n = len(train[i]) - 1
        assert torch.allclose(got["teacher_weight"][i, :n].sum(-1), torch.ones(n))  # counts / K sum to 1
        assert not real[i, n:].any()
        lp = teacher_log_probs(lms, train[i], 2.0)
        ids = got["teacher_ids"][i, :n]
        assert torch.allclose(got["teacher_logp"][i, :n][real[i, :n]], lp.gather(-1, ids)[real[i, :n]], atol=1e-5)
        for row in range(n):  # distinct ids per position
            chosen = ids[row][real[i, row]]
            assert len(chosen.unique()) == len(chosen)
    # pooled over positions, a draw's frequency matches the teacher's probability: sum_v p(v)^2
    # is the chance two independent draws agree, estimated without bias by the sampled counts
    lp = torch.cat([teacher_log_probs(lms, train[i], 2.0) for i in range(10)])
    w = torch.cat([got["teacher_weight"][i, :len(train[i]) - 1] for i in range(10)])
    ids = torch.cat([got["teacher_ids"][i, :len(train[i]) - 1] for i in range(10)])
    estimate = (w * lp.gather(-1, ids).exp()).sum(-1).mean()
    assert float(estimate) == pytest.approx(float(lp.exp().square().sum(-1).mean()), rel=0.1)


def job(script, *argv):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *argv], capture_output=True, text=True, timeout=300)


BAD_RECORDING = [
    (["--top_k", "5000"], "--top_k 5000: the teacher's vocabulary has 400 ids; allowed 1-400"),
    (["--shard", "4", "--num_shards", "4"], "--shard 4: allowed 0-3 (--num_shards 4)"),
    (["--teacher_logits_sampling", "nucleus"], "invalid choice: 'nucleus'"),
    (["--temperature", "0"], "--temperature 0.0: must be positive"),
]


def one_line_error(args_class, run, argv, capsys) -> str:
    """What `jobs/JOB.py argv` prints on bad input, run in this process: exit code 2 and one line."""
    from sitra.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args_class, run, argv=argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("flags,message", BAD_RECORDING, ids=[m for _, m in BAD_RECORDING])
def test_bad_recording_flags_are_one_line_errors(lms, tmp_path, flags, message, capsys):
    d = lms["dir"]
    argv = ["--teacher", lms["teacher"], "--output", str(tmp_path / "rec"), "--train_file", str(d / "train.txt"),
            "--device", "cpu", "--storage_directory", str(tmp_path), *flags]
    assert message in one_line_error(record_teacher.RecordArgs, record_teacher.run, argv, capsys)
    assert not (tmp_path / "rec").exists()  # refused before any compute


def test_record_teacher_takes_the_flags_of_its_job(lms, tmp_path, capsys):
    """--job picks the flags: a Geneformer flag is refused for distill_pythia, an unknown job is one line."""
    for argv, message in ((["--job", "nope", "--output", str(tmp_path / "rec")],
                           "--job nope: allowed distill_pythia, distill_classifier, distill_summarizer, distill_geneformer"),
                          (["--job", "distill_pythia", "--output", str(tmp_path / "rec"), "--max_eval_cells", "5"],
                           "unrecognized arguments: --max_eval_cells 5")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            record_teacher.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert record_teacher.args_class(["--job", "distill_classifier"]) is record_teacher.RECORD_ARGS["distill_classifier"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_record_teacher_script_prints_bytes_per_token(lms, tmp_path):
    d = lms["dir"]
    out = job("record_teacher.py", "--teacher", lms["teacher"], "--output", str(tmp_path / "rec"), "--train_file",
              str(d / "train.txt"), "--eval_file", str(d / "eval.txt"), "--max_seq_length", "32", "--top_k", "8",
              "--device", "cpu", "--storage_directory", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bytes/token" in out.stdout and "records complete" in out.stdout
    assert "recording shard 0/1" in out.stderr  # tqdm progress
    from sitra.results import read_log

    log = read_log(tmp_path / "eval_results" / "record_teacher_distill_pythia_shard0of1.h5")
    assert log["attrs"]["status"] == "complete" and log["final"]["bytes_per_token"] > 0


def test_launcher_expands_a_shard_sweep(lms, tmp_path, monkeypatch):
    """The launcher's grid over --shard: each task's arguments, run as a task would, give the
    whole recording (submitting needs record_teacher in sitra.recipes.JOBS)."""
    from sitra import launch as launcher
    from sitra.recipes import JOBS

    monkeypatch.setitem(JOBS, "record_teacher", "sitra.recipes.record_teacher")
    d = lms["dir"]
    argv = ["--teacher", lms["teacher"], "--output", str(tmp_path / "rec"), "--train_file", str(d / "train.txt"),
            "--eval_file", str(d / "eval.txt"), "--max_seq_length", "32", "--top_k", "8", "--device", "cpu",
            "--num_shards", "3"]
    largs = launcher.LaunchArgs(storage_directory=str(tmp_path), cluster="local", sweep=[["shard=0,1,2"]])
    tasks = launcher.expand("record_teacher", argv, launcher.sweep_axes(largs, record_teacher.RecordArgs), largs, "rec")
    assert [t.args.shard for t in tasks] == [0, 1, 2] and len({t.run_name for t in tasks}) == 3
    for t in tasks:
        record_teacher.run(t.args)
    assert records.TeacherRecords(tmp_path / "rec").positions() > 0


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.multiprocess
def test_launcher_array_over_shards(lms, tmp_path):
    """One array task a shard, on the SLURM cluster where it runs (else locally): together they
    are the records one task makes."""
    from test_launch import slurm_ready

    from sitra.launch import LaunchArgs, launch, wait

    d = lms["dir"]
    argv = ["--teacher", lms["teacher"], "--output", str(tmp_path / "rec"), "--train_file", str(d / "train.txt"),
            "--eval_file", str(d / "eval.txt"), "--max_seq_length", "32", "--top_k", "8", "--device", "cpu",
            "--num_shards", "2", "--batch_size", "8"]
    cluster = "slurm" if slurm_ready() else "local"
    jobs, _ = launch("record_teacher", argv, LaunchArgs(storage_directory=str(tmp_path), cluster=cluster, time="30",
                                                        cpus_per_task=1, mem_gb=2, sweep=[["shard=0,1"]]))
    assert len(jobs) == 2 and not any(wait(jobs).values())
    record(lms, tmp_path / "one", top_k=8)
    one, two = records.TeacherRecords(tmp_path / "one"), records.TeacherRecords(tmp_path / "rec")
    assert len(two.index["shards"]) == 2 and two.positions() == one.positions() > 0
    n = len(one.split("train")) + len(one.split("eval"))
    for i in range(n):
        a, b = one.example(i), two.example(i)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), i


# ---------------------------------------------------------------------------------------------
# the losses


def py_sparse_kl(s_logits, ids, t_logp, t_rest, temperature):
    """Plain Python: sum_i p_i ln(p_i / q_i) + p_rest ln(p_rest / q_rest), times T^2."""
    z = [x / temperature for x in s_logits]
    top = max(z)
    total = sum(math.exp(x - top) for x in z)
    q = [math.exp(x - top) / total for x in z]
    p = [math.exp(v) for v in t_logp]
    p_rest, q_rest = math.exp(t_rest), 1 - sum(q[i] for i in ids)
    norm = sum(p) + p_rest
    p, p_rest = [v / norm for v in p], p_rest / norm
    return temperature**2 * (sum(a * math.log(a / q[i]) for a, i in zip(p, ids)) + p_rest * math.log(p_rest / q_rest))


def dense_and_records(V=12, N=5, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g) * 2
    t = torch.randn(N, V, generator=g) * 2
    return s, t


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_against_the_formula_and_the_dense_kl(temperature):
    s, t = dense_and_records()
    mask = torch.tensor([True, True, False, True, True])
    lp = torch.log_softmax(t / temperature, -1)
    for k in (1, 4, 11):
        logp, ids = lp.topk(k, -1)
        rest = lp.scatter(-1, ids, float("-inf")).logsumexp(-1)
        value = losses.sparse_kl(s, ids, logp, rest, mask, temperature)
        expected = [py_sparse_kl(s[i].tolist(), ids[i].tolist(), logp[i].tolist(), float(rest[i]), temperature)
                    for i in range(5) if mask[i]]
        assert value.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
        dense = losses.kl_div(s, t, mask, temperature)
        assert 0 <= value.item() <= dense.item() + 1e-6  # binning never adds divergence
    ids = lp.argsort(-1, descending=True)  # k = V: the exact dense KL, any order of the ids
    full = losses.sparse_kl(s, ids, lp.gather(-1, ids), torch.full((5,), -math.inf), mask, temperature)
    assert full.item() == pytest.approx(losses.kl_div(s, t, mask, temperature).item(), rel=1e-6)


@pytest.mark.parametrize("name", list(losses.RECORD_LOSSES))
def test_every_record_loss_is_exact_at_k_equal_v_and_has_gradients(name):
    s, t = dense_and_records()
    s.requires_grad_(True)
    mask = torch.tensor([True, False, True, True, True])
    kw = {"beta": 0.3} if name == "jsd" else {}
    dense = losses.LOGIT_LOSSES[name](s, t, mask, temperature=2.0, **kw)
    g_dense, = torch.autograd.grad(dense, s)
    lp = torch.log_softmax(t / 2.0, -1)
    ids = torch.randperm(12, generator=torch.Generator().manual_seed(1)).expand(5, 12)
    sparse = losses.topk_logit_loss(losses.RECORD_LOSSES[name], s, ids, lp.gather(-1, ids), torch.full((5,), -math.inf),
                                    mask, temperature=2.0, **kw)
    g_sparse, = torch.autograd.grad(sparse, s)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)
    assert torch.allclose(g_sparse, g_dense, atol=1e-6)
    logp, few = lp.topk(3, -1)  # k < V: finite values and gradients, nothing on masked rows
    rest = lp.scatter(-1, few, float("-inf")).logsumexp(-1)
    value = losses.topk_logit_loss(losses.RECORD_LOSSES[name], s, few, logp, rest, mask, temperature=2.0, **kw)
    grad, = torch.autograd.grad(value, s)
    assert torch.isfinite(value) and torch.isfinite(grad).all() and not grad[1].any()


def test_sampled_kl_is_unbiased_and_top_k_is_not():
    """Dense gradient of KL(p_T || q_S) in the student logits against the mean over many sets of
    K = 8 draws (within 4 standard errors), and against the top-4 gradients, with and without the
    missing-mass term, which stay off by far more."""
    V, T = 12, 2.0
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(1, V, generator=g) * 2).requires_grad_(True)
    t = torch.randn(1, V, generator=g) * 2
    mask = torch.tensor([True])
    dense, = torch.autograd.grad(losses.kl_div(s, t, mask, T), s)
    lp = torch.log_softmax(t / T, -1)
    K, trials = 8, 4000
    grads = []
    for _ in range(trials):
        draws = torch.multinomial(lp.exp(), K, replacement=True, generator=g)
        ids, counts = draws[0].unique(return_counts=True)
        value = losses.sampled_kl(s, ids[None], lp[0, ids][None], counts[None] / K, mask, T)
        grads.append(torch.autograd.grad(value, s)[0])
    grads = torch.stack(grads)
    mean, stderr = grads.mean(0), grads.std(0) / math.sqrt(trials)
    assert ((mean - dense).abs() <= 4 * stderr + 1e-6).all()
    logp, top = lp.topk(4, -1)
    naive = losses.kl_div(s.gather(-1, top), logp, mask, T)  # renormalised top-k: no tail at all
    rest = lp.scatter(-1, top, float("-inf")).logsumexp(-1)
    for biased in (naive, losses.sparse_kl(s, top, logp, rest, mask, T)):
        grad, = torch.autograd.grad(biased, s)
        assert (grad - dense).abs().max() > 20 * stderr.max()


def test_chunked_record_loss_equals_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    N, H, V, k = 37, 8, 20, 5
    h = torch.randn(N, H, generator=g, requires_grad=True)
    head = torch.nn.Linear(H, V)
    t_lp = torch.log_softmax(torch.randn(N, V, generator=g), -1)
    logp, ids = t_lp.topk(k, -1)
    rest = t_lp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    mask = torch.rand(N, generator=g) < 0.7
    plain = losses.sparse_kl(head(h), ids, logp, rest, mask, 2.0)
    g_plain = torch.autograd.grad(plain, [h, head.weight])
    chunked = losses.chunked_record_loss(losses.sparse_kl, h, head, (ids, logp, rest), mask, chunks=4, temperature=2.0)
    g_chunked = torch.autograd.grad(chunked, [h, head.weight])
    assert chunked.item() == pytest.approx(plain.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_plain, g_chunked))


# ---------------------------------------------------------------------------------------------
# vocabulary alignment and on-policy sampling


def test_shared_vocab_aligns_padding_rows_and_refuses_other_tokenizers():
    vocab = {f"t{i}": i for i in range(50_277)}
    assert shared_vocab(vocab, vocab, 50_277, 50_277) == (50_277, None)
    n, notice = shared_vocab(vocab, dict(vocab), 50_304, 50_280)
    assert n == 50_277 and notice.count("\n") == 0 and "50,304" in notice and "50,280" in notice
    other = dict(vocab, t7=50_277)
    with pytest.raises(UsageError, match=r"--student S: its tokenizer differs from --teacher T's \(1 tokens differ, e.g. 't7' is 50277 there and 7"):
        shared_vocab(vocab, other, 50_304, 50_304, student="--student S", teacher="--teacher T")


def test_sampled_continuations(lms):
    model = AutoModelForCausalLM.from_pretrained(lms["student"])
    model.train()
    batch = {"input_ids": torch.randint(5, 300, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    batch["attention_mask"][2, 9:] = 0
    prompts = on_policy_prompts(batch, max_new_tokens=4)
    assert prompts.shape == (3, 5) and torch.equal(prompts, batch["input_ids"][:, :5])
    torch.manual_seed(0)
    ids, scored = sample_continuations(model, prompts, 4, temperature=1.0, eos_id=None, vocab=100)
    torch.manual_seed(0)
    again, _ = sample_continuations(model, prompts, 4, temperature=1.0, eos_id=None, vocab=100)
    assert torch.equal(ids, again) and ids.shape == (3, 9) and torch.equal(ids[:, :5], prompts)
    assert (ids[:, 5:] < 100).all() and model.training
    assert scored.tolist() == [[False] * 4 + [True] * 4] * 3
    # temperature -> 0 is greedy decoding; an EOS ends a row's scored positions
    cold, _ = sample_continuations(model, prompts, 4, temperature=1e-4)
    with torch.no_grad():
        greedy = model.eval().generate(prompts, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(cold, greedy)
    eos = int(cold[0, 6])
    _, scored = sample_continuations(model, prompts, 4, temperature=1e-4, eos_id=eos)
    for row, new in zip(scored.tolist(), cold[:, 5:].tolist()):
        end = new.index(eos) + 1 if eos in new else 4  # the EOS itself is scored, nothing after it
        assert row == [False] * 4 + [True] * end + [False] * (4 - end)


# ---------------------------------------------------------------------------------------------
# batches from records


def test_record_batches_follow_their_examples_under_data_parallel_sharding(lms, tmp_path):
    from sitra.data import Batches, CausalCollator, shifted

    record(lms, tmp_path / "rec", top_k=4)
    rec = records.TeacherRecords(tmp_path / "rec")
    train, _ = corpus(lms)
    collate = records.RecordCollator(CausalCollator(0), rec, lambda b: shifted(b)[0], rec.offsets("train"))
    whole = Batches(records.Indexed(train), 6, collate, seed=3)
    for rank in (0, 1):
        for batch in whole.shard(rank, 2).epoch(1):
            for row, index in enumerate(batch["example_index"].tolist()):
                n = len(train[index])
                assert batch["input_ids"][row, :n].tolist() == train[index]
                alone = own_positions(rec, lms, [index], n + 1)
                assert torch.equal(batch["teacher_ids"][row, :n - 1], alone["teacher_ids"][0, :n - 1])
                assert torch.equal(batch["teacher_rest"][row, :n - 1], alone["teacher_rest"][0, :n - 1])


def test_a_batch_loss_from_records_with_k_equal_v_is_the_online_loss(lms, tmp_path):
    """One batch of real examples: the chunked sparse loss on float32 records of all V ids equals
    the chunked online loss on the teacher's logits (and k < V stays below it)."""
    from sitra.data import Batches, CausalCollator, shifted
    from sitra.models.causal import final_hidden, lm_head

    V = lms["vocab"]
    record(lms, tmp_path / "full", top_k=V, log_prob_dtype="float32", temperature=2.0)
    record(lms, tmp_path / "few", top_k=8, log_prob_dtype="float32", temperature=2.0)
    train, _ = corpus(lms)
    teacher = AutoModelForCausalLM.from_pretrained(lms["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(lms["student"])
    values = {}
    for name in ("full", "few"):
        rec = records.TeacherRecords(tmp_path / name)
        batch = next(Batches(records.Indexed(train), 8, records.RecordCollator(CausalCollator(0), rec, lambda b: shifted(b)[0]), seed=0).epoch(0))
        scored, _ = shifted(batch)
        flat = scored.reshape(-1)
        h = final_hidden(student, batch).last_hidden_state[:, :-1].reshape(flat.numel(), -1)
        recs = tuple(batch[k].reshape(flat.numel(), *batch[k].shape[2:]) for k in ("teacher_ids", "teacher_logp", "teacher_rest"))
        values[name] = losses.chunked_record_loss(losses.sparse_kl, h, lm_head(student), recs, flat, chunks=3, temperature=2.0)
    with torch.no_grad():
        th = final_hidden(teacher, batch).last_hidden_state[:, :-1].reshape(flat.numel(), -1)
    online = losses.chunked_logit_loss(losses.kl_div, h, lm_head(student), th, lm_head(teacher), flat, chunks=3, temperature=2.0)
    assert values["full"].item() == pytest.approx(online.item(), rel=1e-5)
    assert 0 < values["few"].item() < online.item()


# ---------------------------------------------------------------------------------------------
# students trained from records, aligned vocabularies and on-policy batches (distill_pythia)


def distill(lms, storage, **kw):
    from sitra.recipes import distill_pythia

    d = lms["dir"]
    values = dict(teacher=lms["teacher"], student=lms["student"], train_file=str(d / "train.txt"), eval_file=str(d / "eval.txt"),
                  max_seq_length=32, batch_size=8, max_steps=6, eval_steps=3, lr=3e-3, device="cpu", loss_chunks=3,
                  storage_directory=str(storage))
    values.update(kw)
    return distill_pythia.run(distill_pythia.DistillLMArgs(**values))


def never_load_the_teacher(monkeypatch, student: str | None = None):
    """Loading any model through sitra.models fails, but for the pretrained `student` (loaded there too)."""
    from sitra import models

    real = models.load_model

    def refuse(name, *a, **kw):
        if student is not None and name == student:
            return real(name, *a, **kw)
        raise AssertionError(f"the teacher {name} was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_training_from_records_with_k_equal_v_gives_the_online_losses(lms, tmp_path, monkeypatch, loss):
    from sitra.results import read_log

    V = lms["vocab"]
    online = read_log(distill(lms, tmp_path / "online", loss=loss, jsd_beta=0.3).log_path)
    record(lms, tmp_path / "full32", top_k=V, log_prob_dtype="float32")
    record(lms, tmp_path / "full16", top_k=V)
    never_load_the_teacher(monkeypatch, lms["student"])
    exact = read_log(distill(lms, tmp_path / "r32", teacher_logits=str(tmp_path / "full32"), loss=loss, jsd_beta=0.3).log_path)
    rounded = read_log(distill(lms, tmp_path / "r16", teacher_logits=str(tmp_path / "full16"), loss=loss, jsd_beta=0.3).log_path)
    for part, key in (("train", "loss"), ("eval", "eval_loss")):
        assert np.allclose(exact[part][key], online[part][key], rtol=1e-5, atol=0), (exact[part][key], online[part][key])
        assert np.allclose(rounded[part][key], online[part][key], rtol=2e-3, atol=0)
    assert exact["final"]["distilled/perplexity"] == pytest.approx(online["final"]["distilled/perplexity"], rel=1e-4)
    assert online["attrs"]["teacher_forwards"] > 0 and exact["attrs"]["teacher_forwards"] == 0
    assert (exact["train"]["teacher_forwards"] == 0).all() and (online["train"]["teacher_forwards"] == 1).all()
    assert "teacher/perplexity" in online["final"] and "teacher/perplexity" not in exact["final"]


def test_top_k_and_sampled_records_train_and_say_so_in_the_model_card(lms, tmp_path, monkeypatch):
    from sitra.results import read_log

    record(lms, tmp_path / "top", top_k=8)
    record(lms, tmp_path / "sampled", top_k=8, teacher_logits_sampling="random")
    never_load_the_teacher(monkeypatch, lms["student"])
    for folder, sampling, words in (("top", "top_k", "top-8 log-probabilities and the missing mass"),
                                    ("sampled", "random", "the distinct tokens of 8 draws from it")):
        run = distill(lms, tmp_path / folder, teacher_logits=str(tmp_path / folder), teacher_logits_sampling=sampling,
                      alpha=0.0, max_steps=30, eval_steps=15, lr=1e-2, group_by_length=False)
        evals = read_log(run.log_path)["eval"]["eval_loss"]  # alpha 0: the recorded KD term alone
        assert evals[-1] < 0.85 * evals[0], (sampling, evals)
        card = (run.checkpoint_dir / "model" / "README.md").read_text()
        assert words in card and f"--teacher_logits {tmp_path / folder}" in card and lms["teacher"] in card


def test_a_random_student_is_built_from_the_recorded_config(lms, tmp_path, monkeypatch):
    from transformers import AutoConfig

    record(lms, tmp_path / "rec", top_k=8)
    never_load_the_teacher(monkeypatch, lms["student"])
    run = distill(lms, tmp_path / "random", teacher_logits=str(tmp_path / "rec"), student_init="random", student_layers=1,
                  max_steps=2, eval_steps=2)
    student, teacher = AutoConfig.from_pretrained(run.checkpoint_dir / "model"), AutoConfig.from_pretrained(lms["teacher"])
    assert student.num_hidden_layers == 1 and student.hidden_size == teacher.hidden_size == 64


def test_records_of_other_tokenizers_data_or_settings_are_refused(lms, tmp_path):
    record(lms, tmp_path / "rec", top_k=8)
    rec = str(tmp_path / "rec")
    d = lms["dir"]
    cases = [
        (dict(student=lms["other_tokenizer"]), f"--student {lms['other_tokenizer']}: its tokenizer differs from the records at "
                                               f"--teacher_logits {rec}'s ("),
        (dict(train_file=str(d / "other_train.txt")), f"--teacher_logits {rec}: recorded on other training text"),
        (dict(max_seq_length=24), f"--max_seq_length 24: the records at --teacher_logits {rec} were made with 32"),
        (dict(temperature=2.0), "--temperature 2.0: the records at"),  # recorded at the job's default, 1
        (dict(teacher_logits_sampling="random"), "--teacher_logits_sampling random: the records at"),
        (dict(loss="mse"), "--loss mse: compares raw logits, which records do not keep"),
        (dict(hidden_weight=1.0), "--hidden_weight 1.0: needs the teacher's hidden states"),
        (dict(teacher=lms["student"]), f"--teacher {lms['student']}: with --teacher_logits the teacher is the recorded one"),
    ]
    for kw, message in cases:
        with pytest.raises(UsageError) as error:
            distill(lms, tmp_path / "refused", teacher_logits=rec, **kw)
        assert message in str(error.value) and "\n" not in str(error.value), (kw, str(error.value))
    assert not (tmp_path / "refused" / "checkpoints").exists()  # before any compute


def test_padding_rows_are_aligned_with_a_notice(lms, tmp_path, capsys):
    from sitra.results import read_log

    V = lms["vocab"]
    run = distill(lms, tmp_path / "online", student=lms["padded_student"], max_steps=4, eval_steps=4)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vocabulary:")]
    assert lines == [f"vocabulary: teacher {V:,} and student {V + 8:,} output rows share the tokenizer's {V:,} ids; "
                     f"the logit losses compare the first {V:,} (padding rows left out)"]
    assert np.isfinite(read_log(run.log_path)["eval"]["eval_loss"]).all()
    record(lms, tmp_path / "rec", top_k=8)
    distill(lms, tmp_path / "records", student=lms["padded_student"], teacher_logits=str(tmp_path / "rec"), max_steps=2)


def test_on_policy_batches_cost_one_teacher_forward_each(lms, tmp_path, capsys):
    from sitra.results import read_log

    run = distill(lms, tmp_path / "half", on_policy_fraction=0.5, max_new_tokens=8, max_steps=16, eval_steps=8)
    log = read_log(run.log_path)
    on = log["train"]["on_policy"]
    assert 0 < on.sum() < len(on) and set(on) <= {0.0, 1.0}
    assert (log["train"]["teacher_forwards"] == 1).all()  # exactly one per batch, on-policy or not
    eval_batches = math.ceil(len(corpus(lms)[1]) / 8)
    assert log["attrs"]["teacher_forwards"] == 16 + 3 * eval_batches  # training + the evaluations at steps 0, 8, 16
    assert log["attrs"]["on_policy_batches"] == on.sum()
    assert "on-policy batches: " in capsys.readouterr().out
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    assert "On-policy: 50% of the batches" in card
    full = read_log(distill(lms, tmp_path / "all", on_policy_fraction=1.0, alpha=0.0, max_new_tokens=8, max_steps=16,
                            eval_steps=16, loss="jsd").log_path)
    assert (full["train"]["on_policy"] == 1).all()
    assert full["eval"]["eval_loss"][-1] < full["eval"]["eval_loss"][0]  # the held-out JSD falls


def test_on_policy_runs_resume_bit_for_bit(lms, tmp_path):
    from safetensors.torch import load_file

    straight = distill(lms, tmp_path / "straight", on_policy_fraction=0.5, max_new_tokens=8, max_steps=6, save_steps=1)
    from sitra.errors import Interrupted

    with pytest.raises(Interrupted):
        distill(lms, tmp_path / "resumed", on_policy_fraction=0.5, max_new_tokens=8, max_steps=6, save_steps=1, stop_after_steps=3)
    resumed = distill(lms, tmp_path / "resumed", on_policy_fraction=0.5, max_new_tokens=8, max_steps=6, save_steps=1)
    a = load_file(str(straight.checkpoint_dir / "best.safetensors"))
    b = load_file(str(resumed.checkpoint_dir / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BAD_DISTILL = [
    (["--on_policy_fraction", "1.5"], "--on_policy_fraction 1.5: must be in [0, 1]"),
    (["--on_policy_fraction", "0.5", "--max_new_tokens", "64"], "--max_new_tokens 64: allowed 1-31"),
    (["--student", "OTHER"], "--student OTHER: its tokenizer differs from --teacher TEACHER's ("),
    (["--teacher_logits", "NOWHERE"], "--teacher_logits NOWHERE: no readable index.json"),
]


@pytest.mark.parametrize("flags,message", BAD_DISTILL, ids=[m for _, m in BAD_DISTILL])
def test_bad_distillation_flags_are_one_line_errors(lms, tmp_path, flags, message, capsys):
    from sitra.recipes import distill_pythia

    subst = {"OTHER": lms["other_tokenizer"], "TEACHER": lms["teacher"], "NOWHERE": str(tmp_path / "nowhere")}
    flags = [subst.get(f, f) for f in flags]
    for key, value in subst.items():
        message = message.replace(key, value)
    d = lms["dir"]
    argv = ["--teacher", lms["teacher"], "--student", lms["student"], "--train_file", str(d / "train.txt"),
            "--eval_file", str(d / "eval.txt"), "--max_seq_length", "32", "--device", "cpu",
            "--storage_directory", str(tmp_path), *flags]
    assert message in one_line_error(distill_pythia.DistillLMArgs, distill_pythia.run, argv, capsys)
    assert not (tmp_path / "checkpoints").exists()
