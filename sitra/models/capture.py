"""Read a teacher's intermediate tensors without running the layers it does not need."""

from sitra.models.bert import encoder_layers


class _Stop(Exception):
    pass


def _capture(model, pairs: dict, input_ids, attention_mask) -> dict:
    """{key: (input of module first, output of module last)} for pairs {key: (first, last)}, in
    one forward that stops as soon as every wanted output exists."""
    inputs, outputs, handles = {}, {}, []

    def take_input(key):
        def hook(module, args, kwargs):
            inputs[key] = args[0] if args else kwargs["hidden_states"]
        return hook

    def take_output(key):
        def hook(module, args, output):
            outputs[key] = output[0] if isinstance(output, tuple) else output
            if len(outputs) == len(pairs):
                raise _Stop
        return hook

    for key, (first, last) in pairs.items():
        handles += [first.register_forward_pre_hook(take_input(key), with_kwargs=True),
                    last.register_forward_hook(take_output(key))]
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return {key: (inputs[key], outputs[key]) for key in pairs}


def layer_io(model, start: int, stop: int, input_ids, attention_mask):
    """(input of layer `start`, output of layer `stop - 1`) for a batch; the forward stops there.

    Run it under `torch.inference_mode`.
    """
    return layers_io(model, [(start, stop)], input_ids, attention_mask)[(start, stop)]


def layers_io(model, spans: list[tuple[int, int]], input_ids, attention_mask) -> dict:
    """{(start, stop): layer_io(...)} for several spans in one forward."""
    layers = encoder_layers(model)
    return _capture(model, {(a, b): (layers[a], layers[b - 1]) for a, b in spans}, input_ids, attention_mask)


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
    return blocks_io(model, [layer], input_ids, attention_mask)[layer]


def blocks_io(model, layers: list[int], input_ids, attention_mask) -> dict:
    """{layer: block_io(...)} for several layers in one forward (a fused sweep's teacher pass)."""
    own = encoder_layers(model)
    return _capture(model, {i: (own[i], own[i].attention) for i in layers}, input_ids, attention_mask)


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
