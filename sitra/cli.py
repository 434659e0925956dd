"""Command-line plumbing shared by every `jobs/*.py` script.

Bad input is raised as `UsageError` anywhere before compute starts; `main` turns it into one line
on stderr and exit code 2, the same as argparse does for a bad flag value.
"""
import copy
import dataclasses
import sys
from pathlib import Path

from transformers import HfArgumentParser

from sitra.args import SITRA_METADATA
from sitra.errors import Interrupted, UsageError


class OneLineParser(HfArgumentParser):
    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)  # --block must not mean --blocks

    def error(self, message):
        fail(message)

    @staticmethod
    def _parse_dataclass_field(parser, field):
        """As HfArgumentParser, with sitra's own metadata keys (sitra.args) kept from argparse."""
        field = copy.copy(field)
        field.metadata = {k: v for k, v in field.metadata.items() if k not in SITRA_METADATA}
        HfArgumentParser._parse_dataclass_field(parser, field)


def parse(args_class, argv=None, positional: str | None = None):
    """Parse argv into `args_class`; unknown flags are one-line errors too (exit 2).

    `positional` names a field that may also be given by the leading bare arguments.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if positional and argv and not argv[0].startswith("-"):
        bare = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
        argv = [f"--{positional}", *argv[:bare], *argv[bare:]]
    parser = OneLineParser(args_class)
    args, rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False
    )
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(args_class, run, argv=None, positional: str | None = None, fused=None):
    """What a job script does: parse the flags, call `run`, report bad input in one line.

    A job stopped early (`--stop_after_steps`, a preemption signal) says so and exits 0.
    fused=(FUSABLE, run_fused): comma lists given to those flags train the grid of them in one
    fused task (sitra.fuse).
    """
    from sitra import fuse, runtime  # lazy: parsing --help must not import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    grid = fuse.expand_argv(argv, fused[0]) if fused else None
    args = [parse(args_class, a, positional) for a in grid] if grid else parse(args_class, argv, positional)
    try:
        runtime.setup()
        return fused[1](args) if grid else run(args)
    except UsageError as e:
        fail(str(e))
    except Interrupted as e:
        print(e)
    finally:
        runtime.teardown()


def fail(message: str):
    """One line on stderr, exit code 2: how every bad input ends."""
    sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}\n")
    sys.exit(2)


def apply_preset(args, presets: dict):
    """Fill every field left at its default from the named preset (`--preset NAME`).

    A flag given explicitly on the command line keeps its value unless it equals the default.
    """
    if not getattr(args, "preset", None):
        return args
    if args.preset not in presets:
        raise UsageError(f"--preset {args.preset}: unknown; choose from {', '.join(presets)}")
    names = {f.name for f in dataclasses.fields(args)}
    values = {k: v for k, v in presets[args.preset]().items() if k in names}
    defaults = {f.name: _default(f) for f in dataclasses.fields(args)}
    return dataclasses.replace(
        args, **{k: v for k, v in values.items() if getattr(args, k) == defaults[k]}
    )


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def command_line(script: str, args) -> str:
    """The command that reruns `args`: the script and every flag that differs from its default."""
    import shlex

    parts = [f"python {script}"]
    for f in dataclasses.fields(args):
        value, default = getattr(args, f.name), _default(f)
        if value == default:
            continue
        if isinstance(value, bool):
            parts.append(f"--{f.name}" if value else f"--no_{f.name}")
        elif isinstance(value, list):
            parts.append(f"--{f.name} " + " ".join(shlex.quote(str(v)) for v in value))
        else:
            parts.append(f"--{f.name} {shlex.quote(str(value))}")
    return " ".join(parts)
