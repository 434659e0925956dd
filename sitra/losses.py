"""Distillation losses: pure functions, each with a required mask of the positions that count.

Masks are bool and broadcast against the compared tensors; padding is simply absent from them.
Every loss upcasts to fp32. Worked examples: tests/test_losses.py.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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


def reverse_kl(student_logits, teacher_logits, mask, temperature=1.0):
    """KL(p_S || p_T) per position where mask is True, averaged, times T^2 (mode-seeking)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p = s.exp()
    per_pos = torch.where(p > 0, p * (s - t), 0.0).sum(-1)
    return _masked_mean(per_pos, mask) * temperature**2


def generalized_jsd(student_logits, teacher_logits, mask, beta=0.5, temperature=1.0):
    """Generalised Jensen-Shannon divergence, averaged where mask is True, times T^2:
    m = beta p_T + (1 - beta) p_S;  JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m).

    beta = 0.5 is the symmetric JSD. As GKD (Agarwal et al. 2024) does, beta = 0 is taken to mean
    forward KL(p_T || p_S) and beta = 1 reverse KL(p_S || p_T), the limits the mixture loses.
    """
    if beta == 0:
        return kl_div(student_logits, teacher_logits, mask, temperature)
    if beta == 1:
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
    kl_t = torch.where(t.exp() > 0, t.exp() * (t - m), 0.0).sum(-1)
    kl_s = torch.where(s.exp() > 0, s.exp() * (s - m), 0.0).sum(-1)
    return _masked_mean(beta * kl_t + (1 - beta) * kl_s, mask) * temperature**2


def cosine_distance(a, b, mask):
    """1 - cosine similarity of the vectors along the last dim, averaged where mask is True."""
    return _masked_mean(1 - F.cosine_similarity(a.float(), b.float(), dim=-1), mask)


def relation_kl(student_x, teacher_x, mask, heads: int, student_y=None, teacher_y=None):
    """MiniLM-style relation transfer: KL(R_T || R_S) per relation head and query, averaged.

    R = softmax(x_h y_h^T / sqrt(d_h)) over keys, with x (and y, default x) [B, T, D] split into
    `heads` relation heads (D / heads wide); student and teacher widths may differ, their head
    counts here are the same by construction. x=q, y=k gives the attention distributions;
    x=y=v the value relations. Padded keys are excluded; padded queries do not count.
    """
    def relations(x, y):
        B, T, D = x.shape
        xh = x.float().view(B, T, heads, D // heads).transpose(1, 2)
        yh = y.float().view(B, T, heads, D // heads).transpose(1, 2)
        scores = xh @ yh.transpose(-1, -2) / math.sqrt(D // heads)
        return scores.masked_fill(~mask[:, None, None, :], float("-inf"))

    s = relations(student_x, student_x if student_y is None else student_y)
    t = relations(teacher_x, teacher_x if teacher_y is None else teacher_y)
    return kl_div(s, t, mask[:, None, :].expand(-1, heads, -1))


def cosine_similarity(a, b, mask):
    """Mean cosine similarity of the vectors along the last dim at positions where mask is True."""
    return _masked_mean(F.cosine_similarity(a.float(), b.float(), dim=-1), mask)


# --criterion names users type; each compares (student, teacher, mask).
LOSSES = {"MSE": mse, "L1": l1, "CrossEntropy": soft_cross_entropy}

# --loss names of the logit-distillation jobs; each takes (student_logits, teacher_logits, mask, temperature).
LOGIT_LOSSES = {
    "forward_kl": kl_div,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,  # takes beta= too (--jsd_beta)
    "mse": lambda s, t, mask, temperature=1.0: mse(s, t, mask[..., None]),
}


def chunked_logit_loss(loss_fn, student_hidden, student_head, teacher_hidden, teacher_head, mask, chunks: int = 16,
                       targets=None, **kw):
    """loss_fn over the logits of the two heads, without ever holding the full logits.

    hidden [N, H] (positions flattened), heads map H -> V. Positions are cut into `chunks`
    pieces; each piece's student and teacher logits are computed inside the loop and again in
    backward (activation checkpointing), so peak memory holds one piece's [n, V] logits instead
    of [N, V]. The value equals loss_fn on the full logits (mean over masked positions).
    `targets` [N] (e.g. next-token ids), when given, is cut the same way and passed on as
    loss_fn(..., targets=piece_targets).
    """
    total = mask.sum().clamp(min=1)
    out = student_head(student_hidden[:0]).float().sum()  # 0, but in the graph: an empty mask still backpropagates
    for idx in torch.arange(len(mask), device=mask.device).chunk(chunks):
        piece = mask[idx]
        if not piece.any():
            continue

        extra = {} if targets is None else {"targets": targets[idx]}

        def piece_loss(h, th, piece=piece, extra=extra):
            with torch.no_grad():
                t_logits = teacher_head(th)
            return loss_fn(student_head(h), t_logits, piece, **extra, **kw) * piece.sum()

        out = out + checkpoint(piece_loss, student_hidden[idx], teacher_hidden[idx], use_reentrant=False)
    return out / total


# ---------------------------------------------------------------------------------------------
# Recorded (sparse) teachers: the teacher's distribution is known only at a few ids per position.


def _rest_log_mass(log_probs, ids):
    """log of the probability outside `ids` (per row), -inf where `ids` cover the whole vocabulary;
    finite rows keep their gradient, covered rows get none (no nan from an all -inf logsumexp)."""
    outside = log_probs.scatter(-1, ids, float("-inf"))
    covered = torch.isinf(outside).all(-1, keepdim=True)
    rest = torch.where(covered, 0.0, outside).logsumexp(-1)
    return torch.where(covered.squeeze(-1), float("-inf"), rest)


def topk_logit_loss(loss_fn, student_logits, teacher_ids, teacher_logp, teacher_rest, mask, temperature=1.0, **kw):
    """loss_fn between teacher and student on k + 1 bins: the k recorded ids and "everything else".

    teacher_ids [..., k] (long), teacher_logp [..., k]: log p_T(id) at temperature T; teacher_rest
    [...]: log(1 - sum_k p_T), the mass outside the k ids (-inf when k covers the vocabulary: then
    there is no rest bin). The student's bins are its own log-probabilities at those ids and
    log q_rest = log sum_{v not in ids} q_S(v). For forward KL (`sparse_kl`) this is

        KL_k(p || q) = sum_{i in ids} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest),

    the top-k terms plus the missing-mass term. It is KL of the binned distributions, so
    0 <= KL_k <= KL (data processing), with equality when k = V. The recorded values are renormalised
    over the k + 1 bins (16-bit rounding leaves their sum a little off 1). Times T^2 like the dense
    losses; loss_fn is any dense loss of the menu that compares distributions (kl_div, reverse_kl,
    generalized_jsd), called on the bins.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = teacher_ids.long()
    s_bins = s.gather(-1, ids)
    t_bins = teacher_logp.float()
    if ids.shape[-1] < s.shape[-1]:  # a rest bin exists
        s_bins = torch.cat([s_bins, _rest_log_mass(s, ids)[..., None]], -1)
        t_bins = torch.cat([t_bins, teacher_rest.float()[..., None]], -1)
    t_bins = t_bins - t_bins.logsumexp(-1, keepdim=True)
    return loss_fn(s_bins, t_bins, mask, temperature=1.0, **kw) * temperature**2


def sparse_kl(student_logits, teacher_ids, teacher_logp, teacher_rest, mask, temperature=1.0):
    """Forward KL from top-k records with the missing-mass term; see `topk_logit_loss`."""
    return topk_logit_loss(kl_div, student_logits, teacher_ids, teacher_logp, teacher_rest, mask, temperature)


def sampled_kl(student_logits, teacher_ids, teacher_logp, teacher_weight, mask, temperature=1.0):
    """Monte-Carlo forward KL from tokens drawn from the teacher, per position where mask is True,
    averaged, times T^2:

        KL_hat = sum_j w_j (log p_T(x_j) - log q_S(x_j)),  x_1..x_K ~ p_T i.i.d.,  w_j = count_j / K

    (ids [..., k] are the distinct draws, weights [..., k] their share of the K draws, 0 in unused
    slots). E[sum_j w_j f(x_j)] = sum_v p_T(v) f(v) for any f, so both the value and the gradient
    in the student, E[grad KL_hat] = -sum_v p_T(v) grad log q_S(v) = grad KL(p_T || q_S), are unbiased.
    Top-k records are not: they drop the tail (or lump it into one bin) in the same way every step.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    w = teacher_weight.float()
    per_pos = (w * torch.where(w > 0, teacher_logp.float() - s, 0.0)).sum(-1)
    return _masked_mean(per_pos, mask) * temperature**2


def chunked_record_loss(loss_fn, student_hidden, student_head, records: tuple, mask, chunks: int = 16, targets=None, **kw):
    """chunked_logit_loss for a recorded teacher: loss_fn(student_logits, *record_pieces, mask, **kw).

    hidden [N, H]; records: tensors [N, ...] (e.g. ids, log-probs, rest mass) cut into the same
    position pieces as the hidden states; only one piece's student logits [n, V] exist at a time
    (recomputed in backward). The value equals loss_fn on the full logits.
    """
    total = mask.sum().clamp(min=1)
    out = student_head(student_hidden[:0]).float().sum()
    for idx in torch.arange(len(mask), device=mask.device).chunk(chunks):
        piece = mask[idx]
        if not piece.any():
            continue
        extra = {} if targets is None else {"targets": targets[idx]}
        pieces = tuple(r[idx] for r in records)

        def piece_loss(h, piece=piece, pieces=pieces, extra=extra):
            return loss_fn(student_head(h), *pieces, piece, **extra, **kw) * piece.sum()

        out = out + checkpoint(piece_loss, student_hidden[idx], use_reentrant=False)
    return out / total


# --loss names that records can serve: each compares distributions, so it can be taken on k + 1 bins
RECORD_LOSSES = {"forward_kl": kl_div, "reverse_kl": reverse_kl, "jsd": generalized_jsd}


# ---------------------------------------------------------------------------------------------
# The distillation objective of every job


class TopK(NamedTuple):
    """A teacher recorded as its top-k ids, their log-probabilities and the log of the rest mass
    (tensors [..., k], [..., k], [...]); see `topk_logit_loss`."""
    ids: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor


class Sampled(NamedTuple):
    """A teacher recorded as the distinct ids of K draws, their log-probabilities and their share
    of the draws (tensors [..., k]); see `sampled_kl`."""
    ids: torch.Tensor
    logp: torch.Tensor
    weight: torch.Tensor


def divergence_term(student_logits, teacher, mask, *, divergence: str = "forward_kl", temperature: float = 1.0,
                    beta: float = 0.5):
    """T^2 * D(p_T || p_S) averaged where mask is True, with D named by --loss (LOGIT_LOSSES) and the
    teacher given as dense logits [..., V], `TopK` records or `Sampled` records."""
    extra = {"beta": beta} if divergence == "jsd" else {}
    if isinstance(teacher, TopK):
        return topk_logit_loss(RECORD_LOSSES[divergence], student_logits, *teacher, mask, temperature=temperature, **extra)
    if isinstance(teacher, Sampled):
        if divergence != "forward_kl":
            raise ValueError(f"sampled records estimate forward_kl only, not {divergence}")
        return sampled_kl(student_logits, *teacher, mask, temperature=temperature)
    return LOGIT_LOSSES[divergence](student_logits, teacher, mask, temperature=temperature, **extra)


def distill_loss(student_logits, teacher, mask, targets=None, *, divergence: str = "forward_kl",
                 temperature: float = 1.0, beta: float = 0.5, kd_weight: float = 1.0, ce_weight: float = 0.0):
    """(loss, kd, ce): the one distillation objective of every sitra job,

        loss = kd_weight * T^2 * D(p_T || p_S) + ce_weight * CE(student, targets),

    both terms averaged over the positions where mask is True. student_logits [..., V]; teacher:
    dense logits [..., V] or records (`TopK`, `Sampled`); targets [...] (labels, next tokens;
    read only where mask is True) or None for no cross-entropy term (ce is then 0).
    """
    kd = divergence_term(student_logits, teacher, mask, divergence=divergence, temperature=temperature, beta=beta)
    if targets is None:
        return kd_weight * kd, kd, kd.new_zeros(())
    if mask.any():
        ce = F.cross_entropy(student_logits[mask].float(), targets[mask])
    else:
        ce = kd * 0  # in the graph, so an empty batch still backpropagates
    return kd_weight * kd + ce_weight * ce, kd, ce


def compare(out, target, token_mask, criterion: str, on: str = "output", temperature: float = 1.0, head=None):
    """The --criterion between a student's hidden states and the teacher's, over real tokens.

    on="output" compares the hidden states; on="logits" the MLM distributions
    softmax(head(h) / T): soft-target cross-entropy (times T^2) for CrossEntropy, the
    probabilities for MSE and L1.
    """
    loss_fn = LOSSES[criterion]
    if on == "output":
        return loss_fn(out, target, token_mask[..., None])
    s, t = head(out), head(target).detach()
    if criterion == "CrossEntropy":
        return loss_fn(s, t, token_mask, temperature)
    return loss_fn(F.softmax(s.float() / temperature, -1), F.softmax(t.float() / temperature, -1), token_mask[..., None])


@torch.no_grad()
def fidelity(out, target, token_mask) -> dict:
    return {"block_mse": mse(out, target, token_mask[..., None]), "block_cosine": cosine_similarity(out, target, token_mask)}


def masked_kd(student_logits, teacher_logits, labels, objective: dict) -> tuple:
    """(loss, parts): sitra.losses.distill_loss over the masked positions whose logits are given
    ([N, V] each, labels [N]), with the divergence, the MLM cross-entropy and accuracy as parts."""
    everywhere = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    loss, kd, ce = distill_loss(student_logits, teacher_logits, everywhere, labels, **objective)
    hits = (student_logits.detach().argmax(-1) == labels).float()
    divergence = "kl" if objective["divergence"] == "forward_kl" else objective["divergence"]
    return loss, {divergence: kd.detach(), "mlm_ce": ce.detach(), "mlm_accuracy": hits.mean() if len(labels) else hits.sum()}
