"""Every flag of every job, tried with bad values by its type: an exit code 2, one line on stderr
naming the flag, and no file written. The fields are walked from the dataclasses, so a new flag is
fuzzed without editing this test."""
import dataclasses
import types
import typing

import pytest

from sitra import cli, launch
from sitra.args import FLAG_BOUNDS, FLAG_PATHS
from sitra.recipes import JOBS, job_module


def job_classes():
    for job in JOBS:
        module = job_module(job)
        yield job, (module.args_class([]) if hasattr(module, "args_class") else module.ARGS)
    yield "launch", launch.LaunchArgs


def base_type(t):
    """int, float, bool, str, a Literal's choices (tuple), or ('list', element type)."""
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    if typing.get_origin(t) is typing.Literal:
        return typing.get_args(t)
    if typing.get_origin(t) is list:
        return ("list", typing.get_args(t)[0])
    return t


def bad_values(f):
    """(value, what is wrong) for the field's type and its declared bounds."""
    t = base_type(f.type)
    if isinstance(t, tuple) and t and t[0] == "list":
        if t[1] in (int, float):
            yield "-1", "negative"
        if f.name in FLAG_PATHS:
            yield "/no/such/path", "missing path"
        return
    if isinstance(t, tuple):
        yield "bogus", "unknown choice"
        return
    if t is bool:
        yield "maybe", "not a bool"
        return
    if t in (int, float):
        yield "abc", "not a number"
        yield "-1", "negative"
        if t is int:
            yield "1.5", "not an integer"
        bounds = f.metadata.get("bounds", FLAG_BOUNDS.get(f.name, {}))
        if bounds.get("min", 0) >= 1:
            yield "0", "below its minimum"
        if "above" in bounds:
            yield str(bounds["above"]), "not above its bound"
        if "max" in bounds:
            yield str(bounds["max"] + 0.5), "above its maximum"
        if "below" in bounds:
            yield str(bounds["below"]), "not below its bound"
        if t is float:
            yield "nan", "not a number"
        return
    if f.name in FLAG_PATHS:
        yield "/no/such/path", "missing path"
    if f.name == "device":
        yield "bogus", "unknown device"


def required_flags(cls, but: str, folder) -> list[str]:
    """Valid values for the fields without a default (other than the one fuzzed)."""
    out = []
    for f in dataclasses.fields(cls):
        if f.name != but and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            out += [f"--{f.name}", str(folder) if f.name in FLAG_PATHS else "x"]
    return out


CASES = [(job, cls, f.name, value, why) for job, cls in job_classes() for f in dataclasses.fields(cls)
         for value, why in bad_values(f)]


@pytest.mark.parametrize("job,cls,flag,value,why", CASES, ids=[f"{c[0]}--{c[2]}={c[3]}" for c in CASES])
def test_a_bad_value_is_one_line_exit_2_naming_the_flag(job, cls, flag, value, why, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [*required_flags(cls, flag, tmp_path), f"--{flag}", value]
    with pytest.raises(SystemExit) as stop:
        if job == "launch":
            launch.main(["retrain_single_block", *argv])
        else:
            cli.parse(cls, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, (why, lines)
    assert f"--{flag}" in lines[0], (why, lines[0])
    assert not list(tmp_path.iterdir()), "a file was written"


def test_every_job_is_fuzzed():
    fuzzed = {c[0] for c in CASES}
    assert fuzzed == set(JOBS) | {"launch"}
    assert len(CASES) > 1000
