"""BERT with per-layer student attention blocks, as ordinary registered `transformers` classes.

`config.attn_layout` maps a layer index (a string, as JSON keys are) to `[heads, d_k, dropout]`,
plus the feed-forward width where a layer has its own (merged layers); the classes rebuild those
layers with `StudentSelfAttention`, so `save_pretrained` / `AutoModel*.from_pretrained`
round-trip exactly once `sitra` is imported. `config.layer_sources` says which teacher layers
each layer replaces.
"""
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)

from sitra.models.attention import StudentSelfAttention


class SitraBertConfig(BertConfig):
    model_type = "sitra_bert"

    def __init__(self, attn_layout=None, layer_sources=None, **kwargs):
        super().__init__(**kwargs)
        self.attn_layout = {str(k): list(v) for k, v in (attn_layout or {}).items()}
        self.layer_sources = layer_sources  # teacher layers each layer stands for; None: one each


def encoder_layers(model):
    """The `nn.ModuleList` of transformer layers of a BERT-family model, with or without head."""
    return model.base_model.encoder.layer


def replace_attention(model, layer: int, module):
    """Put `module` in place of the self-attention of `layer`; returns the module it replaced."""
    attention = encoder_layers(model)[layer].attention
    old, attention.self = attention.self, module
    return old


def _apply_layout(model, config):
    for i, (heads, d_k, dropout, *intermediate) in config.attn_layout.items():
        replace_attention(model, int(i), StudentSelfAttention(config.hidden_size, heads, d_k, dropout))
        if intermediate:
            resize_feed_forward(encoder_layers(model)[int(i)], config, intermediate[0])


def resize_feed_forward(layer, config, intermediate_size: int):
    """Give a BertLayer a feed-forward block of another width (fresh weights)."""
    import copy

    from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

    sized = copy.deepcopy(config)
    sized.intermediate_size = intermediate_size
    layer.intermediate, layer.output = BertIntermediate(sized), BertOutput(sized)


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


class SitraBertForSequenceClassification(BertForSequenceClassification):
    """A retrained or merged model with a classification head: finetune_classifier, distill_classifier."""
    config_class = SitraBertConfig

    def __init__(self, config):
        super().__init__(config)
        _apply_layout(self, config)
        self.post_init()


AutoConfig.register("sitra_bert", SitraBertConfig)
AutoModel.register(SitraBertConfig, SitraBertModel)
AutoModelForMaskedLM.register(SitraBertConfig, SitraBertForMaskedLM)
AutoModelForSequenceClassification.register(SitraBertConfig, SitraBertForSequenceClassification)


def layout_entry(layer, config) -> list | None:
    """[heads, d_k, dropout] (+ intermediate size where it differs from the config) of a layer
    with a student attention, None for a stock layer."""
    attn = layer.attention.self
    if not isinstance(attn, StudentSelfAttention):
        return None
    entry = [attn.heads, attn.d_k, attn.dropout]
    if layer.intermediate.dense.out_features != config.intermediate_size:
        entry.append(layer.intermediate.dense.out_features)
    return entry


def layer_sources(model) -> list[list[int]]:
    """For each encoder layer, the teacher layers it stands for ([[0, 1], [2, 3], ...] when merged)."""
    return getattr(model.config, "layer_sources", None) or [[i] for i in range(model.config.num_hidden_layers)]


def assemble(model, layers: list):
    """A registered sitra model with `model`'s embeddings and head and the given encoder layers.

    layers: one (state_dict, layout entry or None, teacher layers it replaces) per encoder layer.
    The result saves and reloads as an ordinary model folder; `model` is left unchanged.
    """
    values = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_COPIED}
    layout = {str(j): entry for j, (_, entry, _) in enumerate(layers) if entry}
    config = SitraBertConfig(**{**values, "num_hidden_layers": len(layers), "attn_layout": layout,
                                "layer_sources": [list(src) for _, _, src in layers]})
    same = dict(attn_implementation=model.config._attn_implementation, dtype=model.dtype)  # keep how it runs
    if isinstance(model, BertForMaskedLM):
        new = SitraBertForMaskedLM._from_config(config, **same)
    else:
        new = SitraBertModel._from_config(config, add_pooling_layer=model.pooler is not None, **same)
    prefix = "bert.encoder.layer." if isinstance(model, BertForMaskedLM) else "encoder.layer."
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    for j, (layer_state, _, _) in enumerate(layers):
        state.update({f"{prefix}{j}.{k}": v for k, v in layer_state.items()})
    new.load_state_dict(state, strict=True)
    return new.to(next(model.parameters()).device).eval()


def current_layers(model) -> list:
    """`model`'s own encoder layers in the form `assemble` takes."""
    entries = getattr(model.config, "attn_layout", {})
    return [(layer.state_dict(), entries.get(str(i)), src)
            for i, (layer, src) in enumerate(zip(encoder_layers(model), layer_sources(model)))]


def with_student_blocks(model, blocks: dict):
    """`model` with the self-attention of each layer i in `blocks` replaced by blocks[i]
    (a StudentSelfAttention), as a registered sitra model; `model` is left unchanged."""
    layers = current_layers(model)
    for i, block in blocks.items():
        state, entry, src = layers[i]
        state = {k: v for k, v in state.items() if not k.startswith("attention.self.")}
        state.update({f"attention.self.{k}": v for k, v in block.state_dict().items()})
        extra = entry[3:] if entry else []
        layers[i] = (state, [block.heads, block.d_k, block.dropout, *extra], src)
    return assemble(model, layers)


def with_merged_layers(model, merged: dict):
    """`model` with layers i and i+1 replaced by merged[i] (a layer from `new_merged_layer`)
    for each i in `merged`: one layer fewer per merge."""
    layers, own = [], current_layers(model)
    i = 0
    while i < len(own):
        if i in merged:
            layer = merged[i]
            layers.append((layer.state_dict(), layout_entry(layer, model.config), own[i][2] + own[i + 1][2]))
            i += 2
        else:
            layers.append(own[i])
            i += 1
    return assemble(model, layers)


_NOT_COPIED = {"model_type", "architectures", "transformers_version", "attn_layout", "layer_sources"}
