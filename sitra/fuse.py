"""Fused sweeps: several student configurations trained in one task against one teacher pass.

A job that can fuse defines FUSABLE (the flags that may differ between its students) and
run_fused(list of args); `run(args)` is run_fused([args]), so a fused student runs the very code
of a lone one. On the command line a fusable flag takes a comma list (`--block_d_k 64,32,16`), and
the grid of all lists is fused; the launcher fuses sweep axes with `--fuse`.
"""
import dataclasses
import itertools

from sitra.errors import UsageError

GB = 1e9


def expand_argv(argv: list[str], flags: tuple[str, ...]) -> list[list[str]] | None:
    """One argv per point of the grid of comma lists given to `flags`; None when there is none."""
    lists, out = {}, []
    i = 0
    while i < len(argv):
        item = argv[i]
        name, eq, value = item.partition("=")
        key = name.lstrip("-").replace("-", "_")
        if item.startswith("--") and key in flags:
            if not eq:
                if i + 1 >= len(argv):
                    break
                value, i = argv[i + 1], i + 1
            if "," in value:
                lists[key] = [v.strip() for v in value.split(",") if v.strip()]
                out.append(("list", key))
            else:
                out.append(("flag", f"--{key}", value))
        else:
            out.append(("raw", item))
        i += 1
    if not lists:
        return None
    argvs = []
    for combo in itertools.product(*lists.values()):
        chosen = dict(zip(lists, combo))
        argv_ = []
        for part in out:
            if part[0] == "list":
                argv_ += [f"--{part[1]}", chosen[part[1]]]
            elif part[0] == "flag":
                argv_ += [part[1], part[2]]
            else:
                argv_.append(part[1])
        argvs.append(argv_)
    return argvs


def check_shared(args_list: list, fusable: tuple[str, ...], names: list[str]):
    """Fused runs may differ only in the fusable flags (and their run names), and need distinct names."""
    first = dataclasses.asdict(args_list[0])
    for args in args_list[1:]:
        other = dataclasses.asdict(args)
        differ = [k for k in first if k not in fusable and k != "run_name" and first[k] != other[k]]
        if differ:
            raise UsageError(f"--{differ[0]}: fused runs differ in it ({first[differ[0]]!r} and {other[differ[0]]!r}); "
                             f"only {', '.join('--' + f for f in fusable)} may differ")
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"--run_name {dup}: fused runs need one name each; leave --run_name out")


def check_memory(need_gb: float, limit_gb: float, n_students: int, per_student_gb: float, flag: str = "--max_memory_gb"):
    """Refuse a fused group whose estimate is over the limit, saying how to split it."""
    if limit_gb and need_gb > limit_gb:
        fit = max(1, int((limit_gb - (need_gb - n_students * per_student_gb)) // per_student_gb)) if per_student_gb else 1
        raise UsageError(f"{flag} {limit_gb:g}: the {n_students} fused students need about {need_gb:.1f} GB "
                         f"({per_student_gb:.2f} GB each plus the shared teacher); fuse at most {fit} per task "
                         "(fuse fewer axes with --fuse) or raise the limit")


def block_student_gb(hidden: int, heads: int, d_k: int, batch: int, seq: int, intermediate: int = 0) -> float:
    """Memory of one student attention block (or merged layer, with its feed-forward) in training:
    fp32 weights, gradients and two AdamW moments (16 bytes a parameter), and the activations
    autograd keeps for backward: q, k, v, context and output projections, LayerNorm, the scores
    and probabilities of every head, and the feed-forward's two layers."""
    inner = heads * d_k
    params = 4 * hidden * inner + 3 * inner + hidden + 2 * intermediate * hidden + intermediate + hidden
    activations = batch * seq * (4 * inner + 4 * hidden + 2 * intermediate) + 2 * batch * heads * seq * seq
    return (16 * params + 4 * activations) / GB


def teacher_params_gb(config) -> float:
    """fp32 weights of a BERT-like teacher."""
    params = (config.vocab_size + config.max_position_embeddings) * config.hidden_size + config.num_hidden_layers * (
        4 * config.hidden_size ** 2 + 2 * config.hidden_size * config.intermediate_size)
    return 4 * params / GB


def teacher_gb(config, batch: int, seq: int) -> float:
    """The frozen teacher and what its forward keeps for the students: every layer's hidden
    states of one batch."""
    return teacher_params_gb(config) + 4 * batch * seq * (config.num_hidden_layers + 1) * config.hidden_size * 2 / GB
