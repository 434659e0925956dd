"""`--report_to tensorboard,wandb`: the HDF5 log's numbers, also where users already look.

The HDF5 log stays the record; sitra.results.RunLog hands every row it appends to its journal
(and its final numbers) to the reporters here, on rank 0 only, so every training job reports
the same `train/`, `eval/` and `final/` scalars as its log, under the same step.

Both write inside the run folder (`checkpoints/<run>/`) and continue there when the run resumes:
- TensorBoard: `tensorboard/` (view with `tensorboard --logdir checkpoints`). A session that
  continues from step s writes a restart marker (purge_step s + 1; 0 for a run started over):
  readers drop the steps from there on that an interrupted session logged, so each step appears
  once, with the numbers of the HDF5 log.
- Weights & Biases: `wandb/` (offline too: `WANDB_MODE=offline`, later `wandb sync`). The run id
  is kept in `wandb_run_id`; a resumed or requeued run continues that W&B run (resume="allow").
  W&B steps only grow, so steps an interrupted session already sent are not sent again (W&B keeps
  the first numbers: the same on CPU, other timings). A run stopped to be resumed is marked
  preempting. Project and entity: W&B's own `WANDB_PROJECT` (default "sitra") and `WANDB_ENTITY`.
"""
import importlib.util
import os
import secrets
import string
from pathlib import Path

from sitra.errors import UsageError

# --report_to value: the package each one needs
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse_report_to(value: str | None) -> list[str]:
    """The reporters a --report_to value names ('none', '' and None: none)."""
    names = [n.strip() for n in (value or "").split(",") if n.strip() and n.strip() != "none"]
    return list(dict.fromkeys(names))


def check_report_to(value: str | None):
    """One-line errors for --report_to: an unknown name, or a reporter whose package is missing."""
    for name in parse_report_to(value):
        if name not in REPORTERS:
            raise UsageError(f"--report_to {value}: unknown '{name}'; allowed none, {', '.join(REPORTERS)} "
                             "or a comma list of them")
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise UsageError(f"--report_to {value}: {name} is not installed; pip install {REPORTERS[name]}")


def _numbers(values: dict) -> dict:
    """The entries that are plain numbers (a log's final numbers may hold a text)."""
    out = {}
    for k, v in values.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            pass
    return out


class TensorBoard:
    def __init__(self, folder: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop every event from this step on that an earlier session wrote
        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"),
                                    purge_step=0 if resume_step is None else resume_step + 1)

    def rows(self, step: int, scalars: dict):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def final(self, step: int, scalars: dict):
        self.rows(step, scalars)

    def close(self, status: str):
        self.writer.close()


class WandB:
    ID_FILE = "wandb_run_id"

    def __init__(self, folder: Path, run_name: str, config: dict, sent_upto: int | None):
        import wandb

        id_file = folder / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else "".join(
            secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's own ids
        if not id_file.exists():
            id_file.write_text(run_id + "\n")
        self.sent_upto = -1 if sent_upto is None else sent_upto  # steps W&B has from earlier sessions
        self.run = wandb.init(id=run_id, resume="allow", dir=str(folder), name=run_name, config=config,
                              project=os.environ.get("WANDB_PROJECT", "sitra"), reinit="create_new")

    def rows(self, step: int, scalars: dict):
        if step > self.sent_upto:
            self.run.log(scalars, step=step)

    def final(self, step: int, scalars: dict):
        self.run.summary.update(scalars)

    def close(self, status: str):
        if status == "stopped":
            self.run.mark_preempting()  # to be resumed: W&B shows it preempted, not finished
        self.run.finish(exit_code=1 if status == "failed" else 0)


class Reporters:
    """The reporters of one run log: rows go to each as {group/name: value} per step."""

    def __init__(self, reporters: list, start_step: int = 0):
        self.reporters, self.last_step = reporters, start_step  # final numbers go at the last step

    def rows(self, pending: dict):
        """pending: {"train": [row], "eval": [row]} as RunLog buffers them; sent step by step."""
        by_step = {}
        for group, rows in pending.items():
            for row in rows:
                step = int(row["step"])
                by_step.setdefault(step, {}).update({f"{group}/{k}": v for k, v in _numbers(row).items() if k != "step"})
        for step in sorted(by_step):
            self.last_step = max(self.last_step, step)
            for r in self.reporters:
                r.rows(step, by_step[step])

    def final(self, final: dict):
        scalars = {f"final/{k}": v for k, v in _numbers(final).items()}
        for r in self.reporters:
            r.final(self.last_step, scalars)

    def close(self, status: str):
        """status: complete, failed, or stopped (to be resumed)."""
        reporters, self.reporters = self.reporters, []
        for r in reporters:
            r.close(status)


def open_reporters(report_to: str | None, folder: Path, run_name: str, config: dict, resume_step: int | None,
                   logged_upto: int | None) -> Reporters | None:
    """The reporters --report_to names, writing into the run folder `folder`; None for none.
    resume_step: the step this session continues from (None: from the start); logged_upto: the
    last step an earlier session of this run logged (None: none)."""
    names = parse_report_to(report_to)
    if not names:
        return None
    check_report_to(report_to)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = {"tensorboard": lambda: TensorBoard(folder, resume_step),
            "wandb": lambda: WandB(folder, run_name, config, logged_upto)}
    return Reporters([made[n]() for n in names], resume_step or 0)
