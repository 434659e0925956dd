"""Low-bit students and teachers: the ternary quantiser against a 2x3 case worked by hand and a
per-token loop, straight-through gradients, ternary layers in any architecture, the 1.6-bit
export reloading to equal outputs, a ternary student whose distillation loss falls, the 8-bit
teacher's memory and KL, and one-line errors for bad input."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, BertConfig, GPTNeoXConfig,
                          LlamaConfig)

from sitra import models
from sitra.cli import main
from sitra.errors import UsageError
from sitra.data import python_docs_paragraphs
from sitra.models import lowbit
from sitra.recipes import distill_pythia, eval_lm, export_ternary
from sitra.results import read_log

ROOT = Path(__file__).resolve().parents[1]


def neox_config(vocab, hidden, layers, init=0.02):
    return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=2 * hidden, max_position_embeddings=128, initializer_range=init)


TINY = {
    "gpt_neox": (lambda: neox_config(97, 32, 2), AutoModelForCausalLM),
    "llama": (lambda: LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True), AutoModelForCausalLM),
    "bert": (lambda: BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64), AutoModelForMaskedLM),
}


def tiny(kind, seed=0):
    config, auto = TINY[kind]
    torch.manual_seed(seed)
    return auto.from_config(config()).eval(), auto


@pytest.fixture(scope="module")
def lms(tiny_teacher, tmp_path_factory):
    """A 4 x 64 GPT-NeoX teacher, a 2 x 32 student, text files; tokenizer of the tiny BERT fixture."""
    d = tmp_path_factory.mktemp("lowbit")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    paragraphs = python_docs_paragraphs()
    (d / "train.txt").write_text("\n".join(paragraphs[:200]))
    (d / "eval.txt").write_text("\n".join(paragraphs[1000:1040]))
    for name, hidden, layers, seed, init in (("teacher", 64, 4, 0, 0.1), ("student", 32, 2, 1, 0.02)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(neox_config(len(tok), hidden, layers, init)).save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return d


def distill_args(d, storage, **kw):
    values = dict(teacher=str(d / "teacher"), student=str(d / "student"), train_file=str(d / "train.txt"),
                  eval_file=str(d / "eval.txt"), max_seq_length=48, batch_size=8, max_steps=30, eval_steps=15, lr=3e-3,
                  device="cpu", storage_directory=str(storage))
    values.update(kw)
    return distill_pythia.DistillLMArgs(**values)


@pytest.fixture(scope="module")
def ternary_run(lms, tmp_path_factory):
    """One distillation of the tiny student with --student_bits 1.58 (shared by several tests)."""
    return distill_pythia.run(distill_args(lms, tmp_path_factory.mktemp("ternary_run"), alpha=0.0, student_bits=1.58))


# ---------------------------------------------------------------------------------------------
# the quantiser


def test_quantiser_on_a_2x3_case_worked_by_hand():
    layer = lowbit.TernaryLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0, 0.0], [2.0, -0.25, 0.75]]))
        layer.bias.copy_(torch.tensor([0.1, -0.2]))
    # gamma = mean |W| = (0.5 + 1 + 0 + 2 + 0.25 + 0.75) / 6 = 0.75
    # W / gamma = [[0.667, -1.333, 0], [2.667, -0.333, 1]] -> round, clamp to [-1, 1] -> [[1, -1, 0], [1, 0, 1]]
    codes, gamma = lowbit.ternary_weight(layer.weight)
    assert float(gamma) == 0.75 and codes.tolist() == [[1, -1, 0], [1, 0, 1]]
    # one token x = [0.6, -2, 0.3]: s = 127 / 2 = 63.5, s x = [38.1, -127, 19.05] -> [38, -127, 19]
    # x~ = [38 / 63.5, -2, 19 / 63.5] = [0.598425, -2, 0.299213]
    # y = x~ (0.75 W~)^T + b = [0.75 * 0.598425 + 0.75 * 2 + 0.1, 0.75 * 0.598425 + 0.75 * 0.299213 - 0.2]
    y = layer(torch.tensor([[0.6, -2.0, 0.3]]))
    assert y[0].tolist() == pytest.approx([2.048819, 0.473228], abs=1e-6)


def test_ternary_forward_equals_a_direct_computation():
    torch.manual_seed(0)
    layer = lowbit.TernaryLinear(16, 8)
    x = torch.randn(3, 5, 16) * torch.rand(3, 5, 1) * 4  # tokens of different ranges
    w = layer.weight.detach().double()
    gamma = w.abs().mean()
    w_q = torch.clamp(torch.round(w / gamma), -1, 1) * gamma
    expected = torch.empty(3, 5, 8, dtype=torch.float64)
    for b in range(3):
        for t in range(5):  # one token at a time: its own absmax scale
            token = x[b, t].double()
            s = 127 / token.abs().max()
            x_q = torch.clamp(torch.round(token * s), -128, 127) / s
            expected[b, t] = w_q @ x_q + layer.bias.detach().double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)
    assert set(lowbit.ternary_weight(layer.weight)[0].unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_gradients_reach_the_latent_weights_straight_through():
    torch.manual_seed(0)
    layer = lowbit.TernaryLinear(6, 4)
    x = torch.randn(5, 6, requires_grad=True)
    upstream = torch.randn(5, 4)
    (layer(x) * upstream).sum().backward()
    codes, gamma = lowbit.ternary_weight(layer.weight)
    x_q = lowbit.activation_quant(x.detach())
    # straight through: the gradients are those of y = x~ W_q^T + b taken at the quantised values
    assert torch.allclose(layer.weight.grad, upstream.T @ x_q, atol=1e-6)
    assert torch.allclose(x.grad, upstream @ (codes * gamma), atol=1e-6)
    assert layer.weight.grad.abs().sum() > 0
    before = layer.weight.detach().clone()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert not torch.equal(layer.weight, before)


def test_full_precision_switch_runs_the_latent_weights():
    torch.manual_seed(0)
    layer = lowbit.TernaryLinear(6, 4)
    x = torch.randn(2, 6)
    with lowbit.full_precision(layer):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))


# ---------------------------------------------------------------------------------------------
# swapping layers in any architecture


PER_LAYER = {"gpt_neox": 4, "llama": 7, "bert": 6}  # fused qkv, dense, 2 MLP; q k v o, 3 MLP; q k v, 3 dense


@pytest.mark.parametrize("kind", list(TINY))
def test_ternarize_picks_the_transformer_layers_linears(kind, tmp_path):
    model, auto = tiny(kind)
    keys = list(model.state_dict())
    names = lowbit.ternarize(model)
    assert len(names) == 2 * PER_LAYER[kind] and all(".layer" in n for n in names)
    assert all(isinstance(model.get_submodule(n), lowbit.TernaryLinear) for n in names)
    assert list(model.state_dict()) == keys  # state_dict names of the original nn.Linear layers
    assert not isinstance(model.get_output_embeddings(), lowbit.TernaryLinear)  # nor the embeddings
    # plain save_pretrained + sitra's loader: the same ternary model back
    model.save_pretrained(tmp_path)
    reloaded = models.load_model(str(tmp_path), auto=auto)
    assert [n for n, m in reloaded.named_modules() if isinstance(m, lowbit.TernaryLinear)] == names
    ids = torch.randint(97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_patterns_choose_by_name_and_a_pattern_that_matches_nothing_is_an_error():
    model, _ = tiny("llama")
    names = lowbit.ternarize(model, patterns=[r"mlp\.(up|down)_proj"])
    assert names == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(UsageError, match=r"--quantize_modules no_such_layer: matches no nn.Linear") as e:
        lowbit.select_linear(tiny("gpt_neox")[0], ["dense", "no_such_layer"])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# the packed file


@pytest.mark.parametrize("n", [1, 5, 7, 64, 1003])
def test_pack_unpack_round_trip_at_1_6_bits(n):
    codes = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n)).to(torch.int8)
    packed = lowbit.pack_ternary(codes)
    assert packed.dtype == torch.uint8 and len(packed) == math.ceil(n / 5)
    assert torch.equal(lowbit.unpack_ternary(packed, (n,)), codes)


@pytest.mark.parametrize("kind", list(TINY))
def test_export_and_reload_give_equal_outputs(kind, tmp_path):
    model, auto = tiny(kind)
    lowbit.ternarize(model)
    ids = torch.randint(97, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    lowbit.export_packed(model, tmp_path)
    packed = models.load_model(str(tmp_path), auto=auto)
    assert any(isinstance(m, lowbit.FrozenTernaryLinear) for m in packed.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, packed(input_ids=ids, attention_mask=mask).logits)
    assert lowbit.weight_bytes(packed) < lowbit.weight_bytes(model)


def test_export_job_on_a_trained_ternary_student(ternary_run, tmp_path, capsys):
    source = ternary_run.checkpoint_dir / "model"
    out = export_ternary.run(export_ternary.ExportTernaryArgs(model_dir=str(source), output=str(tmp_path / "packed")))
    printed = capsys.readouterr().out
    assert "max |difference| 0 (exact)" in printed and "1.60 bits a weight" in printed
    trained = models.load_model(str(source), auto=AutoModelForCausalLM)
    packed = models.load_model(str(out), auto=AutoModelForCausalLM)
    modules = trained.config.sitra_quantization["modules"]
    others = sum(t.nbytes for k, t in trained.state_dict().items() if k not in {f"{m}.weight" for m in modules})
    size = (out / lowbit.PACKED_FILE).stat().st_size
    with open(out / lowbit.PACKED_FILE, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    # the tensor data: the unquantised tensors in float32, then 5 ternary weights a byte and a float32 scale per layer
    sizes = [trained.get_submodule(m).weight.numel() for m in modules]
    assert size - header - others == sum(math.ceil(k / 5) for k in sizes) + 4 * len(modules)
    ids = torch.randint(trained.config.vocab_size, (3, 20))
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, packed(input_ids=ids).logits)
    # bfloat16 for the unquantised tensors: smaller, and close (their rounding is the only difference)
    half = export_ternary.run(export_ternary.ExportTernaryArgs(model_dir=str(source), output=str(tmp_path / "half"),
                                                               dtype="bfloat16"))
    assert (half / lowbit.PACKED_FILE).stat().st_size < size
    with torch.no_grad():
        a = trained(input_ids=ids).logits.log_softmax(-1)
        b = models.load_model(str(half), auto=AutoModelForCausalLM)(input_ids=ids).logits.float().log_softmax(-1)
    assert (a.exp() * (a - b)).sum(-1).mean() < 1e-2


# ---------------------------------------------------------------------------------------------
# the distillation job


def test_a_tiny_ternary_student_distils(ternary_run, lms, tmp_path):
    log = read_log(ternary_run.log_path)
    evals = log["eval"]["eval_loss"]  # alpha 0: the held-out loss is the KL alone
    assert evals[-1] < 0.8 * evals[0]
    final = log["final"]
    card = (ternary_run.checkpoint_dir / "model" / "README.md").read_text()
    for name in ("teacher", "student base", "full-precision student", "ternary student"):
        assert f"{final[f'{name}/perplexity']:.4f}" in card
    assert "--student_bits 1.58" in card and "export_ternary.py" in card
    # eval_lm on the trained folder and its export: the same numbers, the packed one smaller in memory
    source = ternary_run.checkpoint_dir / "model"
    export_ternary.run(export_ternary.ExportTernaryArgs(model_dir=str(source)))
    table = eval_lm.run(eval_lm.EvalLMArgs(models=[str(source), str(source) + "_ternary"], eval_file=str(lms / "eval.txt"),
                                           max_seq_length=48, storage_directory=str(tmp_path), device="cpu"))
    trained, packed = table[ternary_run.name], table[f"{ternary_run.name} (packed)"]
    assert packed["perplexity"] == trained["perplexity"] == pytest.approx(final["ternary student/perplexity"])
    assert packed["weights_mib"] < trained["weights_mib"]


def test_8bit_teacher_memory_and_kl(lms):
    pytest.importorskip("bitsandbytes", reason="the 8-bit teacher needs bitsandbytes (pip install bitsandbytes)")
    teacher = models.load_model(str(lms / "teacher"), auto=AutoModelForCausalLM)
    tok = AutoTokenizer.from_pretrained(lms / "teacher")
    batch = tok(python_docs_paragraphs()[1000:1004], return_tensors="pt", padding=True, truncation=True, max_length=32)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        full = teacher(**batch).logits
    args = lowbit.LowBitArgs(teacher_load_in_8bit=True)
    lowbit.check_lowbit(args)
    info = lowbit.quantize_teacher(teacher, "cpu", args, [batch])
    assert type(teacher.get_output_embeddings()).__name__ == "Linear8bitLt"
    assert info["teacher_weights_mib_8bit"] < 0.6 * info["teacher_weights_mib_full"]
    with torch.no_grad():
        low = teacher(**batch).logits
    keep = batch["attention_mask"].bool()
    p, q = full[keep].log_softmax(-1), low[keep].log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert info["teacher_8bit_kl"] == pytest.approx(kl, rel=1e-4) and 0 < kl < 1e-2
    assert info["teacher_8bit_tokens"] == int(keep.sum())


def test_distillation_with_an_8bit_teacher_logs_its_memory_and_kl(lms, tmp_path):
    pytest.importorskip("bitsandbytes", reason="the 8-bit teacher needs bitsandbytes (pip install bitsandbytes)")
    run = distill_pythia.run(distill_args(lms, tmp_path, max_steps=6, eval_steps=6, teacher_bits=8,
                                          student_init="teacher_layers"))
    log = read_log(run.log_path)
    assert 0 < log["attrs"]["teacher_8bit_kl"] < 1e-2 and log["final"]["lowbit/teacher_8bit_kl"] == log["attrs"]["teacher_8bit_kl"]
    assert log["attrs"]["teacher_weights_mib_8bit"] < log["attrs"]["teacher_weights_mib_full"]
    assert "teacher (8-bit)/perplexity" in log["final"]


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit code 2


def one_line_error(capsys, args_class, run, argv, positional=None):
    with pytest.raises(SystemExit) as e:
        main(args_class, run, argv=argv, positional=positional)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_bad_input_is_one_line(lms, tmp_path, capsys):
    base = ["--teacher", str(lms / "teacher"), "--student", str(lms / "student"), "--train_file", str(lms / "train.txt"),
            "--storage_directory", str(tmp_path), "--device", "cpu"]
    cases = [
        (["--student_bits", "3"], "--student_bits 3: allowed 1.58"),
        (["--student_bits", "1.58", "--quantize_modules", "no_such_layer"], "--quantize_modules no_such_layer: matches no nn.Linear"),
        (["--quantize_modules", "mlp"], "--quantize_modules needs --student_bits 1.58"),
        (["--teacher_bits", "4"], "--teacher_bits 4: allowed 8"),
        (["--teacher_load_in_8bit", "--teacher_bits", "16"], "--teacher_load_in_8bit means --teacher_bits 8"),
    ]
    for flags, message in cases:
        assert message in one_line_error(capsys, distill_pythia.DistillLMArgs, distill_pythia.run, base + flags)
    line = one_line_error(capsys, export_ternary.ExportTernaryArgs, export_ternary.run, [str(lms / "student")], "model_dir")
    assert "not a ternary model" in line and "--student_bits 1.58" in line


@pytest.mark.slow
@pytest.mark.subprocess
def test_bad_student_bits_from_the_command_line(lms, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "distill_pythia.py"), "--teacher", str(lms / "teacher"),
                          "--student", str(lms / "student"), "--train_file", str(lms / "train.txt"),
                          "--storage_directory", str(tmp_path), "--student_bits", "3"], capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "--student_bits 3: allowed 1.58" in lines[0], out.stderr[-2000:]


def test_eval_merged_takes_ternary_and_packed_masked_lms(tiny_teacher, text_files, tmp_path):
    from sitra.recipes import eval_merged

    model = models.load_model(tiny_teacher)
    lowbit.ternarize(model)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model.save_pretrained(tmp_path / "ternary")
    tok.save_pretrained(tmp_path / "ternary")
    lowbit.export_packed(model, tmp_path / "packed", tokenizer=tok)
    metrics = eval_merged.run(eval_merged.EvalMergedArgs(
        teacher=tiny_teacher, models=[str(tmp_path / "ternary"), str(tmp_path / "packed")], eval_file=str(text_files / "eval.txt"),
        max_seq_length=32, batch_size=8, storage_directory=str(tmp_path), device="cpu"))
    assert metrics["ternary"]["parameters"] == metrics["packed"]["parameters"] == metrics["teacher"]["parameters"]
    shared = [k for k in metrics["ternary"] if "accuracy" in k or "perplexity" in k]
    assert shared and all(metrics["ternary"][k] == metrics["packed"][k] for k in shared)
    assert any(metrics["ternary"][k] != metrics["teacher"][k] for k in shared)
