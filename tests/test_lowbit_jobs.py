"""The low-bit flags on distill_geneformer, distill_classifier and distill_summarizer, with the
tiny teachers and data of each job's own tests: a ternary student that learns, is ternary only
inside its transformer layers and reloads to the ternary forward of its best checkpoint (the
BitNet b1.58 formula written out here) and exports exactly; an 8-bit teacher whose memory and KL
are logged; one-line errors before any run folder exists."""
import math
import re
import shlex

import pytest
import torch
import torch.nn.functional as F
from test_geneformer import corpus, dictionaries, teacher  # noqa: F401  (fixtures)
from test_geneformer import distill_args as geneformer_args
from test_tasks import distill_args as classifier_args
from test_tasks import lms, sst, summarizer_args  # noqa: F401  (fixtures)
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from sitra import models
from sitra.cli import command_line, main
from sitra.models import lowbit
from sitra.recipes import (
    distill_classifier,
    distill_geneformer,
    distill_summarizer,
    export_ternary,
)
from sitra.models.assembly import load_weights
from sitra.results import read_log

JOBS = {"geneformer": (distill_geneformer, AutoModelForMaskedLM),
        "classifier": (distill_classifier, AutoModelForSequenceClassification),
        "summarizer": (distill_summarizer, AutoModelForCausalLM)}
KD_ONLY = {"geneformer": 1.0, "classifier": 0.0, "summarizer": 0.0}  # --alpha: geneformer's weighs the KL, the others' the labels
IN_A_LAYER = re.compile(r"\.layers?\.\d+\.")  # bert.encoder.layer.0.attention..., gpt_neox.layers.1.mlp...


def job_args(request, job, storage, **kw):
    """The arguments of the job's own tiny tests, with `kw` on top."""
    if job == "geneformer":
        return geneformer_args(request.getfixturevalue("teacher"), request.getfixturevalue("corpus"), storage, **kw)
    if job == "classifier":
        return classifier_args(request.getfixturevalue("sst"), storage, **kw)
    return summarizer_args(request.getfixturevalue("lms"), storage, **kw)


def argv(args) -> list[str]:
    """The command-line flags that give `args`."""
    return shlex.split(command_line("job", args))[2:]


class Ternary(torch.nn.Module):
    """y = x~ (gamma W~)^T + b with gamma = mean |W|, W~ = clamp(round(W / gamma), -1, 1) and x~ the
    per-token 8-bit absmax quantisation of x."""

    def __init__(self, linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        gamma = self.weight.abs().mean().clamp(min=1e-5)
        s = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        x_q = (x * s).round().clamp(-128, 127) / s
        return F.linear(x_q, (self.weight / gamma).round().clamp(-1, 1) * gamma, self.bias)


@pytest.mark.parametrize("job", JOBS)
def test_ternary_student_learns_reloads_and_exports(job, request, tmp_path, capsys):
    module, auto = JOBS[job]
    run = module.run(job_args(request, job, tmp_path, student_bits=1.58, alpha=KD_ONLY[job]))
    log = read_log(run.log_path)
    loss = log["train"]["loss"]  # the distillation loss alone (no label term)
    k = len(loss) // 4
    assert loss[-k:].mean() < 0.8 * loss[:k].mean(), loss
    folder = run.checkpoint_dir / "model"
    card = (folder / "README.md").read_text()
    assert run.name.endswith("_ternary") and "ternary (BitNet b1.58)" in card and "--student_bits 1.58" in card
    # ternary exactly where the transformer layers' nn.Linear are: not the embeddings, pooler or heads
    student = models.load_model(str(folder), auto=auto)
    linear = {n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)}
    ternary = {n for n, m in student.named_modules() if isinstance(m, lowbit.TernaryLinear)}
    assert ternary and ternary == {n for n in linear if IN_A_LAYER.search(n)}
    # the best checkpoint's weights, run through the formula above: the reloaded student's outputs
    expected = auto.from_pretrained(folder).eval()
    best = load_weights(run.checkpoint_dir)
    assert all(torch.equal(expected.state_dict()[key], t) for key, t in best.items())
    for name in ternary:
        parent, _, child = name.rpartition(".")
        setattr(expected.get_submodule(parent), child, Ternary(expected.get_submodule(name)))
    ids = torch.randint(5, student.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        got, want = student(input_ids=ids, attention_mask=mask).logits, expected(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-5)
    # without a class given, the loader takes the one the marker's module names belong to
    plain = models.load_model(str(folder))
    assert type(plain) is type(student)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, got)
    export_ternary.run(export_ternary.ExportTernaryArgs(model_dir=str(folder)))
    assert "max |difference| 0 (exact)" in capsys.readouterr().out


@pytest.mark.parametrize("job", JOBS)
def test_8bit_teacher_logs_its_memory_and_kl(job, request, tmp_path):
    pytest.importorskip("bitsandbytes", reason="the 8-bit teacher needs bitsandbytes (pip install bitsandbytes)")
    module, _ = JOBS[job]
    fewer = {"generation_examples": 2} if job == "summarizer" else {}
    tiny = job_args(request, job, tmp_path, max_steps=4, eval_steps=4, **fewer)
    run = main(module.ARGS, module.run, argv=argv(tiny) + ["--teacher_load_in_8bit"])  # the alias, through the parser
    log = read_log(run.log_path)
    attrs = log["attrs"]
    assert run.name.endswith("_teacher8bit") and attrs["status"] == "complete" and attrs["teacher_bits"] == 8
    assert 0 < attrs["teacher_weights_mib_8bit"] < attrs["teacher_weights_mib_full"]
    assert math.isfinite(attrs["teacher_8bit_kl"]) and attrs["teacher_8bit_kl"] >= 0
    assert log["final"]["lowbit/teacher_8bit_kl"] == attrs["teacher_8bit_kl"]
    assert attrs["teacher_8bit_examples" if job == "classifier" else "teacher_8bit_tokens"] > 0
    assert "8 bits (bitsandbytes LLM.int8)" in (run.checkpoint_dir / "model" / "README.md").read_text()


def test_8bit_classifier_teacher_kl_is_per_example(request):
    """A sequence classifier scores whole sequences: one distribution an example, not a token."""
    pytest.importorskip("bitsandbytes", reason="the 8-bit teacher needs bitsandbytes (pip install bitsandbytes)")
    folder = request.getfixturevalue("sst")["teacher"]
    classifier = models.load_model(folder, auto=AutoModelForSequenceClassification)
    tok = models.load_tokenizer(folder)
    batch = dict(tok(["the value is true", "a list of false names", "false"], return_tensors="pt", padding=True))
    batch.pop("token_type_ids", None)
    with torch.no_grad():
        full = classifier(**batch).logits.log_softmax(-1)
    info = lowbit.quantize_teacher(classifier, "cpu", lowbit.LowBitArgs(teacher_bits=8), [batch])
    with torch.no_grad():
        low = classifier(**batch).logits.log_softmax(-1)
    assert info["teacher_8bit_examples"] == 3 and "teacher_8bit_tokens" not in info
    assert info["teacher_8bit_kl"] == pytest.approx(float((full.exp() * (full - low)).sum(-1).mean()), rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("job", JOBS)
def test_bad_low_bit_flags_are_one_line_before_any_run_folder(job, request, tmp_path, capsys):
    module, _ = JOBS[job]
    base = argv(job_args(request, job, tmp_path))
    cases = [(["--student_bits", "3"], "--student_bits 3: allowed 1.58"),
             (["--student_model_as_bitnet", "--student_bits", "3"], "--student_model_as_bitnet means --student_bits 1.58"),
             (["--student_bits", "1.58", "--quantize_modules", "no_such_layer"],
              "--quantize_modules no_such_layer: matches no nn.Linear of the student")]
    for flags, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(module.ARGS, module.run, argv=base + flags)
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "checkpoints").exists()
