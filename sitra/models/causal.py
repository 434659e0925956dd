"""Causal-LM students: cut from a teacher's layers, built from a config, or pretrained."""
import copy
import re

import torch
from transformers import AutoModelForCausalLM

LAYER_KEY = re.compile(r"\.(layers|layer|h|blocks)\.(\d+)\.")


def teacher_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Every k-th teacher layer, first layer included: 12 -> 6 gives 0, 2, 4, 6, 8, 10."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def student_from_teacher_layers(teacher, student_layers: int):
    """A student with `student_layers` of the teacher's layers (every k-th), its embeddings,
    final norm and head: the copied tensors are exactly the teacher's."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = student_layers
    student = AutoModelForCausalLM.from_config(config)
    keep = teacher_layer_indices(teacher.config.num_hidden_layers, student_layers)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = LAYER_KEY.search(key)
        if m is None:
            state[key] = value
        elif int(m[2]) in new_index:
            state[key[: m.start()] + f".{m[1]}.{new_index[int(m[2])]}." + key[m.end():]] = value
    student.load_state_dict(state, strict=True)
    return student


def random_student(teacher, student_layers: int, seed: int):
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = student_layers
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def lm_head(model):
    return model.get_output_embeddings()


def final_hidden(model, batch, output_hidden_states=False):
    """The base model's output (last hidden state after the final norm, optionally all layers)."""
    return model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=output_hidden_states)
