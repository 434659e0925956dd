"""Argument groups that several jobs share, and what their field metadata means.

A field may carry, besides `help` and `aliases`:
  not_part_of_run=True   a rerun may change it and still resume the run (where files go, the device)
  teacher_source=True    where the teacher's outputs come from (live or recorded); what a student
                         draws from its random stream does not depend on it
Jobs subclass the groups they use (one level deep); checks of a group's values live beside it.
"""
import dataclasses
from dataclasses import dataclass, field


SITRA_METADATA = ("not_part_of_run", "teacher_source")


def marked(args, key: str) -> frozenset[str]:
    """Names of the fields of `args` (an instance or a dataclass) whose metadata sets `key`."""
    return frozenset(f.name for f in dataclasses.fields(args) if f.metadata.get(key))


@dataclass(kw_only=True)
class RunArgs:
    """Where a run keeps its files and where it runs: every job that writes a run has these."""
    storage_directory: str = field(default=".", metadata={
        "help": "checkpoints/ and eval_results/ are made under it", "not_part_of_run": True})
    run_name: str | None = field(default=None, metadata={
        "help": "folder name of this run (default: from the job's flags)", "not_part_of_run": True})
    overwrite: bool = field(default=False, metadata={
        "help": "start over instead of resuming an existing run", "not_part_of_run": True})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N", "not_part_of_run": True})
    seed: int = 42
