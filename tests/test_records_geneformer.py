"""distill_geneformer from a recorded teacher (--teacher_logits): record_teacher --job
distill_geneformer records the teacher at the masked genes of every training epoch (the masks
differ each epoch) and of the validation cells; students train from them without loading it.

Checked against the online job itself: float32 records of the whole vocabulary give its losses
step for step, over two epochs, though recorded in other batches."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from sitra import records
from sitra.errors import UsageError
from sitra.recipes import distill_geneformer, record_teacher
from sitra.results import read_log
import test_geneformer
import test_records
from test_geneformer import N_GENES, distill_args, save_teacher
from test_records import never_load_the_teacher, one_line_error
from test_records import record as record_pythia

# the fixtures of test_geneformer (a Geneformer-shaped teacher, a corpus of 240 cells) and of
# test_records (tiny causal LMs, for records of another job)
teacher, corpus, dictionaries, lms = test_geneformer.teacher, test_geneformer.corpus, test_geneformer.dictionaries, test_records.lms

JOB = distill_geneformer.JOB
V = N_GENES + 2  # the test teacher's vocabulary: <pad>, <mask> and 200 genes


def record(teacher, corpus, out, top_k=V, sampling="top_k", log_prob_dtype="float16", **job_flags):
    """record_teacher --job distill_geneformer with the flags distill() gives the student (any of
    them changed by job_flags)."""
    flags = dataclasses.asdict(distill_args(teacher, corpus, Path(out).parent, **job_flags))
    return record_teacher.run(record_teacher.RECORD_ARGS[JOB](**flags | dict(
        job=JOB, output=str(out), top_k=top_k, teacher_logits_sampling=sampling, log_prob_dtype=log_prob_dtype)))


def distill(teacher, corpus, storage, **kw):
    return distill_geneformer.run(distill_args(teacher, corpus, storage, **kw))


def test_records_of_every_gene_give_the_online_losses_over_two_epochs(teacher, corpus, tmp_path, monkeypatch):
    """k = V in float32: the training and held-out losses of every step equal online
    distillation's, in both epochs (each epoch's masks have their own records), though the
    recording read the cells in batches of 5 and the student in length-grouped batches of 16. The
    student keeps its dropout: it draws the same with a live or a recorded teacher."""
    two_epochs = dict(epochs=2, max_steps=0, batch_size=16, eval_steps=6)  # 192 training cells: 12 steps an epoch
    online = read_log(distill(teacher, corpus, tmp_path / "online", **two_epochs).log_path)
    record(teacher, corpus, tmp_path / "rec", log_prob_dtype="float32", **two_epochs | {"batch_size": 5})
    rec = records.TeacherRecords(tmp_path / "rec")
    assert [p["epoch"] for p in rec.parts("train")] == [0, 1] and [p["epoch"] for p in rec.parts("validation")] == [None]
    never_load_the_teacher(monkeypatch)
    run = distill(None, corpus, tmp_path / "records", teacher_logits=str(tmp_path / "rec"), **two_epochs)
    exact = read_log(run.log_path)
    assert len(online["train"]["loss"]) == 24 and list(exact["train"]["step"]) == list(online["train"]["step"])
    for part, keys in (("train", ("loss", "kl", "ce")), ("eval", ("eval_loss", "eval_kl", "eval_ce"))):
        for key in keys:
            assert np.allclose(exact[part][key], online[part][key], rtol=1e-5, atol=0), (key, exact[part][key], online[part][key])
    for key in ("mlm_accuracy", "perplexity", "masked_tokens"):
        assert exact["final"][f"student/{key}"] == pytest.approx(online["final"][f"student/{key}"], rel=1e-5)
    assert "teacher/perplexity" in online["final"] and not any(k.startswith("teacher/") for k in exact["final"])
    assert run.name.endswith(f"_records-top_k{V}")
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    assert "| Teacher" not in card and "| Gap" not in card and "with the masks of 2 training epochs" in card
    assert f"# Distilled Geneformer student of {teacher}" in card and f"--teacher_logits {tmp_path / 'rec'}" in card


def test_top_k_and_sampled_records_train_and_say_so_in_the_model_card(teacher, corpus, tmp_path, monkeypatch):
    record(teacher, corpus, tmp_path / "top", top_k=8)
    record(teacher, corpus, tmp_path / "sampled", top_k=64, sampling="random")  # 64 draws: a steady estimate
    never_load_the_teacher(monkeypatch)
    for folder, sampling, k, words in (("top", "top_k", 8, "its top-8 log-probabilities and the missing mass"),
                                       ("sampled", "random", 64, "the distinct genes of 64 draws from it")):
        run = distill(None, corpus, tmp_path / folder, teacher_logits=str(tmp_path / folder), alpha=1.0)
        log = read_log(run.log_path)
        evals = log["eval"]["eval_loss"]  # alpha 1: the recorded KL term alone
        assert evals[0] > evals[1] > evals[2] and evals[-1] < 0.85 * evals[0], (sampling, evals)
        assert log["train"]["loss"][-4:].mean() < log["train"]["loss"][:4].mean()
        card = (run.checkpoint_dir / "model" / "README.md").read_text()
        assert words in card and "the teacher was never loaded" in card and teacher in card
        assert run.name.endswith(f"_records-{sampling}{k}")


def test_records_that_cannot_stand_in_for_the_teacher_are_refused(teacher, corpus, lms, tmp_path):
    """One line each, before any run folder: records of other cells, masks, temperature, job or
    teacher, flags that need the live teacher, more epochs than recorded, no teacher at all."""
    record(teacher, corpus, tmp_path / "rec", top_k=8)  # --max_steps 24 at 24 batches an epoch: 1 epoch
    record_pythia(lms, tmp_path / "pythia", top_k=8)
    rec = str(tmp_path / "rec")
    other = save_teacher(tmp_path / "other_teacher", seed=1)
    where = f"the records at --teacher_logits {rec}"
    cases = [
        (dict(split_seed=1), f"--teacher_logits {rec}: recorded on other training cells"),
        (dict(max_eval_cells=20), f"--teacher_logits {rec}: recorded on other validation cells"),
        (dict(temperature=1.0), f"--temperature 1.0: {where} were made with 2.5"),
        (dict(seed=7), f"--seed 7: {where} were made with 42"),
        (dict(mlm_probability=0.3), f"--mlm_probability 0.3: {where} were made with 0.15"),
        (dict(teacher_logits_sampling="random"), f"--teacher_logits_sampling random: {where} were made with top_k"),
        (dict(teacher=other), f"--teacher {other}: with --teacher_logits the teacher is the recorded one ({teacher})"),
        (dict(init_from_teacher=True), "--init_from_teacher: copies the teacher's weights"),
        (dict(max_steps=30), f"--max_steps 30: {where} hold 1 epoch(s) of masks (24 steps an epoch here); allowed 1-24"),
        (dict(max_steps=0, epochs=2), f"--epochs 2: {where} hold 1 epoch(s) of masks; allowed 1-1"),
        (dict(teacher_logits=str(tmp_path / "pythia")),
         f"--teacher_logits {tmp_path / 'pythia'}: recorded for distill_pythia, not distill_geneformer"),
        (dict(teacher_logits=None, teacher=None), "--teacher or --teacher_logits is required"),
    ]
    for kw, message in cases:
        with pytest.raises(UsageError) as error:
            distill(**dict(teacher=teacher, corpus=corpus, storage=tmp_path / "refused", teacher_logits=rec) | kw)
        assert message in str(error.value) and "\n" not in str(error.value), (kw, str(error.value))
    assert not (tmp_path / "refused").exists()
    # fewer epochs than recorded, other batches: accepted
    distill(None, corpus, tmp_path / "fewer", teacher_logits=rec, max_steps=6, batch_size=4, eval_steps=0)


def test_bad_recordings_and_flags_are_one_line_errors(teacher, corpus, tmp_path, capsys):
    with pytest.raises(UsageError, match=rf"--top_k 500: the teacher's vocabulary has {V} ids; allowed 1-{V}$"):
        record(teacher, corpus, tmp_path / "rec", top_k=500)
    assert not (tmp_path / "rec").exists()
    argv = ["--data", corpus, "--validation_fraction", "0.2", "--device", "cpu", "--storage_directory", str(tmp_path)]
    line = one_line_error(distill_geneformer.DistillGeneformerArgs, distill_geneformer.run, argv, capsys)
    assert line.endswith("error: --teacher or --teacher_logits is required: a Geneformer (BertForMaskedLM) folder, "
                         "or records of one (jobs/record_teacher.py --job distill_geneformer)")
    assert not (tmp_path / "checkpoints").exists()
