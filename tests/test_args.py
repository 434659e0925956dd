"""Argument groups: one meaning of the distillation weights in every job (--alpha converted as
each job read it before), presets applied once in the parser (a typed flag always wins), and
the objective checks written once."""
import dataclasses
import subprocess
import typing
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sitra import cli, losses
from sitra.args import KDArgs
from sitra.recipes import job_module

ROOT = Path(__file__).resolve().parents[1]

# what --alpha a meant in each job before --kd_weight / --ce_weight: (kd_weight, ce_weight)
OLD_ALPHA = {
    "distill_pythia": lambda a: (1 - a, a),
    "distill_classifier": lambda a: (1 - a, a),
    "distill_summarizer": lambda a: (1 - a, a),
    "distill_geneformer": lambda a: (a, 1 - a),
    "finetune_fully_merged": lambda a: (1.0, a),
    "finetune_conditioned_fully_merged": None,  # no distillation term: no --alpha
    "train_full_merged_model": lambda a: (1.0, a),
    "train_block_till_end": lambda a: (1.0, a),
}


def kd_jobs():
    return [job for job, old in OLD_ALPHA.items() if old]


@pytest.mark.parametrize("job", kd_jobs())
def test_every_distillation_job_has_the_one_objective_group(job):
    assert issubclass(job_module(job).ARGS, KDArgs)


@pytest.mark.parametrize("job", kd_jobs())
def test_old_alpha_is_converted_to_what_the_job_meant(job, capsys):
    args_class = job_module(job).ARGS
    old = cli.parse(args_class, ["--alpha", "0.3"])
    kd, ce = OLD_ALPHA[job](0.3)
    assert (old.kd_weight, old.ce_weight, old.alpha) == (kd, ce, None)
    notice = capsys.readouterr().err.strip().splitlines()
    assert notice == [f"--alpha 0.3 is the old name: this job reads it as --kd_weight {kd:g} --ce_weight {ce:g}"]
    new = cli.parse(args_class, ["--kd_weight", str(kd), "--ce_weight", str(ce)])
    assert old == new
    assert old.weights_name() == "a0.3"  # old commands keep their run folders
    assert args_class(alpha=0.3) == old  # built directly (launcher, tests) the same


@pytest.mark.parametrize("job", kd_jobs())
def test_default_weights_are_what_the_old_default_alpha_gave(job):
    """Defaults unchanged: the job's old --alpha default, converted."""
    old_default = {"distill_pythia": 0.5, "distill_classifier": 0.5, "distill_summarizer": 0.5, "distill_geneformer": 0.65,
                   "finetune_fully_merged": 0.0, "train_full_merged_model": 0.0, "train_block_till_end": 0.0}[job]
    args = job_module(job).ARGS()
    assert (args.kd_weight, args.ce_weight) == OLD_ALPHA[job](old_default)


@pytest.mark.parametrize("meaning,formula", [
    ("ce", lambda kd, ce, a: (1 - a) * kd + a * ce),       # distill_pythia / classifier / summarizer before
    ("kd", lambda kd, ce, a: a * kd + (1 - a) * ce),       # distill_geneformer before
    ("ce_added", lambda kd, ce, a: kd + a * ce),           # finetune_* / train_block_till_end before
])
def test_converted_objective_equals_the_old_formula_exactly(meaning, formula):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    y = torch.randint(0, 11, (6,), generator=g)
    mask = torch.tensor([True, True, False, True, True, True])
    T, a = 2.0, 0.3
    kl = losses.kl_div(s, t, mask, T)
    ce = F.cross_entropy(s[mask], y[mask])
    args_class = dataclasses.make_dataclass("Job", [], bases=(KDArgs,), namespace={"ALPHA_MEANING": meaning}, kw_only=True)
    args = args_class(alpha=a, temperature=T)
    got, kd_term, ce_term = losses.distill_loss(s, t, mask, y, **args.objective())
    assert torch.equal(kd_term, kl) and torch.equal(ce_term, ce)
    assert torch.equal(got, torch.as_tensor(formula(kl, ce, a)))


@pytest.mark.subprocess
def test_alpha_with_the_new_flags_is_one_line_exit_2():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "distill_pythia.py"), "--alpha", "0.5", "--ce_weight", "0.2"],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "--alpha 0.5" in lines[0] and "--ce_weight" in lines[0], out.stderr


@pytest.mark.parametrize("flags,message", [
    (["--kd_weight", "-1"], "--kd_weight -1.0: must be 0 or more"),
    (["--ce_weight", "-0.5"], "--ce_weight -0.5: must be 0 or more"),
    (["--kd_weight", "0", "--ce_weight", "0"], "nothing to train on"),
    (["--temperature", "0"], "--temperature 0.0: must be positive"),
    (["--jsd_beta", "2"], "--jsd_beta 2.0: must be in [0, 1]"),
])
@pytest.mark.parametrize("job", ["distill_pythia", "distill_geneformer", "train_block_till_end"])
def test_objective_checks_are_the_same_in_every_job(job, flags, message, capsys):
    """Refused by the parser (ranges) or by check_kd (combinations): the same words in every job."""
    from sitra.args import check_kd
    from sitra.errors import UsageError

    try:
        check_kd(cli.parse(job_module(job).ARGS, flags))
    except SystemExit as stop:
        assert stop.code == 2
        said = capsys.readouterr().err
    except UsageError as e:
        said = str(e)
    else:
        raise AssertionError(f"{flags} accepted")
    assert message in said


def test_alpha_and_new_flags_train_the_same_run(tiny_teacher, text_files, tmp_path):
    """An old command (--alpha) and its new spelling train bit-identical blocks in the same run folder name."""
    common = ["--teacher", tiny_teacher, "--train_file", str(text_files / "train.txt"), "--eval_file",
              str(text_files / "eval.txt"), "--block", "1", "--block_heads", "2", "--max_seq_length", "32",
              "--batch_size", "8", "--max_steps", "4", "--device", "cpu"]
    module = job_module("train_block_till_end")
    old = cli.main(module.ARGS, module.run, [*common, "--alpha", "0.5", "--storage_directory", str(tmp_path / "old")],
                   fused=(module.FUSABLE, module.run_fused))
    new = cli.main(module.ARGS, module.run, [*common, "--kd_weight", "1", "--ce_weight", "0.5",
                                             "--storage_directory", str(tmp_path / "new")],
                   fused=(module.FUSABLE, module.run_fused))
    old_run, new_run = old, new
    assert old_run.name == new_run.name and "_a0.5" in old_run.name
    a, b = load_file(old_run.checkpoint_dir / "best.safetensors"), load_file(new_run.checkpoint_dir / "best.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_typed_flag_beats_the_preset_even_at_its_default(minilm):
    args_class = job_module("retrain_single_block").ARGS
    default_lr = next(f.default for f in dataclasses.fields(args_class) if f.name == "lr")
    preset = cli.parse(args_class, ["--preset", "quickstart"])
    assert preset.lr == 1e-3 != default_lr and preset.block == 3 and preset.teacher == minilm
    typed = cli.parse(args_class, ["--preset", "quickstart", "--lr", str(default_lr), "--block=2"])
    assert typed.lr == default_lr and typed.block == 2
    assert dataclasses.replace(typed, lr=preset.lr, block=3) == preset  # every other flag from the preset


@pytest.mark.subprocess
def test_an_unknown_preset_is_one_line_exit_2():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "build_merged.py"), "--preset", "fast"],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "--preset fast: unknown; choose from quickstart" in lines[0]


@pytest.mark.parametrize("job", ["distill_pythia", "distill_classifier", "distill_summarizer"])
def test_students_start_from_one_shared_group(job):
    """--student, --student_init and --student_layers mean the same in every job that has them;
    each job allows only the starts it can build."""
    from sitra.args import STUDENT_INITS, StudentInitArgs

    args_class = job_module(job).ARGS
    assert issubclass(args_class, StudentInitArgs)
    choices = set(typing.get_args(next(f.type for f in dataclasses.fields(args_class) if f.name == "student_init")))
    assert choices <= set(STUDENT_INITS) and "pretrained" in choices and "teacher_layers" in choices
    bogus = next(k for k in STUDENT_INITS if k not in choices) if choices != set(STUDENT_INITS) else None
    if bogus:
        with pytest.raises(SystemExit):
            cli.parse(args_class, ["--student_init", bogus])


@pytest.mark.parametrize("job", ["retrain_single_block", "retrain_merge", "train_block_till_end"])
def test_block_jobs_refuse_a_causal_teacher_in_one_line(job, tmp_path, capsys):
    """A causal LM has no BERT attention blocks to replace: one line, exit 2, before any weights
    load (the folder holds only a config, so loading weights would fail otherwise)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path)
    module = job_module(job)
    with pytest.raises(SystemExit) as e:
        cli.main(module.ARGS, module.run, ["--teacher", str(tmp_path), "--block", "0", "--storage_directory", str(tmp_path / "s")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher: a llama model" in err[0] and "bert" in err[0]


def test_the_preset_flag_names_every_preset():
    """args.py is a leaf module and cannot import the presets, so its help names them as text."""
    from sitra.args import PresetArgs
    from sitra.presets import PRESETS

    help_text = next(f for f in dataclasses.fields(PresetArgs) if f.name == "preset").metadata["help"]
    assert help_text.rsplit(": ", 1)[1].split(", ") == list(PRESETS)
