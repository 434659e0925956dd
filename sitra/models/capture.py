"""Read a teacher's intermediate tensors without running the layers it does not need."""

from sitra.models.bert import encoder_layers


class _Stop(Exception):
    pass


def _capture(model, first, last, input_ids, attention_mask):
    """(input of module `first`, output of module `last`) in a forward that stops after `last`."""
    captured = {}

    def take_input(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]

    def take_output(module, args, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handles = [first.register_forward_pre_hook(take_input, with_kwargs=True), last.register_forward_hook(take_output)]
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured["x"], captured["out"]


def layer_io(model, start: int, stop: int, input_ids, attention_mask):
    """(input of layer `start`, output of layer `stop - 1`) for a batch; the forward stops there.

    Run it under `torch.inference_mode`.
    """
    layers = encoder_layers(model)
    return _capture(model, layers[start], layers[stop - 1], input_ids, attention_mask)


def run_layers(model, hidden, attention_mask, start: int = 0, stop: int | None = None):
    """Run encoder layers start..stop-1 of `model` on `hidden` [B, T, H]."""
    return apply_layers(encoder_layers(model)[start:stop], model.config, hidden, attention_mask)


def apply_layers(layers, config, hidden, attention_mask):
    """Run BERT layers in turn on `hidden` [B, T, H], with the 4-D mask transformers itself
    builds for `config` from the [B, T] `attention_mask`."""
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    for layer in layers:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def block_io(model, layer: int, input_ids, attention_mask):
    """(input of layer `layer`, output of its attention block) for a batch.

    The forward stops right after the attention block (dense + residual + LayerNorm of
    `BertSelfOutput`), so layers above it cost nothing. Run it under `torch.inference_mode`.
    """
    target = encoder_layers(model)[layer]
    return _capture(model, target, target.attention, input_ids, attention_mask)


def last_hidden_state(model, input_ids, attention_mask):
    """[B, T, H] output of the last layer, for models with or without an MLM head."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def mlm_logits_from_hidden(model, hidden):
    """The MLM head of `model` applied to hidden states [B, T, H] -> [B, T, V]."""
    return model.cls(hidden)


def transformer_layers(model):
    """The list of transformer layers of a BERT, GPT-NeoX or Llama-family model."""
    base = model.base_model
    for path in ("layers", "encoder.layer", "h"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise ValueError(f"{type(model).__name__}: no transformer layer list found")


def qkv_hooks(model, layers: list[int], store: dict):
    """Forward hooks that put each listed layer's attention inputs q, k, v ([B, T, heads * d]) into
    store[layer]; q and k are taken before any rotary embedding. Returns the hook handles."""
    handles = []
    for i in layers:
        layer = transformer_layers(model)[i]
        slot = store.setdefault(i, {})
        attn = getattr(layer, "attention", None)
        if attn is not None and hasattr(attn, "query_key_value"):  # GPT-NeoX: fused, per head [q | k | v]
            def fused(module, args, out, slot=slot, d=attn.head_size):
                B, T, _ = out.shape
                q, k, v = out.view(B, T, -1, 3 * d).split(d, dim=-1)
                slot.update(q=q.reshape(B, T, -1), k=k.reshape(B, T, -1), v=v.reshape(B, T, -1))
            handles.append(attn.query_key_value.register_forward_hook(fused))
            continue
        projections = ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj) if hasattr(layer, "self_attn")
                       else (attn.self.query, attn.self.key, attn.self.value))
        for name, proj in zip("qkv", projections):
            handles.append(proj.register_forward_hook(lambda m, a, out, slot=slot, name=name: slot.__setitem__(name, out)))
    return handles
