"""README.md starts with the two commands, maps every job and names only flags that exist;
docs/flags.md is exactly what docs/make_flags.py generates from the argument dataclasses now."""
import dataclasses
import difflib
import importlib.util
import re
import shlex
import typing
from pathlib import Path


from sitra.launch import LaunchArgs
from sitra.recipes import JOBS, job_module

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FLAGS_MD = ROOT / "docs" / "flags.md"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_flags", ROOT / "docs" / "make_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_reference_is_what_the_generator_writes():
    expected = load_generator().render()
    actual = FLAGS_MD.read_text() if FLAGS_MD.exists() else ""
    diff = "\n".join(list(difflib.unified_diff(actual.splitlines(), expected.splitlines(), "docs/flags.md",
                                               "python docs/make_flags.py", lineterm=""))[:40])
    assert actual == expected, f"docs/flags.md is out of date: run python docs/make_flags.py > docs/flags.md\n{diff}"


def test_flags_reference_names_every_flag_of_every_job():
    """Each flag is in its job's table or in a shared group the job's section links to."""
    text = FLAGS_MD.read_text()
    sections = dict(re.findall(r"(?ms)^### (\S+)\n(.*?)(?=^### |\Z)", text))
    by_anchor = {s.lower(): s for s in sections}
    for name, cls in [("launch", LaunchArgs)] + [(j, job_module(j).ARGS) for j in JOBS]:
        seen, todo = set(), [name]
        while todo:  # the job's section and every section it links to, transitively
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo += [by_anchor[a] for a in re.findall(r"\]\(#([\w-]+)\)", sections[s]) if a in by_anchor]
        documented = "".join(sections[s] for s in seen)
        missing = [f.name for f in dataclasses.fields(cls) if f"`--{f.name}`" not in documented]
        assert not missing, f"docs/flags.md: the section of {name} (and the groups it links) lacks {missing}"


def test_readme_starts_with_install_and_test_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert "pip install torch==2.13.0" in blocks[0] and "--preset quickstart" in blocks[0]
    assert blocks[0].index("torch==2.13.0") < blocks[0].index("pip install -e")
    assert blocks[1].strip().startswith("python -m pytest")


def test_every_job_has_an_entry_script():
    assert all((ROOT / "jobs" / f"{j}.py").exists() for j in JOBS)


def test_readme_jobs_table_lists_every_job_once():
    section = README[README.index("\n## Jobs\n"):]
    section = section[:section.index("\n## ", 1)]
    rows = re.findall(r"(?m)^\| \[(\w+)\]\(docs/flags\.md#(\w+)\)", section)
    assert [name for name, _ in rows] == [a for _, a in rows]
    assert sorted(name for name, _ in rows) == sorted([*JOBS, "launch"])


def test_readme_links_to_flags_reference_resolve():
    anchors = {a.lower() for a in re.findall(r"(?m)^#+ (\S+)$", FLAGS_MD.read_text())}
    links = re.findall(r"\(docs/flags\.md(?:#([\w-]+))?\)", README)
    assert links, "README.md does not link docs/flags.md"
    assert not [a for a in links if a and a not in anchors], "README.md links a section docs/flags.md lacks"


def flag_names(cls) -> set[str]:
    """Every spelling the parser accepts for the fields of `cls`, with underscores."""
    names = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        names.add(f.name)
        aliases = f.metadata.get("aliases", [])
        names |= {a.lstrip("-").replace("-", "_") for a in ([aliases] if isinstance(aliases, str) else aliases)}
        if f.default is True and hints.get(f.name) is bool:
            names.add(f"no_{f.name}")
    return names


def job_flags(job: str, argv: list[str]) -> set[str]:
    module = job_module(job)
    cls = module.args_class(argv) if hasattr(module, "args_class") else module.ARGS
    return flag_names(cls) | {"help"}


def readme_commands():
    """(job, flags given, command) of every `jobs/JOB.py` command in README.md's bash blocks."""
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            tokens = list(lex)
            for i, token in enumerate(tokens):
                m = re.fullmatch(r"jobs/(\w+)\.py", token)
                if m:
                    argv = []
                    for t in tokens[i + 1:]:
                        if t in (";", "&&", "||", "|", "&", "done"):
                            break
                        argv.append(t)
                    yield m[1], argv


def test_readme_commands_use_flags_that_exist():
    checked = 0
    for job, argv in readme_commands():
        given = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        if job == "launch":
            assert argv and argv[0] in JOBS, f"README: jobs/launch.py {' '.join(argv)}: name the job first"
            known = flag_names(LaunchArgs) | job_flags(argv[0], argv[1:])
        else:
            known = job_flags(job, argv)
        unknown = sorted(given - known)
        assert not unknown, f"README: jobs/{job}.py {' '.join(argv)}: no such flags {unknown}"
        checked += 1
    assert checked > 30


def test_readme_names_only_flags_that_exist():
    """A flag in inline code (`--name ...`) is a flag of some job or of the launcher."""
    every = flag_names(LaunchArgs) | {"help"}
    for j in JOBS:
        module = job_module(j)
        every |= flag_names(module.ARGS)
        for cls in getattr(module, "RECORD_ARGS", {}).values():
            every |= flag_names(cls)
    named = {n.replace("-", "_") for n in re.findall(r"`--([\w-]+)", README)}
    assert not sorted(named - every), f"README.md names flags no job has: {sorted(named - every)}"
