"""SiTra on MiniLM, judged on a task (SST-2): the teacher fine-tuned on SST-2; its six attention
blocks retrained with d_k halved (one fused task), assembled and fine-tuned on SST-2 the same way;
its layers merged in pairs (one fused task), assembled, given conditioned fine-tuning and
fine-tuned on SST-2 the same way; a two-layer distill_classifier student of the SST-2 teacher.

Every model is made by sitra's jobs (benchmarks/quality_common.Runner). Checkpoints are chosen on
a validation split held out from train.tsv (--validation_from_train); dev.tsv is the --test_file,
evaluated once with the chosen checkpoint. The hidden-state cosine to the teacher is that of the
compressed encoders before the SST-2 fine-tuning (eval_merged on held-out WikiText-2)."""

from quality_common import (
    Inputs,
    Runner,
    final_metrics,
    markdown_table,
    parameter_counts,
    us_per_token,
)

# Sizes per scale. default: about 18 minutes on 2 idle CPU cores. Calibrated on MiniLM with one
# thread (CPU-seconds, which other work on the machine does not inflate much): an SST-2 step of 32
# sentences 1.2 s, a block step of 16 x 128 tokens with six students 1.2 s, a merge step with three
# layers 2 s, a conditioned step 1.0 s, a job's start 5 s; whole jobs at these sizes (150 block
# steps): teacher 265, blocks 192, retrained SST-2 265, merge 243, conditioned 216, merged SST-2 178,
# distilled 198, eval_merged 77 CPU-s. Two threads on two idle cores run about 1.7x faster;
# EXPECTED_S holds the resulting estimates.
TEXT = dict(max_seq_length=128, batch_size=16)
SIZES = {
    "toy": dict(sst2=dict(train_fraction=1.0, validation=16, max_seq_length=32, batch_size=8, max_steps=6,
                          eval_steps=3, lr=1e-3, warmup_steps=1),
                blocks=dict(percentage_data=1.0, max_seq_length=32, batch_size=8, max_steps=4, eval_steps=4),
                merge=dict(percentage_data=1.0, max_seq_length=32, batch_size=8, max_steps=4, eval_steps=4),
                conditioned=dict(percentage_data=1.0, max_seq_length=32, batch_size=8, max_steps=2, eval_steps=2),
                fidelity=dict(percentage_data=1.0, max_seq_length=32),
                distill=dict(lr=1e-3),
                timing=dict(batch=2, length=16, repeats=2)),
    "default": dict(sst2=dict(train_fraction=0.1, validation=500, max_seq_length=64, batch_size=32, max_steps=200,
                              eval_steps=50, lr=1e-4, warmup_steps=20),
                    blocks=dict(TEXT, percentage_data=0.3, max_steps=250, eval_steps=250),
                    merge=dict(TEXT, percentage_data=0.15, max_steps=120, eval_steps=120),
                    conditioned=dict(TEXT, percentage_data=0.05, max_steps=50, eval_steps=50),
                    fidelity=dict(percentage_data=0.15, max_seq_length=128),
                    distill=dict(lr=5e-4),
                    timing=dict(batch=8, length=128, repeats=5)),
    "full": dict(sst2=dict(train_fraction=1.0, validation=1000, max_seq_length=64, batch_size=32, epochs=3,
                           eval_steps=500, lr=5e-5, warmup_steps=200),
                 blocks=dict(TEXT, percentage_data=1.0, epochs=10, batch_size=32),
                 merge=dict(TEXT, percentage_data=1.0, epochs=10, batch_size=32),
                 conditioned=dict(TEXT, percentage_data=1.0, epochs=3, batch_size=32),
                 fidelity=dict(percentage_data=1.0, max_seq_length=128),
                 distill=dict(lr=2e-4),
                 timing=dict(batch=8, length=128, repeats=5)),
}
# estimated wall seconds of each job at --scale default on 2 idle CPU cores (printed before each job)
EXPECTED_S = {"teacher": 160, "blocks": 185, "build_retrained": 8, "sst2_retrained": 160, "merge": 145,
              "build_merged": 8, "conditioned": 130, "sst2_merged": 105, "distill": 120, "fidelity": 50}

AIMS = {"retrained": 0.99, "merged": 0.95}


def flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def sst2_flags(size: dict, inputs: Inputs, **override) -> list[str]:
    s = dict(size, **override)
    validation = s.pop("validation")
    return ["--train_file", inputs.sst2 / "train.tsv", "--validation_from_train", validation,
            "--test_file", inputs.sst2 / "dev.tsv", *flags(s)]


def text_flags(size: dict, inputs: Inputs) -> list[str]:
    return ["--train_file", inputs.train_text, "--eval_file", inputs.heldout_text, *flags(size)]


def teacher_shape(teacher: str) -> tuple[int, int, int, int]:
    """(layers, heads, d_k of its heads, feed-forward width) of the teacher."""
    from sitra.models import load_config

    c = load_config(teacher, "--encoder_teacher")
    return c.num_hidden_layers, c.num_attention_heads, c.hidden_size // c.num_attention_heads, c.intermediate_size


def check(inputs: Inputs):
    """Refuse a teacher the section cannot use, before any job runs."""
    from sitra.errors import UsageError

    layers, heads, d_k, _ = teacher_shape(inputs.encoder_teacher)
    if layers % 2 or d_k % 2:
        raise UsageError(f"--encoder_teacher {inputs.encoder_teacher}: {layers} layers of {heads} heads x {d_k}; "
                         "the section merges pairs of layers and halves d_k, so both must be even")


def run_job(runner: Runner, scale: str, key: str, job: str, *args) -> float:
    if scale == "default" and key in EXPECTED_S:
        print(f"[{key}] expected about {EXPECTED_S[key] / 60:.1f} min", flush=True)
    return runner.run(job, *args)


def section(scale: str, inputs: Inputs, runner: Runner) -> str:
    from transformers import AutoModelForSequenceClassification

    size, start = SIZES[scale], len(runner.commands)
    if scale == "default":
        print(f"encoder section: about {sum(EXPECTED_S.values()) / 60:.0f} minutes on 2 idle CPU cores", flush=True)
    store = runner.storage
    ck = store / "checkpoints"
    teacher = inputs.encoder_teacher
    layers, heads, d_k, ff = teacher_shape(teacher)
    common = ["--storage_directory", store]
    sst2 = sst2_flags(size["sst2"], inputs)
    blocks = ",".join(str(b) for b in range(layers))
    pairs = ",".join(str(b) for b in range(0, layers, 2))
    half = d_k // 2
    block_runs = [ck / f"block{b}_h{heads}_dk{half}_MSE_svd" for b in range(layers)]
    merge_runs = [ck / f"merge{b}_h{heads}_dk{d_k}_ff{ff}_first_MSE" for b in range(0, layers, 2)]

    # the teacher
    run_job(runner, scale, "teacher", "finetune_classifier", "--model", teacher, *sst2, *common, "--run_name", "sst2_teacher")
    # retrained blocks: every attention block at half d_k, started from the teacher's block truncated to it,
    # one fused task; assembled; fine-tuned the same way
    run_job(runner, scale, "blocks", "retrain_single_block", "--teacher", teacher, "--block", blocks,
            "--block_heads", heads, "--block_d_k", half, "--block_init", "teacher_svd", *text_flags(size["blocks"], inputs),
            *common)
    run_job(runner, scale, "build_retrained", "build_retrained", "--teacher", teacher, "--checkpoints", *block_runs,
            "--output", ck / "retrained_model", "--storage_directory", store, "--overwrite")
    run_job(runner, scale, "sst2_retrained", "finetune_classifier", "--model", ck / "retrained_model", *sst2, *common,
            "--run_name", "sst2_retrained")
    # merged layers: pairs (0,1), (2,3), ... one fused task; assembled; conditioned fine-tuning; SST-2
    run_job(runner, scale, "merge", "retrain_merge", "--teacher", teacher, "--block", pairs, "--block_heads", heads,
            "--block_d_k", d_k, *text_flags(size["merge"], inputs), *common)
    run_job(runner, scale, "build_merged", "build_merged", "--teacher", teacher, "--checkpoints", *merge_runs,
            "--output", ck / "merged_model", "--storage_directory", store, "--overwrite")
    run_job(runner, scale, "conditioned", "finetune_conditioned_fully_merged", "--teacher", teacher,
            "--model", ck / "merged_model", *text_flags(size["conditioned"], inputs), *common, "--run_name", "conditioned")
    run_job(runner, scale, "sst2_merged", "finetune_classifier", "--model", ck / "conditioned" / "model", *sst2, *common,
            "--run_name", "sst2_merged")
    # a two-layer student of the SST-2 teacher, its layers cut from the teacher's (every k-th)
    run_job(runner, scale, "distill", "distill_classifier", "--teacher", ck / "sst2_teacher" / "model",
            "--student_init", "teacher_layers", "--student_layers", 2,
            *sst2_flags(size["sst2"], inputs, **size["distill"]), "--kd_weight", 0.5, "--ce_weight", 0.5,
            "--temperature", 2, *common, "--run_name", "sst2_distilled")
    # hidden-state fidelity of the compressed encoders to the teacher, on held-out text
    run_job(runner, scale, "fidelity", "eval_merged", "--teacher", teacher, "--models", ck / "retrained_model",
            ck / "conditioned" / "model", *text_flags(size["fidelity"], inputs), *common, "--run_name", "encoder_fidelity")

    cosine = final_metrics(store, "encoder_fidelity")
    rows = [("teacher, fine-tuned on SST-2", "sst2_teacher", "fine-tuned", None),
            (f"{layers} attention blocks retrained at d_k {half} (of {d_k}), fine-tuned", "sst2_retrained", "fine-tuned",
             cosine.get("retrained_model/hidden_cosine")),
            (f"{layers // 2}-layer merged model (conditioned fine-tuning), fine-tuned", "sst2_merged", "fine-tuned",
             cosine.get("conditioned/hidden_cosine")),
            ("2-layer distill_classifier student of the SST-2 teacher", "sst2_distilled", "student after KD", None)]
    table, accuracy = [], {}
    for label, run, model_name, cos in rows:
        folder = ck / run / "model"
        counts = parameter_counts(folder)
        acc = final_metrics(store, run)[f"{model_name}/test_accuracy"]
        accuracy[run] = acc
        table.append([label, counts["parameters"], counts["attention"],
                      us_per_token(folder, auto=AutoModelForSequenceClassification, **size["timing"]), acc,
                      100 * acc / accuracy["sst2_teacher"], cos])
    header = ["model", "parameters", "attention parameters", "µs per token", "SST-2 dev accuracy",
              "% of teacher", "hidden cosine to teacher"]
    return "\n\n".join([
        "## SiTra on MiniLM, judged on SST-2",
        markdown_table(header, table),
        notes(scale, size, accuracy, layers, half, d_k),
        "Commands (run from the repository root):",
        runner.table(start),
    ]) + "\n"


def budget(s: dict, what: str, fraction_key: str) -> str:
    """How much a job of the run trained, in words."""
    length = s.get("max_steps") and f"{s['max_steps']} steps" or f"{s.get('epochs', 1)} epochs"
    return f"{length} of {s['batch_size']} {what} ({100 * s[fraction_key]:g}% of the file)"


def notes(scale: str, size: dict, accuracy: dict, layers: int, half: int, d_k: int) -> str:
    t = accuracy["sst2_teacher"]
    aims = "; ".join(f"{k} keeps {100 * accuracy[f'sst2_{k}'] / t:.1f}% of the teacher's accuracy (aim >= {100 * a:.0f}%: "
                     f"{'met' if accuracy[f'sst2_{k}'] >= a * t else 'not met'})" for k, a in AIMS.items())
    s = size["sst2"]
    lines = f"lines of up to {size['blocks']['max_seq_length']} tokens of WikiText-2 valid.txt"
    return "\n".join([
        f"- Aims: {aims}.",
        f"- Every SST-2 fine-tuning (teacher, retrained, merged) uses the same flags: "
        f"{budget(s, 'sentences of train.tsv', 'train_fraction')}, {s['validation']} training sentences held out to "
        "choose the checkpoint, dev.tsv evaluated once at the end with it. The distilled student trains as long.",
        f"- Block retraining: each student block starts as the teacher's block truncated to d_k {half} "
        "(`--block_init teacher_svd`: best rank-d_k query-key forms and value maps); "
        f"{budget(size['blocks'], lines, 'percentage_data')}; merging: "
        f"{budget(size['merge'], 'lines', 'percentage_data')}; conditioned fine-tuning: "
        f"{budget(size['conditioned'], 'lines', 'percentage_data')} per layer.",
        "- Parameters and attention parameters are the stored weights of each final classifier folder (attention: "
        "query, key, value and output projections and the output LayerNorm of every layer); µs per token is one "
        "forward pass of a batch of {batch} x {length} tokens on this machine (fastest of {repeats}).".format(**size["timing"]),
        "- Hidden cosine: mean cosine of the last hidden states of the compressed encoder (before SST-2) and the "
        "teacher's encoder on held-out WikiText-2 tokens (eval_merged); after SST-2 each classifier has moved away "
        "from the teacher in its own fine-tuning.",
        f"- Halving d_k ({d_k} -> {half}) shrinks query, key and value, but each retrained block also has its own "
        "output projection before the teacher's, so attention parameters fall by about a quarter, not a half.",
        "- These budgets are small (a CPU): the table compares sitra's methods with each other at equal budget. "
        "`--scale full` (a GPU) trains on all of SST-2 for 3 epochs and the blocks for 10 epochs of WikiText-2."
        if scale != "full" else "- `--scale full`: SST-2 for 3 epochs, blocks and merges for 10 epochs of WikiText-2.",
    ])
