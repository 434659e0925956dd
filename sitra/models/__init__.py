"""Teachers, student blocks and splicing them into `transformers` models."""
from sitra.models.attention import StudentSelfAttention, attention_probs, init_linear
from sitra.models.bert import (
    SitraBertConfig, SitraBertForMaskedLM, SitraBertModel, encoder_layers, replace_attention,
    with_student_blocks,
)
from sitra.models.teacher import has_mlm_head, load_config, load_model, load_tokenizer, minilm_path, pick_device
from sitra.models.capture import block_io, last_hidden_state, mlm_logits_from_hidden
