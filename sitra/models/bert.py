"""BERT with per-layer student attention blocks, as ordinary registered `transformers` classes.

`config.attn_layout` maps a layer index (a string, as JSON keys are) to `[heads, d_k, dropout]`;
the classes rebuild those layers with `StudentSelfAttention`, so `save_pretrained` /
`AutoModel*.from_pretrained` round-trip exactly once `sitra` is imported.
"""
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, BertConfig
from transformers import BertForMaskedLM, BertModel

from sitra.models.attention import StudentSelfAttention


class SitraBertConfig(BertConfig):
    model_type = "sitra_bert"

    def __init__(self, attn_layout=None, **kwargs):
        super().__init__(**kwargs)
        self.attn_layout = {str(k): list(v) for k, v in (attn_layout or {}).items()}


def encoder_layers(model):
    """The `nn.ModuleList` of transformer layers of a BERT-family model, with or without head."""
    return model.base_model.encoder.layer


def replace_attention(model, layer: int, module):
    """Put `module` in place of the self-attention of `layer`; returns the module it replaced."""
    attention = encoder_layers(model)[layer].attention
    old, attention.self = attention.self, module
    return old


def _apply_layout(model, config):
    for i, (heads, d_k, dropout) in config.attn_layout.items():
        replace_attention(model, int(i), StudentSelfAttention(config.hidden_size, heads, d_k, dropout))


class SitraBertModel(BertModel):
    config_class = SitraBertConfig

    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        _apply_layout(self, config)
        self.post_init()


class SitraBertForMaskedLM(BertForMaskedLM):
    config_class = SitraBertConfig

    def __init__(self, config):
        super().__init__(config)
        _apply_layout(self, config)
        self.post_init()


AutoConfig.register("sitra_bert", SitraBertConfig)
AutoModel.register(SitraBertConfig, SitraBertModel)
AutoModelForMaskedLM.register(SitraBertConfig, SitraBertForMaskedLM)


def with_student_blocks(model, blocks: dict):
    """A registered sitra model equal to `model` with `blocks` ({layer: StudentSelfAttention}).

    `model` is a (Sitra)BertModel or (Sitra)BertForMaskedLM and is left unchanged; the result
    saves and reloads as an ordinary model folder.
    """
    layout = dict(getattr(model.config, "attn_layout", {}))
    for i, b in blocks.items():
        layout[str(i)] = [b.heads, b.d_k, b.dropout]
    values = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_COPIED}
    config = SitraBertConfig(**{**values, "attn_layout": layout})
    same = dict(attn_implementation=model.config._attn_implementation, dtype=model.dtype)  # keep how it runs
    if isinstance(model, BertForMaskedLM):
        new = SitraBertForMaskedLM._from_config(config, **same)
    else:
        new = SitraBertModel._from_config(config, add_pooling_layer=model.pooler is not None, **same)
    teacher_state = {k: v for k, v in model.state_dict().items()
                     if not any(k.startswith(_self_prefix(model, i)) for i in blocks)}
    missing, unexpected = new.load_state_dict(teacher_state, strict=False)
    for i, b in blocks.items():
        encoder_layers(new)[i].attention.self.load_state_dict(b.state_dict())
    replaced = [k for k in missing if not any(k.startswith(_self_prefix(new, i)) for i in blocks)]
    if replaced or unexpected:
        raise RuntimeError(f"weights do not line up: missing {replaced}, unexpected {unexpected}")
    return new.to(next(model.parameters()).device).eval()


_NOT_COPIED = {"model_type", "architectures", "transformers_version", "attn_layout"}


def _self_prefix(model, layer):
    base = "bert." if isinstance(model, BertForMaskedLM) else ""
    return f"{base}encoder.layer.{layer}.attention.self."
