"""Command-line plumbing shared by every `jobs/*.py` script.

Bad input is raised as `UsageError` anywhere before compute starts; `main` turns it into one line
on stderr and exit code 2, the same as argparse does for a bad flag value.
"""
import contextlib
import copy
import dataclasses
import signal
import sys
from pathlib import Path

from transformers import HfArgumentParser

from sitra import fuse, runtime
from sitra.args import SITRA_METADATA, check_values
from sitra.errors import Interrupted, StorageError, UsageError
from sitra.presets import PRESETS, typed_groups
from sitra.train import request_stop


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
    """Parse argv into `args_class`, then fill every flag not typed from `--preset NAME`.

    Bad values, unknown flags and an unknown preset are one-line errors (exit 2). `positional`
    names a field that may also be given by the leading bare arguments.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if positional and argv and not argv[0].startswith("-"):
        bare = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
        argv = [f"--{positional}", *argv[:bare], *argv[bare:]]
    parser = OneLineParser(args_class)
    try:
        args, rest = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args = apply_preset(args, typed_fields(parser, argv))
        check_values(args)
        return args
    except UsageError as e:
        fail(str(e))


def typed_fields(parser, argv: list[str]) -> set[str]:
    """The fields whose flags appear in argv (`--lr 5e-4`, `--lr=5e-4`, `--no_packing`)."""
    actions = parser._option_string_actions  # argparse's own map of option strings to fields
    return {actions[a.split("=", 1)[0]].dest for a in argv
            if a.startswith("-") and a.split("=", 1)[0] in actions}


def apply_preset(args, typed: set[str]):
    """args with every field not in `typed` (nor in a group of sitra.presets.GROUPS with a typed
    field) taken from the preset `args.preset` names, if any."""
    name = getattr(args, "preset", None)
    if not name:
        return args
    if name not in PRESETS:
        raise UsageError(f"--preset {name}: unknown; choose from {', '.join(PRESETS)}")
    names, typed = {f.name for f in dataclasses.fields(args)}, typed_groups(typed)
    return dataclasses.replace(args, **{k: v for k, v in PRESETS[name]().items() if k in names and k not in typed})


def main(args_class, run, argv=None, positional: str | None = None, fused=None):
    """What a job script does: parse the flags, call `run`, report bad input in one line.

    A job stopped early (`--stop_after_steps`, a preemption signal) says so and exits 0.
    fused=(FUSABLE, run_fused): comma lists given to those flags train the grid of them in one
    fused task (sitra.fuse).
    """

    argv = list(sys.argv[1:] if argv is None else argv)
    grid = fuse.expand_argv(argv, fused[0]) if fused else None
    args = [parse(args_class, a, positional) for a in grid] if grid else parse(args_class, argv, positional)
    signalled = []
    with stop_on_signals(signalled):
        try:
            runtime.setup()
            return fused[1](args) if grid else run(args)
        except UsageError as e:
            fail(str(e))
        except StorageError as e:
            sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {e}\n")
            sys.exit(1)
        except Interrupted as e:
            print(e)
            if signalled:  # a scheduler's signal, not --stop_after_steps: the job is not done
                sys.exit(STOPPED_BY_SIGNAL)
        finally:
            runtime.teardown()


STOPPED_BY_SIGNAL = 75  # EX_TEMPFAIL: saved and stopped by SIGTERM / SIGUSR2; rerun the command to resume
STOP_SIGNALS = ("SIGTERM", "SIGUSR2")


@contextlib.contextmanager
def stop_on_signals(signalled: list):
    """SIGTERM (SLURM's time limit, scancel) and SIGUSR2 (preemption) ask the loop to save at the
    next step boundary and stop; the handlers only set a flag (sitra.train.request_stop)."""
    def handler(signum, frame):
        signalled.append(signal.Signals(signum).name)
        request_stop(True, reason=signal.Signals(signum).name)

    old = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name)
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a job called from a thread): leave them be
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        request_stop(False)


def fail(message: str):
    """One line on stderr, exit code 2: how every bad input ends."""
    sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}\n")
    sys.exit(2)


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
