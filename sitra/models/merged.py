"""One transformer layer that stands for two adjacent teacher layers."""
import copy

import torch
from transformers.models.bert.modeling_bert import BertLayer

from sitra.losses import compare, fidelity
from sitra.models.attention import StudentSelfAttention, init_linear
from sitra.models.bert import encoder_layers
from sitra.models.capture import apply_layers, layers_io

INITS = ("first", "average", "random")


def new_merged_layer(teacher, first: int, heads: int, d_k: int, dropout: float, intermediate_size: int,
                     init: str = "first"):
    """A BertLayer with a student attention (heads x d_k) and a feed-forward of
    `intermediate_size`, to replace teacher layers `first` and `first + 1`.

    init: "first" copies layer `first`, "average" averages layers `first` and `first + 1`, each
    tensor where the shapes allow (the rest stays random); "random" is BERT's initialisation.
    Where the attention is as wide as the model, its output projection starts as the identity,
    so "first" starts exactly as the teacher's layer.
    """
    config = copy.deepcopy(teacher.config)
    config.intermediate_size = intermediate_size
    layer = BertLayer(config)
    layer.attention.self = StudentSelfAttention(config.hidden_size, heads, d_k, dropout)
    init_linear(layer, config.initializer_range)
    if init == "random":
        return layer
    sources = [encoder_layers(teacher)[first]] + ([encoder_layers(teacher)[first + 1]] if init == "average" else [])
    states = [s.state_dict() for s in sources]
    with torch.no_grad():
        for name, p in layer.named_parameters():
            same = [st[name] for st in states if name in st and st[name].shape == p.shape]
            if same:
                p.copy_(torch.stack(same).float().mean(0).to(p.dtype))
        out = layer.attention.self.output
        if out.weight.shape[0] == out.weight.shape[1] and "attention.self.query.weight" in states[0] \
                and states[0]["attention.self.query.weight"].shape == layer.attention.self.query.weight.shape:
            out.weight.copy_(torch.eye(out.weight.shape[0]))
            out.bias.zero_()
    return layer


def merge_step(layer, teacher, block: int, batch, criterion: str, on: str, temperature: float):
    """(loss, fidelity) of the merged layer on one batch: teacher input of `block` in, teacher
    output of `block + 1` as the target."""
    token_mask = batch["attention_mask"].bool()
    x, target = batch["layer_io"][(block, block + 2)]  # from the shared teacher pass (teacher_pass)
    x, target = x.clone(), target.clone()
    out = apply_layers([layer], teacher.config, x, batch["attention_mask"])
    loss = compare(out, target, token_mask, criterion, on, temperature, head=getattr(teacher, "cls", None))
    return loss, fidelity(out, target, token_mask)


def merge_teacher_pass(teacher, blocks: list[int]):
    """prepare(batch): the teacher's input of layer b and output of layer b + 1 for every
    student's b, from one forward."""
    def prepare(batch):
        with torch.inference_mode():
            spans = [(b, b + 2) for b in blocks]
            return {**batch, "layer_io": layers_io(teacher, spans, batch["input_ids"], batch["attention_mask"])}
    return prepare
