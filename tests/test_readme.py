"""README.md documents every flag of every job, and starts with the two commands."""
import dataclasses
import re
from pathlib import Path

import pytest

from sitra.launch import LaunchArgs

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


from sitra.recipes import JOBS, job_module

ALL = [LaunchArgs] + [job_module(j).ARGS for j in JOBS]


@pytest.mark.parametrize("args_class", ALL, ids=lambda c: c.__name__)
def test_every_flag_is_documented(args_class):
    missing = [f.name for f in dataclasses.fields(args_class) if f"`--{f.name}`" not in README]
    assert not missing, f"README.md lacks {missing}"


def test_readme_starts_with_install_and_test_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert "pip install torch==2.13.0" in blocks[0] and "--preset quickstart" in blocks[0]
    assert blocks[0].index("torch==2.13.0") < blocks[0].index("pip install -e")
    assert blocks[1].strip().startswith("python -m pytest")


def test_every_job_has_an_entry_script():
    root = Path(__file__).resolve().parents[1]
    assert all((root / "jobs" / f"{j}.py").exists() for j in JOBS)
