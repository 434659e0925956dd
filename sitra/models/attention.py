"""The student attention block that replaces a teacher's `BertSelfAttention`."""
import math

import torch.nn.functional as F
from torch import nn


class StudentSelfAttention(nn.Module):
    """Multi-head self-attention with its own head count, head width and dropout.

    query/key/value project d_model -> heads * d_k and `output` projects back to d_model, so the
    teacher's `BertSelfOutput` (dense + residual + LayerNorm) that follows it is unchanged.
    Drop-in for `BertSelfAttention`: takes the 4-D mask transformers builds (bool for sdpa,
    additive float for eager, or None) and returns the 2-tuple `(output, None)`.
    """

    def __init__(self, hidden_size: int, heads: int, d_k: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.d_k, self.dropout = heads, d_k, dropout
        self.query = nn.Linear(hidden_size, heads * d_k)
        self.key = nn.Linear(hidden_size, heads * d_k)
        self.value = nn.Linear(hidden_size, heads * d_k)
        self.output = nn.Linear(heads * d_k, hidden_size)

    def _split(self, x, proj):
        B, T, _ = x.shape
        return proj(x).view(B, T, self.heads, self.d_k).transpose(1, 2)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        q, k, v = (self._split(hidden_states, p) for p in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )
        B, _, T, _ = out.shape
        return self.output(out.transpose(1, 2).reshape(B, T, self.heads * self.d_k)), None

    def attention_probs(self, hidden_states, token_mask):
        """Per-head attention distributions [B, heads, T, T] (no dropout)."""
        return attention_probs(self.query, self.key, self.heads, hidden_states, token_mask)


def attention_probs(query: nn.Linear, key: nn.Linear, heads: int, hidden_states, token_mask):
    """softmax(Q K^T / sqrt(d_k)) per head, padded keys excluded; [B, heads, T, T].

    Works for the teacher's `BertSelfAttention` (its query/key Linear layers) and the student's.
    token_mask [B, T] bool marks real tokens.
    """
    B, T, _ = hidden_states.shape
    q = query(hidden_states).view(B, T, heads, -1).transpose(1, 2)
    k = key(hidden_states).view(B, T, heads, -1).transpose(1, 2)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~token_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def init_linear(module: nn.Module, std: float):
    """BERT's initialisation (normal(0, initializer_range), zero bias) for new modules."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
