"""Write docs/flags.md, the reference of every flag of every job, from the argument dataclasses.

    python docs/make_flags.py > docs/flags.md      (or: python docs/make_flags.py --write)

Each job's flags are the fields of its `ARGS` dataclass (sitra.recipes.job_module(name).ARGS, and
sitra.launch.LaunchArgs for jobs/launch.py). Argument groups that several jobs share (TrainArgs,
TextDataArgs, ...) get one table each; a job's own table lists the fields it adds or redeclares
(a redeclared field, e.g. another --lr default, wins over the group's). tests/test_readme.py
fails when docs/flags.md differs from what this script prints, so rerun it after changing a flag.
"""
import dataclasses
import functools
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sitra.launch import LaunchArgs  # noqa: E402
from sitra.recipes import JOBS, job_module  # noqa: E402

OUTPUT = ROOT / "docs" / "flags.md"


# ---------------------------------------------------------------------------------------------
# one field as a table row


def type_text(t) -> str:
    """A flag's type as people read it: `int`, `float`, `one of: a, b`, `list of str`."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return " or ".join(type_text(a) for a in kept)
    if origin is typing.Literal:
        return "one of: " + ", ".join(f"`{a}`" for a in args)
    if origin is list:
        return "list of " + (type_text(args[0]) if args else "str")
    if t is bool:
        return "switch"
    return getattr(t, "__name__", str(t).replace("typing.", ""))


# fields left at None whose value then comes from a class attribute of the job (sitra.args.KDArgs)
CLASS_DEFAULTS = {"kd_weight": ("KD_DEFAULTS", 0), "ce_weight": ("KD_DEFAULTS", 1)}


def default_text(f: dataclasses.Field, cls) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "**required**"
    if value is None and f.name in CLASS_DEFAULTS and hasattr(cls, CLASS_DEFAULTS[f.name][0]):
        attr, i = CLASS_DEFAULTS[f.name]
        value = getattr(cls, attr)[i]
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        value = f"{value:g}"
    if isinstance(value, list):
        return "`" + " ".join(map(str, value)) + "`"
    if value == "":
        return '`""`'
    return "`" + str(value).replace("\n", "\\n").replace("|", "\\|") + "`"


def flag_text(f: dataclasses.Field, t) -> str:
    names = [f"`--{f.name}`"]
    aliases = f.metadata.get("aliases", [])
    aliases = [aliases] if isinstance(aliases, str) else list(aliases)
    names += [f"`{a if a.startswith('-') else '--' + a}`" for a in aliases]
    if f.default is True and t is bool:
        names.append(f"`--no_{f.name}`")
    return " / ".join(names)


def help_text(f: dataclasses.Field, t, cls) -> str:
    text = " ".join(str(f.metadata.get("help", "")).split())
    notes = []
    if typing.get_origin(t) is list:
        note = "repeatable" if f.metadata.get("action") == "append" else "several values"
        if note not in text:
            notes.append(note)
    if f.name == "alpha" and hasattr(cls, "ALPHA_MEANING"):  # sitra.args.KDArgs: what the old flag means here
        from sitra import args as sitra_args

        meaning = getattr(sitra_args, "ALPHA_MEANINGS", {}).get(cls.ALPHA_MEANING)
        if meaning:
            notes.append(f"here `--alpha a` means `{meaning}`")
    if f.metadata.get("not_part_of_run"):
        notes.append("a rerun may change it and still resume")
    if notes:
        text = f"{text} ({'; '.join(notes)})" if text else "; ".join(notes)
    return text.replace("|", "\\|")


@functools.cache
def hints(cls) -> dict:
    return typing.get_type_hints(cls)


def row(cls, f: dataclasses.Field) -> str:
    t = hints(cls).get(f.name, f.type)
    return f"| {flag_text(f, t)} | {type_text(t)} | {default_text(f, cls)} | {help_text(f, t, cls)} |"


def table(cls, fields: list[dataclasses.Field]) -> list[str]:
    return ["| flag | type | default | help |", "| --- | --- | --- | --- |"] + [row(cls, f) for f in fields]


# ---------------------------------------------------------------------------------------------
# which fields a class adds to the documented classes it is built from


def source_of(cls) -> str:
    return cls.__module__.replace(".", "/") + ".py"


def first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def is_own_doc(cls) -> bool:
    """A docstring written for the class, not the one dataclasses makes up (`Name(a: int, ...)`)."""
    return bool(cls.__doc__) and not cls.__doc__.startswith(f"{cls.__name__}(")


def documented_bases(cls, documented: dict) -> list:
    """The documented classes `cls` is built from, leaving out those another of them includes."""
    found = [b for b in cls.__mro__[1:] if b in documented]
    return [b for b in found if not any(b is not o and b in o.__mro__ for o in found)]


def own_fields(cls, documented: dict) -> list[dataclasses.Field]:
    """Fields of `cls` that read differently here than in the nearest documented class it is
    built from that has them (another default, type or help), or that none of them has."""
    bases = [b for b in cls.__mro__[1:] if b in documented]
    mine = []
    for f in dataclasses.fields(cls):
        nearest = next((b for b in bases if f.name in b.__dataclass_fields__), None)
        if nearest is None or row(nearest, nearest.__dataclass_fields__[f.name]) != row(cls, f):
            mine.append(f)
    return mine


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def usage(job: str, cls) -> str:
    """The command line, with the bare arguments the job script accepts (`positional=`)."""
    if job == "launch":
        return "python jobs/launch.py JOB [job flags] [launcher flags]"
    script = ROOT / "jobs" / f"{job}.py"
    m = re.search(r'positional="(\w+)"', script.read_text()) if script.exists() else None
    if not m:
        return f"python jobs/{job}.py [flags]"
    many = typing.get_origin(typing.get_type_hints(cls).get(m[1])) is list
    return f"python jobs/{job}.py [{m[1].upper()}{' ...' if many else ''}] [flags]"


# ---------------------------------------------------------------------------------------------
# the document


def render() -> str:
    jobs = {name: job_module(name) for name in JOBS}
    job_args = {name: m.ARGS for name, m in jobs.items()} | {"launch": LaunchArgs}
    job_of = {cls: name for name, cls in job_args.items()}
    # argument groups: dataclasses in at least two jobs' flags that are no job's ARGS
    counts = {}
    for cls in job_args.values():
        for b in cls.__mro__[1:]:
            if dataclasses.is_dataclass(b) and b not in job_of:
                counts[b] = counts.get(b, 0) + 1
    groups = [b for b in counts if counts[b] >= 2]
    documented = {**{g: g.__name__ for g in groups}, **job_of}

    def link(cls) -> str:
        name = documented[cls]
        return f"[{name}](#{anchor(name)})" if cls in job_of else f"[`{name}`](#{anchor(name)})"

    out = [
        "# Flags of every job",
        "",
        "<!-- generated by `python docs/make_flags.py > docs/flags.md`; do not edit by hand -->",
        "",
        "Generated from the argument dataclasses by `python docs/make_flags.py > docs/flags.md`;",
        "`tests/test_readme.py` fails when this file is out of date. What the jobs do is in the",
        "[README](../README.md); `python jobs/JOB.py --help` prints the same flags.",
        "",
        "- Dashes work as well as underscores (`--block-heads`). A switch is on when given (`--packing`);",
        "  a switch that is on by default is turned off with its `--no_` form.",
        "- A list flag takes several values after it (`--models A B C`); a repeatable one may be given",
        "  several times.",
        "- \"a rerun may change it and still resume\": the flag does not define the run (where files go,",
        "  the device), so the same command with another value resumes the run instead of being refused.",
        "- `--preset NAME` (where a job has it) fills every flag you did not type; a flag you type wins.",
        "- Bad values are one-line errors naming the flag, exit code 2, before any compute.",
        "",
        "Jobs: " + ", ".join(f"[{name}](#{anchor(name)})" for name in job_args) + ".",
        "Shared groups: " + ", ".join(link(g) for g in groups) + ".",
        "",
        "## Shared groups",
        "",
    ]
    for g in groups:
        users = [name for name, cls in job_args.items() if g in cls.__mro__]
        out += [f"### {g.__name__}", ""]
        if is_own_doc(g):
            out += [first_line(g.__doc__), ""]
        out += [f"Defined in `{source_of(g)}`; used by {', '.join(users)}."]
        bases = documented_bases(g, documented)
        if bases:
            out[-1] += " Includes " + ", ".join(link(b) for b in bases) + "."
        out += [""] + table(g, own_fields(g, documented)) + [""]
    out += ["## Jobs", ""]
    for name, cls in job_args.items():
        module = jobs.get(name)
        doc = first_line(module.__doc__ if module else "Launch any sitra job locally or as one SLURM job array.")
        out += [f"### {name}", "", doc, "", f"`{usage(name, cls)}` — `{cls.__name__}` in `{source_of(cls)}`.", ""]
        if module is not None and hasattr(module, "RECORD_ARGS"):
            out += ["Its flags depend on `--job`: the flags below plus every flag of the job it names, one of "
                    + ", ".join(f"[{j}](#{anchor(j)})" for j in module.RECORD_ARGS)
                    + f" (default {', '.join(link(b) for b in documented_bases(cls, documented) if b in job_of)}).", ""]
        if is_own_doc(cls):
            out += [first_line(cls.__doc__), ""]
        bases = [b for b in documented_bases(cls, documented) if b not in job_of]
        mine = own_fields(cls, documented)
        if bases:
            out += ["Takes the flags of " + ", ".join(link(b) for b in bases)
                    + ("; the table lists the flags this job adds or sets differently (these win)." if mine
                       else "; no flags of its own."), ""]
        if mine:
            out += table(cls, mine) + [""]
    return "\n".join(out)


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--write"]:
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT}")
    elif sys.argv[1:]:
        sys.exit("usage: python docs/make_flags.py [--write]   (without --write: print to stdout)")
    else:
        sys.stdout.write(text)
