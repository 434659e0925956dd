"""distill_summarizer from a recorded teacher (record_teacher --job distill_summarizer, then
--teacher_logits): float32 records of every id give the online losses without loading the teacher,
top-k and sampled records train, and records that cannot stand in for the teacher are refused.
Tiny GPT-NeoX teacher and student of tests/test_tasks.py."""
import dataclasses

import numpy as np
import pytest
from transformers import AutoTokenizer

from sitra import models
from sitra.errors import UsageError
from sitra.recipes import distill_summarizer, record_teacher
from sitra.results import read_log
import test_tasks
from test_tasks import summarizer_args

lms = test_tasks.lms  # the fixture: tiny GPT-NeoX teacher and student, (document, summary) files

JOB = "distill_summarizer"
QUICK = dict(max_steps=6, eval_steps=3, generation_examples=2)


def record(lms, out, **kw):
    """Records made with the flags the students of summarizer_args give, and `kw`."""
    own = {f.name for f in dataclasses.fields(record_teacher.RecordFields)}  # e.g. --teacher_logits_sampling: what to record
    values = {k: v for k, v in dataclasses.asdict(summarizer_args(lms, out.parent)).items() if k not in own}
    return record_teacher.run(record_teacher.RECORD_ARGS[JOB](**values | dict(job=JOB, output=str(out), top_k=16) | kw))


def distill(lms, storage, **kw):
    return distill_summarizer.run(summarizer_args(lms, storage, **kw))


def vocab(lms) -> int:
    return len(AutoTokenizer.from_pretrained(lms["teacher"]))


def never_load_the_teacher(monkeypatch, teacher: str):
    """Loading the teacher through sitra.models (its weights, config or tokenizer) fails."""
    def refuse(name, *a, **kw):
        raise AssertionError(f"{name} was loaded")

    monkeypatch.setattr(models, "load_model", lambda what, *a, real=models.load_model, **kw:
                        refuse(what) if what == teacher else real(what, *a, **kw))
    for name in ("load_config", "load_tokenizer"):
        real = getattr(models, name)
        monkeypatch.setattr(models, name, lambda what, *a, real=real, **kw: refuse(what) if what == teacher else real(what, *a, **kw))


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_float32_records_of_every_id_give_the_online_losses_without_the_teacher(lms, tmp_path, monkeypatch, loss):
    V = vocab(lms)
    online_run = distill(lms, tmp_path / "online", loss=loss, jsd_beta=0.3, **QUICK)
    online = read_log(online_run.log_path)
    record(lms, tmp_path / "full", top_k=V, log_prob_dtype="float32")
    never_load_the_teacher(monkeypatch, lms["teacher"])
    run = distill(lms, tmp_path / "records", teacher=None, teacher_logits=str(tmp_path / "full"), loss=loss, jsd_beta=0.3, **QUICK)
    got = read_log(run.log_path)
    for part, key in (("train", "loss"), ("eval", "eval_loss")):
        assert len(got[part][key]) == len(online[part][key]) > 1
        assert np.allclose(got[part][key], online[part][key], rtol=1e-5, atol=0), (part, got[part][key], online[part][key])
    assert run.name == online_run.name + f"_records-top_k{V}"
    assert "teacher/validation_rougeL" in online["final"] and not any(k.startswith("teacher/") for k in got["final"])
    assert 0 <= got["final"]["student after KD/validation_rougeL"] <= 1


def test_top_k_and_sampled_records_train_and_say_so_in_the_model_card(lms, tmp_path, monkeypatch):
    record(lms, tmp_path / "top", top_k=8)
    record(lms, tmp_path / "sampled", top_k=64, teacher_logits_sampling="random")  # 8 draws: too noisy to fall in 16 steps
    never_load_the_teacher(monkeypatch, lms["teacher"])
    for folder, sampling, words in (("top", "top_k", "top-8 log-probabilities and the missing mass"),
                                    ("sampled", "random", "the distinct tokens of 64 draws from it")):
        run = distill(lms, tmp_path / f"student_{folder}", teacher=None, teacher_logits=str(tmp_path / folder),
                      teacher_logits_sampling=sampling, alpha=0.0, generation_examples=2)
        evals = read_log(run.log_path)["eval"]["eval_loss"]  # alpha 0: the recorded KD term alone
        assert evals[-1] < 0.8 * evals[0], (sampling, evals)
        card = (run.checkpoint_dir / "model" / "README.md").read_text()
        assert words in card and f"--teacher_logits {tmp_path / folder}" in card and f"of the causal LM `{lms['teacher']}`" in card
        header = next(line for line in card.splitlines() if line.startswith("| Metric"))
        assert "student after KD" in header and "teacher" not in header


def test_records_that_cannot_stand_in_for_the_teacher_are_refused(lms, tmp_path, text_files, capsys):
    from sitra.cli import main

    V = vocab(lms)
    rec, sampled, other_job = tmp_path / "rec", tmp_path / "sampled", tmp_path / "pythia"
    record(lms, rec, top_k=8)
    record(lms, sampled, top_k=8, teacher_logits_sampling="random")
    record_teacher.run(record_teacher.RECORD_ARGS["distill_pythia"](
        job="distill_pythia", teacher=lms["teacher"], output=str(other_job), train_file=str(text_files / "train.txt"),
        eval_file=str(text_files / "eval.txt"), max_seq_length=16, top_k=4, device="cpu", storage_directory=str(tmp_path)))
    cases = [
        (dict(train_fraction=0.5), f"--teacher_logits {rec}: recorded on other training pairs"),
        (dict(max_summary_length=2), f"--teacher_logits {rec}: recorded on other training pairs"),
        (dict(teacher_logits=str(other_job)), f"--teacher_logits {other_job}: recorded for distill_pythia, not {JOB}"),
        (dict(temperature=1.0), f"--temperature 1.0: the records at --teacher_logits {rec} were made with 2.0"),
        (dict(teacher_logits_sampling="random"), "--teacher_logits_sampling random: the records at"),
        (dict(loss="mse"), "--loss mse: compares raw logits, which records do not keep; with --teacher_logits allowed: "),
        (dict(teacher_logits=str(sampled), loss="reverse_kl"), "--loss reverse_kl: sampled records"),
        (dict(student_init="teacher_layers", student=None), "--student_init teacher_layers: copies the teacher's weights"),
        (dict(teacher=lms["student"]), f"--teacher {lms['student']}: with --teacher_logits the teacher is the recorded one"),
        (dict(teacher=None, teacher_logits=None), "--teacher: required, or --teacher_logits DIR"),
    ]
    for kw, message in cases:
        with pytest.raises(UsageError) as error:
            distill(lms, tmp_path / "refused", **{"teacher_logits": str(rec)} | kw)
        assert message in str(error.value) and "\n" not in str(error.value), (kw, str(error.value))
    assert not (tmp_path / "refused" / "checkpoints").exists()  # refused before any run folder
    # on the command line: one line on stderr, exit code 2
    d = lms["dir"]
    argv = ["--student", lms["student"], "--train_file", str(d / "train.jsonl"), "--validation_file", str(d / "validation.jsonl"),
            "--storage_directory", str(tmp_path / "refused")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(distill_summarizer.ARGS, distill_summarizer.run, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "--teacher: required, or --teacher_logits DIR" in lines[0], lines
    # recording: more ids than the vocabulary has, or no teacher to record
    for kw, message in ((dict(top_k=V + 1), f"--top_k {V + 1}: the teacher's vocabulary has {V:,} ids; allowed 1-{V:,}"),
                        (dict(teacher=None), "--teacher: required (the teacher to record)")):
        with pytest.raises(UsageError) as error:
            record(lms, tmp_path / "not_recorded", **kw)
        assert message in str(error.value) and "\n" not in str(error.value), (kw, str(error.value))
    assert not (tmp_path / "not_recorded").exists()
