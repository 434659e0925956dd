"""Every distillation job saves its student as training starts beside the result (RUN/student_before),
once (a resumed run keeps it), and its model card says what training read, which teacher layers a
cut student kept and what was held out."""
import json
import random

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForMaskedLM, BertForSequenceClassification)

from conftest import build_neox, build_tokenizer
from sitra.cards import seen_in_training
from sitra.data.mlm import LengthGroupedBatches
from sitra.data.mlm import Batches
from sitra.errors import Interrupted
from sitra.recipes import distill_classifier, distill_geneformer, distill_pythia, distill_summarizer
from sitra.train import Progress

BEFORE = "student_before"


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "length-grouped"])
def test_seen_in_training_counts_what_the_loop_read(grouped):
    rng = random.Random(0)
    examples = [[7] * rng.randrange(1, 30) for _ in range(23)]
    lengths = [len(e) for e in examples]
    keep = lambda batch, generators: batch  # noqa: E731  (the batch's examples themselves)
    batches = (LengthGroupedBatches(examples, 4, keep, lengths, seed=3, group_size=2) if grouped
               else Batches(examples, 4, keep, seed=3))
    # 2 full epochs (6 batches each), then 4 batches of the third: read them the way the loop does
    read = [e for epoch in range(2) for batch in batches.epoch(epoch) for e in batch]
    read += [e for b, batch in enumerate(batches.epoch(2)) if b < 4 for e in batch]
    seen = seen_in_training(batches, Progress(step=16, epoch=2, batch=4), lengths)
    assert seen == {"reads": len(read), "distinct": len({id(e) for e in read}), "examples": 23,
                    "tokens": sum(len(e) for e in read), "steps": 16}
    assert seen["reads"] == 2 * 23 + 16
    part = seen_in_training(batches, Progress(step=3, epoch=0, batch=3), lengths)  # 3 steps of 4 in epoch 0
    first = [e for b, batch in enumerate(batches.epoch(0)) if b < 3 for e in batch]
    assert (part["reads"], part["distinct"], part["tokens"]) == (12, 12, sum(map(len, first)))


@pytest.fixture(scope="module")
def lms(tiny_teacher, tmp_path_factory):
    from sitra.data import python_docs_paragraphs

    d = tmp_path_factory.mktemp("before_lm")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.eos_token = "[SEP]"
    paragraphs = python_docs_paragraphs()
    (d / "train.txt").write_text("\n".join(paragraphs[:200]))
    (d / "eval.txt").write_text("\n".join(paragraphs[1000:1020]))
    for name, part in [("train", paragraphs[:40]), ("validation", paragraphs[500:504])]:
        rows = [{"document": " ".join(p.split()[:20]), "summary": " ".join(p.split()[:3])} for p in part]
        (d / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"teacher": build_neox(d / "teacher", tok, 32, 4, 0), "student": build_neox(d / "student", tok, 32, 2, 1), "dir": d}


def test_distill_pythia_writes_the_student_before_once_and_a_resumed_run_keeps_it(lms, tmp_path):
    d = lms["dir"]
    args = dict(teacher=lms["teacher"], student=lms["student"], train_file=str(d / "train.txt"), eval_file=str(d / "eval.txt"),
                max_seq_length=32, batch_size=8, max_steps=6, eval_steps=3, lr=3e-3, device="cpu",
                storage_directory=str(tmp_path))
    with pytest.raises(Interrupted):
        distill_pythia.run(distill_pythia.DistillLMArgs(**args, stop_after_steps=3))
    run_dir = next((tmp_path / "checkpoints").iterdir())
    before = run_dir / BEFORE
    written = {p.name: p.read_bytes() for p in before.iterdir()}
    assert same_weights(AutoModelForCausalLM.from_pretrained(before), AutoModelForCausalLM.from_pretrained(lms["student"]))
    assert AutoTokenizer.from_pretrained(before).get_vocab() == AutoTokenizer.from_pretrained(lms["teacher"]).get_vocab()
    run = distill_pythia.run(distill_pythia.DistillLMArgs(**args))  # resumes at step 3 with trained weights
    assert {p.name: p.read_bytes() for p in before.iterdir()} == written  # not rewritten, not even its marker
    assert not same_weights(AutoModelForCausalLM.from_pretrained(before), AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "model"))
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    n_train = len(distill_pythia.load_corpus(distill_pythia.DistillLMArgs(**args), AutoTokenizer.from_pretrained(lms["teacher"]))[0])
    assert f"Seen in training: 6 steps read 48 examples ({48 / n_train:.2f} epochs; 48 distinct" in card
    assert f"of the {n_train:,} training examples" in card and "100%" not in card
    assert f"Held-out: {d / 'eval.txt'}: " in card and "initialised from `" + lms["student"] + "` (pretrained)" in card


def test_distill_summarizer_saves_the_cut_student_before(lms, tmp_path):
    d = lms["dir"]
    run = distill_summarizer.run(distill_summarizer.DistillSummarizerArgs(
        teacher=lms["teacher"], student_init="teacher_layers", student_layers=2, train_file=str(d / "train.jsonl"),
        validation_file=str(d / "validation.jsonl"), max_steps=2, eval_steps=2, batch_size=8, max_prompt_length=32,
        max_new_tokens=3, generation_examples=2, device="cpu", storage_directory=str(tmp_path)))
    teacher = AutoModelForCausalLM.from_pretrained(lms["teacher"])
    before = AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / BEFORE)
    for new, old in enumerate([0, 2]):  # every other layer of 4
        assert same_weights(before.gpt_neox.layers[new], teacher.gpt_neox.layers[old])
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    assert "Student layers: teacher layers 0, 2 of its 4 (0-based)" in card
    assert "seen in training: 2 steps read 16 examples (0.40 epochs; 16 distinct, 40.0% of the 40 training examples)" in card


def test_distill_classifier_saves_the_cut_student_before(tmp_path):
    tok = build_tokenizer(tmp_path / "teacher")
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    rows = [(i % 2, f"a {'true' if i % 2 else 'false'} sentence number {i}") for i in range(40)]
    for split, part in [("train", rows[:32]), ("dev", rows[32:])]:
        (tmp_path / f"{split}.tsv").write_text("label\tsentence\n" + "".join(f"{y}\t{s}\n" for y, s in part))
    run = distill_classifier.run(distill_classifier.DistillClassifierArgs(
        teacher=str(tmp_path / "teacher"), student_init="teacher_layers", student_layers=2,
        train_file=str(tmp_path / "train.tsv"), validation_file=str(tmp_path / "dev.tsv"), max_steps=3, eval_steps=3,
        batch_size=8, device="cpu", storage_directory=str(tmp_path / "store")))
    teacher = AutoModelForSequenceClassification.from_pretrained(tmp_path / "teacher")
    before = AutoModelForSequenceClassification.from_pretrained(run.checkpoint_dir / BEFORE)
    for new, old in enumerate([0, 2]):
        assert same_weights(before.bert.encoder.layer[new], teacher.bert.encoder.layer[old])
    assert same_weights(before.classifier, teacher.classifier)
    assert AutoTokenizer.from_pretrained(run.checkpoint_dir / BEFORE).get_vocab() == tok.get_vocab()
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    assert "Student layers: teacher layers 0, 2 of its 4 (0-based)" in card
    assert "seen in training: 3 steps read 24 examples (0.75 epochs; 24 distinct, 75.0% of the 32 training examples)" in card
    assert f"validation: {tmp_path / 'dev.tsv'} (8 examples)" in card


def test_distill_geneformer_saves_the_student_before(tmp_path):
    from datasets import Dataset

    rng = np.random.default_rng(0)
    cells = [rng.permutation(np.arange(2, 40))[: rng.integers(5, 30)].tolist() for _ in range(60)]
    Dataset.from_dict({"input_ids": cells, "length": [len(c) for c in cells]}).save_to_disk(str(tmp_path / "corpus"))
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, pad_token_id=0)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(tmp_path / "teacher")
    run = distill_geneformer.run(distill_geneformer.DistillGeneformerArgs(
        teacher=str(tmp_path / "teacher"), data=str(tmp_path / "corpus"), hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, init_from_teacher=True, batch_size=8, max_steps=3, eval_steps=3, validation_fraction=0.2,
        device="cpu", storage_directory=str(tmp_path / "store")))
    teacher = BertForMaskedLM.from_pretrained(tmp_path / "teacher")
    before = BertForMaskedLM.from_pretrained(run.checkpoint_dir / BEFORE)
    after = BertForMaskedLM.from_pretrained(run.checkpoint_dir / "model")
    for new, old in enumerate([0, 2]):
        assert same_weights(before.bert.encoder.layer[new], teacher.bert.encoder.layer[old])
    assert not same_weights(before, after)
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    assert "Student layers: teacher layers 0, 2 of its 4 (0-based)" in card
    assert "Seen in training: 3 steps read 24 cells (0.50 epochs; 24 distinct, 50.0% of the 48 training cells)" in card
    assert "Held-out: the 12 validation cells (never trained on)" in card
    assert "Initialised from teacher layers 0, 2" in (run.checkpoint_dir / BEFORE / "README.md").read_text()
