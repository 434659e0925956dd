"""Recorded teachers for distill_classifier: record_teacher --job distill_classifier stores the
teacher's label log-probabilities once per training example, in the teacher's own tokens, and
students (of the teacher's tokenizer or their own) train from them without loading the teacher.

Checked against independent computations: the records against the teacher's own log_softmax and
the fingerprint of the examples tokenized here; float32 records of every label against online
distillation, step for step."""
from pathlib import Path

import numpy as np
import pytest
import test_records
import test_tasks
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from conftest import build_tokenizer
from sitra import models, records
from sitra.errors import UsageError
from sitra.data import tasks
from sitra.recipes import distill_classifier, record_teacher
from sitra.results import read_log

JOB = "distill_classifier"
# the fixtures and helpers of the jobs' own tests: synthetic splits with a teacher fine-tuned on them
# (distill_classifier), tiny GPT-NeoX models and text (distill_pythia, for records of another job)
sst, distill_args = test_tasks.sst, test_tasks.distill_args
lms, record_pythia = test_records.lms, test_records.record


@pytest.fixture(scope="module")
def students(sst):
    """A config.json alone (random weights, reads the teacher's tokens) and a pretrained encoder
    with a tokenizer of its own (the teacher then reads teacher_input_ids). Both keep their
    dropout: a student draws the same with a live or a recorded teacher."""
    d = sst["dir"]
    BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=128, initializer_range=0.2).save_pretrained(d / "config_only")
    tok = build_tokenizer(d / "own_vocab", vocab_size=300)
    torch.manual_seed(5)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(d / "own_vocab")
    return {"config": str(d / "config_only"), "own_vocab": str(d / "own_vocab")}


def record(sst, out, **kw):
    f = sst["files"]
    values = dict(job=JOB, teacher=sst["teacher"], output=str(out), train_file=f["train"], validation_file=f["dev"],
                  test_file=f["test"], top_k=2, device="cpu", batch_size=16, storage_directory=str(Path(out).parent))
    values.update(kw)
    return record_teacher.run(record_teacher.RECORD_ARGS[JOB](**values))


def distill(sst, storage, **kw):
    return distill_classifier.run(distill_args(sst, storage, **kw))


def never_load_the_teacher(monkeypatch, teacher: str):
    """Any load of the teacher's weights, config or tokenizer fails the test."""
    def refuse(load):
        def guarded(name, *a, **kw):
            if str(name) == teacher:
                raise AssertionError(f"the teacher {name} was loaded")
            return load(name, *a, **kw)
        return guarded

    for name in ("load_model", "load_config", "load_tokenizer"):
        monkeypatch.setattr(models, name, refuse(getattr(models, name)))
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained",
                        refuse(AutoModelForSequenceClassification.from_pretrained))


def test_records_hold_the_teachers_label_log_probs_of_the_examples_it_read(sst, tmp_path):
    record(sst, tmp_path / "rec", log_prob_dtype="float32", temperature=2.0)
    rec = records.TeacherRecords(tmp_path / "rec")
    rows = tasks.read_rows(sst["files"]["train"], "--train_file")
    tok = AutoTokenizer.from_pretrained(sst["teacher"])
    ids = tok([r["sentence"] for r in rows], truncation=True, max_length=128)["input_ids"]
    labels = [int(r["label"]) for r in rows]
    assert [(p["split"], p["range"]) for p in rec.index["parts"]] == [("train", [0, len(rows)])]  # held-out: labels only
    assert rec.index["parts"][0]["sha256"] == records.fingerprint(list(zip(ids, labels)))
    assert rec.vocab == 2 and rec.identity["settings"] == {"--teacher_logits_sampling": "top_k", "--temperature": 2.0}
    teacher = AutoModelForSequenceClassification.from_pretrained(sst["teacher"]).eval()
    for index in (0, 7, len(rows) - 1):
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=torch.tensor([ids[index]])).logits[0] / 2.0, -1)
        got = rec.example(index)
        top = logp.topk(2)
        assert got["teacher_ids"].tolist() == [top.indices.tolist()]
        assert np.allclose(got["teacher_logp"], top.values.numpy()[None], rtol=1e-5, atol=1e-6)
        assert got["teacher_rest"].tolist() == [float("-inf")]  # k = every label: no mass outside


@pytest.mark.parametrize("loss,student", [("forward_kl", "config"), ("jsd", "own_vocab")])
def test_records_of_every_label_give_the_online_losses(sst, students, tmp_path, monkeypatch, loss, student):
    """k = the number of labels, float32: the same training as online, step for step, also for a
    student with its own tokenizer (the records are keyed to the teacher's tokens)."""
    # a small learning rate: Adam's first steps move by about lr x sign(gradient), which turns the
    # float rounding of teacher logits in batches padded otherwise (~1e-7) into larger differences
    kw = dict(student=students[student], student_init="auto", loss=loss, jsd_beta=0.3, max_steps=6, eval_steps=3, lr=3e-4)
    online_run = distill(sst, tmp_path / "online", **kw)
    online = read_log(online_run.log_path)
    for shard in (1, 0):
        record(sst, tmp_path / "rec", log_prob_dtype="float32", shard=shard, num_shards=2)
    never_load_the_teacher(monkeypatch, sst["teacher"])
    run = distill(sst, tmp_path / "records", teacher=None, teacher_logits=str(tmp_path / "rec"), **kw)
    recorded = read_log(run.log_path)
    for key in ("loss", "ce", loss):
        assert np.allclose(recorded["train"][key], online["train"][key], rtol=1e-5, atol=0), (key, recorded["train"][key])
    for key in ("ce", "accuracy", "macro_f1"):
        assert np.allclose(recorded["eval"][key], online["eval"][key], rtol=1e-5, atol=0), key
    assert run.name == online_run.name + "_records-top_k2"  # never the online run's folder
    teacher_keys = [k for k in recorded["final"] if k.startswith("teacher/")]
    assert "teacher/validation_accuracy" in online["final"] and not teacher_keys
    for key, value in recorded["final"].items():
        if key.startswith("student") and not key.endswith("examples_per_s"):
            assert value == pytest.approx(online["final"][key], rel=1e-5), key


def test_top_k_and_sampled_records_train_and_say_so_in_the_model_card(sst, students, tmp_path, monkeypatch):
    record(sst, tmp_path / "top", top_k=1)
    record(sst, tmp_path / "sampled", top_k=64, teacher_logits_sampling="random")  # 64 draws of 2 labels: a steady estimate
    never_load_the_teacher(monkeypatch, sst["teacher"])
    for folder, words in (("top", "its top-1 log-probabilities and the missing mass"),
                          ("sampled", "the distinct labels of 64 draws from it with their counts")):
        run = distill(sst, tmp_path / folder, teacher=None, teacher_logits=str(tmp_path / folder), student=students["config"],
                      student_init="auto", alpha=0.0, max_steps=40, eval_steps=20)
        log = read_log(run.log_path)
        kd = log["train"]["forward_kl"]  # alpha 0: the recorded teacher's term alone (sampled: an estimate per batch)
        assert kd[-10:].mean() < 0.7 * kd[:10].mean(), (folder, kd)
        ce = log["eval"]["ce"]  # and with it the student learns the labels
        assert ce[-1] < 0.85 * ce[0], (folder, ce)
        final = log["final"]
        assert final["student after KD/validation_accuracy"] > final["student before KD/validation_accuracy"] + 0.2, (folder, final)
        card = (run.checkpoint_dir / "model" / "README.md").read_text()
        assert words in card and f"--teacher_logits {tmp_path / folder}" in card and sst["teacher"] in card, card
        assert "Results (student before KD, student after KD;" in card and "| teacher" not in card


def test_records_that_cannot_stand_in_for_the_teacher_are_refused(sst, students, lms, tmp_path):
    record(sst, tmp_path / "rec")
    record(sst, tmp_path / "sampled", teacher_logits_sampling="random")
    record_pythia(lms, tmp_path / "pythia", top_k=4)
    rec = str(tmp_path / "rec")
    cases = [
        (dict(train_fraction=0.5), f"--teacher_logits {rec}: recorded on other training examples (320 examples of "),
        (dict(max_seq_length=6), f"--teacher_logits {rec}: recorded on other training examples"),
        (dict(teacher_logits=str(tmp_path / "pythia")), f"--teacher_logits {tmp_path / 'pythia'}: recorded for distill_pythia, "
                                                         "not distill_classifier; record with --job distill_classifier"),
        (dict(temperature=1.0), f"--temperature 1.0: the records at --teacher_logits {rec} were made with 2.0"),
        (dict(teacher_logits_sampling="random"), "--teacher_logits_sampling random: the records at"),
        (dict(loss="mse"), "--loss mse: compares raw logits, which records do not keep; with --teacher_logits allowed: "
                           "forward_kl, reverse_kl, jsd"),
        (dict(teacher_logits=str(tmp_path / "sampled"), loss="jsd"), "--loss jsd: sampled records"),
        (dict(student_init="teacher_layers"), "--student_init teacher_layers: copies the teacher's layers, which "
                                               "--teacher_logits leaves out; give --student (pretrained or config)"),
        (dict(student=None), "--student_init auto: without --student copies the teacher's layers, which --teacher_logits "
                             "leaves out"),
        (dict(teacher_bits=8), "--teacher_bits 8: with --teacher_logits the teacher is not loaded"),
        (dict(teacher=sst["encoder"]), f"--teacher {sst['encoder']}: with --teacher_logits the teacher is the recorded one"),
        (dict(teacher_logits=None), "--teacher is required (a sequence classifier), or --teacher_logits"),
    ]
    for kw, message in cases:
        values = dict(teacher=None, teacher_logits=rec, student=students["config"], student_init="auto") | kw
        with pytest.raises(UsageError) as error:
            distill(sst, tmp_path / "refused", **values)
        assert message in str(error.value) and "\n" not in str(error.value), (kw, str(error.value))
    assert not (tmp_path / "refused" / "checkpoints").exists()  # before any compute
    with pytest.raises(UsageError) as error:
        record(sst, tmp_path / "too_many", top_k=3)
    assert str(error.value) == "--top_k 3: the teacher's vocabulary has 2 ids; allowed 1-2"
    assert not (tmp_path / "too_many").exists()


def test_neither_teacher_nor_records_is_one_line_exit_2(sst, tmp_path, capsys):
    from sitra.cli import main

    f = sst["files"]
    with pytest.raises(SystemExit) as exit_:
        main(distill_classifier.ARGS, distill_classifier.run, ["--train_file", f["train"], "--validation_file", f["dev"],
                                                              "--storage_directory", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "--teacher is required" in lines[0], lines
    assert not (tmp_path / "checkpoints").exists()
