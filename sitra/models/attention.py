"""The student attention block that replaces a teacher's `BertSelfAttention`."""
import math

import torch
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


def student_block(config, heads: int, d_k: int, dropout: float, init: str = "random", teacher_self=None) -> StudentSelfAttention:
    """A new student block of a teacher of `config`: BERT's random initialisation, or
    (init="teacher_svd") the truncated teacher block of `teacher_self` (init_from_teacher)."""
    block = StudentSelfAttention(config.hidden_size, heads, d_k, dropout)
    init_linear(block, config.initializer_range)
    if init == "teacher_svd":
        init_from_teacher(block, teacher_self)
    return block


def init_linear(module: nn.Module, std: float):
    """BERT's initialisation (normal(0, initializer_range), zero bias) for new modules."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def init_from_teacher(student: StudentSelfAttention, teacher_self) -> None:
    """Start a student block from the teacher's `BertSelfAttention` with the same heads: each
    head's query-key form W_q^T W_k (biases included, as the products of [W | b] over [x, 1]) and
    value path are replaced by their best rank-d_k approximations (truncated SVD; exact when the
    student's d_k is the teacher's), so training starts near the teacher instead of at random.

    Scores: the student's Q'^T K' / sqrt(d_k') equals the truncated Q^T K / sqrt(d_k). Values:
    the student's extra `output` projection maps each head's d_k' values back into the teacher's
    slot of that head, so output(context') approximates the teacher's context."""
    heads, d_s = student.heads, student.d_k
    d_t = teacher_self.attention_head_size
    if teacher_self.num_attention_heads != heads:
        raise ValueError(f"init_from_teacher: the student has {heads} heads, the teacher {teacher_self.num_attention_heads}")
    r = min(d_s, d_t)

    def augmented(linear, h):  # [W_h | b_h]: d_t x (hidden + 1)
        rows = slice(h * d_t, (h + 1) * d_t)
        return torch.cat([linear.weight[rows], linear.bias[rows, None]], 1).double()

    def assign(linear, h, rows):  # the student's rows of head h (zero past rank r)
        block = torch.zeros(d_s, rows.shape[1], dtype=rows.dtype)
        block[:r] = rows[:r]
        linear.weight[h * d_s:(h + 1) * d_s] = block[:, :-1].to(linear.weight.dtype)
        linear.bias[h * d_s:(h + 1) * d_s] = block[:, -1].to(linear.bias.dtype)

    scale = (d_s / d_t) ** 0.25  # so that the student's 1/sqrt(d_k') gives the teacher's 1/sqrt(d_k)
    student.output.weight.zero_()
    student.output.bias.zero_()
    for h in range(heads):
        u, s, vt = torch.linalg.svd(augmented(teacher_self.query, h).T @ augmented(teacher_self.key, h))
        root = s[:r].sqrt()[:, None] * scale
        assign(student.query, h, root * u[:, :r].T)
        assign(student.key, h, root * vt[:r])
        u, s, vt = torch.linalg.svd(augmented(teacher_self.value, h), full_matrices=False)
        assign(student.value, h, s[:r, None] * vt[:r])
        student.output.weight[h * d_t:(h + 1) * d_t, h * d_s:h * d_s + r] = u[:, :r].to(student.output.weight.dtype)
