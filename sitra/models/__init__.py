"""Teachers, student blocks and splicing them into `transformers` models."""
from sitra.models.attention import StudentSelfAttention, attention_probs, init_linear, student_block
from sitra.models.bert import (
    SitraBertConfig,
    SitraBertForMaskedLM,
    SitraBertModel,
    assemble,
    encoder_layers,
    layer_sources,
    layout_entry,
    replace_attention,
    with_merged_layers,
    with_student_blocks,
)
from sitra.models.capture import (
    apply_layers,
    block_io,
    last_hidden_state,
    layer_io,
    mlm_logits_from_hidden,
    run_layers,
)
from sitra.models.lowbit import (
    FrozenTernaryLinear,
    LowBitArgs,
    TernaryLinear,
    check_lowbit,
    export_packed,
    load_packed,
    prepare_student,
    quantize_teacher,
    ternarize,
)
from sitra.models.merged import INITS, new_merged_layer
from sitra.models.teacher import (
    has_mlm_head,
    load_config,
    load_model,
    load_tokenizer,
    minilm_path,
)
