"""Argument groups that several jobs share, and what their field metadata means.

A field may carry, besides `help` and `aliases`:
  not_part_of_run=True   a rerun may change it and still resume the run (where files go, the device)
  teacher_source=True    where the teacher's outputs come from (live or recorded); what a student
                         draws from its random stream does not depend on it
Jobs subclass the groups they use (one level deep); checks of a group's values live beside it.
"""
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sitra.errors import UsageError
from sitra.reporting import check_report_to

SITRA_METADATA = ("not_part_of_run", "teacher_source", "bounds")


def marked(args, key: str) -> frozenset[str]:
    """Names of the fields of `args` (an instance or a dataclass) whose metadata sets `key`."""
    return frozenset(f.name for f in dataclasses.fields(args) if f.metadata.get(key))


@dataclass(kw_only=True)
class PresetArgs:
    """Jobs of the block-retraining workflow take `--preset quickstart` (sitra.presets)."""
    preset: str | None = field(default=None, metadata={
        "help": "fill every flag you do not type from a preset: quickstart"})  # the names of sitra.presets.PRESETS


@dataclass(kw_only=True)
class PlaceArgs(PresetArgs):
    """Where a job keeps its files and where it runs: every job that writes a run or results."""
    storage_directory: str = field(default=".", metadata={
        "help": "checkpoints/ and eval_results/ are under it", "not_part_of_run": True})
    run_name: str | None = field(default=None, metadata={
        "help": "name of this run's folder and log (default: from the job's flags)", "not_part_of_run": True})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N", "not_part_of_run": True})


@dataclass(kw_only=True)
class RunArgs(PlaceArgs):
    """A run that trains: it resumes from its folder unless told to start over, from its seed."""
    overwrite: bool = field(default=False, metadata={
        "help": "start over instead of resuming an existing run", "not_part_of_run": True})
    seed: int = field(default=42, metadata={"help": "seed of the initial weights, data order, masks and dropout"})
    report_to: str = field(default="none", metadata={
        "help": "also write the log's numbers to tensorboard, wandb or both (tensorboard,wandb), in the run folder; "
                "a resumed run continues the same TensorBoard and W&B run; none: only the HDF5 log",
        "not_part_of_run": True})


# --loss names: the divergences of sitra.losses.LOGIT_LOSSES (kept here so parsing needs no torch)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "mse")
# what --alpha meant in each kind of job before --kd_weight / --ce_weight
ALPHA_MEANINGS = {
    "ce": "--ce_weight a --kd_weight 1-a",   # distill_pythia, distill_classifier, distill_summarizer
    "kd": "--kd_weight a --ce_weight 1-a",   # distill_geneformer
    "ce_added": "--kd_weight 1 --ce_weight a",  # finetune_*, train_full_merged_model, train_block_till_end
}
KD_HELP = {
    "loss": "divergence D of the distillation term: forward_kl (KL(teacher || student)), reverse_kl, jsd, mse",
    "temperature": "softmax temperature T of both distributions in D (the term is multiplied by T^2)",
    "jsd_beta": "beta of --loss jsd (0: forward KL, 1: reverse KL)",
    "kd_weight": "weight of the distillation term T^2 * D(teacher_T || student_T)",
    "ce_weight": "weight of the cross-entropy with the data's targets (labels, next tokens, masked tokens)",
}


def alpha_weights(meaning: str, a: float) -> tuple[float, float]:
    """(kd_weight, ce_weight) that --alpha a meant in a job of that ALPHA_MEANINGS kind."""
    return {"ce": (1 - a, a), "kd": (a, 1 - a), "ce_added": (1.0, a)}[meaning]


def kd_field(name: str, default):
    """A KDArgs field with a job's own default (the help stays the group's)."""
    return field(default=default, metadata={"help": KD_HELP[name]})


@dataclass(kw_only=True)
class KDArgs:
    """The distillation objective, the same in every job (sitra.losses.distill_loss):
    loss = kd_weight * T^2 * D(teacher_T || student_T) + ce_weight * CE(targets).

    A job sets its defaults by redeclaring fields with `kd_field` and names in ALPHA_MEANING
    what its old flag --alpha meant, so old commands still train what they trained before."""
    ALPHA_MEANING = "ce"

    loss: Literal[DIVERGENCES] = field(default="forward_kl", metadata={"help": KD_HELP["loss"]})
    temperature: float = kd_field("temperature", 2.0)
    jsd_beta: float = kd_field("jsd_beta", 0.5)
    kd_weight: float | None = kd_field("kd_weight", None)
    ce_weight: float | None = kd_field("ce_weight", None)
    alpha: float | None = field(default=None, metadata={
        "help": "old name of the weights, converted with a notice: what it meant in this job is in the README"})

    def __post_init__(self):
        if self.alpha is not None:
            a, meaning = self.alpha, self.ALPHA_MEANING
            if self.kd_weight is not None or self.ce_weight is not None:
                raise UsageError(f"--alpha {a}: the old name of --kd_weight / --ce_weight; give one or the other")
            if meaning in ("ce", "kd") and not 0 <= a <= 1:
                raise UsageError(f"--alpha {a}: must be in [0, 1]")
            if meaning == "ce_added" and not a >= 0:
                raise UsageError(f"--alpha {a}: must be 0 or more")
            self.kd_weight, self.ce_weight = alpha_weights(meaning, a)
            _notice(type(self), f"--alpha {a:g} is the old name: this job reads it as --kd_weight {self.kd_weight:g} "
                    f"--ce_weight {self.ce_weight:g}")
            self.alpha = None
        defaults = self.KD_DEFAULTS
        if self.kd_weight is None:
            self.kd_weight = defaults[0]
        if self.ce_weight is None:
            self.ce_weight = defaults[1]

    KD_DEFAULTS = (0.5, 0.5)  # (kd_weight, ce_weight) when neither they nor --alpha are given

    def objective(self) -> dict:
        """The keyword arguments of sitra.losses.distill_loss."""
        return dict(divergence=self.loss, temperature=self.temperature, beta=self.jsd_beta,
                    kd_weight=self.kd_weight, ce_weight=self.ce_weight)

    def describe(self, targets: str = "targets") -> str:
        """The objective in words, for model cards."""
        d = self.loss + (f" (beta {self.jsd_beta:g})" if self.loss == "jsd" else "")
        return (f"{self.kd_weight:g} x T^2 x {d}(teacher_T || student_T) + {self.ce_weight:g} x cross-entropy({targets}), "
                f"T = {self.temperature:g}")

    def weights_name(self) -> str:
        """The run-name part of the weights: `a<alpha>` where an old --alpha gives them (so old
        commands keep their run folders), else `kd<w>_ce<w>`."""
        kd, ce = self.kd_weight, self.ce_weight
        a = kd if self.ALPHA_MEANING == "kd" else ce
        if (kd, ce) == alpha_weights(self.ALPHA_MEANING, a):
            return f"a{a:g}"
        return f"kd{kd:g}_ce{ce:g}"


def check_kd(args: KDArgs, divergences=DIVERGENCES):
    """One-line errors for the objective's flags, before any compute (their ranges: check_values)."""
    if args.loss not in divergences:
        raise UsageError(f"--loss {args.loss}: allowed {', '.join(divergences)}")
    check_values(args, KDArgs)
    if args.kd_weight == 0 and args.ce_weight == 0:
        raise UsageError("--kd_weight 0 --ce_weight 0: nothing to train on; give one of them a positive weight")


_said = set()


def _notice(job, line: str):
    """Say a line once per job and process (a fused grid parses the same flags several times)."""
    if (job, line) not in _said:
        _said.add((job, line))
        print(line, file=sys.stderr)


STUDENT_INITS = {
    "pretrained": "--student's weights",
    "config": "random weights of --student's config",
    "auto": "pretrained, or config where --student has no weights",
    "teacher_layers": "every k-th layer of the teacher (as DistilBERT)",
    "random": "the teacher's config with --student_layers layers, random weights",
}


def student_init_field(default: str, *allowed: str):
    """A job's --student_init: the starts it can build, with the group's words for them."""
    return field(default=default, metadata={"help": "; ".join(f"{k}: {STUDENT_INITS[k]}" for k in allowed)})


@dataclass(kw_only=True)
class StudentInitArgs:
    """Where a distilled student starts. A job redeclares `student_init` with student_init_field
    (the starts it can build) and `student` where it has a default student."""
    student: str | None = field(default=None, metadata={
        "help": "the model the student starts from: a folder, hub id or .gguf file (pretrained, config and auto starts)"})
    student_init: str = student_init_field("pretrained", "pretrained", "teacher_layers")
    student_layers: int | None = field(default=None, metadata={
        "help": "layers of a student made from the teacher (teacher_layers, random; default: half the teacher's)"})


SAMPLINGS = ("top_k", "random")  # what teacher records hold (sitra.records)


@dataclass(kw_only=True)
class RecordsArgs:
    """A teacher recorded once by jobs/record_teacher.py instead of a live one."""
    teacher_logits: str | None = field(default=None, metadata={"teacher_source": True,
        "help": "records folder of jobs/record_teacher.py: train from the recorded teacher, never loading it"})
    teacher_logits_sampling: Literal[SAMPLINGS] | None = field(default=None, metadata={"teacher_source": True,
        "help": "what --teacher_logits hold (default: whatever they hold): top_k ids + the rest mass, or random draws"})


def check_block(block, num_layers: int, flag: str = "--block", needs_successor: bool = False):
    last = num_layers - 2 if needs_successor else num_layers - 1
    if block is None:
        raise UsageError(f"{flag} is required: a layer index 0-{last}")
    if not 0 <= block <= last:
        why = " (it needs a following layer)" if needs_successor else ""
        raise UsageError(f"{flag} {block}: the teacher has {num_layers} layers, allowed 0-{last}{why}")


def student_shape(hidden_size: int, heads: int, d_k: int | None) -> tuple[int, int]:
    """(heads, d_k) of a student block; d_k defaults to hidden_size / heads."""
    if heads < 1:
        raise UsageError(f"--block_heads {heads}: must be at least 1")
    if d_k is None:
        if hidden_size % heads:
            divisors = [h for h in range(1, hidden_size + 1) if hidden_size % h == 0 and h <= 64]
            raise UsageError(f"--block_heads {heads} does not divide the hidden size {hidden_size}: "
                             f"give --block_d_k or use one of {', '.join(map(str, divisors))}")
        d_k = hidden_size // heads
    if d_k < 1:
        raise UsageError(f"--block_d_k {d_k}: must be at least 1")
    return heads, d_k


@dataclass(kw_only=True)
class StudentBlockArgs:
    """The teacher and the shape of the student attention that replaces one of its blocks."""
    teacher: str = field(default="bert-base-uncased", metadata={"teacher_source": True, "help": "hub id or local model folder"})
    block: int | None = field(default=None, metadata={"help": "index of the layer whose attention is replaced"})
    block_heads: int = field(default=12, metadata={"help": "attention heads of the student block"})
    block_d_k: int | None = field(default=None, metadata={"help": "width of each head (default: hidden size / heads)"})
    block_dropout: float = field(default=0.1, metadata={"help": "attention dropout of the student block"})


@dataclass(kw_only=True)
class BlockInitArgs:
    """Where a retrained student block starts."""
    block_init: Literal["random", "teacher_svd"] = field(default="random", metadata={"help":
        "random: BERT's initialisation; teacher_svd: the teacher's block truncated to --block_d_k per head "
        "(best rank-d_k query-key forms and value paths; needs --block_heads equal to the teacher's)"})

    def init_name(self) -> str:
        """The run-name part of the start: runs from a truncated teacher block are kept apart."""
        return "_svd" if self.block_init == "teacher_svd" else ""


def check_block_init(args: BlockInitArgs, config, heads: int):
    if args.block_init == "teacher_svd" and heads != config.num_attention_heads:
        raise UsageError(f"--block_init teacher_svd: needs --block_heads {config.num_attention_heads} (the teacher's heads), "
                         f"not {heads}; or --block_init random")


# configs whose models sitra.models.bert can splice student blocks and merged layers into
BLOCK_TEACHERS = ("bert", "sitra_bert")


def check_student_block(args: StudentBlockArgs, config, needs_successor: bool = False) -> tuple[int, int]:
    """(heads, d_k) after checking the teacher's kind, --block, --block_heads, --block_d_k and
    --block_dropout."""
    if config.model_type not in BLOCK_TEACHERS:
        raise UsageError(f"--teacher: a {config.model_type} model; block and merge jobs retrain the attention blocks "
                         f"of BERT encoders ({', '.join(BLOCK_TEACHERS)}); distil a causal LM with distill_pythia")
    check_block(args.block, config.num_hidden_layers, needs_successor=needs_successor)
    if not 0 <= args.block_dropout < 1:
        raise UsageError(f"--block_dropout {args.block_dropout}: must be in [0, 1)")
    return student_shape(config.hidden_size, args.block_heads, args.block_d_k)


# ---------------------------------------------------------------------------------------------
# Plain-value checks every job gets from the parser, before anything loads or is written.
# A flag name means the same in every job, so its bounds are written once, here. Every number
# is 0 or more unless its bounds say otherwise; min/max are inclusive, above/below exclusive.

FLAG_BOUNDS = {
    **dict.fromkeys(["batch_size", "epochs", "gradient_accumulation_steps", "block_heads", "block_d_k", "chunk_size",
                     "cpus_per_task", "array_parallelism", "generation_batch_size", "hidden_size", "num_attention_heads",
                     "num_hidden_layers", "length_group_size", "loss_chunks", "max_new_tokens", "max_seq_length",
                     "max_length", "max_prompt_length", "max_summary_length", "nodes", "num_shards", "passes",
                     "relation_heads", "eval_stride", "stride", "student_layers", "tasks_per_node", "top_k",
                     "intermediate_size", "bucket_sizes"], {"min": 1}),
    **dict.fromkeys(["lr", "temperature", "sampling_temperature", "adam_epsilon", "target_sum",
                     "save_checkpoint_every"], {"above": 0}),
    **dict.fromkeys(["percentage_data", "train_fraction"], {"above": 0, "max": 1}),
    **dict.fromkeys(["mlm_probability", "validation_fraction"], {"above": 0, "below": 1}),
    **dict.fromkeys(["jsd_beta", "on_policy_fraction"], {"max": 1}),
    **dict.fromkeys(["adam_beta1", "adam_beta2", "block_dropout", "attention_dropout"], {"below": 1}),
}
DEVICES = "auto, cpu, cuda or cuda:N"
# flags that name a local file or folder that must exist (model flags may also be hub ids: not here)
FLAG_PATHS = {**dict.fromkeys(["train_file", "eval_file", "validation_file", "test_file", "lambada_file", "h5ad",
                               "token_dictionary", "gene_median_dictionary", "gene_name_dictionary", "log"], "file"),
              **dict.fromkeys(["dataset_dir", "data", "sweep_dir", "model_dir", "checkpoints"], "folder")}


# flags whose value a job does not use when one of the others is given: the logged config says so
# (as_used), so that it records the data a run read, not a default or a preset's suggestion
UNUSED_WHEN = dict.fromkeys(["dataset_name", "dataset_config"], ("train_file", "eval_file"))


def as_used(config: dict) -> dict:
    """The config with every UNUSED_WHEN flag that another given flag overrides set to None."""
    return {k: None if any(config.get(o) for o in UNUSED_WHEN.get(k, ())) else v for k, v in config.items()}


def check_values(args, group=None):
    """One-line errors for plain values out of their flag's range (and --device, and local paths
    that must exist), for any job; `group`: only the fields of that argument group."""
    for f in dataclasses.fields(group or args):
        value = getattr(args, f.name)
        if f.name == "device" and isinstance(value, str):
            kind, _, index = value.partition(":")
            if value != "auto" and kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
                raise UsageError(f"--device {value}: choose {DEVICES}")
        if f.name == "report_to":
            check_report_to(value)
        kind = FLAG_PATHS.get(f.name)
        for text in (value if isinstance(value, list) else [value]) if kind else []:
            if isinstance(text, str) and text and not (Path(text).is_file() if kind == "file" else Path(text).is_dir()):
                raise UsageError(f"--{f.name} {text}: no such {kind}")
        bounds = f.metadata.get("bounds", FLAG_BOUNDS.get(f.name, {}))
        for x in value if isinstance(value, list) else [value]:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            flag = f"--{f.name} {x}"
            lo, above, hi, below = bounds.get("min", 0), bounds.get("above"), bounds.get("max"), bounds.get("below")
            if (x != x or (above is not None and not x > above) or x < lo or (hi is not None and x > hi)
                    or (below is not None and not x < below)):  # x != x: nan
                raise UsageError(f"{flag}: must be {_allowed(lo, above, hi, below)}")


def _allowed(lo, above, hi, below) -> str:
    """The range in words, e.g. 'in (0, 1]', 'positive', 'at least 1', '0 or more'."""
    if hi is not None or below is not None:
        start = f"({above}" if above is not None else f"[{lo}"
        end = f"{hi}]" if hi is not None else f"{below})"
        return f"in {start}, {end}"
    if above is not None:
        return "positive" if above == 0 else f"more than {above}"
    return f"at least {lo}" if lo else "0 or more"
