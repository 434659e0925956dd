"""Distillation losses: pure functions, each with a required mask of the positions that count.

Masks are bool and broadcast against the compared tensors; padding is simply absent from them.
Every loss upcasts to fp32. Worked examples: tests/test_losses.py.
"""
import torch
import torch.nn.functional as F


def _masked_mean(elementwise, mask):
    """Mean over the selected elements; values elsewhere (even inf or nan) never enter."""
    mask = mask.expand_as(elementwise)
    return torch.where(mask, elementwise, 0.0).sum() / mask.sum().clamp(min=1)


def mse(pred, target, mask):
    """Mean squared error over the elements `mask` selects (mask broadcasts to pred's shape)."""
    return _masked_mean((pred.float() - target.float()).square(), mask)


def l1(pred, target, mask):
    """Mean absolute error over the elements `mask` selects."""
    return _masked_mean((pred.float() - target.float()).abs(), mask)


def soft_cross_entropy(student_logits, teacher_logits, mask, temperature=1.0):
    """-sum_v p_T(v) log p_S(v) per position, p = softmax(logits / T), averaged where mask is
    True, times T^2 (so gradients keep their scale as T changes).

    logits [..., V]; mask [...] bool. Log-probabilities of -inf where the teacher gives 0 add 0,
    so log-distributions with impossible entries (padded keys) are accepted as logits.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    per_pos = -(t * s.clamp(min=torch.finfo(s.dtype).min)).sum(-1)
    return _masked_mean(per_pos, mask) * temperature**2


def kl_div(student_logits, teacher_logits, mask, temperature=1.0):
    """KL(p_T || p_S) per position where mask is True, averaged, times T^2."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p = t.exp()
    per_pos = torch.where(p > 0, p * (t - s), 0.0).sum(-1)  # 0 log 0 = 0 where the teacher gives 0
    return _masked_mean(per_pos, mask) * temperature**2


def cosine_similarity(a, b, mask):
    """Mean cosine similarity of the vectors along the last dim at positions where mask is True."""
    return _masked_mean(F.cosine_similarity(a.float(), b.float(), dim=-1), mask)


# --criterion names users type; each compares (student, teacher, mask).
LOSSES = {"MSE": mse, "L1": l1, "CrossEntropy": soft_cross_entropy}
