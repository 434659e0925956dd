"""lm-eval-harness tasks for eval_lm: the names checked and their data loaded before any model
loads, then each loaded model scored on them, lm-eval's numbers unchanged (its prompts, metrics
and standard errors), as table rows `TASK/METRIC`."""
import difflib
from pathlib import Path

from sitra.errors import UsageError

INSTALL = "pip install 'sitra[lm_eval]'"


def task_names(text: str) -> list[str]:
    """`lambada_openai,hellaswag` -> its names, in order, once each."""
    return list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def load_tasks(names: list[str], include: str | None = None):
    """(TaskManager, [task or group per name]) with every task's data loaded, or a one-line
    UsageError naming the flag. lm-eval's index of its own tasks is built by reading each of the
    ~14,000 task YAML files it ships (about 6 s of CPU): when every name is defined in
    --lm_eval_include, the index of that folder alone serves (milliseconds); otherwise the full
    one, which then runs the evaluation, so the check costs nothing lm-eval would not spend."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError(f"--lm_eval_tasks needs lm-eval-harness: {INSTALL}") from None
    if include is not None and not Path(include).is_dir():
        raise UsageError(f"--lm_eval_include {include}: no such folder (it holds lm-eval task YAML files)")
    if not names:
        raise UsageError("--lm_eval_tasks: name at least one lm-eval task, e.g. lambada_openai,hellaswag")
    if include is not None:
        local = TaskManager(include_path=include, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            try:
                return local, _build(local, names)
            except UsageError:
                pass  # e.g. a local group of lm-eval's own tasks: those need the full index
    manager = TaskManager(include_path=include)
    for name in names:
        if name not in manager.task_index:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.5)
            raise UsageError(f"--lm_eval_tasks {name}: no such lm-eval task"
                             + (f"; similar: {', '.join(close)}" if close else "")
                             + " (local task YAML files: --lm_eval_include FOLDER)")
    return manager, _build(manager, names)


def _build(manager, names: list[str]) -> list:
    """The task, group or tag's tasks of each name, built (their data sets read)."""
    built, owner = [], {}
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as e:  # lm-eval and datasets raise many kinds; the user needs the first line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"--lm_eval_tasks {name}: cannot load the task's data ({first}); without a hub, "
                             "define it over local files with --lm_eval_include") from None
        for task in loaded["tasks"]:
            if task in owner:
                raise UsageError(f"--lm_eval_tasks: {owner[task]} and {name} both hold task {task}; name it once")
            owner[task] = name
        top = loaded["groups"].get(name, loaded["tasks"].get(name))
        built += [top] if top is not None else list(loaded["tasks"].values())  # a tag: its tasks
    return built


def evaluate(model, tokenizer, manager, tasks, limit: int | None, batch_size: int) -> dict:
    """{TASK/METRIC: value} of an already-loaded causal LM, as lm-eval reports them (metrics under
    a filter other than lm-eval's `none` are named `METRIC (FILTER)`), plus TASK/examples scored."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    out = simple_evaluate(lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False)
    return metric_rows(out)


def version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def metric_rows(out: dict) -> dict:
    """lm-eval's `results` ({task: {"acc,none": x, "acc_stderr,none": s, "alias": ...}}) as flat
    numbers; a standard error lm-eval could not compute ("N/A") is left out."""
    rows = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool):
                rows[f"{task}/{metric if filt == 'none' else f'{metric} ({filt})'}"] = float(value)
        if task in out.get("n-samples", {}):
            rows[f"{task}/examples"] = int(out["n-samples"][task]["effective"])
    return rows
