"""Causal-LM distillation on tiny GPT-NeoX models: packing, warm starts, the job, eval_lm."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sitra import data
from sitra.data import python_docs_paragraphs
from sitra.evaluate import evaluate_lm, lambada_accuracy, sliding_windows
from sitra.models.causal import student_from_teacher_layers, teacher_layer_indices
from sitra.recipes import distill_pythia, eval_lm
from sitra.results import read_log

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lms(tiny_teacher, tmp_path_factory):
    from conftest import build_neox

    d = tmp_path_factory.mktemp("lm")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    paragraphs = python_docs_paragraphs()
    (d / "train.txt").write_text("\n".join(paragraphs[:200]))
    (d / "eval.txt").write_text("\n".join(paragraphs[1000:1040]))
    # a teacher with peaked attention, so its relations are worth learning
    return {"teacher": build_neox(d / "teacher", tok, 64, 4, 0, init=0.1), "student": build_neox(d / "student", tok, 32, 2, 1),
            "dir": d}


def distill_args(lms, storage, **kw):
    d = lms["dir"]
    values = dict(teacher=lms["teacher"], student=lms["student"], train_file=str(d / "train.txt"),
                  eval_file=str(d / "eval.txt"), max_seq_length=48, batch_size=8, max_steps=30, eval_steps=15, lr=3e-3,
                  device="cpu", storage_directory=str(storage))
    values.update(kw)
    return distill_pythia.DistillLMArgs(**values)


def test_packing_keeps_every_token_once():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11], [12]]
    blocks = data.pack(docs, 4, eos_id=0)
    assert all(len(b) == 4 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 4
    assert [t for b in blocks for t in b] == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 11, 0, 12, 0]


def test_causal_collator_and_shift():
    batch = data.CausalCollator(pad_id=9)([[1, 2, 3], [4, 5]])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, 5, -100]]
    scored, nxt = data.shifted(batch)
    assert scored.tolist() == [[True, True], [True, False]] and nxt.tolist() == [[2, 3], [5, 9]]


def test_teacher_layers_warm_start_copies_exactly(lms):
    teacher = AutoModelForCausalLM.from_pretrained(lms["teacher"])
    assert teacher_layer_indices(4, 2) == [0, 2] and teacher_layer_indices(12, 6) == [0, 2, 4, 6, 8, 10]
    student = student_from_teacher_layers(teacher, 2)
    assert student.config.num_hidden_layers == 2
    for new, old in enumerate([0, 2]):
        for (n1, a), (n2, b) in zip(student.gpt_neox.layers[new].named_parameters(),
                                    teacher.gpt_neox.layers[old].named_parameters()):
            assert n1 == n2 and torch.equal(a, b)
    assert torch.equal(student.gpt_neox.embed_in.weight, teacher.gpt_neox.embed_in.weight)
    assert torch.equal(student.embed_out.weight if hasattr(student, "embed_out") else student.lm_head.weight,
                       teacher.get_output_embeddings().weight)


def test_distillation_lowers_the_kl_and_writes_a_model_card(lms, tmp_path):
    run = distill_pythia.run(distill_args(lms, tmp_path, alpha=0.0, packing=True, hidden_weight=1.0))
    log = read_log(run.log_path)
    evals = log["eval"]["eval_loss"]  # alpha 0: the held-out loss is the KL alone (plus the hidden term)
    assert evals[-1] < 0.8 * evals[0]
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    final = log["final"]
    for name in ("teacher", "student base", "distilled"):
        assert f"{final[f'{name}/perplexity']:.4f}" in card
    assert "python jobs/distill_pythia.py" in card and "--packing" in card and "forward_kl" in card
    reloaded = AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "model")
    assert reloaded.config.num_hidden_layers == 2


@pytest.mark.parametrize("kw", [dict(loss="reverse_kl", student_init="teacher_layers"),
                                dict(loss="jsd", jsd_beta=0.3, student_init="random", student_layers=1),
                                dict(loss="mse", hidden_loss="cosine", hidden_weight=0.5, layer_map="0:0,2:4", loss_chunks=1)],
                         ids=["reverse_kl", "jsd", "mse+cosine"])
def test_loss_menu_choices_train(lms, tmp_path, kw):
    run = distill_pythia.run(distill_args(lms, tmp_path, max_steps=10, eval_steps=10, **kw))
    evals = read_log(run.log_path)["eval"]["eval_loss"]
    assert evals[-1] < evals[0]


def test_sliding_windows_score_each_token_once():
    stream = list(range(50))
    windows = sliding_windows(stream, 16, 5)
    scored = [t for w, skip in windows for t in w[max(skip, 1):]]
    assert scored == list(range(1, 50))
    assert all(len(w) <= 16 for w, _ in windows)


def test_eval_lm_perplexity_against_the_model_loss(lms):
    model = AutoModelForCausalLM.from_pretrained(lms["teacher"]).eval()
    ids = list(range(5, 45))
    out = evaluate_lm(model, sliding_windows(ids, 64, 32), "cpu")
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert out["tokens"] == 39 and out["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_lambada_accuracy_on_a_model_that_knows_the_answer(lms):
    tok = AutoTokenizer.from_pretrained(lms["teacher"])
    passages = ["the list sort method", "a class is an object"]
    known = [tok(p, add_special_tokens=False)["input_ids"] for p in passages]

    class Oracle(torch.nn.Module):  # predicts the true next token for the first passage only
        def forward(self, input_ids):
            logits = torch.zeros(1, input_ids.shape[1], len(tok))
            if input_ids[0].tolist() == known[0]:
                for i, t in enumerate(known[0][1:]):
                    logits[0, i, t] = 1
            return type("Out", (), {"logits": logits})

    assert lambada_accuracy(Oracle(), tok, passages, "cpu") == 0.5


def test_eval_lm_job(lms, tmp_path, capsys):
    d = lms["dir"]
    table = eval_lm.run(eval_lm.EvalLMArgs(models=[lms["teacher"], lms["student"]], eval_file=str(d / "eval.txt"),
                                           max_seq_length=48, storage_directory=str(tmp_path), device="cpu"))
    assert set(table) == {"teacher", "student"}
    assert table["teacher"]["tokens"] == table["student"]["tokens"] > 0
    assert read_log(tmp_path / "eval_results" / "eval_lm.h5")["attrs"]["status"] == "complete"


BAD = [
    (["--loss", "kl"], "invalid choice: 'kl'"),
    (["--student_init", "teacher_layers", "--student_layers", "2", "--hidden_weight", "1", "--layer_map", "0:1,3:2"],
     "--layer_map 0:1,3:2: 3:2 is out of range"),
    (["--alpha", "1.5"], "--alpha 1.5: must be in [0, 1]"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[m for _, m in BAD])
@pytest.mark.slow
@pytest.mark.subprocess
def test_bad_input_is_one_line_exit_2(lms, tmp_path, flags, message):
    d = lms["dir"]
    base = ["--teacher", lms["teacher"], "--student", lms["student"], "--train_file", str(d / "train.txt"),
            "--storage_directory", str(tmp_path)]
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "distill_pythia.py"), *base, *flags],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]


def test_minilm_relation_terms_train(lms, tmp_path):
    run = distill_pythia.run(distill_args(lms, tmp_path, max_steps=20, eval_steps=20, attention_weight=5.0,
                                          value_weight=5.0, relation_layers="0:1,1:3"))  # widths 32 vs 64
    log = read_log(run.log_path)
    assert {"attention_relation_kl", "value_relation_kl"} <= set(log["eval"])
    for term in ("attention_relation_kl", "value_relation_kl"):
        assert log["eval"][term][-1] < log["eval"][term][0], term


def test_qkv_hooks_match_the_attention_inputs(lms):
    from sitra.models.capture import qkv_hooks

    model = AutoModelForCausalLM.from_pretrained(lms["teacher"]).eval()
    store = {}
    handles = qkv_hooks(model, [1], store)
    ids = torch.randint(5, 300, (2, 7))
    with torch.no_grad():
        hidden = model.gpt_neox(input_ids=ids, output_hidden_states=True).hidden_states[1]
        fused = model.gpt_neox.layers[1].attention.query_key_value(model.gpt_neox.layers[1].input_layernorm(hidden))
    for h in handles:
        h.remove()
    d = model.config.hidden_size // model.config.num_attention_heads
    per_head = fused.view(2, 7, model.config.num_attention_heads, 3 * d)
    assert torch.equal(store[1]["q"], per_head[..., :d].reshape(2, 7, -1))
    assert torch.equal(store[1]["v"], per_head[..., 2 * d:].reshape(2, 7, -1))


@pytest.mark.parametrize("ce_weight", [1.0, 0.5])
def test_ce_only_runs_no_teacher_and_its_loss_is_the_next_token_ce(lms, tmp_path, capsys, ce_weight):
    args = distill_args(lms, tmp_path, student_init="teacher_layers", student_layers=2, kd_weight=0.0, ce_weight=ce_weight,
                        max_steps=6, eval_steps=3, lr=1e-3)
    run = distill_pythia.run(args)
    log = read_log(run.log_path)
    assert "runs no forwards" in capsys.readouterr().out
    assert not any(log["train"]["teacher_forwards"]) and log["attrs"]["teacher_forwards"] == 0
    assert not any(k.startswith("teacher/") for k in log["final"])
    # the held-out loss is ce_weight x the student's next-token CE: the mean over held-out batches of Hugging Face's own loss
    student = AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(lms["teacher"])
    tok.pad_token = tok.pad_token or tok.eos_token
    _, eval_ids = distill_pythia.load_corpus(args, tok)
    with torch.no_grad():
        ce = [float(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss)
              for b in data.Batches(eval_ids, args.batch_size, data.CausalCollator(tok.pad_token_id), shuffle=False).epoch(0)]
    best = int(log["final"]["best_step"])
    assert log["eval"]["eval_loss"][list(log["eval"]["step"]).index(best)] == pytest.approx(ce_weight * sum(ce) / len(ce), rel=1e-5)


def test_a_narrow_random_student_has_the_shape_its_flags_give(lms, tmp_path):
    from transformers import AutoConfig

    run = distill_pythia.run(distill_args(lms, tmp_path, student_init="random", student_layers=3, student_heads=2,
                                          student_intermediate_size=40, max_steps=2, eval_steps=2))
    config = AutoConfig.from_pretrained(run.checkpoint_dir / "model")
    teacher = AutoConfig.from_pretrained(lms["teacher"])
    head = teacher.hidden_size // teacher.num_attention_heads
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size, config.intermediate_size) == \
        (3, 2, 2 * head, 40)
    before = AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "student_before")
    assert before.config.hidden_size == 2 * head  # the start is saved at the same shape


def test_student_shape_flags_against_grouped_attention():
    from transformers import LlamaConfig

    from sitra.errors import UsageError
    from sitra.models.causal import check_student_shape, student_config

    teacher = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          intermediate_size=1536, num_hidden_layers=30)
    with pytest.raises(UsageError, match=r"--student_heads 4: must be a multiple of 3"):
        check_student_shape(teacher, 4, None)
    config = student_config(teacher, 30, 6, 1000)
    assert (config.num_attention_heads, config.num_key_value_heads, config.hidden_size, config.head_dim,
            config.intermediate_size, teacher.hidden_size) == (6, 2, 384, 64, 1000, 576)


@pytest.mark.parametrize("kw,message", [
    (dict(student_heads=2), "--student_heads 2: shapes a random student; add --student_init random"),
    (dict(kd_weight=0.0, ce_weight=1.0, on_policy_fraction=0.5), "with --kd_weight 0: on-policy batches"),
], ids=["heads-without-random", "on-policy-without-kd"])
def test_student_flags_refused_before_any_model_loads(lms, tmp_path, kw, message):
    from sitra.errors import UsageError

    with pytest.raises(UsageError, match=message):
        distill_pythia.check(distill_args(lms, tmp_path, **kw))


def test_the_learning_rate_default_follows_the_students_start(lms, tmp_path):
    """1e-4 for a pretrained student (a warm start), LR_FROM_SCRATCH for one cut from the teacher
    or random; a given --lr is kept, and the card and log record the rate used."""
    assert distill_args(lms, tmp_path, lr=None).lr == 1e-4
    for init in ("teacher_layers", "random"):
        assert distill_args(lms, tmp_path, lr=None, student_init=init).lr == distill_pythia.LR_FROM_SCRATCH == 1e-3
    assert distill_args(lms, tmp_path, lr=3e-4, student_init="random").lr == 3e-4
    run = distill_pythia.run(distill_args(lms, tmp_path, lr=None, student_init="teacher_layers", max_steps=1, eval_steps=1))
    assert read_log(run.log_path)["config"]["lr"] == 1e-3
    assert "lr 0.001," in (run.checkpoint_dir / "model" / "README.md").read_text()
