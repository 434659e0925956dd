"""Distillation losses: pure functions, each with a required mask of the positions that count.

Masks are bool and broadcast against the compared tensors; padding is simply absent from them.
Every loss upcasts to fp32. Worked examples: tests/test_losses.py.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


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


def _pieces(n: int, chunks: int):
    """(start, end) of the position pieces: torch.chunk's cut of range(n) into `chunks` pieces."""
    size = max(1, -(-n // max(1, chunks)))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _leaves(root, skip):
    """The tensors requiring grad that the autograd graph from node `root` reaches (its leaves,
    e.g. the head's parameters, tied or not), in the order found, `skip` left out."""
    found, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node
        if leaf is not None:
            if leaf is not skip:
                found.append(leaf)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


class _ChunkGrads(torch.autograd.Function):
    """total / n, whose backward hands out gradients computed beforehand, chunk by chunk:
    grad_output times the stored d(total / n)/d(hidden) and d(total / n)/d(each head parameter).
    The parameters are inputs, so their gradients arrive by the ordinary autograd path
    (AccumulateGrad, DistributedDataParallel's hooks). The stored gradients are scaled in place
    and let go in backward (no second copy of the head's gradient lives on with the loss), so it
    backpropagates once."""

    @staticmethod
    def forward(ctx, stored, hidden, *params):
        total, ctx.n, ctx.grad_hidden, ctx.grads = stored
        return total / ctx.n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("chunked loss: its gradients were computed in forward and handed out by a first "
                               "backward; it cannot backpropagate twice (compute the loss again)")
        scale = grad_output.float()
        grad_hidden, grads = ctx.grad_hidden, ctx.grads
        ctx.grad_hidden = ctx.grads = None
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(scale.to(grad_hidden.dtype))
        return (None, grad_hidden, *(None if g is None else g.mul_(scale).to(dtype) for g, dtype in grads))


def _store_grads(got, want_hidden: bool, grad_hidden, a: int, b: int, grads: list):
    """A piece's torch.autograd.grad results: the hidden states' rows a:b (first, when wanted),
    then the leaves' gradients added to their accumulators."""
    if want_hidden:
        if got[0] is not None:
            grad_hidden[a:b] = got[0]
        got = got[1:]
    _add_grads(grads, got)


def _add_grads(grads, got):
    """Add one piece's parameter gradients `got` into grads[i] = (accumulator, dtype of the parameter)."""
    for i, g in enumerate(got):
        if g is None:
            continue
        acc, dtype = grads[i]
        if acc is None:  # the first piece's gradient becomes the accumulator (fp32 at least)
            acc = g.float() if g.is_floating_point() and g.element_size() < 4 else g
            if acc is g and (not g.is_contiguous() or any(g is o for j, o in enumerate(got) if j != i)):
                acc = g.clone(memory_format=torch.contiguous_format)  # expanded, or handed to two leaves
        else:
            acc.add_(g)
        grads[i] = (acc, dtype)


def _new_leaves(params, grads, root, skip):
    """Append to params (and a None accumulator to grads) the leaves reached from `root` not yet there."""
    for leaf in _leaves(root, skip):
        if not any(leaf is p for p in params):
            params.append(leaf)
            grads.append((None, leaf.dtype))


def _chunked(piece_loss, student_hidden, student_head, mask, chunks):
    """sum over position pieces of piece_loss(student_logits, start, end, piece_mask) * n_masked_in_piece,
    divided by the number of masked positions, never holding more than one piece's logits.

    With grad enabled, each piece's gradients (into its hidden states and into every tensor
    requiring grad that its graph reaches: the head's parameters) are computed right there, by
    torch.autograd.grad on the piece's loss, and the piece's logits are freed; _ChunkGrads hands
    them out in backward. Nothing is recomputed: the head runs once per piece in forward +
    backward. Without grad, the value only. The head's trainable tensors must be leaves (as
    parameters are): a tensor requiring grad computed outside the head and used in it would be
    differentiated through, once per piece.
    """
    n = mask.sum().clamp(min=1)
    pieces = [(a, b, mask[a:b]) for a, b in _pieces(len(mask), chunks)]
    pieces = [(a, b, piece) for a, b, piece in pieces if piece.any()]
    if not torch.is_grad_enabled():
        total = torch.zeros((), device=mask.device)
        for a, b, piece in pieces:
            total = total + piece_loss(student_head(student_hidden[a:b]), a, b, piece).float() * piece.sum()
        return total / n
    if not pieces:  # 0, but in the graph: an empty mask still backpropagates (zeros) into hidden and head
        return student_head(student_hidden[:0]).float().sum() / n

    hidden = student_hidden.detach()
    want_hidden = student_hidden.requires_grad
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    params, grads = [], []  # grads[i]: (accumulated gradient, dtype of params[i])
    total = torch.zeros((), device=mask.device)
    for a, b, piece in pieces:
        h = hidden[a:b].detach().requires_grad_(want_hidden)
        loss = piece_loss(student_head(h), a, b, piece).float()  # the mean over the piece's masked positions
        total = total + loss.detach() * piece.sum()
        if not loss.requires_grad:
            continue
        _new_leaves(params, grads, loss.grad_fn, h)
        # seeded with n_piece / n, so the 1/n of the mean enters where it does in the plain loss (before
        # the softmax backward and the head's matmul over V): the same rounding, not just the same value
        got = torch.autograd.grad(loss, ([h] if want_hidden else []) + params, piece.sum() / n, allow_unused=True)
        del loss
        _store_grads(got, want_hidden, grad_hidden, a, b, grads)
        del got
    if not want_hidden and not params:  # nothing here requires grad
        return total / n
    return _ChunkGrads.apply((total, n, grad_hidden, grads), student_hidden, *params)


def chunked_logit_loss(loss_fn, student_hidden, student_head, teacher_hidden, teacher_head, mask, chunks: int = 16,
                       targets=None, **kw):
    """loss_fn over the logits of the two heads, without ever holding the full logits.

    hidden [N, H] (positions flattened), heads map H -> V (any callable: a module, tied or with a
    bias, or a function of one). Positions are cut into `chunks` pieces; each piece's student and
    teacher logits are computed inside the loop, and with grad enabled so is the piece's gradient
    into its hidden states and the student head's parameters (torch.autograd.grad, in the style of
    fused linear + loss kernels), after which its logits are freed: peak memory holds one piece's
    [n, V] logits instead of [N, V], and nothing is recomputed in backward. The value and the
    gradients equal loss_fn on the full logits (mean over masked positions); nothing flows into
    the teacher. `targets` [N] (e.g. next-token ids), when given, is cut the same way and passed
    on as loss_fn(..., targets=piece_targets).
    """
    def piece_loss(s_logits, a, b, piece):
        with torch.no_grad():
            t_logits = teacher_head(teacher_hidden[a:b])
        extra = {} if targets is None else {"targets": targets[a:b]}
        return loss_fn(s_logits, t_logits, piece, **extra, **kw)

    return _chunked(piece_loss, student_hidden, student_head, mask, chunks)


def _sliced(head, vocab):
    """head, or its first `vocab` outputs."""
    return head if vocab is None else (lambda h: head(h)[..., :vocab])


def _plain_linear(head, hidden, vocab):
    """(weight, bias) of head, detached and cut to `vocab` rows, when it is an fp32 nn.Linear run as
    nn.Linear runs (no hooks, no autocast): its logits and their gradients are then plain matmuls;
    else None."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    hooks = [getattr(head, k, None) for k in kinds] + [getattr(nn.modules.module, "_global" + k, None) for k in kinds]
    if (type(head) is not nn.Linear or any(hooks) or torch.is_autocast_enabled(hidden.device.type)
            or head.weight.dtype != torch.float32 or hidden.dtype != torch.float32):
        return None
    cut = slice(None, vocab)
    return head.weight.detach()[cut], None if head.bias is None else head.bias.detach()[cut]


def _linear_into(out, h, weight, bias, temperature=1.0):
    """F.linear(h, weight, bias) / temperature written into `out` (the 1/T taken on h and bias)."""
    if temperature != 1:
        h, bias = h / temperature, None if bias is None else bias / temperature
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _exact_division(T):
    """Whether x / T is exact (T a power of 2), so it may be taken anywhere with the same result."""
    return math.frexp(T)[0] == 0.5


def _forward_kl_ce(s, t, targets, temperature, kd_scale, ce_scale, X, Y, Z, want_grad, divided=False, scored=None):
    """(sum over scored rows of KL(p_T || p_S), of CE(s, targets), G, g) of one piece: the gradient
    of kd_scale * T^2 * KL + ce_scale * CE in the student logits is g * G (0 in rows not scored).

    s, t: student and teacher logits [n, V], read only (t may be X; t None: no divergence, targets
    None: no CE), or logits / T when `divided` (then targets must be None or T 1); X, Y, Z: fp32
    [n, V] buffers; scored: [n] bool, the rows that count (None: all). With p = softmax(logits / T),
    the gradient row by row is

        kd_scale * T * (p_S - p_T) + ce_scale * (softmax(s) - onehot(target))

    (where p_T is 0, 0 log 0 = 0 gives its term and its gradient 0). The divergence's part is taken
    as autograd takes it, log-softmax backward of -kd_scale T^2 p_T: g - p_S sum(g), so with the
    plain loss's rounding (sum_v p_T is 1 only to ~1e-6 after exp(log p_T), and p_S - p_T cancels).
    G is left in X or Z; with T = 1 the one student log-softmax serves both terms.
    """
    T = float(temperature)
    scaled = T == 1 or divided
    rows = slice(None) if scored is None else scored
    kl = ce = G = None
    g = 1.0
    if t is not None:
        torch.log_softmax(t if scaled else torch.div(t, T, out=X), -1, out=Y)  # log p_T
        torch.log_softmax(s if scaled else torch.div(s, T, out=X), -1, out=Z)  # log p_S
        torch.sub(Y, Z, out=X)
        kl = X.mul_(Y.exp_()).sum(-1)[rows].sum()  # Y is p_T from here on
        if kl.isnan():  # only 0 * -inf where the teacher gives 0 (or a nan in the logits: it stays)
            kl = torch.where(Y > 0, X, 0.0).sum(-1)[rows].sum()
        if want_grad:
            G = torch._log_softmax_backward_data(Y.mul_(-kd_scale * T * T), Z, -1, torch.float32, out=X)
            if _exact_division(T):  # the 1/T of logits / T is left to g, for the head's matmuls
                g = 1 / T
            else:
                G.div_(T)
    if targets is not None:
        log_p = Z if t is not None and T == 1 else torch.log_softmax(s, -1, out=Z if t is None else Y)
        at = (torch.arange(len(s), device=s.device)[rows], targets[rows])  # (row, target) of each scored row
        ce = -log_p[at].sum()
        if want_grad:
            p = log_p.exp_()  # softmax(s)
            if G is None:
                G = p.mul_(ce_scale)
            else:
                G.add_(p, alpha=ce_scale / g)
            G.index_put_(at, G.new_tensor(-ce_scale / g), accumulate=True)
    if G is not None and scored is not None:
        G[~scored] = 0.0
    return kl, ce, G, g


def chunked_distill_loss(student_hidden, student_head, teacher_hidden, teacher_head, mask, targets=None, *,
                         chunks: int = 16, vocab: int | None = None, divergence: str = "forward_kl",
                         temperature: float = 1.0, beta: float = 0.5, kd_weight: float = 1.0, ce_weight: float = 0.0):
    """distill_loss(student_head(h_s)[..., :vocab], teacher_head(h_t)[..., :vocab], mask, targets,
    divergence=..., ...)[0], chunked as chunked_logit_loss is (one piece's logits at a time, each
    piece's gradients taken in the loop, nothing recomputed in backward), and for forward KL and
    cross-entropy without autograd through the softmaxes.

    hidden [N, H], mask [N], targets [N] or None (no CE term); heads H -> V as in
    chunked_logit_loss, `vocab` cuts both to their first `vocab` logits. teacher_hidden None leaves
    the divergence out (loss = ce_weight * CE; so does kd_weight 0). The gradient in each piece's
    logits is computed directly (see _forward_kl_ce) on three or four [n, V] buffers kept across pieces,
    then taken through the student head by matmul when it is a plain fp32 nn.Linear (its weight
    and bias, tied or not, get their gradients as inputs of _ChunkGrads), else by
    torch.autograd.grad(logits, ..., that gradient) (any head: a function, a slice, autocast).
    Other divergences take chunked_logit_loss's path. Value and gradients equal the plain loss's.
    """
    kd = teacher_hidden is not None and kd_weight != 0
    with_ce = targets is not None and ce_weight != 0
    if teacher_hidden is None and not with_ce:
        raise ValueError("chunked_distill_loss: no teacher and no cross-entropy (targets, ce_weight): nothing to compute")
    if (kd and divergence != "forward_kl") or not (kd or with_ce):
        def dense(s_logits, t_logits, piece, targets=None):
            return distill_loss(s_logits, t_logits, piece, targets, divergence=divergence, temperature=temperature,
                                beta=beta, kd_weight=kd_weight, ce_weight=ce_weight)[0]

        return chunked_logit_loss(dense, student_hidden, _sliced(student_head, vocab), teacher_hidden,
                                  _sliced(teacher_head, vocab), mask, chunks, targets=targets)

    if with_ce and bool((targets[mask] < 0).any()):  # (an ignore_index such as -100 would index from the end)
        raise ValueError("chunked_distill_loss: targets must be class ids where mask is True")
    count = int(mask.sum())
    n = mask.sum().clamp(min=1)
    # whole pieces, as chunked_logit_loss cuts them (the head's matmuls then take the shapes, and so
    # the rounding, of the plain loss's); rows not scored get a gradient of 0
    pieces = [(a, b, mask[a:b]) for a, b in _pieces(len(mask), chunks)]
    pieces = [(a, b, None if piece.all() else piece) for a, b, piece in pieces if piece.any()]
    if not pieces:  # 0, but in the graph when grad is on: an empty mask still backpropagates (zeros)
        return _sliced(student_head, vocab)(student_hidden[:0]).float().sum() / n

    grad_on = torch.is_grad_enabled()
    hidden = student_hidden.detach()
    want_hidden = grad_on and student_hidden.requires_grad
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    linear = _plain_linear(student_head, hidden, vocab)
    t_linear = _plain_linear(teacher_head, teacher_hidden, vocab) if kd else None
    T = float(temperature)
    # plain heads take an exact 1/T on the hidden states ([n, H]) instead of on the logits ([n, V])
    if t_linear is not None and linear is not None and t_linear[0].shape != linear[0].shape:
        t_linear = None  # a mismatch: the teacher runs as a module, the shapes are checked below
    divide_hidden = (linear is not None and (t_linear is not None or not kd) and (T == 1 or not with_ce)
                     and _exact_division(T))
    params, grads = [], []  # grads[i]: (accumulated gradient, dtype of params[i])
    if linear is not None and grad_on:
        for full, used in zip((student_head.weight, student_head.bias), linear):
            if used is not None and full.requires_grad:
                params.append(full)
                grads.append((torch.zeros_like(full), full.dtype))
    kl_sum = ce_sum = torch.zeros((), device=mask.device)
    buffers = None
    for a, b, scored in pieces:
        h = hidden[a:b]
        if linear is None:
            logits = _sliced(student_head, vocab)(h.requires_grad_(want_hidden))
            s = logits.detach().float()
        if buffers is None:  # fp32 [rows of the largest piece, V], reused by every piece
            size = (max(b - a for a, b, _ in pieces), linear[0].shape[0] if linear is not None else s.shape[-1])
            buffers = [torch.empty(size, device=hidden.device) for _ in range(3 + (linear is not None))]
        X, Y, Z = (buffer[:b - a] for buffer in buffers[:3])
        if linear is not None:
            s = _linear_into(buffers[3][:b - a], h, *linear, T if divide_hidden else 1.0)
        t = None
        if kd:
            with torch.no_grad():
                t_h = teacher_hidden[a:b]
                if t_linear is not None:
                    t = _linear_into(X, t_h, *t_linear, T if divide_hidden else 1.0)
                else:
                    t = _sliced(teacher_head, vocab)(t_h).float()
            if t.shape != s.shape:
                raise ValueError(f"teacher logits {tuple(t.shape)} and student logits {tuple(s.shape)} differ")
        want_grad = want_hidden or bool(params) or (linear is None and logits.requires_grad)
        kl, ce, G, g = _forward_kl_ce(s, t, targets[a:b] if with_ce else None, T, kd_weight / count,
                                      ce_weight / count, X, Y, Z, want_grad, divided=divide_hidden, scored=scored)
        kl_sum = kl_sum if kl is None else kl_sum + kl
        ce_sum = ce_sum if ce is None else ce_sum + ce
        if not want_grad:
            continue
        if linear is not None:  # the head's backward as plain matmuls, g folded into them
            weight, used = linear[0], slice(None, linear[0].shape[0])
            if want_hidden:
                torch.mm(G, weight, out=grad_hidden[a:b]).mul_(g)
            for p, (acc, _) in zip(params, grads):  # the head's weight, then its bias
                if p is student_head.weight:
                    acc[used].addmm_(G.t(), h, alpha=g)
                else:
                    acc[used].add_(G.sum(0), alpha=g)
            continue
        _new_leaves(params, grads, logits.grad_fn, h)
        got = torch.autograd.grad(logits, ([h] if want_hidden else []) + params, G.mul_(g).to(logits.dtype),
                                  allow_unused=True)
        del logits
        _store_grads(got, want_hidden, grad_hidden, a, b, grads)
        del got
    total = kd_weight * T**2 * kl_sum + ce_weight * ce_sum
    if not want_hidden and not params:
        return total / n
    return _ChunkGrads.apply((total, n, grad_hidden, grads), student_hidden, *params)


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
    position pieces as the hidden states; only one piece's student logits [n, V] exist at a time,
    each piece's gradients are computed in the loop (no recomputation in backward). The value and
    the gradients equal loss_fn on the full logits.
    """
    def piece_loss(s_logits, a, b, piece):
        extra = {} if targets is None else {"targets": targets[a:b]}
        return loss_fn(s_logits, *(r[a:b] for r in records), piece, **extra, **kw)

    return _chunked(piece_loss, student_hidden, student_head, mask, chunks)


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
