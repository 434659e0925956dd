"""The causal-LM section of benchmarks/quality.py at toy scale: a tiny Llama teacher and a few
paragraphs of text, every job run in this process; the table checked against the logs, the
saved models and independent formulas."""
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality_causal as qc
from quality_common import Inputs, Runner

ROWS = [("teacher", "–"), ("(records)", "record_teacher, top-8"), ("(records)", "record_teacher, 8 draws")] + [
    (s, o) for s in ("cut", "narrow") for o in ("before training", "next-token CE only", "forward KL",
                                                "KL + CE (0.5 each)", "forward KL, top-k records",
                                                "forward KL, sampled records")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 4-layer Llama teacher with a 400-id WordPiece tokenizer, text in WikiText-2's layout,
    and the section's markdown after one toy run."""
    from conftest import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from sitra.data import python_docs_paragraphs

    d = tmp_path_factory.mktemp("causal")
    tokenizer = build_tokenizer(d / "teacher")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d / "teacher")
    paragraphs = python_docs_paragraphs()
    (d / "text").mkdir()
    (d / "text" / "valid.txt").write_text("\n".join(paragraphs[:120]))
    (d / "text" / "test.txt").write_text("\n".join(paragraphs[1000:1060]))
    inputs = Inputs(scale="toy", encoder_teacher="", sst2=d, causal_teacher=str(d / "teacher"), text=d / "text")
    runner = Runner(d / "work", in_process=True)
    block = qc.section("toy", inputs, runner)
    return {"block": block, "runner": runner, "dir": d, "teacher": str(d / "teacher")}


def table_rows(block: str) -> list[list[str]]:
    """The body of the first markdown table in `block`."""
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:end] if line.startswith("| ")][1:]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_every_row_is_there(toy):
    rows = table_rows(toy["block"])
    assert [(r[0], r[1]) for r in rows] == ROWS


def test_tokens_seen_are_steps_times_batch_times_length(toy):
    """4 steps x 4 blocks x 32 tokens at toy scale, less at most one block's shortfall (packing's
    last block is short; where the log counts tokens, a run that draws it reports them)."""
    sc = qc.SCALES["toy"]
    assert (sc.steps, sc.batch, sc.seq) == (4, 4, 32)
    for r in table_rows(toy["block"])[3:]:
        if r[1] == "before training":
            assert number(r[3]) == 0
        else:
            assert 4 * 4 * 32 - 32 < number(r[3]) <= 4 * 4 * 32


def test_perplexity_is_exp_of_the_mean_loss_on_the_test_piece(toy):
    """The teacher's and a distilled student's perplexity, recomputed from their saved weights
    as exp(mean next-token cross-entropy) over the same windows eval_lm scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sitra import data
    from sitra.evaluate import sliding_windows

    rows = {(r[0], r[1]): r for r in table_rows(toy["block"])}
    work = toy["dir"] / "work"
    tokenizer = AutoTokenizer.from_pretrained(toy["teacher"])
    lines = (work / "causal_text" / "test.txt").read_text().splitlines()
    stream = [t for block in data.causal_texts(lines, tokenizer, 32, packing=True) for t in block]
    windows = sliding_windows(stream, 32, 16)
    for key, folder in ((("teacher", "–"), toy["teacher"]),
                        (("cut", "forward KL"), work / "checkpoints" / "causal_cut_kl" / "model"),
                        (("narrow", "forward KL, top-k records"), work / "checkpoints" / "causal_narrow_rec" / "model")):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        nll = count = 0
        with torch.no_grad():
            for ids, skip in windows:
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
                targets = torch.tensor(ids[1:])
                keep = slice(max(skip, 1) - 1, None)
                nll += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
                count += len(targets[keep])
        assert number(rows[key][7]) == pytest.approx(math.exp(nll / count), rel=2e-3)


def test_records_and_ce_rows_never_ran_the_teacher_and_kd_rows_did(toy):
    from sitra.results import read_log

    work = toy["dir"] / "work"
    for student in ("cut", "narrow"):
        for key, forwards in (("kl", 1), ("klce", 1), ("ce", 0), ("rec", 0), ("smp", 0)):
            log = read_log(work / "eval_results" / f"causal_{student}_{key}.h5")
            assert set(log["train"]["teacher_forwards"]) == {forwards}
            assert len(log["train"]["step"]) == 4


def test_students_are_half_the_teacher(toy):
    """The cut student keeps every 2nd layer; the narrow one has every layer at a multiple of the
    teacher's query heads per key-value head (3 of 6 here) and within 5% of the cut student's
    parameters; both start where the table says."""
    from transformers import AutoConfig

    rows = {(r[0], r[1]): r for r in table_rows(toy["block"])}
    work = toy["dir"] / "work"
    cut = AutoConfig.from_pretrained(work / "checkpoints" / "causal_cut_kl" / "model")
    narrow = AutoConfig.from_pretrained(work / "checkpoints" / "causal_narrow_kl" / "model")
    assert (cut.num_hidden_layers, cut.hidden_size) == (2, 48)
    assert (narrow.num_hidden_layers, narrow.hidden_size, narrow.num_attention_heads, narrow.num_key_value_heads) == (4, 24, 3, 1)
    cut_params, narrow_params = number(rows[("cut", "forward KL")][2]), number(rows[("narrow", "forward KL")][2])
    assert narrow_params == pytest.approx(cut_params, rel=0.05)
    assert number(rows[("cut", "before training")][2]) == cut_params


def test_every_row_of_a_student_starts_from_the_same_weights(toy):
    """The records rows rebuild their start without the teacher (the cut one from the live run's
    saved start, the random one from the records' config and the same seed): it must be the same."""
    from safetensors.torch import load_file

    work = toy["dir"] / "work" / "checkpoints"
    for student in ("cut", "narrow"):
        first = load_file(work / f"causal_{student}_kl" / "student_before" / "model.safetensors")
        for key in ("klce", "ce", "rec", "smp"):
            other = load_file(work / f"causal_{student}_{key}" / "student_before" / "model.safetensors")
            assert first.keys() == other.keys() and all(torch.equal(first[k], other[k]) for k in first), (student, key)


def test_the_commands_are_listed(toy):
    block = toy["block"]
    assert block.count("python jobs/distill_pythia.py") == 10 + 1 + 1  # and one more learning rate and temperature
    assert block.count("python jobs/record_teacher.py") == 2 and block.count("python jobs/eval_lm.py") == 1
    assert block.count("--top_k 8 --teacher_logits_sampling random") == 1 and block.count("--top_k 8 --teacher_logits_sampling top_k") == 1
    assert block.count("--student_heads 3 --student_intermediate_size") == 5


@pytest.mark.parametrize("title,flag,values,runs", [
    ("Learning rate (cut student, forward KL from the sampled records, the same budget)", "lr", ["0.003", "0.01"],
     ["causal_cut_smp", "causal_cut_smp_lr0.01"]),
    ("Temperature (cut student, forward KL to the live teacher, the same budget)", "temperature", ["1 (default)", "2"],
     ["causal_cut_kl", "causal_cut_kl_T2"])], ids=["lr", "temperature"])
def test_the_sweeps_compare_the_runs_own_held_out_perplexity(toy, title, flag, values, runs):
    from quality_common import final_metrics

    from sitra.results import read_log

    lines = toy["block"].splitlines()
    rows = table_rows("\n".join(lines[lines.index(f"### {title}"):]))
    work = toy["dir"] / "work"
    assert [r[0] for r in rows] == values
    for r, run in zip(rows, runs):
        assert number(r[1]) == pytest.approx(final_metrics(work, run)["distilled/perplexity"], rel=1e-3)
        assert read_log(work / "eval_results" / f"{run}.h5")["config"][flag] == float(r[0].split()[0])
    best = min(rows, key=lambda r: number(r[1]))[0].split()[0]
    verdict = next(line for line in lines[lines.index(f"### {title}"):] if line.startswith(("best", "distill_pythia's")))
    assert f"`--{flag} {best}`" in verdict


def test_narrow_shape_matches_the_parameter_count_of_smollm2_halved():
    """At SmolLM2-135M's shape: 6 heads of 64 (2 key-value heads), 30 layers, and a feed-forward
    width that lands within 1% of the 15-layer cut."""
    from transformers import LlamaConfig

    from sitra.models.causal import student_config

    teacher = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    heads, width = qc.narrow_shape(teacher, 15)
    config = student_config(teacher, 30, heads, width)
    cut = LlamaConfig(**{**teacher.to_dict(), "num_hidden_layers": 15})
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (384, 6, 2, 30)
    assert qc.count_parameters(config) == pytest.approx(qc.count_parameters(cut), rel=0.01)
    assert qc.count_parameters(cut) == 28_311_552 + 15 * (576 * 1536 + 3 * 576 * 1536 + 2 * 576) + 576


def test_text_parts_are_disjoint_and_big_enough(toy):
    """val.txt and train.txt are consecutive lines of valid.txt (no line in both), train.txt fills
    every step's blocks and one more batch, test.txt is the start of test.txt."""
    from transformers import AutoTokenizer

    d, sc = toy["dir"], qc.SCALES["toy"]
    parts = {k: (d / "work" / "causal_text" / f"{k}.txt").read_text().splitlines() for k in ("val", "train", "test")}
    valid = [line for line in (d / "text" / "valid.txt").read_text().splitlines() if line.strip()]
    assert parts["val"] + parts["train"] == valid[:len(parts["val"]) + len(parts["train"])]
    assert parts["test"] == (d / "text" / "test.txt").read_text().splitlines()[:len(parts["test"])]
    tokenizer = AutoTokenizer.from_pretrained(toy["teacher"])
    def tokens(lines):  # as packing counts them: an EOS after each line
        return sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) + 1 for line in lines)

    need = (sc.steps + 1) * sc.batch * sc.seq
    assert tokens(parts["train"][:-1]) < need <= tokens(parts["train"])  # the fewest lines that fill the steps
    assert tokens(parts["test"][:-1]) < sc.test_tokens <= tokens(parts["test"])
    assert tokens(parts["val"][:-1]) < sc.val_tokens <= tokens(parts["val"])


def test_a_teacher_the_students_cannot_halve_is_refused_in_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sitra.errors import UsageError

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32)).save_pretrained(tmp_path / "one")
    inputs = Inputs(scale="toy", encoder_teacher="", sst2=tmp_path, causal_teacher=str(tmp_path / "one"), text=tmp_path)
    with pytest.raises(UsageError, match=r"^--causal_teacher .*1 layers and 2 heads; the students need at least 2") as e:
        qc.check(inputs)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="^--causal_teacher"):
        qc.check(Inputs(scale="toy", encoder_teacher="", sst2=tmp_path, causal_teacher=str(tmp_path), text=tmp_path))


@pytest.mark.parametrize("counted", [False, True])
def test_run_numbers_from_a_log(tmp_path, counted):
    """Training seconds are the sum of each step's tokens / tokens-per-second; tokens seen are the
    steps' counts where the log has them, else steps x batch x accumulation x block length."""
    from sitra.results import RunLog

    config = {"batch_size": 2, "gradient_accumulation_steps": 3, "max_seq_length": 10}
    with RunLog(tmp_path / "eval_results" / "r.h5", "distill_pythia", "r", config) as log:
        for step, (n, rate) in enumerate([(60, 30.0), (55, 11.0), (60, 20.0)], start=1):
            log.train(step, tokens_per_s=rate, **({"tokens": n} if counted else {}))
        log.complete({"best_step": 2})
    numbers = qc.run_numbers(tmp_path, "r")
    tokens = 175 if counted else 3 * 2 * 3 * 10
    seconds = 60 / 30 + 55 / 11 + 60 / 20 if counted else 60 / 30 + 60 / 11 + 60 / 20
    assert numbers == {"steps": 3, "tokens": tokens, "train_s": pytest.approx(seconds),
                       "tokens_per_s": pytest.approx(tokens / seconds), "best_step": 2}


def test_a_rerun_resumes_and_reports_the_same_table(toy):
    """Rerun on the same workdir: every job finds its run complete, and the table (wall seconds
    included: those of the runs that did the work) is the same."""
    inputs = Inputs(scale="toy", encoder_teacher="", sst2=toy["dir"], causal_teacher=toy["teacher"], text=toy["dir"] / "text")
    again = qc.section("toy", inputs, Runner(toy["dir"] / "work", in_process=True))
    assert table_rows(again) == table_rows(toy["block"])
