"""The causal-LM loss menu in sitra.losses against formulas written out independently.

reverse_kl, generalized_jsd, cosine_distance and relation_kl are checked against plain Python
(`math`, loops over the real positions), never the torch ops they use: hand-worked cases with
their numbers in the test, random tensors against per-position loops, limits and symmetries.
chunked_logit_loss is checked against the unchunked loss on the full logits (value and
gradients to 1e-5) for every entry of LOGIT_LOSSES; the causal shift against a loop over
(position, next token) pairs. Padding is absent: what masked-out positions hold never matters.
"""
import copy
import math

import pytest
import torch

from sitra.losses import (LOGIT_LOSSES, chunked_logit_loss, cosine_distance, generalized_jsd, kl_div, relation_kl,
                          reverse_kl)

LN2 = math.log(2)


# ---------------------------------------------------------------------------------------------
# plain-Python reference formulas (lists of floats, no torch)


def py_softmax(xs, temperature=1.0):
    xs = [x / temperature for x in xs]
    top = max(x for x in xs if x != -math.inf)
    exps = [math.exp(x - top) if x != -math.inf else 0.0 for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def py_kl_probs(p, q):
    """KL(p || q) of two probability lists; terms with p = 0 add nothing."""
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def py_forward_kl(s_logits, t_logits, temperature=1.0):
    return py_kl_probs(py_softmax(t_logits, temperature), py_softmax(s_logits, temperature))


def py_reverse_kl(s_logits, t_logits, temperature=1.0):
    return py_kl_probs(py_softmax(s_logits, temperature), py_softmax(t_logits, temperature))


def py_jsd(s_logits, t_logits, beta, temperature=1.0):
    """beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S."""
    p_s, p_t = py_softmax(s_logits, temperature), py_softmax(t_logits, temperature)
    m = [beta * b + (1 - beta) * a for a, b in zip(p_s, p_t)]
    return beta * py_kl_probs(p_t, m) + (1 - beta) * py_kl_probs(p_s, m)


def py_cosine_distance(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def py_relation_kl(s_x, t_x, mask, heads, s_y=None, t_y=None):
    """MiniLM relation KL by loops: for every batch row, relation head and real query,
    R[k] = softmax_k(x_h[q] . y_h[k] / sqrt(d_h)) over the real keys k only, with each model's
    own head width d_h; KL(R_T || R_S); the mean over all (row, head, query) triples."""
    s_x, t_x, mask = s_x.tolist(), t_x.tolist(), mask.tolist()
    s_y = s_x if s_y is None else s_y.tolist()
    t_y = t_x if t_y is None else t_y.tolist()

    def row(x, y, b, h, q, real):
        dh = len(x[b][q]) // heads
        scores = [sum(x[b][q][h * dh + i] * y[b][k][h * dh + i] for i in range(dh)) / math.sqrt(dh) for k in real]
        return py_softmax(scores)

    values = []
    for b in range(len(mask)):
        real = [k for k, m in enumerate(mask[b]) if m]
        for h in range(heads):
            for q in real:
                values.append(py_kl_probs(row(t_x, t_y, b, h, q, real), row(s_x, s_y, b, h, q, real)))
    return sum(values) / len(values)


def positions(mask):
    return [tuple(i) for i in mask.nonzero().tolist()]


def loop_position_loss(per_position, a, b, mask, **kw):
    """Mean over the masked positions of per_position(vector_a, vector_b) along the last dim."""
    values = [per_position(a[p].tolist(), b[p].tolist(), **kw) for p in positions(mask)]
    return sum(values) / len(values)


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rand_mask(*shape, seed, p=0.6):
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p
    mask.view(-1)[0] = True  # never empty
    return mask


def token_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def _noise(shape, kind, seed):
    sign = torch.sign(rand(*shape, seed=seed))
    if kind == "noise":
        return rand(*shape, seed=seed) * 1e3
    if kind == "huge":
        return torch.full(shape, 1e20) * sign
    if kind == "inf":
        return torch.full(shape, math.inf) * sign
    return torch.full(shape, math.nan)


# ---------------------------------------------------------------------------------------------
# hand-worked cases: the numbers are the golden values

# two positions over a vocabulary of 3, given as log-probabilities (logits up to a constant)
T_PROBS = [[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]
S_PROBS = [[0.25, 0.25, 0.5], [1 / 6, 2 / 6, 3 / 6]]
REVERSE_KL_BY_HAND = [
    0.25 * LN2,  # 0.25 ln(1/2) + 0.25 ln 1 + 0.5 ln 2
    0.5 * math.log(3) - 2 / 3 * LN2,  # (1/6) ln(1/2) + (2/6) ln 1 + (3/6) ln(3/2) = 0.0872...
]
# beta = 0.5 at the first position; m = [3/8, 1/4, 3/8]:
# 0.5 [0.5 ln 4/3 + 0.25 ln 2/3] + 0.5 [0.25 ln 2/3 + 0.5 ln 4/3] = 1.25 ln 2 - 0.75 ln 3 = 0.04247
JSD_FIRST_BY_HAND = 1.25 * LN2 - 0.75 * math.log(3)


def hand_logits():
    s = torch.tensor(S_PROBS).log() + torch.tensor([[3.0], [-7.0]])  # shifts do not change a softmax
    t = torch.tensor(T_PROBS).log() + torch.tensor([[1.0], [5.0]])
    return s, t


def test_reverse_kl_by_hand():
    s, t = hand_logits()
    assert REVERSE_KL_BY_HAND[1] == pytest.approx(0.08720, abs=1e-5)
    assert reverse_kl(s, t, torch.tensor([True, False])).item() == pytest.approx(REVERSE_KL_BY_HAND[0], rel=1e-5)
    assert reverse_kl(s, t, torch.tensor([False, True])).item() == pytest.approx(REVERSE_KL_BY_HAND[1], rel=1e-5)
    assert reverse_kl(s, t, torch.tensor([True, True])).item() == pytest.approx(sum(REVERSE_KL_BY_HAND) / 2, rel=1e-5)
    # reverse is not forward: at the second position forward KL is ln(4/3) / 3 = 0.0959
    assert kl_div(s, t, torch.tensor([False, True])).item() == pytest.approx(math.log(4 / 3) / 3, rel=1e-5)


def test_reverse_kl_temperature_by_hand():
    # student logits 0 -> uniform 1/3; teacher logits ln[2, 1, 1] at T=2 -> p_T = [sqrt2, 1, 1] / z, z = 2 + sqrt2
    # KL(uniform || p_T) = sum (1/3) ln((1/3) / p_T) = ln z - ln 3 - (1/6) ln 2 = 0.01381; times T^2 = 4
    s = torch.zeros(1, 3)
    t = torch.tensor([[math.log(2), 0.0, 0.0]])
    expected = 4 * (math.log(2 + math.sqrt(2)) - math.log(3) - LN2 / 6)
    assert expected == pytest.approx(0.05524, abs=1e-5)
    assert reverse_kl(s, t, torch.tensor([True]), temperature=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_jsd_by_hand():
    s, t = hand_logits()
    assert JSD_FIRST_BY_HAND == pytest.approx(0.04247, abs=1e-5)
    assert generalized_jsd(s, t, torch.tensor([True, False]), beta=0.5).item() == pytest.approx(JSD_FIRST_BY_HAND, rel=1e-5)
    # the second position worked out: p_S = [1,2,3]/6, p_T = [2,2,2]/6, m = [3,4,5]/12
    #   0.5 KL(p_T || m) = (1/6)(ln 4/3 + ln 1 + ln 4/5);  0.5 KL(p_S || m) = (1/12) ln 2/3 + (1/6) ln 1 + (1/4) ln 6/5
    second = (math.log(4 / 3) + math.log(4 / 5)) / 6 + math.log(2 / 3) / 12 + math.log(6 / 5) / 4
    assert second == pytest.approx(0.02255, abs=1e-5)
    assert generalized_jsd(s, t, torch.tensor([False, True]), beta=0.5).item() == pytest.approx(second, rel=1e-5)
    both = generalized_jsd(s, t, torch.tensor([True, True]))  # beta defaults to 0.5
    assert both.item() == pytest.approx((JSD_FIRST_BY_HAND + second) / 2, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_of_disjoint_supports_is_ln2_by_hand(temperature):
    # p_T = [1, 0], p_S = [0, 1]: m = [1/2, 1/2], each KL to m is ln 2, so JSD = ln 2 (its maximum) times T^2
    t = torch.tensor([[0.0, -math.inf]])
    s = torch.tensor([[-math.inf, 0.0]])
    value = generalized_jsd(s, t, torch.tensor([True]), beta=0.5, temperature=temperature).item()
    assert value == pytest.approx(LN2 * temperature**2, rel=1e-6)


def test_cosine_distance_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0], [4.0, 3.0]])
    # cosines 0, 1, 24/25 -> distances 1, 0, 0.04
    assert cosine_distance(a, b, torch.tensor([True, True, True])).item() == pytest.approx(1.04 / 3, rel=1e-6)
    assert cosine_distance(a, b, torch.tensor([False, True, True])).item() == pytest.approx(0.02, rel=1e-5)
    assert cosine_distance(a, -b, torch.tensor([False, True, False])).item() == pytest.approx(2.0, rel=1e-6)


def test_relation_kl_by_hand():
    # one relation head of width 1. Student x = [1, 0]: scores x x^T = [[1, 0], [0, 0]];
    # teacher x = [0, 0]: every relation uniform. Query 0: KL(uniform || [e, 1] / (e + 1)) = ln((e + 1) / 2) - 1/2;
    # query 1: the student relation is uniform too, KL 0. Mean over the two queries: 0.06006.
    expected = (math.log((math.e + 1) / 2) - 0.5) / 2
    assert expected == pytest.approx(0.06006, abs=1e-5)
    s = torch.tensor([[[1.0], [0.0]]])
    t = torch.tensor([[[0.0], [0.0]]])
    assert relation_kl(s, t, torch.tensor([[True, True]]), heads=1).item() == pytest.approx(expected, rel=1e-5)
    # a third, padded position holding noise changes nothing (it is neither a key nor a query)
    s3 = torch.tensor([[[1.0], [0.0], [7.0]]])
    t3 = torch.tensor([[[0.0], [0.0], [-5.0]]])
    assert relation_kl(s3, t3, torch.tensor([[True, True, False]]), heads=1).item() == pytest.approx(expected, rel=1e-5)
    # the query/key form: x = q, y = k. Student q = [1, 1], k = [1, 0]: both queries see scores [1, 0]
    sq, sk = torch.tensor([[[1.0], [1.0]]]), torch.tensor([[[1.0], [0.0]]])
    qk = relation_kl(sq, t, torch.tensor([[True, True]]), heads=1, student_y=sk, teacher_y=t)
    assert qk.item() == pytest.approx(math.log((math.e + 1) / 2) - 0.5, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# reverse KL and generalised JSD: random tensors against loops, temperature, limits, symmetry


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_reverse_kl_random_vs_loop(temperature):
    B, T, V = 3, 6, 7
    s, t = rand(B, T, V, seed=1) * 3, rand(B, T, V, seed=2) * 3
    mask = rand_mask(B, T, seed=3)
    expected = loop_position_loss(py_reverse_kl, s, t, mask, temperature=temperature) * temperature**2
    assert reverse_kl(s, t, mask, temperature).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_reverse_kl_temperature_is_scaled_by_t_squared(temperature):
    s, t = rand(2, 5, 9, seed=4) * 2, rand(2, 5, 9, seed=5) * 2
    mask = rand_mask(2, 5, seed=6)
    at_t = reverse_kl(s, t, mask, temperature=temperature).item()
    assert at_t == pytest.approx(temperature**2 * reverse_kl(s / temperature, t / temperature, mask).item(), rel=1e-5)
    assert at_t != pytest.approx(reverse_kl(s / temperature, t / temperature, mask).item(), rel=1e-2)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_reverse_kl_is_zero_for_identical_inputs(temperature):
    x = rand(3, 4, 8, seed=7) * 5
    mask = rand_mask(3, 4, seed=8)
    assert reverse_kl(x, x.clone(), mask, temperature).item() == pytest.approx(0.0, abs=1e-6)
    assert reverse_kl(x + 3.0, x, mask, temperature).item() == pytest.approx(0.0, abs=1e-5)


def test_reverse_kl_is_non_negative_and_not_forward_kl():
    for seed in range(30):
        s, t = rand(2, 3, 6, seed=100 + seed) * (1 + seed % 5), rand(2, 3, 6, seed=200 + seed) * (1 + seed % 3)
        mask = rand_mask(2, 3, seed=300 + seed)
        value = reverse_kl(s, t, mask, temperature=1 + seed % 3).item()
        assert value > 0
        assert value != pytest.approx(kl_div(s, t, mask, temperature=1 + seed % 3).item(), rel=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_random_vs_loop(beta, temperature):
    B, T, V = 3, 6, 7
    s, t = rand(B, T, V, seed=10) * 3, rand(B, T, V, seed=11) * 3
    mask = rand_mask(B, T, seed=12)
    expected = loop_position_loss(py_jsd, s, t, mask, beta=beta, temperature=temperature) * temperature**2
    value = generalized_jsd(s, t, mask, beta=beta, temperature=temperature).item()
    assert value == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert 0 < value <= LN2 * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_endpoints_are_forward_and_reverse_kl(temperature):
    s, t = rand(3, 5, 7, seed=13) * 2, rand(3, 5, 7, seed=14) * 2
    mask = rand_mask(3, 5, seed=15)
    forward = loop_position_loss(py_forward_kl, s, t, mask, temperature=temperature) * temperature**2
    reverse = loop_position_loss(py_reverse_kl, s, t, mask, temperature=temperature) * temperature**2
    assert forward != pytest.approx(reverse, rel=1e-2)
    for beta in (0, 0.0):
        assert generalized_jsd(s, t, mask, beta=beta, temperature=temperature).item() == pytest.approx(forward, rel=1e-4)
        assert generalized_jsd(s, t, mask, beta=beta, temperature=temperature).item() == pytest.approx(
            kl_div(s, t, mask, temperature).item(), rel=1e-6)
    for beta in (1, 1.0):
        assert generalized_jsd(s, t, mask, beta=beta, temperature=temperature).item() == pytest.approx(reverse, rel=1e-4)
        assert generalized_jsd(s, t, mask, beta=beta, temperature=temperature).item() == pytest.approx(
            reverse_kl(s, t, mask, temperature).item(), rel=1e-6)


def test_jsd_endpoints_are_the_limits_of_the_mixture():
    """Near beta = 0 the mixture gives beta KL(p_T || p_S) + O(beta^2), near 1 (1 - beta) KL(p_S || p_T):
    the convention picks the forward KL for 0 and the reverse for 1, not the other way round."""
    s, t = rand(3, 7, seed=16) * 2, rand(3, 7, seed=17) * 2
    mask = torch.ones(3, dtype=torch.bool)
    eps = 1e-3
    assert (generalized_jsd(s, t, mask, beta=eps) / eps).item() == pytest.approx(
        generalized_jsd(s, t, mask, beta=0).item(), rel=2e-2)
    assert (generalized_jsd(s, t, mask, beta=1 - eps) / eps).item() == pytest.approx(
        generalized_jsd(s, t, mask, beta=1).item(), rel=2e-2)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_is_zero_for_identical_inputs(beta):
    x = rand(3, 4, 8, seed=18) * 5
    mask = rand_mask(3, 4, seed=19)
    assert generalized_jsd(x, x.clone(), mask, beta=beta).item() == pytest.approx(0.0, abs=1e-6)
    assert generalized_jsd(x - 2.0, x, mask, beta=beta, temperature=2.0).item() == pytest.approx(0.0, abs=1e-5)


def test_jsd_is_symmetric_exactly_at_one_half():
    s, t = rand(3, 5, 7, seed=20) * 2, rand(3, 5, 7, seed=21) * 3
    mask = rand_mask(3, 5, seed=22)
    assert generalized_jsd(s, t, mask, beta=0.5).item() == pytest.approx(generalized_jsd(t, s, mask, beta=0.5).item(),
                                                                          rel=1e-6)
    for beta in (0.0, 0.1, 0.3, 0.9, 1.0):
        forward, swapped = generalized_jsd(s, t, mask, beta=beta).item(), generalized_jsd(t, s, mask, beta=beta).item()
        assert forward != pytest.approx(swapped, rel=1e-3), beta
        # swapping student and teacher is the same as beta -> 1 - beta
        assert forward == pytest.approx(generalized_jsd(t, s, mask, beta=1 - beta).item(), rel=1e-5), beta


def test_jsd_is_bounded_by_ln2_t_squared():
    for seed in range(20):
        temperature = 0.5 + seed % 4
        s, t = rand(2, 3, 6, seed=400 + seed) * 20, rand(2, 3, 6, seed=500 + seed) * 20
        mask = rand_mask(2, 3, seed=600 + seed)
        value = generalized_jsd(s, t, mask, beta=0.5, temperature=temperature).item()
        assert 0 < value <= LN2 * temperature**2 * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------
# cosine distance


def test_cosine_distance_random_vs_loop():
    B, T, H = 4, 5, 6
    a, b = rand(B, T, H, seed=30), rand(B, T, H, seed=31) + 0.5 * rand(B, T, H, seed=30)
    mask = rand_mask(B, T, seed=32)
    value = cosine_distance(a, b, mask).item()
    assert value == pytest.approx(loop_position_loss(py_cosine_distance, a, b, mask), rel=1e-5)
    assert 0 < value < 2
    assert cosine_distance(a, 3 * a, mask).item() == pytest.approx(0.0, abs=1e-6)  # scale does not matter


# ---------------------------------------------------------------------------------------------
# masked-out positions, empty masks, dtypes for the new position-wise losses

NEW = {  # name: (loss, size of the last dim)
    "reverse_kl": (reverse_kl, 7),
    "jsd_0.5": (lambda s, t, m: generalized_jsd(s, t, m, beta=0.5), 7),
    "jsd_0.2": (lambda s, t, m: generalized_jsd(s, t, m, beta=0.2, temperature=2.0), 7),
    "cosine_distance": (cosine_distance, 4),
}


def _new_inputs(name, B=3, T=6, seed=40):
    D = NEW[name][1]
    return rand(B, T, D, seed=seed) * 2, rand(B, T, D, seed=seed + 1) * 2, token_mask([6, 4, 1][:B], T)


@pytest.mark.parametrize("kind", ["noise", "huge", "inf", "nan"])
@pytest.mark.parametrize("name", list(NEW))
def test_new_losses_ignore_masked_out_values(name, kind):
    fn = NEW[name][0]
    a, b, tm = _new_inputs(name)
    clean = a.clone().requires_grad_(True)
    before = fn(clean, b, tm)
    before.backward()
    a2, b2 = a.clone(), b.clone()
    a2[~tm] = _noise(a2[~tm].shape, kind, seed=41)
    b2[~tm] = _noise(b2[~tm].shape, kind, seed=42)
    a2.requires_grad_(True)
    after = fn(a2, b2, tm)
    after.backward()
    assert torch.isfinite(after) and torch.equal(after, before), (before, after)
    assert torch.equal(a2.grad[tm], clean.grad[tm]) and clean.grad[tm].abs().sum() > 0
    if kind in ("noise", "huge"):
        assert not a2.grad[~tm].any()
    # not vacuous: counted, the padded positions' contents move the value
    a3, b3 = a2.detach().nan_to_num(1.0, 1.0, -1.0), b2.nan_to_num(-1.0, -1.0, 1.0)
    assert fn(a3, b3, ~tm).item() != pytest.approx(fn(a, b, ~tm).item(), rel=1e-3)


@pytest.mark.parametrize("name", list(NEW))
def test_new_losses_empty_mask_gives_zero_gradient(name):
    fn = NEW[name][0]
    a, b, tm = _new_inputs(name)
    a = a.clone().requires_grad_(True)
    value = fn(a, b, torch.zeros_like(tm))
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(a.grad).all() and not a.grad.any()


@pytest.mark.parametrize("name", list(NEW))
def test_new_losses_empty_mask_gives_zero(name):
    fn = NEW[name][0]
    a, b, tm = _new_inputs(name)
    assert fn(a, b, torch.zeros_like(tm)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(NEW))
def test_new_losses_compute_in_fp32(name, dtype):
    fn = NEW[name][0]
    a, b, tm = _new_inputs(name)
    a, b = a.to(dtype), b.to(dtype)
    value = fn(a, b, tm)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(fn(a.float(), b.float(), tm).item(), rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# relation KL (MiniLM)

REL_MASK = torch.tensor([[True, True, True, True, True],  # full
                         [True, True, True, False, False],  # right padding
                         [False, False, True, True, True]])  # left padding


@pytest.mark.parametrize("heads", [1, 2])
def test_relation_kl_value_form_vs_loop(heads):
    s, t = rand(3, 5, 8, seed=50), rand(3, 5, 12, seed=51) * 1.5  # student 8 wide, teacher 12 wide
    expected = py_relation_kl(s, t, REL_MASK, heads)
    assert relation_kl(s, t, REL_MASK, heads).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_relation_kl_query_key_form_vs_loop(heads):
    sq, sk = rand(3, 5, 8, seed=52), rand(3, 5, 8, seed=53)
    tq, tk = rand(3, 5, 12, seed=54) * 1.5, rand(3, 5, 12, seed=55) * 1.5
    expected = py_relation_kl(sq, tq, REL_MASK, heads, sk, tk)
    value = relation_kl(sq, tq, REL_MASK, heads, student_y=sk, teacher_y=tk).item()
    assert value == pytest.approx(expected, rel=1e-5)
    # the two forms are different quantities
    assert value != pytest.approx(relation_kl(sq, tq, REL_MASK, heads).item(), rel=1e-2)


def test_relation_kl_heads_split_the_width():
    """Two relation heads are not one head over the full width: each head softmaxes its own slice."""
    s, t = rand(3, 5, 8, seed=56), rand(3, 5, 12, seed=57)
    one, two = relation_kl(s, t, REL_MASK, 1).item(), relation_kl(s, t, REL_MASK, 2).item()
    assert one == pytest.approx(py_relation_kl(s, t, REL_MASK, 1), rel=1e-5)
    assert two == pytest.approx(py_relation_kl(s, t, REL_MASK, 2), rel=1e-5)
    assert one != pytest.approx(two, rel=1e-2)


def test_relation_kl_is_zero_for_identical_relations():
    x = rand(3, 5, 8, seed=58)
    assert relation_kl(x, x.clone(), REL_MASK, 2).item() == pytest.approx(0.0, abs=1e-6)
    # an orthogonal rotation inside each head keeps every dot product, so the relations match exactly
    q, _ = torch.linalg.qr(rand(4, 4, seed=59))
    rotated = torch.cat([x[..., :4] @ q, x[..., 4:] @ q], dim=-1)
    assert relation_kl(x, rotated, REL_MASK, 2).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["noise", "huge"])
@pytest.mark.parametrize("form", ["value", "query_key"])
def test_relation_kl_ignores_padded_keys_and_queries(form, kind):
    sq, sk = rand(3, 5, 8, seed=60), rand(3, 5, 8, seed=61)
    tq, tk = rand(3, 5, 12, seed=62), rand(3, 5, 12, seed=63)
    pad = ~REL_MASK

    def run(sq, sk, tq, tk):
        sq = sq.clone().requires_grad_(True)
        sk = sk.clone().requires_grad_(True)
        value = (relation_kl(sq, tq, REL_MASK, 2) if form == "value"
                 else relation_kl(sq, tq, REL_MASK, 2, student_y=sk, teacher_y=tk))
        value.backward()
        return value, sq.grad, sk.grad

    before, gq, gk = run(sq, sk, tq, tk)
    noisy = []
    for i, x in enumerate((sq, sk, tq, tk)):
        x = x.clone()
        x[pad] = _noise(x[pad].shape, kind, seed=64 + i)
        noisy.append(x)
    after, gq2, gk2 = run(*noisy)
    assert torch.isfinite(after)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    assert torch.allclose(gq2[REL_MASK], gq[REL_MASK], rtol=1e-5, atol=1e-7) and gq[REL_MASK].abs().sum() > 0
    assert torch.isfinite(gq2).all() and not gq2[pad].any()
    if form == "query_key":
        assert torch.allclose(gk2[REL_MASK], gk[REL_MASK], rtol=1e-5, atol=1e-7) and gk[REL_MASK].abs().sum() > 0
        assert torch.isfinite(gk2).all() and not gk2[pad].any()
    # not vacuous: unmasked, the same noise moves the value
    everywhere = torch.ones_like(REL_MASK)
    if kind == "noise":
        assert relation_kl(noisy[0], noisy[2], everywhere, 2).item() != pytest.approx(
            relation_kl(sq, tq, everywhere, 2).item(), rel=1e-3)


def test_relation_kl_more_padding_does_not_matter():
    s, t = rand(3, 5, 8, seed=70), rand(3, 5, 12, seed=71)
    extra = 3
    s2 = torch.cat([s, rand(3, extra, 8, seed=72) * 10], dim=1)
    t2 = torch.cat([t, rand(3, extra, 12, seed=73) * 10], dim=1)
    mask2 = torch.cat([REL_MASK, torch.zeros(3, extra, dtype=torch.bool)], dim=1)
    assert relation_kl(s2, t2, mask2, 2).item() == pytest.approx(relation_kl(s, t, REL_MASK, 2).item(), rel=1e-6)
    # the padded rows without their padding, one at a time
    per_row = []
    for b in range(3):
        real = REL_MASK[b]
        m = torch.ones(1, int(real.sum()), dtype=torch.bool)
        per_row.append((relation_kl(s[b:b + 1, real], t[b:b + 1, real], m, 2).item(), int(real.sum())))
    weighted = sum(v * n for v, n in per_row) / sum(n for _, n in per_row)  # mean over (row, query)
    assert relation_kl(s, t, REL_MASK, 2).item() == pytest.approx(weighted, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# chunked_logit_loss: the same value and gradients as the loss on the full logits

N, H, V = 18, 6, 11
# positions 6..11 masked out (with 3 chunks of 6 the middle one is empty; with 7 -> 6 chunks of 3, two are;
# with more chunks than positions, every masked position is its own empty chunk), plus two scattered ones
CHUNK_MASK = torch.tensor([i not in (1, 6, 7, 8, 9, 10, 11, 15) for i in range(N)])
LOSS_KW = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "mse": {}}


def test_logit_losses_menu():
    assert set(LOGIT_LOSSES) == set(LOSS_KW)
    assert LOGIT_LOSSES["forward_kl"] is kl_div
    assert LOGIT_LOSSES["reverse_kl"] is reverse_kl
    assert LOGIT_LOSSES["jsd"] is generalized_jsd
    s, t = rand(4, 5, seed=80), rand(4, 5, seed=81)
    m = torch.tensor([True, False, True, True])
    expected = sum((x - y) ** 2 for p in range(4) if m[p] for x, y in zip(s[p].tolist(), t[p].tolist())) / (3 * 5)
    assert LOGIT_LOSSES["mse"](s, t, m).item() == pytest.approx(expected, rel=1e-5)
    assert LOGIT_LOSSES["mse"](s, t, m, temperature=2.0).item() == pytest.approx(expected, rel=1e-5)


def _heads(seed=90):
    student_head, teacher_head = torch.nn.Linear(H, V), torch.nn.Linear(H, V)
    with torch.no_grad():
        student_head.weight.copy_(rand(V, H, seed=seed))
        student_head.bias.copy_(rand(V, seed=seed + 1))
        teacher_head.weight.copy_(rand(V, H, seed=seed + 2) * 1.5)
        teacher_head.bias.copy_(rand(V, seed=seed + 3))
    return student_head, teacher_head


def _chunked(name, chunks, h_s, h_t, student_head, teacher_head, mask=CHUNK_MASK, temperature=1.0):
    h_s = h_s.clone().requires_grad_(True)
    h_t = h_t.clone().requires_grad_(True)  # to see that nothing flows back to the teacher
    head = copy.deepcopy(student_head)
    value = chunked_logit_loss(LOGIT_LOSSES[name], h_s, head, h_t, teacher_head, mask, chunks=chunks,
                               temperature=temperature, **LOSS_KW[name])
    value.backward()
    assert h_t.grad is None
    return value, h_s.grad, head.weight.grad, head.bias.grad


def _full(name, h_s, h_t, student_head, teacher_head, mask=CHUNK_MASK, temperature=1.0):
    h_s = h_s.clone().requires_grad_(True)
    head = copy.deepcopy(student_head)
    with torch.no_grad():
        t_logits = teacher_head(h_t)
    value = LOGIT_LOSSES[name](head(h_s), t_logits, mask, temperature=temperature, **LOSS_KW[name])
    value.backward()
    return value, h_s.grad, head.weight.grad, head.bias.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunks", [1, 3, 7, 40])
@pytest.mark.parametrize("name", list(LOSS_KW))
def test_chunked_equals_unchunked(name, chunks, temperature):
    if chunks > 1:  # the mask leaves at least one chunk with nothing to score
        assert any(not CHUNK_MASK[idx].any() for idx in torch.arange(N).chunk(chunks))
    h_s, h_t = rand(N, H, seed=91), rand(N, H, seed=92)
    student_head, teacher_head = _heads()
    value, g_h, g_w, g_b = _chunked(name, chunks, h_s, h_t, student_head, teacher_head, temperature=temperature)
    full, f_h, f_w, f_b = _full(name, h_s, h_t, student_head, teacher_head, temperature=temperature)
    assert full.item() > 1e-2
    assert value.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-5)
    for got, want in ((g_h, f_h), (g_w, f_w), (g_b, f_b)):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not g_h[~CHUNK_MASK].any()  # masked-out positions get no gradient
    # the teacher head is frozen inside: nothing reaches its parameters
    assert teacher_head.weight.grad is None and teacher_head.bias.grad is None


def test_chunked_jsd_passes_beta_on():
    """beta reaches the loss: 0.3 and 0.7 give different values, each equal to the unchunked one."""
    h_s, h_t = rand(N, H, seed=93), rand(N, H, seed=94)
    student_head, teacher_head = _heads()
    values = {}
    for beta in (0.3, 0.7):
        chunked = chunked_logit_loss(generalized_jsd, h_s, student_head, h_t, teacher_head, CHUNK_MASK, chunks=3,
                                     beta=beta)
        full = generalized_jsd(student_head(h_s), teacher_head(h_t), CHUNK_MASK, beta=beta)
        assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
        values[beta] = chunked.item()
    assert values[0.3] != pytest.approx(values[0.7], rel=1e-3)


@pytest.mark.parametrize("kind", ["noise", "huge"])
@pytest.mark.parametrize("name", list(LOSS_KW))
def test_chunked_ignores_masked_out_hidden_states(name, kind):
    h_s, h_t = rand(N, H, seed=95), rand(N, H, seed=96)
    student_head, teacher_head = _heads()
    pad = ~CHUNK_MASK
    noisy_s, noisy_t = h_s.clone(), h_t.clone()
    noisy_s[pad] = _noise(noisy_s[pad].shape, kind, seed=97)
    noisy_t[pad] = _noise(noisy_t[pad].shape, kind, seed=98)
    for chunks in (1, 3, 7):
        clean = _chunked(name, chunks, h_s, h_t, student_head, teacher_head)
        noisy = _chunked(name, chunks, noisy_s, noisy_t, student_head, teacher_head)
        assert torch.isfinite(noisy[0]) and noisy[0].item() == pytest.approx(clean[0].item(), rel=1e-6)
        torch.testing.assert_close(noisy[1][CHUNK_MASK], clean[1][CHUNK_MASK], rtol=1e-6, atol=1e-7)
        assert not noisy[1][pad].any()
        torch.testing.assert_close(noisy[2], clean[2], rtol=1e-6, atol=1e-7)  # head weight
        torch.testing.assert_close(noisy[3], clean[3], rtol=1e-6, atol=1e-7)  # head bias
    # not vacuous: with every position counted, the noise moves the value
    everywhere = torch.ones(N, dtype=torch.bool)
    moved = chunked_logit_loss(LOGIT_LOSSES[name], noisy_s, student_head, noisy_t, teacher_head, everywhere, chunks=3,
                               **LOSS_KW[name])
    assert not moved.item() == pytest.approx(
        chunked_logit_loss(LOGIT_LOSSES[name], h_s, student_head, h_t, teacher_head, everywhere, chunks=3,
                           **LOSS_KW[name]).item(), rel=1e-3)


def test_chunked_empty_mask_gives_zero_with_a_gradient():
    h_s = rand(N, H, seed=99).requires_grad_(True)
    student_head, teacher_head = _heads()
    value = chunked_logit_loss(kl_div, h_s, student_head, rand(N, H, seed=100), teacher_head,
                               torch.zeros(N, dtype=torch.bool), chunks=3)
    assert value.item() == 0.0
    value.backward()  # as the training loop does when a micro-batch has no scored position
    assert not h_s.grad.any()


# ---------------------------------------------------------------------------------------------
# the causal shift: logits at position t predict token t + 1


def shifted_mask(am):
    """Positions whose logits are scored: the position and the token it predicts are both real."""
    return am[:, 1:] & am[:, :-1]


def causal_case(seed=110):
    B, T, V_ = 3, 6, 5
    am = torch.tensor([[1, 1, 1, 1, 1, 1],  # full
                       [1, 1, 1, 1, 0, 0],  # right padding
                       [0, 0, 1, 1, 1, 1]]).bool()  # left padding
    return rand(B, T, V_, seed=seed) * 2, rand(B, T, V_, seed=seed + 1) * 2, am


@pytest.mark.parametrize("name", list(LOSS_KW))
def test_causal_shift_scores_real_pairs_only(name):
    s, t, am = causal_case()
    value = LOGIT_LOSSES[name](s[:, :-1], t[:, :-1], shifted_mask(am), **LOSS_KW[name]).item()
    if name != "mse":  # against a loop over (position, next token) pairs where both are real
        per_position = {"forward_kl": py_forward_kl, "reverse_kl": py_reverse_kl,
                        "jsd": lambda a, b: py_jsd(a, b, 0.3)}[name]
        values = [per_position(s[b, p].tolist(), t[b, p].tolist())
                  for b in range(3) for p in range(5) if am[b, p] and am[b, p + 1]]
        assert len(values) == 5 + 3 + 3
        assert value == pytest.approx(sum(values) / len(values), rel=1e-5)

    # append padding (right) and prepend padding (left) holding noise: the value does not move
    B, _, V_ = s.shape
    for side in ("right", "left"):
        noise_s, noise_t = rand(B, 3, V_, seed=120) * 100, rand(B, 3, V_, seed=121) * 100
        pad_mask = torch.zeros(B, 3, dtype=torch.bool)
        if side == "right":
            s2, t2, am2 = torch.cat([s, noise_s], 1), torch.cat([t, noise_t], 1), torch.cat([am, pad_mask], 1)
        else:
            s2, t2, am2 = torch.cat([noise_s, s], 1), torch.cat([noise_t, t], 1), torch.cat([pad_mask, am], 1)
        padded = LOGIT_LOSSES[name](s2[:, :-1], t2[:, :-1], shifted_mask(am2), **LOSS_KW[name]).item()
        assert padded == pytest.approx(value, rel=1e-6), side


def test_causal_shift_needs_both_halves_of_the_mask():
    """Not vacuous: with only one half of the mask, added padding changes the value."""
    s, t, am = causal_case()
    B, _, V_ = s.shape
    noise_s, noise_t = rand(B, 3, V_, seed=122) * 100, rand(B, 3, V_, seed=123) * 100
    pad_mask = torch.zeros(B, 3, dtype=torch.bool)
    # only "this position is real": after right padding, the last real token of row 0 (which predicted
    # nothing) now predicts a pad token and counts
    right = torch.cat([s, noise_s], 1), torch.cat([t, noise_t], 1), torch.cat([am, pad_mask], 1)
    assert kl_div(right[0][:, :-1], right[1][:, :-1], right[2][:, :-1]).item() != pytest.approx(
        kl_div(s[:, :-1], t[:, :-1], am[:, :-1]).item(), rel=1e-3)
    # only "the next token is real": with left padding, the pad before the first real token counts
    left = torch.cat([noise_s, s], 1), torch.cat([noise_t, t], 1), torch.cat([pad_mask, am], 1)
    assert kl_div(left[0][:, :-1], left[1][:, :-1], left[2][:, 1:]).item() != pytest.approx(
        kl_div(s[:, :-1], t[:, :-1], am[:, 1:]).item(), rel=1e-3)
    # both halves: unchanged either way
    for s2, t2, am2 in (right, left):
        assert kl_div(s2[:, :-1], t2[:, :-1], shifted_mask(am2)).item() == pytest.approx(
            kl_div(s[:, :-1], t[:, :-1], shifted_mask(am)).item(), rel=1e-6)


@pytest.mark.parametrize("name", list(LOSS_KW))
def test_causal_shift_chunked_over_flattened_positions(name):
    """The recipe's path: hidden states [B, T, H] -> [:, :-1] flattened, the shifted mask flattened, chunked."""
    B, T = 3, 6
    am = causal_case()[2]
    h_s, h_t = rand(B, T, H, seed=130), rand(B, T, H, seed=131)
    h_s[~am] = 1e3 * rand(int((~am).sum()), H, seed=132)  # padded hidden states hold anything
    student_head, teacher_head = _heads()
    flat = shifted_mask(am).reshape(-1)
    value = chunked_logit_loss(LOGIT_LOSSES[name], h_s[:, :-1].reshape(-1, H), student_head,
                               h_t[:, :-1].reshape(-1, H), teacher_head, flat, chunks=4, **LOSS_KW[name])
    # against the unchunked loss over the real pairs only, gathered by a loop
    rows = [(b, p) for b in range(B) for p in range(T - 1) if am[b, p] and am[b, p + 1]]
    s_real = torch.stack([h_s[b, p] for b, p in rows])
    t_real = torch.stack([h_t[b, p] for b, p in rows])
    expected = LOGIT_LOSSES[name](student_head(s_real), teacher_head(t_real), torch.ones(len(rows), dtype=torch.bool),
                                  **LOSS_KW[name])
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# chunked_logit_loss and chunked_record_loss compute each chunk's gradients in the chunk loop:
# the same value and gradients as the plain loss (1e-6 relative), and the student head runs
# exactly once per chunk in forward + backward (nothing recomputed)

from sitra.losses import RECORD_LOSSES, Sampled, TopK, chunked_record_loss, distill_loss

NG, HG, VG, KG = 30, 6, 11, 4
GRAD_MASK = torch.tensor([i % 4 != 2 and i not in (5, 17) for i in range(NG)])  # every chunk of 1, 4 or 5 scores some
GRAD_CASES = [("logits", name) for name in LOGIT_LOSSES] + [("logits+targets", "jsd")] + \
    [("top_k", name) for name in RECORD_LOSSES] + [("sampled", "forward_kl")]


class _Student(torch.nn.Module):
    """Hidden states from token ids (an embedding and a layer) and a head: "linear" (with a bias),
    "tied" (its weight is the input embeddings') or "closure" (a wider head sliced to VG, as
    distill_pythia's `lambda h: lm_head(model)(h)[..., :V]`)."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(140)
        self.kind = kind
        self.emb = torch.nn.Embedding(VG, HG)
        self.layer = torch.nn.Linear(HG, HG)
        self.lm = torch.nn.Linear(HG, VG + 3 if kind == "closure" else VG, bias=kind != "tied")
        if kind == "tied":
            self.lm.weight = self.emb.weight

    def hidden(self, ids):
        return torch.tanh(self.layer(self.emb(ids))) * 3

    def head(self, h):
        return self.lm(h)[..., :VG] if self.kind == "closure" else self.lm(h)


def _grad_case(kind):
    """(loss_fn, teacher) of a case: teacher is (h_t, teacher_head) for logits, the records otherwise."""
    source, name = kind
    extra = {"beta": 0.3} if name == "jsd" else {}
    if source.startswith("logits"):
        t_head = torch.nn.Linear(HG, VG)
        with torch.no_grad():
            t_head.weight.copy_(rand(VG, HG, seed=141) * 2)
            t_head.bias.copy_(rand(VG, seed=142))
        h_t = rand(NG, HG, seed=143).requires_grad_(True)  # to see that nothing flows back to the teacher
        if source == "logits":
            return (lambda s, t, mask: LOGIT_LOSSES[name](s, t, mask, temperature=2.0, **extra)), (h_t, t_head)
        return (lambda s, t, mask, targets: distill_loss(s, t, mask, targets, divergence=name, temperature=2.0,
                                                         ce_weight=0.5, **extra)[0]), (h_t, t_head)
    t_lp = torch.log_softmax(rand(NG, VG, seed=144) * 2 / 2.0, -1)
    if source == "top_k":
        logp, ids = t_lp.topk(KG, -1)
        records, wrap = (ids, logp, t_lp.scatter(-1, ids, float("-inf")).logsumexp(-1)), TopK
    else:  # distinct ids of 8 draws from p_T, their share of the draws, 0 in unused slots
        draws = torch.multinomial(t_lp.exp(), 8, replacement=True, generator=torch.Generator().manual_seed(145))
        ids, weight = torch.zeros(NG, 8, dtype=torch.long), torch.zeros(NG, 8)
        for row in range(NG):
            distinct, counts = draws[row].unique(return_counts=True)
            ids[row, :len(distinct)], weight[row, :len(distinct)] = distinct, counts / 8
        records, wrap = (ids, t_lp.gather(-1, ids), weight), Sampled

    def loss_fn(s, *pieces_mask, targets=None):
        *pieces, mask = pieces_mask
        return distill_loss(s, wrap(*pieces), mask, targets, divergence=name, temperature=2.0, ce_weight=0.5, **extra)[0]

    return loss_fn, records


def _grad_run(kind, head_kind, chunks=None):
    """(value, gradients by name, student head calls) of the plain loss (chunks None) or the chunked one."""
    student = _Student(head_kind)
    calls = [0]

    def head(h):
        calls[0] += 1
        return student.head(h)

    loss_fn, teacher = _grad_case(kind)
    ids = torch.randint(0, VG, (NG,), generator=torch.Generator().manual_seed(146))
    targets = torch.randint(0, VG, (NG,), generator=torch.Generator().manual_seed(147))
    extra = {"targets": targets} if kind[0] != "logits" else {}
    hidden = student.hidden(ids)
    hidden.retain_grad()
    if kind[0].startswith("logits"):
        h_t, t_head = teacher
        if chunks is None:
            with torch.no_grad():
                t_logits = t_head(h_t)
            value = loss_fn(head(hidden), t_logits, GRAD_MASK, **extra)
        else:
            value = chunked_logit_loss(loss_fn, hidden, head, h_t, t_head, GRAD_MASK, chunks=chunks, **extra)
    elif chunks is None:
        value = loss_fn(head(hidden), *teacher, GRAD_MASK, **extra)
    else:
        value = chunked_record_loss(loss_fn, hidden, head, teacher, GRAD_MASK, chunks=chunks, **extra)
    forward_calls = calls[0]
    value.backward()
    assert calls[0] == forward_calls  # backward runs no head
    if kind[0].startswith("logits"):
        assert teacher[0].grad is None and teacher[1].weight.grad is None and teacher[1].bias.grad is None
    grads = {"hidden": hidden.grad, **{n: p.grad for n, p in student.named_parameters()}}
    return value.detach(), grads, calls[0]


def _max_rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("chunks", [1, 4, 5])
@pytest.mark.parametrize("head_kind", ["linear", "tied", "closure"])
@pytest.mark.parametrize("kind", GRAD_CASES, ids=lambda k: f"{k[0]}-{k[1]}")
def test_chunked_gradients_equal_plain_with_one_head_call_per_chunk(kind, head_kind, chunks):
    pieces = torch.arange(NG).chunk(chunks)
    assert len(pieces) == chunks and all(GRAD_MASK[p].any() for p in pieces)
    plain, want, plain_calls = _grad_run(kind, head_kind)
    value, got, calls = _grad_run(kind, head_kind, chunks)
    assert plain_calls == 1 and calls == chunks  # once per chunk in forward + backward
    assert plain.item() > 1e-2 and abs(value.item() - plain.item()) <= 1e-6 * abs(plain.item())
    # tied: lm.weight is emb.weight, one parameter taking the gradient of both uses
    names = {"hidden", "emb.weight", "layer.weight", "layer.bias"} | ({"lm.weight", "lm.bias"} if head_kind != "tied" else set())
    assert set(want) == names and set(got) == names
    for n in names:
        assert want[n].abs().max() > 0, n
        assert _max_rel(got[n], want[n]) <= 1e-6, (n, _max_rel(got[n], want[n]))
    assert not got["hidden"][~GRAD_MASK].any()


def test_chunked_without_grad_runs_no_autograd():
    """Under no_grad / inference_mode: the value chunk by chunk, no graph, one head call per chunk."""
    student = _Student("linear")
    loss_fn, (h_t, t_head) = _grad_case(("logits", "forward_kl"))
    h = student.hidden(torch.arange(NG) % VG).detach()
    with torch.no_grad():
        want = loss_fn(student.head(h), t_head(h_t), GRAD_MASK)
    for context in (torch.no_grad, torch.inference_mode):
        calls = [0]

        def head(x, calls=calls):
            calls[0] += 1
            return student.head(x)

        with context():
            value = chunked_logit_loss(loss_fn, h, head, h_t, t_head, GRAD_MASK, chunks=4)
        assert not value.requires_grad and calls[0] == 4
        assert abs(value.item() - want.item()) <= 1e-6 * want.item()


def test_chunked_under_autocast():
    """bf16 autocast: the loss is taken in fp32, value and gradients close to the plain loss's under autocast."""
    results = []
    for chunks in (None, 4):
        student = _Student("tied")
        loss_fn, (h_t, t_head) = _grad_case(("logits", "forward_kl"))
        hidden = student.hidden(torch.arange(NG) % VG)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunks is None:
                with torch.no_grad():
                    t_logits = t_head(h_t)
                value = loss_fn(student.head(hidden), t_logits, GRAD_MASK)
            else:
                value = chunked_logit_loss(loss_fn, hidden, student.head, h_t, t_head, GRAD_MASK, chunks=chunks)
        assert value.dtype == torch.float32
        value.backward()
        results.append((value.item(), {n: p.grad for n, p in student.named_parameters()}))
    (plain, want), (value, got) = results
    assert value == pytest.approx(plain, rel=1e-3)
    for n in want:
        assert torch.isfinite(got[n]).all() and _max_rel(got[n], want[n]) <= 2e-2, n
