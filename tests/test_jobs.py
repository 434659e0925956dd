"""The block-retraining jobs end to end: retrain, build, evaluate, and bad input."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from sitra import models
from sitra.cli import main
from sitra.errors import UsageError
from sitra.recipes import build_retrained, eval_retrained, retrain_single_block
from sitra.recipes.retrain_single_block import BlockArgs
from sitra.results import read_log

ROOT = Path(__file__).resolve().parents[1]


def block_args(teacher, text_files, storage, **kw):
    values = dict(teacher=teacher, train_file=str(text_files / "train.txt"), eval_file=str(text_files / "eval.txt"),
                  storage_directory=str(storage), block=2, block_heads=2, block_d_k=8, block_dropout=0.0,
                  max_seq_length=32, batch_size=8, max_steps=40, eval_steps=20, lr=1e-2, device="cpu")
    values.update(kw)
    return BlockArgs(**values)


MODES = [dict(criterion="MSE"), dict(criterion="L1"),
         dict(criterion="CrossEntropy", loss_on_logits=True, temperature=2.0), dict(criterion="MSE", loss_on_logits=True),
         dict(criterion="CrossEntropy", loss_on_scores=True), dict(criterion="L1", loss_on_scores=True)]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_retrain_block_learns_and_logs(tiny_teacher, text_files, tmp_path, mode):
    run = retrain_single_block.run(block_args(tiny_teacher, text_files, tmp_path, **mode))
    log = read_log(run.log_path)
    loss = log["train"]["loss"]
    assert len(loss) == 40 and log["train"]["step"].tolist() == list(range(1, 41))
    evals = log["eval"]
    assert evals["step"].tolist() == [0, 20, 40]  # the untrained start, then every 20 steps
    if mode["criterion"] == "CrossEntropy":  # includes the teacher's entropy, which cannot fall
        assert evals["eval_loss"][-1] < evals["eval_loss"][0] - 1e-3
    else:
        assert evals["eval_loss"][-1] < 0.8 * evals["eval_loss"][0], "the held-out block loss did not fall"
    if not mode.get("loss_on_scores"):
        assert evals["block_mse"][-1] < 0.8 * evals["block_mse"][0]
    assert log["attrs"]["status"] == "complete" and log["attrs"]["sitra_version"]
    assert log["config"]["criterion"] == mode["criterion"] and log["config"]["block"] == 2
    assert set(log["train"]) >= {"lr", "grad_norm", "tokens_per_s", "block_mse", "block_cosine"}
    assert log["final"]["eval_loss"] == min(log["eval"]["eval_loss"])  # the best checkpoint was kept
    assert (run.checkpoint_dir / "best.safetensors").exists() and (run.checkpoint_dir / "latest.pt").exists()
    assert log["attrs"]["wall_time_s"] > 0


def test_teacher_forward_is_frozen_and_untouched(tiny_teacher, text_files, tmp_path):
    before = {k: v.clone() for k, v in models.load_model(tiny_teacher).state_dict().items()}
    run = retrain_single_block.run(block_args(tiny_teacher, text_files, tmp_path, max_steps=3))
    after = models.load_model(tiny_teacher).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    from safetensors.torch import load_file

    assert set(load_file(str(run.checkpoint_dir / "best.safetensors"))) == {
        f"{p}.{w}" for p in ("query", "key", "value", "output") for w in ("weight", "bias")}


def test_build_and_evaluate_retrained(tiny_teacher, text_files, tmp_path, capsys):
    for block, heads in ((0, 1), (2, 4)):
        retrain_single_block.run(block_args(tiny_teacher, text_files, tmp_path, block=block, block_heads=heads, max_steps=10))
    out = build_retrained.run(build_retrained.BuildArgs(teacher=tiny_teacher, storage_directory=str(tmp_path)))
    assert "reload check: identical" in capsys.readouterr().out
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert model.config.attn_layout == {"0": [1, 8, 0.0], "2": [4, 8, 0.0]}
    assert type(models.encoder_layers(model)[2].attention.self).__name__ == "StudentSelfAttention"

    metrics = eval_retrained.run(eval_retrained.EvalArgs(
        teacher=tiny_teacher, storage_directory=str(tmp_path), train_file=str(text_files / "train.txt"),
        eval_file=str(text_files / "eval.txt"), max_seq_length=32, batch_size=8, device="cpu"))
    printed = capsys.readouterr().out
    assert "| Metric" in printed and "Gap" in printed and "mlm_accuracy" in printed
    assert metrics["teacher"]["hidden_cosine"] == pytest.approx(1.0) and metrics["teacher"]["hidden_mse"] == 0
    assert metrics["model"]["hidden_cosine"] < 1.0
    assert metrics["model"]["parameters"] < metrics["teacher"]["parameters"]

    # the teacher's MLM numbers against a direct computation on the same fixed masks
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_teacher).eval()
    from sitra.data.mlm import text_batches

    _, batches = text_batches(eval_retrained.EvalArgs(train_file=str(text_files / "train.txt"),
                                                      eval_file=str(text_files / "eval.txt"), max_seq_length=32),
                              tok, 8, 42, need_train=False)
    nll, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for b in batches.epoch(0):
            logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            for i, j in zip(*torch.nonzero(b["labels"] != -100, as_tuple=True)):
                target = int(b["labels"][i, j])
                nll -= float(torch.log_softmax(logits[i, j], -1)[target])
                correct += int(logits[i, j].argmax()) == target
                n += 1
    assert metrics["teacher"]["masked_tokens"] == n
    assert metrics["teacher"]["mlm_accuracy"] == pytest.approx(correct / n)
    assert metrics["teacher"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    log = read_log(tmp_path / "eval_results" / "eval_retrained_model.h5")
    assert log["attrs"]["status"] == "complete"
    assert log["final"]["model/mlm_accuracy"] == metrics["model"]["mlm_accuracy"]


def test_build_refuses_two_runs_of_one_block(tiny_teacher, text_files, tmp_path):
    retrain_single_block.run(block_args(tiny_teacher, text_files, tmp_path, max_steps=2))
    retrain_single_block.run(block_args(tiny_teacher, text_files, tmp_path, max_steps=2, block_heads=4))
    with pytest.raises(UsageError, match="several runs retrain block 2"):
        build_retrained.run(build_retrained.BuildArgs(teacher=tiny_teacher, storage_directory=str(tmp_path)))


def test_encoder_teacher_without_mlm_head(tiny_encoder, text_files, tmp_path):
    run = retrain_single_block.run(block_args(tiny_encoder, text_files, tmp_path, max_steps=4))
    assert read_log(run.log_path)["attrs"]["status"] == "complete"
    with pytest.raises(UsageError, match="--loss_on_logits needs a teacher with an MLM head"):
        retrain_single_block.run(block_args(tiny_encoder, text_files, tmp_path, loss_on_logits=True, criterion="CrossEntropy"))


BAD = [
    (["--block", "4"], "--block 4: the teacher has 4 layers, allowed 0-3"),
    (["--block", "-1"], "--block -1"),
    ([], "--block is required"),
    (["--block", "1", "--block_heads", "5"], "--block_heads 5 does not divide the hidden size 32"),
    (["--block", "1", "--block_heads", "0"], "--block_heads 0: must be at least 1"),
    (["--block", "1", "--percentage_data", "1.5"], "--percentage_data 1.5: must be in (0, 1]"),
    (["--block", "1", "--percentage_data", "0"], "--percentage_data 0.0: must be in (0, 1]"),
    (["--block", "1", "--criterion", "CrossEntropy"], "--criterion CrossEntropy compares distributions"),
    (["--block", "1", "--criterion", "l1"], "invalid choice: 'l1'"),
    (["--block", "1", "--bogus", "3"], "unrecognized arguments: --bogus 3"),
    (["--block", "1", "--train_file", "/no/such/file.txt"], "--train_file /no/such/file.txt: no such file"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_exit_2(tiny_teacher, text_files, tmp_path, capsys, flags, message):
    argv = ["--teacher", tiny_teacher, "--train_file", str(text_files / "train.txt"),
            "--storage_directory", str(tmp_path), "--block_heads", "4", *flags]
    with pytest.raises(SystemExit) as e:
        main(BlockArgs, retrain_single_block.run, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written


def test_unreadable_data_file(tiny_teacher, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError, match="--train_file .*latin1.txt: cannot read"):
        retrain_single_block.run(BlockArgs(teacher=tiny_teacher, block=1, block_heads=4, train_file=str(bad),
                                            storage_directory=str(tmp_path)))


@pytest.mark.parametrize("script,flags,message", [
    ("retrain_single_block.py", ["--teacher", "./no/such/teacher", "--block", "1"], "--teacher ./no/such/teacher: no such model folder"),
    ("eval_retrained.py", ["--teacher", "TEACHER", "--model", "/no/such/model"], "--model /no/such/model: no such model folder"),
    ("build_retrained.py", ["--teacher", "TEACHER", "--checkpoints", "/no/such/run"], "--checkpoints /no/such/run: no such folder"),
])
@pytest.mark.slow
@pytest.mark.subprocess
def test_job_scripts_exit_2_with_one_line(tiny_teacher, tmp_path, script, flags, message):
    flags = [tiny_teacher if f == "TEACHER" else f for f in flags]
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *flags, "--storage_directory", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


@pytest.mark.slow
@pytest.mark.quickstart
def test_wikitext_block_retraining_on_minilm(minilm, wikitext, tmp_path):
    """The real pretrained teacher on the shared WikiText-2 text: the held-out block MSE falls."""
    args = BlockArgs(teacher=minilm, train_file=str(wikitext / "valid.txt"), eval_file=str(wikitext / "test.txt"),
                     percentage_data=0.02, storage_directory=str(tmp_path), block=4, block_heads=4, block_d_k=32,
                     max_seq_length=48, batch_size=16, max_steps=20, eval_steps=10, lr=2e-3, device="cpu")
    run = retrain_single_block.run(args)
    evals = read_log(run.log_path)["eval"]
    assert evals["block_mse"][-1] < 0.7 * evals["block_mse"][0]
    assert evals["block_cosine"][-1] > evals["block_cosine"][0]


@pytest.mark.slow
@pytest.mark.quickstart
def test_quickstart_commands(minilm, tmp_path):
    """README's quickstart chain, shortened with --max_steps, through the real job scripts."""
    common = ["--preset", "quickstart", "--storage_directory", str(tmp_path)]
    for script, extra in (("retrain_single_block.py", ["--max_steps", "15"]), ("build_retrained.py", []),
                          ("eval_retrained.py", ["--percentage_data", "0.5"])):
        out = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *common, *extra],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    assert "| hidden_cosine |" in out.stdout and "Gap" in out.stdout


def test_eval_with_a_reference_of_another_width(tiny_teacher, text_files, tmp_path, capsys):
    from conftest import build_teacher

    reference = build_teacher(tmp_path / "wide", hidden=48, heads=4, layers=2, seed=1, tokenizer_from=tiny_teacher)
    metrics = eval_retrained.run(eval_retrained.EvalArgs(
        teacher=tiny_teacher, model=tiny_teacher, reference=reference, storage_directory=str(tmp_path),
        train_file=str(text_files / "train.txt"), eval_file=str(text_files / "eval.txt"), max_seq_length=32,
        batch_size=8, device="cpu", percentage_data=0.5))
    assert metrics["model"]["mlm_accuracy"] == metrics["teacher"]["mlm_accuracy"]  # same model, same masks
    assert "hidden_cosine" not in metrics["reference"] and "mlm_accuracy" in metrics["reference"]
    assert metrics["reference"]["masked_tokens"] == metrics["teacher"]["masked_tokens"]
    assert re.search(r"\| Metric +\| teacher +\| model +\| reference +\| Gap", capsys.readouterr().out)


def test_build_refuses_an_unfinished_block_run(tiny_teacher, text_files, tmp_path):
    run = retrain_single_block.run(block_args(tiny_teacher, text_files, tmp_path, max_steps=2))
    (run.checkpoint_dir / "best.safetensors").unlink()
    with pytest.raises(UsageError, match="--checkpoints .*: no best.safetensors"):
        build_retrained.run(build_retrained.BuildArgs(teacher=tiny_teacher, checkpoints=[str(run.checkpoint_dir)]))
