"""benchmarks/quality.py end to end at toy size: tiny teachers and data made here, every job of a
section run in this interpreter; the results file's numbers checked against the saved models."""
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_teacher

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402
import quality_common  # noqa: E402


def sst2_like(folder: Path) -> Path:
    """train.tsv and dev.tsv in SST-2's columns: Python-docs sentences labelled by the parity of
    their word count (hard to learn: accuracies differ between models, none is trivially 1)."""
    from sitra.data import python_docs_paragraphs

    folder.mkdir()
    lines = [p.replace("\t", " ").split(". ")[0][:200] for p in python_docs_paragraphs()[:400]]
    rows = [f"{t}\t{len(t.split()) % 2}" for t in lines if t.strip()]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:120]) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[300:340]) + "\n")
    return folder


def text_dir(folder: Path) -> Path:
    from sitra.data import python_docs_paragraphs

    folder.mkdir()
    p = python_docs_paragraphs()
    (folder / "valid.txt").write_text("\n".join(p[:80]))
    (folder / "test.txt").write_text("\n".join(p[1000:1030]))
    return folder


@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("quality_inputs")
    teacher = build_teacher(d / "teacher", mlm=False, layers=4, hidden=32, heads=4)
    return {"teacher": teacher, "sst2": sst2_like(d / "sst2"), "text": text_dir(d / "text")}


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first markdown table after `heading`."""
    lines = text.split(heading, 1)[1].strip().split("\n\n")[0].splitlines()
    assert lines[0].startswith("|"), "no table right after the heading"
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def dev_accuracy(folder: Path, dev: Path, max_length: int) -> float:
    """Accuracy of a saved classifier on a labelled tsv, recomputed here from scratch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [line.split("\t") for line in dev.read_text().splitlines()[1:]]
    right = 0
    with torch.no_grad():
        for text, label in rows:
            enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
            right += int(model(**enc).logits.argmax(-1).item() == int(label))
    return right / len(rows)


def test_encoder_section_at_toy_size(toy_inputs, tmp_path):
    work = tmp_path / "work"
    results = quality.main(["--scale", "toy", "--sections", "encoder", "--workdir", str(work),
                            "--encoder_teacher", toy_inputs["teacher"], "--sst2", str(toy_inputs["sst2"]),
                            "--text", str(toy_inputs["text"])], in_process=True)
    assert results == work / "results.md"
    text = results.read_text()
    rows = table_rows(text, "## SiTra on MiniLM, judged on SST-2")
    assert len(rows) == 4
    assert [w in r[0] for r, w in zip(rows, ("teacher", "retrained", "merged", "distill_classifier"))] == [True] * 4
    folders = {0: "sst2_teacher", 1: "sst2_retrained", 2: "sst2_merged", 3: "sst2_distilled"}
    from safetensors.torch import load_file

    teacher_acc = None
    for i, row in enumerate(rows):
        folder = work / "checkpoints" / folders[i] / "model"
        weights = load_file(str(folder / "model.safetensors"))
        assert number(row[1]) == sum(t.numel() for t in weights.values())
        assert number(row[2]) == sum(t.numel() for k, t in weights.items() if ".attention." in k)
        assert number(row[3]) > 0
        acc = number(row[4])
        assert 0 <= acc <= 1
        assert acc == pytest.approx(dev_accuracy(folder, toy_inputs["sst2"] / "dev.tsv", 32), abs=1e-3)
        teacher_acc = teacher_acc or acc
        assert number(row[5]) == pytest.approx(100 * acc / teacher_acc, rel=1e-2)
    # the retrained blocks have half the teacher's d_k (4 heads x 4, not 4 x 8): per layer, q, k, v
    # project 32 -> 16 instead of 32 -> 32, and a student output projection 16 -> 32 is added
    saved = 3 * (32 * 32 + 32) - 3 * (32 * 16 + 16) - (16 * 32 + 32)
    assert number(rows[1][2]) == number(rows[0][2]) - 4 * saved
    # hidden cosine where it applies (the compressed encoders), in [-1, 1]
    assert rows[0][6] == rows[3][6] == "–"
    assert all(-1 <= number(rows[i][6]) <= 1 for i in (1, 2))
    # the commands a user types, each once, from the repository root
    for job in ("finetune_classifier", "retrain_single_block", "build_retrained", "retrain_merge", "build_merged",
                "finetune_conditioned_fully_merged", "distill_classifier", "eval_merged"):
        assert re.search(rf"HF_HUB_OFFLINE=1 .*python jobs/{job}\.py ", text), job
    assert "python benchmarks/quality.py --scale toy --sections encoder" in text


def test_missing_inputs_are_one_line_errors(toy_inputs, tmp_path, capsys):
    odd = build_teacher(tmp_path / "odd", mlm=False, layers=3, hidden=32, heads=4)
    capsys.readouterr()
    work = tmp_path / "work"
    base = ["--scale", "toy", "--sections", "encoder", "--workdir", str(work), "--encoder_teacher",
            toy_inputs["teacher"], "--text", str(toy_inputs["text"])]
    for extra, flag in ((["--sst2", str(toy_inputs["sst2"]), "--encoder_teacher", odd], "--encoder_teacher"),
                        (["--sst2", str(toy_inputs["sst2"]), "--text", str(tmp_path)], "--text"),
                        (["--sst2", str(tmp_path / "nowhere")], "--sst2"), (["--scale", "huge"], "--scale"),
                        (["--sections", "encoder,vision"], "--sections"),
                        (["--sst2", str(toy_inputs["sst2"]), "--results", str(ROOT / "docs" / "x.md")], "--results")):
        with pytest.raises(SystemExit) as e:
            quality.main(base + extra, in_process=True)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err
    assert not (ROOT / "docs" / "x.md").exists()
    assert not work.exists()


def test_runner_prints_commands_and_raises_with_the_jobs_error(tmp_path, capsys):
    runner = quality_common.Runner(tmp_path, in_process=True)
    with pytest.raises(RuntimeError, match="finetune_classifier"):
        runner.run("finetune_classifier", "--model", str(tmp_path / "none"), "--train_file", "x.tsv")
    out = capsys.readouterr()
    assert "$ HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false python jobs/finetune_classifier.py" in out.out
    assert "error:" in out.err and runner.commands == []


@pytest.mark.subprocess
def test_runner_in_a_fresh_process_raises_with_the_tail_of_the_jobs_stderr(tmp_path, capsys):
    runner = quality_common.Runner(tmp_path)
    with pytest.raises(RuntimeError, match=r"exit code 2\):\nfinetune_classifier.py: error: --train_file x.tsv: no such file"):
        runner.run("finetune_classifier", "--model", str(tmp_path / "none"), "--train_file", "x.tsv")
    assert "no such file" in capsys.readouterr().err  # passed through as the job wrote it


def test_the_header_of_a_rerun_gives_the_jobs_first_run_minutes(tmp_path):
    """A rerun finds the jobs finished and takes minutes where they took an hour: the header says both."""
    first = quality.header(["--sections", "encoder"], wall_s=3600, jobs_s=3500, sections=["encoder"], workdir=tmp_path)
    rerun = quality.header(["--sections", "encoder"], wall_s=300, jobs_s=3600, sections=["encoder"], workdir=tmp_path)
    assert "60.0 minutes in all (encoder)." in first and "first ran" not in first
    assert "5.0 minutes in all (encoder) (the jobs took 60 minutes when each first ran" in rerun
