"""Layer merging, block-to-end training, fine-tuning and evaluation of the smaller models."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sitra import models
from sitra.models import assembly
from sitra.recipes import (
    build_merged, eval_merge_layer, eval_merged, finetune_conditioned_fully_merged as conditioned,
    finetune_fully_merged, retrain_merge, train_block_till_end, train_full_merged_model,
)
from sitra.results import read_log

ROOT = Path(__file__).resolve().parents[1]


def common(teacher, text_files, storage, **kw):
    return dict(teacher=teacher, train_file=str(text_files / "train.txt"), eval_file=str(text_files / "eval.txt"),
                max_seq_length=32, batch_size=8, device="cpu", storage_directory=str(storage), **kw)


@pytest.fixture(scope="module")
def merged_storage(tiny_teacher, text_files, tmp_path_factory):
    """Both pairs of the 4-layer teacher merged (one odd-sized, one from the average)."""
    storage = tmp_path_factory.mktemp("merged")
    for block, init in ((0, "average"), (2, "first")):
        retrain_merge.run(retrain_merge.MergeArgs(**common(tiny_teacher, text_files, storage), block=block, block_heads=2,
                                                  block_d_k=16, init=init, max_steps=30, eval_steps=15, lr=1e-2))
    build_merged.run(build_merged.BuildMergedArgs(teacher=tiny_teacher, storage_directory=str(storage)))
    return storage


def test_merged_layer_beats_its_initialisation(merged_storage):
    for name in ("merge0_h2_dk16_ff64_average_MSE", "merge2_h2_dk16_ff64_first_MSE"):
        evals = read_log(merged_storage / "eval_results" / f"{name}.h5")["eval"]
        assert evals["step"].tolist() == [0, 15, 30]
        assert evals["block_mse"][-1] < 0.7 * evals["block_mse"][0], name


@pytest.mark.parametrize("block", [1, 2])  # odd and even starting layers
def test_merge_init_first_and_average(tiny_teacher, block):
    teacher = models.load_model(tiny_teacher)
    ids = torch.randint(5, 300, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        hs = teacher.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        first = models.new_merged_layer(teacher, block, 4, 8, 0.0, 64, "first").eval()
        out = models.apply_layers([first], teacher.config, hs[block], mask)
    assert torch.allclose(out, hs[block + 1], atol=1e-6)  # a copy of the first layer, attention included
    average = models.new_merged_layer(teacher, block, 4, 8, 0.0, 64, "average")
    a, b = (models.encoder_layers(teacher)[i].state_dict() for i in (block, block + 1))
    got = average.state_dict()
    for name in ("attention.self.query.weight", "intermediate.dense.weight", "output.LayerNorm.weight"):
        assert torch.allclose(got[name], (a[name] + b[name]) / 2)
    narrow = models.new_merged_layer(teacher, block, 2, 8, 0.0, 48, "average").state_dict()
    assert torch.allclose(narrow["attention.output.dense.weight"], (a["attention.output.dense.weight"] + b["attention.output.dense.weight"]) / 2)
    torch.manual_seed(0)
    random = models.new_merged_layer(teacher, block, 4, 8, 0.0, 64, "random").state_dict()
    assert not torch.equal(random["attention.self.query.weight"], a["attention.self.query.weight"])


def test_build_merged_halves_the_layers_and_round_trips(tiny_teacher, merged_storage):
    folder = merged_storage / "checkpoints" / "merged_model"
    model = models.load_model(str(folder))
    assert model.config.num_hidden_layers == 2 and model.config.layer_sources == [[0, 1], [2, 3]]
    assert model.config.attn_layout == {"0": [2, 16, 0.1], "1": [2, 16, 0.1]}
    layer = models.encoder_layers(model)[0]
    teacher = models.load_model(tiny_teacher)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in teacher.parameters())
    # the folder reproduces the trained merged layer exactly on the teacher's input of layer 0
    _, trained = assembly.read_merged(merged_storage / "checkpoints" / "merge0_h2_dk16_ff64_average_MSE", teacher, tiny_teacher)
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), trained.state_dict().values()))


def test_eval_merge_layer(tiny_teacher, text_files, merged_storage, capsys):
    metrics = eval_merge_layer.run(eval_merge_layer.EvalMergeLayerArgs(
        **common(tiny_teacher, text_files, merged_storage), block=2))
    trained = read_log(merged_storage / "eval_results" / "merge2_h2_dk16_ff64_first_MSE.h5")["final"]
    assert metrics["merged"]["layer_mse"] == pytest.approx(trained["block_mse"], rel=1e-5)
    assert 0 < metrics["merged"]["layer_cosine"] <= 1 and "mlm_accuracy" in metrics["merged"]
    assert metrics["merged"]["parameters"] < metrics["teacher"]["parameters"]
    assert "| layer_mse" in capsys.readouterr().out


def test_finetune_fully_merged_lowers_the_kd_loss(tiny_teacher, text_files, merged_storage):
    run = finetune_fully_merged.run(finetune_fully_merged.FinetuneMergedArgs(
        **common(tiny_teacher, text_files, merged_storage), max_steps=20, eval_steps=10, lr=3e-3, hidden_weight=1.0, alpha=0.5))
    log = read_log(run.log_path)
    assert log["eval"]["eval_loss"][-1] < log["eval"]["eval_loss"][0]
    assert {"kl", "mlm_ce", "hidden_mse"} <= set(log["train"])
    tuned = models.load_model(str(run.checkpoint_dir / "model"))
    assert tuned.config.num_hidden_layers == 2 and log["attrs"]["status"] == "complete"


def test_finetune_only_selected_layers(tiny_teacher, text_files, merged_storage):
    before = models.load_model(str(merged_storage / "checkpoints" / "merged_model"))
    run = finetune_fully_merged.run(finetune_fully_merged.FinetuneMergedArgs(
        **common(tiny_teacher, text_files, merged_storage), max_steps=4, lr=1e-2, trainable_layers="1"))
    trained = torch.load(run.checkpoint_dir / "latest.pt", weights_only=False)["model"]
    assert trained and all(k.startswith("bert.encoder.layer.1.") for k in trained)  # only layer 1 was trained
    assert any(not torch.equal(v, before.state_dict()[k]) for k, v in trained.items())
    after = models.load_model(str(run.checkpoint_dir / "model"))
    assert all(torch.equal(x, y) for x, y in zip(models.encoder_layers(before)[0].parameters(),
                                                  models.encoder_layers(after)[0].parameters()))
    assert torch.equal(before.bert.embeddings.word_embeddings.weight, after.bert.embeddings.word_embeddings.weight)


def test_conditioned_finetuning_feeds_the_students_own_outputs(tiny_teacher, text_files, merged_storage, monkeypatch):
    seen = {}
    real = conditioned.stage_input

    def record(model, layer, batch):
        x = real(model, layer, batch)
        seen.setdefault(layer, (batch, x.clone()))
        return x

    monkeypatch.setattr(conditioned, "stage_input", record)
    run = conditioned.run(conditioned.ConditionedArgs(**common(tiny_teacher, text_files, merged_storage),
                                                      max_steps=12, eval_steps=6, lr=2e-3, passes=1))
    final = models.load_model(str(run.checkpoint_dir / "model"))
    teacher = models.load_model(tiny_teacher)
    batch, x = seen[1]
    with torch.no_grad():
        own = models.run_layers(final, final.bert.embeddings(input_ids=batch["input_ids"]), batch["attention_mask"], stop=1)
        teacher_hidden = teacher.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      output_hidden_states=True).hidden_states[2]
    assert torch.equal(x, own)  # layer 1 saw what the trained layer 0 makes of the embeddings
    assert not torch.allclose(x, teacher_hidden, atol=1e-3)  # not the teacher's hidden state
    log = read_log(run.log_path)
    assert log["attrs"]["status"] == "complete" and "pass0_layer1/block_mse" in log["final"]
    for layer in (0, 1):
        evals = read_log(run.log_path.with_suffix("") / f"pass0_layer{layer}.h5")["eval"]
        assert evals["block_mse"][-1] < evals["block_mse"][0]


def test_train_block_till_end_learns_through_frozen_layers(tiny_teacher, text_files, tmp_path):
    run = train_block_till_end.run(train_block_till_end.BlockToEndArgs(
        **common(tiny_teacher, text_files, tmp_path), block=1, block_heads=2, block_d_k=8, max_steps=30, eval_steps=15,
        lr=1e-2, temperature=2.0, alpha=0.5))
    log = read_log(run.log_path)
    assert log["eval"]["kl"][-1] < 0.8 * log["eval"]["kl"][0]
    # its block checkpoint is a block run like any other: build_retrained can assemble it
    from sitra.recipes import build_retrained

    out = build_retrained.run(build_retrained.BuildArgs(teacher=tiny_teacher, checkpoints=[str(run.checkpoint_dir)],
                                                        output=str(tmp_path / "model")))
    assert models.load_model(str(out)).config.attn_layout == {"1": [2, 8, 0.1]}


def test_train_full_merged_model(tiny_teacher, text_files, tmp_path):
    from sitra.recipes import build_retrained, retrain_single_block

    for b in (0, 3):
        retrain_single_block.run(retrain_single_block.BlockArgs(**common(tiny_teacher, text_files, tmp_path), block=b,
                                                                block_heads=2, block_d_k=8, max_steps=3))
    build_retrained.run(build_retrained.BuildArgs(teacher=tiny_teacher, storage_directory=str(tmp_path)))
    run = train_full_merged_model.run(train_full_merged_model.FinetuneRetrainedArgs(
        **common(tiny_teacher, text_files, tmp_path), max_steps=15, eval_steps=15, lr=3e-3))
    log = read_log(run.log_path)
    assert log["eval"]["eval_loss"][-1] < log["eval"]["eval_loss"][0]


def test_eval_merged_table_file_and_plot(tiny_teacher, text_files, merged_storage, capsys):
    metrics = eval_merged.run(eval_merged.EvalMergedArgs(
        **common(tiny_teacher, text_files, merged_storage), models=[str(merged_storage / "checkpoints" / "merged_model")],
        percentage_data=0.5))
    assert set(metrics) == {"teacher", "merged_model"}
    for m in metrics.values():
        assert {"mlm_accuracy", "mlm_top5_accuracy", "perplexity", "hidden_cosine", "parameters", "us_per_token"} <= set(m)
        assert m["us_per_token"] > 0
    assert metrics["merged_model"]["parameters"] < metrics["teacher"]["parameters"]
    assert (merged_storage / "eval_results" / "eval_merged.png").stat().st_size > 1000
    assert read_log(merged_storage / "eval_results" / "eval_merged.h5")["final"]["merged_model/perplexity"] > 1
    assert "| us_per_token" in capsys.readouterr().out


BAD = [
    ("retrain_merge.py", ["--block", "3"], "--block 3: the teacher has 4 layers, allowed 0-2 (it needs a following layer)"),
    ("retrain_merge.py", ["--block", "1", "--block_heads", "5"], "--block_heads 5 does not divide the hidden size 32"),
    ("eval_merge_layer.py", ["--block", "0", "--checkpoint", "/no/such/run"], "--checkpoint /no/such/run: no such folder"),
    ("build_merged.py", [], "--checkpoints: no finished merge run of"),
    ("finetune_fully_merged.py", [], "--model"),
    ("train_block_till_end.py", ["--block", "9", "--block_heads", "2"], "--block 9: the teacher has 4 layers"),
]


@pytest.mark.parametrize("script,flags,message", BAD, ids=[m for _, _, m in BAD])
@pytest.mark.slow
@pytest.mark.subprocess
def test_bad_input_is_one_line_exit_2(tiny_teacher, tmp_path, script, flags, message):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / script), "--teacher", tiny_teacher,
                          "--storage_directory", str(tmp_path), *flags], capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]
