"""eval_lm with lm-eval-harness tasks: local task definitions over files the test writes, tiny
causal LMs, offline; lm-eval's numbers against the same metrics computed here from the model."""
import io
import json
import math
import random
import socket
import sys
from contextlib import redirect_stdout

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sitra import models
from sitra.errors import UsageError
from sitra.evaluate import lambada_accuracy
from sitra.recipes import eval_lm
from sitra.results import read_log

pytest.importorskip("lm_eval", reason="pip install 'sitra[lm_eval]' for the lm-eval-harness tasks")

WORDS = ("the a cat dog bird sat ran flew on in to over under mat park sky tree house red blue green small big "
         "old new sun moon and then").split()

CHOICE_TASK = """task: tiny_choice
tag: tiny_tasks
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

# as lm-eval's lambada_openai: a loglikelihood task's target carries its own leading space
LAST_WORD_TASK = """task: tiny_last_word
tag: tiny_tasks
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def word_tokenizer(folder):
    """A whitespace word-level tokenizer that adds no special tokens (as GPT-NeoX's does not)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                            pad_token="<eos>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def no_network():
    """Patches that record (and refuse) every attempt to open a network connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in an offline test")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    return mp, attempts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import build_neox

    d = tmp_path_factory.mktemp("lm_eval")
    tok = word_tokenizer(d / "tokenizer")
    rng = random.Random(0)
    choice_docs = []
    for _ in range(14):
        choices = [sentence(rng, rng.randint(1, 3)) for _ in range(rng.randint(2, 4))]
        choice_docs.append({"context": sentence(rng, rng.randint(3, 6)), "choices": choices,
                            "gold": rng.randrange(len(choices))})
    passages = [sentence(rng, rng.randint(4, 8)) for _ in range(12)]
    (d / "choice.jsonl").write_text("\n".join(json.dumps(r) for r in choice_docs) + "\n")
    (d / "last_word.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in passages) + "\n")
    (d / "lambada.txt").write_text("\n".join(passages) + "\n")
    (d / "eval.txt").write_text("\n".join(sentence(rng, 12) for _ in range(20)) + "\n")
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=d / "choice.jsonl", cache=d / "datasets"))
    (tasks / "last_word.yaml").write_text(LAST_WORD_TASK.format(data=d / "last_word.jsonl", cache=d / "datasets"))
    lms = {"big": build_neox(d / "big", tok, 32, 2, 0, init=0.3), "small": build_neox(d / "small", tok, 16, 1, 1, init=0.3)}
    return {"dir": d, "tasks": str(tasks), "models": lms, "choice_docs": choice_docs, "passages": passages}


def run_eval(setup, storage, **kw):
    d = setup["dir"]
    values = dict(models=list(setup["models"].values()), eval_file=str(d / "eval.txt"), max_seq_length=16,
                  storage_directory=str(storage), device="cpu", lm_eval_include=setup["tasks"])
    return eval_lm.run(eval_lm.EvalLMArgs(**(values | kw)))


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    """Both models, both tasks, every example, with every network connection refused."""
    storage = tmp_path_factory.mktemp("eval_storage")
    mp, attempts = no_network()
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            table = run_eval(setup, storage, lm_eval_tasks="tiny_choice,tiny_last_word",
                             lambada_file=str(setup["dir"] / "lambada.txt"))
    finally:
        mp.undo()
    return {"table": table, "printed": out.getvalue(), "log": storage / "eval_results" / "eval_lm.h5", "attempts": attempts}


@torch.inference_mode()
def continuation(model, tok, context: str, cont: str) -> tuple[float, bool]:
    """Log-probability of `cont`'s tokens after `context`'s, and whether each is the argmax."""
    ctx, target = tok(context)["input_ids"], tok(cont)["input_ids"]
    logp = model(torch.tensor([ctx + target])).logits[0].float().log_softmax(-1)
    rows = logp[len(ctx) - 1: len(ctx) + len(target) - 1]
    return float(rows[torch.arange(len(target)), target].sum()), rows.argmax(-1).tolist() == target


def own_choice_metrics(model, tok, docs):
    acc, acc_norm = [], []
    for doc in docs:
        lls = [continuation(model, tok, doc["context"], c)[0] for c in doc["choices"]]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["gold"]))
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]  # lm-eval's acc_norm: per character
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == doc["gold"]))
    return acc, acc_norm


def mean_and_stderr(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def test_lm_eval_metrics_equal_an_independent_computation(setup, full_run):
    tok = AutoTokenizer.from_pretrained(setup["models"]["big"])
    seen = set()
    for name, folder in setup["models"].items():
        row = full_run["table"][name]
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        acc, acc_norm = own_choice_metrics(model, tok, setup["choice_docs"])
        for metric, values in (("acc", acc), ("acc_norm", acc_norm)):
            mean, stderr = mean_and_stderr(values)
            assert row[f"tiny_choice/{metric}"] == pytest.approx(mean, abs=1e-9), (name, metric)
            assert row[f"tiny_choice/{metric}_stderr"] == pytest.approx(stderr, rel=1e-6), (name, metric)
        assert row["tiny_choice/examples"] == len(setup["choice_docs"])
        seen.add((row["tiny_choice/acc"], row["tiny_choice/acc_norm"]))

        scored = [continuation(model, tok, *p.rsplit(" ", 1)) for p in setup["passages"]]
        ll = [s[0] for s in scored]
        assert row["tiny_last_word/perplexity"] == pytest.approx(math.exp(-sum(ll) / len(ll)), rel=1e-4)
        assert row["tiny_last_word/perplexity_stderr"] > 0
        greedy = sum(s[1] for s in scored) / len(scored)
        assert row["tiny_last_word/acc"] == pytest.approx(greedy, abs=1e-9)
        # the same passages through eval_lm's own LAMBADA metric: the same definition, the same number
        assert row["lambada_accuracy"] == pytest.approx(row["tiny_last_word/acc"], abs=1e-9)
        assert row["lambada_accuracy"] == pytest.approx(lambada_accuracy(model, tok, setup["passages"], "cpu"), abs=1e-9)
    assert len(seen) == 2, "the two models should score differently, or the check cannot tell them apart"


def test_table_and_log_have_lm_eval_rows_for_every_model(setup, full_run):
    names = list(setup["models"])
    lines = full_run["printed"].splitlines()
    header = next(line for line in lines if line.startswith("| Metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Metric", *names]
    expected = ["perplexity", "accuracy", "lambada_accuracy", "tiny_choice/acc", "tiny_choice/acc_stderr",
                "tiny_choice/acc_norm", "tiny_choice/acc_norm_stderr", "tiny_choice/examples",
                "tiny_last_word/perplexity", "tiny_last_word/perplexity_stderr", "tiny_last_word/acc",
                "tiny_last_word/acc_stderr", "tiny_last_word/examples"]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
            if len(cells) == len(names) + 1}
    for metric in expected:
        assert metric in rows and "-" not in rows[metric], metric
    log = read_log(full_run["log"])
    assert log["attrs"]["status"] == "complete" and log["attrs"]["lm_eval_version"]
    for name in names:
        for metric in expected:
            assert log["final"][f"{name}/{metric}"] == pytest.approx(full_run["table"][name][metric])


def test_nothing_reached_the_network(full_run):
    assert full_run["attempts"] == []


def test_limit_scores_the_first_examples_of_each_task_of_a_tag(setup, tmp_path):
    table = run_eval(setup, tmp_path, models=[setup["models"]["small"]], lm_eval_tasks="tiny_tasks", lm_eval_limit=5)
    row = table["small"]
    assert row["tiny_last_word/examples"] == 5
    tok = AutoTokenizer.from_pretrained(setup["models"]["small"])
    model = AutoModelForCausalLM.from_pretrained(setup["models"]["small"]).eval()
    acc, _ = own_choice_metrics(model, tok, setup["choice_docs"][:5])
    assert row["tiny_choice/examples"] == 5
    assert row["tiny_choice/acc"] == pytest.approx(sum(acc) / 5, abs=1e-9)


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the lm-eval tasks were checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.slow  # an unknown name needs lm-eval's full task index: about 6 s of CPU
def test_unknown_task_is_one_line_naming_similar_tasks_before_any_model_loads(setup, tmp_path, no_model_loads):
    with pytest.raises(UsageError) as e:
        run_eval(setup, tmp_path, lm_eval_tasks="tiny_choice,tiny_last_wrd")
    message = str(e.value)
    assert message.startswith("--lm_eval_tasks tiny_last_wrd: no such lm-eval task") and "\n" not in message
    assert "tiny_last_word" in message.split("similar:")[1]


@pytest.mark.slow  # lm-eval's full task index: about 6 s of CPU
def test_task_whose_data_is_on_an_unreachable_hub_is_one_line(setup, tmp_path, no_model_loads):
    mp, attempts = no_network()
    try:
        run_eval(setup, tmp_path, lm_eval_tasks="hellaswag", lm_eval_include=None)
    except UsageError as e:
        message = str(e)
    else:
        pytest.skip("hellaswag loaded from a local datasets cache: cannot test the failure")
    finally:
        mp.undo()
    assert message.startswith("--lm_eval_tasks hellaswag: cannot load the task's data") and "\n" not in message
    assert "--lm_eval_include" in message and attempts == []


def test_missing_package_and_folder_are_one_line_errors(setup, tmp_path, monkeypatch, no_model_loads):
    with pytest.raises(UsageError, match=r"^--lm_eval_include .*nowhere: no such folder"):
        run_eval(setup, tmp_path, lm_eval_tasks="tiny_choice", lm_eval_include=str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match=r"^--lm_eval_limit 0: must be at least 1$"):
        run_eval(setup, tmp_path, lm_eval_tasks="tiny_choice", lm_eval_limit=0)
    with pytest.raises(UsageError, match=r"^--lm_eval_tasks: name at least one"):
        run_eval(setup, tmp_path, lm_eval_tasks=" , ")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(UsageError) as e:
        run_eval(setup, tmp_path, lm_eval_tasks="tiny_choice")
    assert str(e.value) == "--lm_eval_tasks needs lm-eval-harness: pip install 'sitra[lm_eval]'"
