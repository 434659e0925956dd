"""Task distillation: data readers, summary label masking, the classification KD loss, tiny
classifier and summarizer jobs, deterministic generation, and one-line errors for bad input."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, \
    BertForSequenceClassification, GPTNeoXConfig

from conftest import SHARED, build_teacher, build_tokenizer
from sitra.errors import UsageError
from sitra.data import tasks
from sitra.evaluate import accuracy, generate_summaries, macro_f1, rouge
from sitra.recipes import distill_classifier, distill_summarizer, finetune_classifier
from sitra.models.causal import student_from_teacher_layers
from sitra.results import read_log

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Data readers and labels


def write_tsv(path, header, rows):
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]) + "\n")
    return str(path)


def test_tsv_csv_jsonl_and_datasets_folder_read_the_same_rows(tmp_path):
    import datasets

    rows = [{"label": "1", "sentence": 'a "quoted" film , really'}, {"label": "0", "sentence": "dull, slow"}]
    write_tsv(tmp_path / "a.tsv", ["label", "sentence"], [(r["label"], r["sentence"]) for r in rows])
    import csv
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["label", "sentence"])
        w.writeheader(), w.writerows(rows)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("a.tsv", "a.csv", "a.jsonl"):
        assert tasks.read_rows(str(tmp_path / name), "--train_file") == rows, name
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows[:1])}
                         ).save_to_disk(str(tmp_path / "ds"))
    assert tasks.read_dataset_dir(str(tmp_path / "ds")) == {"train": rows, "validation": rows[:1]}


def test_text_column_is_sentence_or_content_and_labels_map_to_ids():
    assert tasks.pick_column([{"label": 0, "content": "x"}], None, tasks.TEXT_COLUMNS, "--text_column", "f") == "content"
    assert tasks.pick_column([{"sentence": "x", "content": "y"}], None, tasks.TEXT_COLUMNS, "--text_column", "f") == "sentence"
    assert tasks.label_names(["1", "0", "1"]) == {0: "0", 1: "1"}
    assert tasks.label_names(["pos", "neg"]) == {0: "neg", 1: "pos"}
    assert tasks.label_ids(["pos", "1", "neg"], {0: "neg", 1: "pos"}, "f") == [1, 1, 0]  # names, then integer ids
    with pytest.raises(UsageError, match="label '2' is not one of the model's 2 labels"):
        tasks.label_ids(["2"], {0: "LABEL_0", 1: "LABEL_1"}, "f")


def test_validation_from_train_is_held_out_and_datasets_folders_need_a_validation_split(tmp_path):
    import datasets

    from sitra.data.tasks import TaskDataArgs, check_task_data, load_splits

    train = write_tsv(tmp_path / "train.tsv", ["label", "sentence"], [(i % 2, f"sentence {i}") for i in range(100)])
    args = TaskDataArgs(train_file=train, validation_from_train=10, train_fraction=0.5)
    check_task_data(args)
    splits = load_splits(args)
    val = [r["sentence"] for r in splits["validation"][0]]
    rest = [r["sentence"] for r in splits["train"][0]]
    assert len(val) == 10 and len(rest) == 45 and not set(val) & set(rest)
    with pytest.raises(UsageError, match="give it or --validation_file, not both"):
        check_task_data(TaskDataArgs(train_file=train, validation_file=train, validation_from_train=5))
    rows = [{"label": "0", "sentence": "x"}] * 5
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UsageError, match="has no validation split"):
        load_splits(TaskDataArgs(dataset_dir=str(tmp_path / "ds")))
    assert len(load_splits(TaskDataArgs(dataset_dir=str(tmp_path / "ds"), validation_from_train=2))["validation"][0]) == 2


def test_prompt_template_flag_reads_a_typed_newline():
    args = distill_summarizer.DistillSummarizerArgs(teacher="t", prompt_template="Text:\\n{document}\\nTL;DR:")
    assert distill_summarizer.template_of(args) == "Text:\n{document}\nTL;DR:"


def test_sst2_files_read_with_their_columns():
    if not (SHARED / "data" / "sst2" / "dev.tsv").exists():
        pytest.skip("../shared/data/sst2 is absent (a fresh clone): the SST-2 test needs it")
    from sitra.data.tasks import ClassifierDataArgs, labelled_splits

    splits = labelled_splits(ClassifierDataArgs(train_file=str(SHARED / "data/sst2/train.tsv"),
                                                validation_file=str(SHARED / "data/sst2/dev.tsv")))
    texts, labels, _ = splits["validation"]
    assert len(texts) == 872 and labels.count("0") == 428 and labels.count("1") == 444  # the `content` column
    assert len(splits["train"][0]) == 67349 and splits["train"][1].count("1") == 37569


# ---------------------------------------------------------------------------------------------
# Metrics


def test_accuracy_and_macro_f1_against_sklearn():
    f1_score = pytest.importorskip("sklearn.metrics").f1_score

    rng = random.Random(0)
    for _ in range(20):
        y = [rng.randrange(3) for _ in range(30)]
        p = [rng.randrange(4) for _ in range(30)]
        assert macro_f1(p, y) == pytest.approx(f1_score(y, p, average="macro"))
        assert accuracy(p, y) == sum(a == b for a, b in zip(p, y)) / 30


def test_rouge_is_stemmed_f_measure():
    r = rouge(["the cats were running"], ["a cat runs"])  # stemming: cats -> cat, running/runs -> run
    assert r["rouge1"] == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert r["rouge2"] == 0.0 and rouge(["same words here"], ["same words here"])["rougeL"] == 1.0


# ---------------------------------------------------------------------------------------------
# Classification KD loss and warm start


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_classification_kd_loss_against_its_formula(loss):
    s = [[1.0, -0.5, 0.2], [0.3, 0.3, 2.0]]
    t = [[2.0, 0.0, -1.0], [-0.2, 1.0, 0.5]]
    y = [0, 2]
    alpha, T = 0.3, 2.5
    ce = kl = 0.0
    for si, ti, yi in zip(s, t, y):
        ce += -math.log(softmax(si)[yi]) / 2
        p, q = softmax([v / T for v in ti]), softmax([v / T for v in si])
        if loss == "reverse_kl":
            p, q = q, p
        kl += sum(a * math.log(a / b) for a, b in zip(p, q)) / 2
    expected = alpha * ce + (1 - alpha) * T**2 * kl
    objective = dict(divergence=loss, temperature=T, kd_weight=1 - alpha, ce_weight=alpha)
    value, parts = distill_classifier.classification_kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), objective, loss)
    assert float(value) == pytest.approx(expected, rel=1e-6)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-6) and float(parts[loss]) == pytest.approx(T**2 * kl, rel=1e-6)


def test_teacher_layers_student_copies_every_kth_layer_exactly():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=6, num_attention_heads=2,
                                                       intermediate_size=32, num_labels=3)).eval()
    student = student_from_teacher_layers(teacher, 2).eval()
    assert type(student) is BertForSequenceClassification and student.config.num_hidden_layers == 2
    for new, old in enumerate([0, 3]):
        for (n1, a), (n2, b) in zip(student.bert.encoder.layer[new].named_parameters(),
                                    teacher.bert.encoder.layer[old].named_parameters()):
            assert n1 == n2 and torch.equal(a, b)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert teacher.config.num_hidden_layers == 6  # the teacher is untouched


# ---------------------------------------------------------------------------------------------
# Summaries: prompts, label masking, KD positions, generation


def test_summary_labels_mask_prompt_and_padding_and_keep_the_eos():
    eos = pad = 2  # the common case: padding with the EOS id
    a = tasks.summary_example([11, 12, 13], [21, 22], eos)
    b = tasks.summary_example([14], [23], eos)
    assert a == ([11, 12, 13, 21, 22, 2], [-100, -100, -100, 21, 22, 2])
    assert b == ([14, 23, 2], [-100, 23, 2])
    batch = tasks.SummaryCollator(pad)([a, b])
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 2], [14, 23, 2, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 21, 22, 2], [-100, 23, 2, -100, -100, -100]]
    # the positions scored (KD and CE) are those that predict a summary token or the EOS
    scored = batch["labels"][:, 1:] != -100
    assert scored.nonzero().tolist() == [[0, 2], [0, 3], [0, 4], [1, 0], [1, 1]]


def test_prompt_keeps_the_template_and_cuts_the_document(lms):
    tok = lms["tokenizer"]
    template = "summarize the following:\n{document}\nsummary:"
    tail = tok("\nsummary:", add_special_tokens=False)["input_ids"]
    doc = "the list object has a sort method that sorts the list in place"
    full = tasks.encode_prompt(tok, template, doc, 200)
    assert full == tok("summarize the following:\n", add_special_tokens=False)["input_ids"] + \
        tok(doc, add_special_tokens=False)["input_ids"] + tail
    cut = tasks.encode_prompt(tok, template, doc, len(full) - 3)
    assert len(cut) == len(full) - 3 and cut[-len(tail):] == tail and cut[:len(full) - 3 - len(tail)] == full[:len(full) - 3 - len(tail)]
    with pytest.raises(UsageError, match="must contain {document} exactly once"):
        tasks.split_template("Summarize this:")


def test_summary_kd_uses_summary_positions_only(lms):
    teacher = AutoModelForCausalLM.from_pretrained(lms["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(lms["student"]).eval()
    a = tasks.summary_example([11, 12, 13], [21, 22], 3)
    b = tasks.summary_example([14], [23], 3)
    batch = tasks.SummaryCollator(0)([a, b])
    alpha, T = 0.4, 2.0
    objective = dict(divergence="forward_kl", temperature=T, kd_weight=1 - alpha, ce_weight=alpha)
    value = distill_summarizer.summary_kd_loss(student, teacher, batch, objective, chunks=2)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    positions = [(0, 2, 21), (0, 3, 22), (0, 4, 3), (1, 0, 23), (1, 1, 3)]  # (row, position, next token), by hand
    ce = kl = 0.0
    for r, i, nxt in positions:
        ce -= float(torch.log_softmax(s[r, i], -1)[nxt]) / len(positions)
        p, q = torch.softmax(t[r, i] / T, -1), torch.softmax(s[r, i] / T, -1)
        kl += float((p * (p.log() - q.log())).sum()) / len(positions)
    assert float(value.detach()) == pytest.approx(alpha * ce + (1 - alpha) * T**2 * kl, rel=1e-5)
    noisy = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 77))
    again = distill_summarizer.summary_kd_loss(student, teacher, noisy, objective)
    assert float(again.detach()) == pytest.approx(float(value.detach()), rel=1e-6)


def test_generation_evaluation_is_identical_across_runs_and_batchings(lms):
    tok = lms["tokenizer"]
    docs = ["the list sort method sorts in place", "a class is an object", "the file object has a read method and a write method"]
    prompts = [tasks.encode_prompt(tok, distill_summarizer.DEFAULT_TEMPLATE, d, 64) for d in docs]
    outs = []
    for batch_size in (3, 3, 1):
        model = AutoModelForCausalLM.from_pretrained(lms["teacher"])  # a fresh load each time
        summaries, _ = generate_summaries(model, prompts, tok, 8, batch_size, torch.device("cpu"))
        outs.append((summaries, rouge(summaries, docs)))
    assert outs[0] == outs[1] == outs[2]  # left-padded batches give what one at a time gives
    assert all(s for s in outs[0][0])  # something was generated


# ---------------------------------------------------------------------------------------------
# Tiny jobs

WORDS = ["the", "object", "function", "value", "list", "method", "string", "file", "name", "type", "module", "is", "of"]


def synthetic_rows(n, seed):
    """Separable: label 1 iff the sentence contains `true`, else it contains `false`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(WORDS) for _ in range(rng.randrange(4, 10))]
        words.insert(rng.randrange(len(words) + 1), "true" if label else "false")
        rows.append((label, " ".join(words)))
    return rows


@pytest.fixture(scope="module")
def sst(tmp_path_factory):
    """Synthetic classification splits, a tiny encoder, and a teacher fine-tuned from it by the job."""
    d = tmp_path_factory.mktemp("cls")
    files = {split: write_tsv(d / f"{split}.tsv", ["label", "sentence" if split == "train" else "content"],
                              synthetic_rows(n, seed)) for split, n, seed in [("train", 320, 0), ("dev", 80, 1), ("test", 80, 2)]}
    encoder = build_teacher(d / "encoder", mlm=False, layers=4, hidden=32)
    run = finetune_classifier.run(finetune_classifier.FinetuneClassifierArgs(
        model=encoder, train_file=files["train"], validation_file=files["dev"], test_file=files["test"], max_steps=80,
        eval_steps=20, batch_size=16, lr=3e-3, device="cpu", storage_directory=str(d / "store")))
    return {"dir": d, "files": files, "encoder": encoder, "teacher": str(run.checkpoint_dir / "model"), "teacher_run": run}


def test_finetuned_teacher_is_accurate_and_has_a_card(sst):
    run = sst["teacher_run"]
    log = read_log(run.log_path)
    assert log["attrs"]["status"] == "complete"
    assert log["final"]["fine-tuned/validation_accuracy"] > 0.9 and log["final"]["fine-tuned/test_accuracy"] > 0.85
    model = AutoModelForSequenceClassification.from_pretrained(sst["teacher"])
    assert model.config.id2label == {0: "0", 1: "1"}
    card = (Path(sst["teacher"]) / "README.md").read_text()
    assert "python jobs/finetune_classifier.py" in card and f"{log['final']['fine-tuned/test_accuracy']:.4f}" in card


def distill_args(sst, storage, **kw):
    f = sst["files"]
    values = dict(teacher=sst["teacher"], student=None, student_init="teacher_layers", student_layers=1,
                  train_file=f["train"], validation_file=f["dev"], test_file=f["test"], max_steps=30, eval_steps=10,
                  batch_size=16, lr=3e-3, device="cpu", storage_directory=str(storage))
    values.update(kw)
    return distill_classifier.DistillClassifierArgs(**values)


def test_tiny_classifier_distillation_raises_student_accuracy(sst, tmp_path):
    config_only = sst["dir"] / "student_config"
    BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=128, initializer_range=0.2).save_pretrained(config_only)  # a config.json alone: random weights
    run = distill_classifier.run(distill_args(sst, tmp_path, student=str(config_only), student_init="auto", max_steps=40))
    log = read_log(run.log_path)
    final = log["final"]
    assert final["teacher/validation_accuracy"] > 0.9
    assert final["student after KD/validation_accuracy"] > final["student before KD/validation_accuracy"] + 0.2
    assert final["student after KD/parameters"] < final["teacher/parameters"]
    assert all(final[f"{m}/examples_per_s"] > 0 for m in ("teacher", "student before KD", "student after KD"))
    # chosen on validation: the best step is the lowest validation selection_error; test never evaluated in training
    evals = log["eval"]
    assert final["best_step"] == evals["step"][int(evals["selection_error"].argmin())]
    assert not any(k.startswith("test") for k in evals)
    assert final["student after KD/validation_accuracy"] == pytest.approx(1 - evals["selection_error"].min())
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    for name in ("teacher", "student before KD", "student after KD"):
        assert f"{final[f'{name}/test_macro_f1']:.4f}" in card
    assert "--student_init auto" not in card and "forward_kl" in card


def test_classifier_distillation_resumes_to_the_same_weights(sst, tmp_path):
    from safetensors.torch import load_file

    from sitra.errors import Interrupted

    whole = distill_classifier.run(distill_args(sst, tmp_path / "a", max_steps=6, eval_steps=3))
    with pytest.raises(Interrupted):
        distill_classifier.run(distill_args(sst, tmp_path / "b", max_steps=6, eval_steps=3, stop_after_steps=4))
    resumed = distill_classifier.run(distill_args(sst, tmp_path / "b", max_steps=6, eval_steps=3))
    a = load_file(str(whole.checkpoint_dir / "model" / "model.safetensors"))
    b = load_file(str(resumed.checkpoint_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(resumed.log_path)["attrs"]["status"] == "complete"


def test_student_with_its_own_tokenizer_reads_its_own_tokens(sst, tmp_path):
    """A pretrained encoder with another vocabulary: the teacher reads teacher_input_ids, the
    student its own ids; the teacher's accuracy is the one its fine-tuning measured."""
    from transformers import BertModel

    other = sst["dir"] / "other_vocab"
    tok = build_tokenizer(other, vocab_size=300)  # a tokenizer of its own
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(other)
    other = str(other)
    assert AutoTokenizer.from_pretrained(other).get_vocab() != AutoTokenizer.from_pretrained(sst["teacher"]).get_vocab()
    run = distill_classifier.run(distill_args(sst, tmp_path, student=other, student_init="pretrained", max_steps=4, eval_steps=4))
    final, teacher_final = read_log(run.log_path)["final"], read_log(sst["teacher_run"].log_path)["final"]
    assert final["teacher/test_accuracy"] == teacher_final["fine-tuned/test_accuracy"]
    assert AutoTokenizer.from_pretrained(run.checkpoint_dir / "model").get_vocab() == AutoTokenizer.from_pretrained(other).get_vocab()


@pytest.fixture(scope="module")
def lms(tiny_teacher, tmp_path_factory):
    """Tiny GPT-NeoX teacher and student sharing a WordPiece tokenizer whose EOS is [SEP]."""
    d = tmp_path_factory.mktemp("sum")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.eos_token = "[SEP]"

    def neox(folder, hidden, layers, seed):
        config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                               intermediate_size=2 * hidden, max_position_embeddings=256, initializer_range=0.1)
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(d / folder)
        tok.save_pretrained(d / folder)
        return str(d / folder)

    from sitra.data import python_docs_paragraphs

    paragraphs = python_docs_paragraphs()
    for name, part in [("train", paragraphs[:60]), ("validation", paragraphs[500:506]), ("test", paragraphs[900:906])]:
        rows = [{"document": " ".join(p.split()[:30]), "summary": " ".join(p.split()[:4])} for p in part]
        (d / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"teacher": neox("teacher", 64, 2, 0), "student": neox("student", 32, 2, 1), "tokenizer": tok, "dir": d}


def summarizer_args(lms, storage, **kw):
    d = lms["dir"]
    values = dict(teacher=lms["teacher"], student=lms["student"], train_file=str(d / "train.jsonl"),
                  validation_file=str(d / "validation.jsonl"), test_file=str(d / "test.jsonl"), max_steps=16,
                  eval_steps=8, lr=3e-3, batch_size=8, max_prompt_length=48, max_new_tokens=6, device="cpu",
                  storage_directory=str(storage))
    values.update(kw)
    return distill_summarizer.DistillSummarizerArgs(**values)


def test_summarizer_distillation_lowers_the_loss_and_reports_rouge(lms, tmp_path):
    run = distill_summarizer.run(summarizer_args(lms, tmp_path, alpha=0.0))
    log = read_log(run.log_path)
    assert log["eval"]["eval_loss"][-1] < 0.8 * log["eval"]["eval_loss"][0]  # alpha 0: the summary-token KL alone
    final = log["final"]
    assert final["rouge_use_stemmer"] == 1.0
    for name in ("teacher", "student before KD", "student after KD"):
        for k in ("validation_rouge1", "validation_rouge2", "validation_rougeL", "test_rougeL"):
            assert 0 <= final[f"{name}/{k}"] <= 1
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    assert "use_stemmer=True" in card and f"{final['student after KD/test_rougeL']:.4f}" in card
    assert AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "model").config.num_hidden_layers == 2


def test_summarizer_from_teacher_layers_on_a_datasets_folder_resumes(lms, tmp_path):
    import datasets

    from sitra.errors import Interrupted

    d = lms["dir"]
    splits = {s: datasets.Dataset.from_list(tasks.read_rows(str(d / f"{s}.jsonl"), s)) for s in ("train", "validation")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    kw = dict(train_file=None, validation_file=None, test_file=None, dataset_dir=str(tmp_path / "ds"), student=None,
              student_init="teacher_layers", student_layers=1, max_steps=6, eval_steps=3, generation_examples=3)
    with pytest.raises(Interrupted):
        distill_summarizer.run(summarizer_args(lms, tmp_path, stop_after_steps=3, **kw))
    run = distill_summarizer.run(summarizer_args(lms, tmp_path, **kw))
    log = read_log(run.log_path)
    assert log["attrs"]["status"] == "complete" and log["train"]["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert "test_rouge1" not in str(list(log["final"])) and log["final"]["student after KD/validation_rougeL"] >= 0
    assert AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "model").config.num_hidden_layers == 1


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, before any compute

def bad_cases(sst, lms, tmp):
    d, f = sst["dir"], sst["files"]
    three = d / "three_labels"
    if not three.exists():
        BertForSequenceClassification(BertConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=32, num_labels=3)).save_pretrained(three)
    cls = ["--teacher", sst["teacher"], "--train_file", f["train"], "--validation_file", f["dev"], "--storage_directory", str(tmp)]
    summ = ["--teacher", lms["teacher"], "--student", lms["student"], "--train_file", str(lms["dir"] / "train.jsonl"),
            "--validation_file", str(lms["dir"] / "validation.jsonl"), "--storage_directory", str(tmp)]
    return {
        "label counts": ("distill_classifier", cls + ["--student", str(three)], f"--student {three}: 3 labels, the teacher has 2"),
        "same file": ("distill_classifier", cls + ["--test_file", f["dev"], "--student_init", "teacher_layers"],
                      f"--test_file {f['dev']}: the same file as --validation_file"),
        "missing column": ("distill_classifier", cls + ["--student_init", "teacher_layers", "--text_column", "review"],
                           f"--text_column review: --train_file {f['train']} has no such column (it has: label, sentence)"),
        "missing label": ("finetune_classifier", ["--model", sst["encoder"], "--train_file", f["train"], "--validation_file",
                                                  f["dev"], "--label_column", "stars", "--storage_directory", str(tmp)],
                          "--label_column stars: --train_file"),
        "template": ("distill_summarizer", summ + ["--prompt_template", "Summarize:"],
                     "--prompt_template 'Summarize:': must contain {document} exactly once"),
        "summary column": ("distill_summarizer", summ + ["--summary_column", "abstract"],
                           "--summary_column abstract: --train_file"),
        "not a classifier": ("distill_classifier", ["--teacher", sst["encoder"], *cls[2:]], "not a sequence classifier"),
    }


CASES = ["label counts", "same file", "missing column", "missing label", "template", "summary column", "not a classifier"]
JOBS = {"distill_classifier": distill_classifier, "finetune_classifier": finetune_classifier,
        "distill_summarizer": distill_summarizer}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(sst, lms, tmp_path, capsys, case):
    from sitra.cli import main

    job, flags, message = bad_cases(sst, lms, tmp_path)[case]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(JOBS[job].ARGS, JOBS[job].run, flags)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "checkpoints").exists()  # refused before any run folder was made


@pytest.mark.slow
@pytest.mark.subprocess
def test_bad_input_from_the_command_line(sst, lms, tmp_path):
    """The same through the job script in a fresh process: nothing else reaches stderr."""
    job, flags, message = bad_cases(sst, lms, tmp_path)["label counts"]
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *flags], capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]
