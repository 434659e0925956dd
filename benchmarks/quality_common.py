"""What the sections of benchmarks/quality.py share: their inputs, a runner that runs sitra's jobs
the way a user types them (and remembers each command and its wall time), and the measurements
every table uses (final metrics of a run's log, parameter counts, forward time per token)."""
import codecs
import dataclasses
import json
import os
import resource
import runpy
import shlex
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SCALES = ("toy", "default", "full")


@dataclasses.dataclass
class Inputs:
    """Every input of the run: teachers and data folders, and the scale it runs at."""
    scale: str
    encoder_teacher: str
    sst2: Path
    causal_teacher: str
    text: Path

    @property
    def train_text(self) -> Path:
        """WikiText-2's validation split is the training text of every section (test is held out)."""
        return Path(self.text) / "valid.txt"

    @property
    def heldout_text(self) -> Path:
        return Path(self.text) / "test.txt"


def show_path(path) -> str:
    """A path as a user would type it from the repository root: relative where it lies in the
    repository or beside it (../shared/data/...), else as given."""
    relative = os.path.relpath(os.path.abspath(path), ROOT)  # symlinks kept: ../shared stays ../shared
    return relative if not relative.startswith(os.path.join("..", "..")) else str(path)




class Runner:
    """Runs `python jobs/<job>.py FLAGS` from the repository root, as a user would.

    Each command is printed first (with the offline environment it runs in) and kept, with its
    wall seconds, in `commands`. A failing job raises with the tail of its error output.
    `in_process` runs the job script in this interpreter instead (the same flags and code path,
    without a new process's start-up: how the test runs the whole benchmark in seconds)."""

    def __init__(self, workdir, in_process: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.in_process = in_process
        self.commands: list[tuple[str, float]] = []
        self.variables: dict[str, tuple[str, str]] = {}  # path -> (NAME, how a user gets it)

    def name(self, path, variable: str, how: str):
        """Show `path` in commands as $variable (e.g. a teacher inside site-packages), where `how`
        is the shell text that sets it on any machine."""
        self.variables[str(path)] = (variable, how)

    def _shown(self, flag: str) -> str:
        if flag in self.variables:
            return "$" + self.variables[flag][0]
        return shlex.quote(show_path(flag) if os.path.isabs(flag) else flag)

    @property
    def storage(self) -> Path:
        """The --storage_directory of every job of the run (checkpoints/ and eval_results/)."""
        return self.workdir

    def command(self, job: str, *flags: str) -> str:
        env = " ".join(f"{k}={v}" for k, v in OFFLINE_ENV.items())
        return f"{env} python jobs/{job}.py " + " ".join(self._shown(str(f)) for f in flags)

    def run(self, job: str, *flags: str) -> float:
        """Run the job; its wall seconds. A command that finished before in this workdir (a rerun,
        which sitra turns into a quick check of the finished run) reports the seconds it took
        then: they are kept in the workdir's walls.json."""
        flags = tuple(str(f) for f in flags)
        line = self.command(job, *flags)
        print(f"\n$ {line}", flush=True)
        start, cpu = time.perf_counter(), _children_cpu_s()
        if self.in_process:
            self._run_here(job, flags)
        else:
            self._run_process(job, flags)
        seconds = time.perf_counter() - start
        cpu_note = "" if self.in_process else f", {_children_cpu_s() - cpu:.0f} CPU-s"
        store = self.workdir / "walls.json"
        walls = json.loads(store.read_text()) if store.exists() else {}
        first = walls.setdefault(line, seconds)
        store.write_text(json.dumps(walls, indent=1))
        self.commands.append((line, first))
        print(f"  ({seconds:.1f} s{cpu_note}" + (f"; {first:.0f} s when it first ran" if first != seconds else "") + ")",
              flush=True)
        return first

    def _run_process(self, job: str, flags: tuple[str, ...]):
        env = dict(os.environ, **OFFLINE_ENV)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        tail, decoder = deque(maxlen=40), codecs.getincrementaldecoder("utf-8")(errors="replace")
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *flags], cwd=ROOT, env=env,
                                stderr=subprocess.PIPE)
        while chunk := os.read(proc.stderr.fileno(), 4096):  # progress bars pass through as they come
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            tail.extend(text.replace("\r", "\n").splitlines())
        proc.stderr.close()
        if proc.wait():
            raise RuntimeError(f"jobs/{job}.py failed (exit code {proc.returncode}):\n" +
                               "\n".join(t for t in tail if t.strip())[-3000:])

    def _run_here(self, job: str, flags: tuple[str, ...]):
        script = ROOT / "jobs" / f"{job}.py"
        with _argv([str(script), *flags]), _environ(OFFLINE_ENV):
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                if e.code not in (None, 0):
                    raise RuntimeError(f"jobs/{job}.py failed (exit code {e.code})") from e

    def table(self, since: int = 0) -> str:
        """The commands run so far (from the `since`-th on: one section's) as a markdown code
        block, each with its wall time, after the variables they use."""
        lines = [f"{v}={how}" for v, how in self.variables.values()]
        lines += [f"{c}    # {s:.0f} s" for c, s in self.commands[since:]]
        return "```\n" + "\n".join(lines) + "\n```"


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextmanager
def _argv(argv):
    old = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = old


@contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# measurements


def log_path(storage, run_name: str) -> Path:
    return Path(storage) / "eval_results" / f"{run_name}.h5"


def final_metrics(storage, run_name: str) -> dict:
    """The final metrics of a finished run's HDF5 log (with its wall time as `wall_time_s`)."""
    from sitra.results import read_log

    log = read_log(log_path(storage, run_name))
    if log["attrs"].get("status") != "complete":
        raise RuntimeError(f"{log_path(storage, run_name)}: status {log['attrs'].get('status')!r}, not complete")
    return {**{k: float(v) for k, v in log["final"].items() if _is_number(v)},
            "wall_time_s": float(log["attrs"].get("wall_time_s", float("nan")))}


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def is_attention(name: str) -> bool:
    """An attention parameter: q, k, v and output projection (and its LayerNorm) of any layer,
    as BERT (`.attention.`), Llama/GPT-NeoX (`.self_attn.`, `.attention.`) and GPT-2 (`.attn.`) name them."""
    return any(part in name for part in (".attention.", ".self_attn.", ".attn."))


def parameter_counts(folder) -> dict:
    """{'parameters', 'attention'}: numbers of stored weights of a model folder (its safetensors
    files; a tensor stored once counts once, as tied embeddings are)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    total = attention = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = st.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
                attention += n if is_attention(name) else 0
    return {"parameters": total, "attention": attention}


def us_per_token(folder, auto=None, batch: int = 8, length: int = 128, repeats: int = 5) -> float:
    """Microseconds per token of one forward pass of the model in `folder` (eval mode, no
    gradients, random ids of a fixed batch x length, all of the machine's cores): the fastest of
    `repeats` passes after one warm-up pass (the least disturbed by other work on the machine)."""
    import torch

    from sitra.models.teacher import load_model

    model = load_model(str(folder), mlm=False, flag="model", auto=auto)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        length = min(length, getattr(model.config, "max_position_embeddings", length))
        ids = torch.randint(5, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        times = []
        with torch.inference_mode():
            for i in range(repeats + 1):
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                if i:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return min(times) / (batch * length) * 1e6


def machine() -> str:
    """Cores, CPU model (and GPU where there is one), torch version."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} CPU cores ({cpu}){gpu}, torch {torch.__version__}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats shown with 4 significant digits, None as a dash."""
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
