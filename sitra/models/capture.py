"""Read a teacher's intermediate tensors without running the layers it does not need."""
import torch

from sitra.models.bert import encoder_layers


class _Stop(Exception):
    pass


def layer_io(model, start: int, stop: int, input_ids, attention_mask):
    """(input of layer `start`, output of layer `stop - 1`) for a batch; the forward stops there.

    Run it under `torch.inference_mode`.
    """
    captured = {}
    layers = encoder_layers(model)

    def take_input(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]

    def take_output(module, args, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handles = [layers[start].register_forward_pre_hook(take_input, with_kwargs=True),
               layers[stop - 1].register_forward_hook(take_output)]
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured["x"], captured["out"]


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
    captured = {}
    target = encoder_layers(model)[layer]

    def take_input(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]

    def take_output(module, args, output):
        captured["out"] = output[0]
        raise _Stop

    handles = [target.register_forward_pre_hook(take_input, with_kwargs=True),
               target.attention.register_forward_hook(take_output)]
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured["x"], captured["out"]


def last_hidden_state(model, input_ids, attention_mask):
    """[B, T, H] output of the last layer, for models with or without an MLM head."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def mlm_logits_from_hidden(model, hidden):
    """The MLM head of `model` applied to hidden states [B, T, H] -> [B, T, V]."""
    return model.cls(hidden)
