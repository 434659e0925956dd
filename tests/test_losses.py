"""sitra.losses against formulas written out independently.

Expected values come from plain Python (`math`, loops over the masked positions), never from the
torch ops the losses use: hand-worked 2x3 cases with their numbers in the test, random tensors
against per-position loops, and the invariances a masked loss must have (padding is absent).
"""
import math

import pytest
import torch

from sitra import losses
from sitra.losses import LOSSES, cosine_similarity, kl_div, l1, mse, soft_cross_entropy

LN2 = math.log(2)


# ---------------------------------------------------------------------------------------------
# plain-Python reference formulas (lists of floats, no torch)


def py_softmax(xs, temperature=1.0):
    xs = [x / temperature for x in xs]
    finite = [x for x in xs if x != -math.inf]
    top = max(finite)
    exps = [math.exp(x - top) if x != -math.inf else 0.0 for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def py_cross_entropy(s_logits, t_logits, temperature=1.0):
    """-sum_v p_T(v) log p_S(v); terms with p_T(v) = 0 contribute nothing."""
    p_s, p_t = py_softmax(s_logits, temperature), py_softmax(t_logits, temperature)
    return -sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s) if pt > 0)


def py_kl(s_logits, t_logits, temperature=1.0):
    p_s, p_t = py_softmax(s_logits, temperature), py_softmax(t_logits, temperature)
    return sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s) if pt > 0)


def py_entropy(t_logits, temperature=1.0):
    return -sum(p * math.log(p) for p in py_softmax(t_logits, temperature) if p > 0)


def py_cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def positions(mask):
    """Index tuples of the True entries of a bool mask, in a plain Python loop."""
    return [tuple(i) for i in mask.nonzero().tolist()]


def loop_position_loss(per_position, a, b, mask, **kw):
    """Mean over the masked positions of per_position(vector_a, vector_b) along the last dim."""
    values = [per_position(a[p].tolist(), b[p].tolist(), **kw) for p in positions(mask)]
    return sum(values) / len(values)


def loop_elementwise(fn, a, b, mask):
    """Mean of fn(x, y) over the elements `mask` (broadcast to a's shape) selects."""
    mask = mask.expand(a.shape)
    values = [fn(a[p].item(), b[p].item()) for p in positions(mask)]
    return sum(values) / len(values)


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rand_mask(*shape, seed, p=0.6):
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p
    mask.view(-1)[0] = True  # never empty
    return mask


def token_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------------------------------------
# hand-worked cases: the numbers are the golden values


M23 = [[True, True, False], [True, False, True]]


def test_mse_and_l1_by_hand():
    pred = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    target = torch.tensor([[1.0, 0.0, 30.0], [2.0, -50.0, 9.0]])
    mask = torch.tensor(M23)
    # selected differences: 0, 2, 2, -3 (the 27 and 55 are masked out)
    assert mse(pred, target, mask).item() == pytest.approx((0 + 4 + 4 + 9) / 4)  # 4.25
    assert l1(pred, target, mask).item() == pytest.approx((0 + 2 + 2 + 3) / 4)  # 1.75
    # every position
    full = torch.ones(2, 3, dtype=torch.bool)
    assert mse(pred, target, full).item() == pytest.approx((0 + 4 + 27**2 + 4 + 55**2 + 9) / 6)
    assert l1(pred, target, full).item() == pytest.approx((0 + 2 + 27 + 2 + 55 + 3) / 6)


def test_mse_and_l1_mask_broadcasts_over_hidden_by_hand():
    # 2 tokens x 3 hidden units, the second token is padding: mask [2, 1] broadcasts to [2, 3]
    pred = torch.tensor([[1.0, -1.0, 2.0], [100.0, 100.0, 100.0]])
    target = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True], [False]])
    assert mse(pred, target, mask).item() == pytest.approx((1 + 4 + 0) / 3)
    assert l1(pred, target, mask).item() == pytest.approx((1 + 2 + 0) / 3)


# two positions over a vocabulary of 3, given as log-probabilities (logits up to a constant)
T_PROBS = [[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]
S_PROBS = [[0.25, 0.25, 0.5], [1 / 6, 2 / 6, 3 / 6]]
CE_BY_HAND = [
    1.75 * LN2,  # -(0.5 ln 1/4 + 0.25 ln 1/4 + 0.25 ln 1/2)
    math.log(36) / 3,  # -(1/3)(ln 1/6 + ln 2/6 + ln 3/6)
]
KL_BY_HAND = [
    0.25 * LN2,  # 0.5 ln 2 + 0.25 ln 1 + 0.25 ln 1/2
    math.log(4 / 3) / 3,  # (1/3)(ln 2 + ln 1 + ln 2/3)
]


def hand_logits():
    s = torch.tensor(S_PROBS).log() + torch.tensor([[3.0], [-7.0]])  # shifts do not change a softmax
    t = torch.tensor(T_PROBS).log() + torch.tensor([[1.0], [5.0]])
    return s, t


def test_soft_cross_entropy_by_hand():
    s, t = hand_logits()
    assert soft_cross_entropy(s, t, torch.tensor([True, True])).item() == pytest.approx(sum(CE_BY_HAND) / 2, rel=1e-6)
    assert soft_cross_entropy(s, t, torch.tensor([True, False])).item() == pytest.approx(CE_BY_HAND[0], rel=1e-6)
    assert soft_cross_entropy(s, t, torch.tensor([False, True])).item() == pytest.approx(CE_BY_HAND[1], rel=1e-6)


def test_soft_cross_entropy_temperature_by_hand():
    # teacher logits ln[2, 1, 1] at T=2 -> probs proportional to sqrt: [sqrt2, 1, 1] / (2 + sqrt2);
    # student logits 0 -> uniform 1/3; CE = ln 3 per position, times T^2 = 4
    s = torch.zeros(1, 3)
    t = torch.tensor([[math.log(2), 0.0, 0.0]])
    assert soft_cross_entropy(s, t, torch.tensor([True]), temperature=2.0).item() == pytest.approx(4 * math.log(3), rel=1e-6)
    # KL at T=2: sum p ln(3p) with p = [sqrt2, 1, 1] / (2 + sqrt2), times 4
    z = 2 + math.sqrt(2)
    p = [math.sqrt(2) / z, 1 / z, 1 / z]
    expected_kl = 4 * sum(q * math.log(3 * q) for q in p)
    assert kl_div(s, t, torch.tensor([True]), temperature=2.0).item() == pytest.approx(expected_kl, rel=1e-5)


def test_kl_div_by_hand():
    s, t = hand_logits()
    assert kl_div(s, t, torch.tensor([True, True])).item() == pytest.approx(sum(KL_BY_HAND) / 2, rel=1e-5)
    assert kl_div(s, t, torch.tensor([False, True])).item() == pytest.approx(KL_BY_HAND[1], rel=1e-5)


def test_cosine_similarity_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0], [4.0, 3.0]])
    # cosines: 0, 1, 24/25
    assert cosine_similarity(a, b, torch.tensor([True, True, True])).item() == pytest.approx((0 + 1 + 0.96) / 3)
    assert cosine_similarity(a, b, torch.tensor([False, True, True])).item() == pytest.approx((1 + 0.96) / 2)
    assert cosine_similarity(a, -b, torch.tensor([True, True, False])).item() == pytest.approx((0 - 1) / 2)


# ---------------------------------------------------------------------------------------------
# random tensors against per-position loops


@pytest.mark.parametrize("mask_shape", ["token", "element"])
@pytest.mark.parametrize("fn,elem", [pytest.param(mse, lambda x, y: (x - y) ** 2, id="mse"),
                                     pytest.param(l1, lambda x, y: abs(x - y), id="l1")])
def test_mse_l1_random_vs_loop(fn, elem, mask_shape):
    B, T, H = 3, 5, 4
    a, b = rand(B, T, H, seed=1), rand(B, T, H, seed=2) * 2
    mask = rand_mask(B, T, 1, seed=3) if mask_shape == "token" else rand_mask(B, T, H, seed=3)
    expected = loop_elementwise(elem, a, b, mask)
    assert fn(a, b, mask).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_soft_cross_entropy_and_kl_random_vs_loop(temperature):
    B, T, V = 3, 6, 7
    s, t = rand(B, T, V, seed=4) * 3, rand(B, T, V, seed=5) * 3
    mask = rand_mask(B, T, seed=6)
    ce = loop_position_loss(lambda x, y: py_cross_entropy(x, y, temperature), s, t, mask) * temperature**2
    kl = loop_position_loss(lambda x, y: py_kl(x, y, temperature), s, t, mask) * temperature**2
    assert soft_cross_entropy(s, t, mask, temperature).item() == pytest.approx(ce, rel=1e-5)
    assert kl_div(s, t, mask, temperature).item() == pytest.approx(kl, rel=1e-4, abs=1e-6)


def test_cosine_similarity_random_vs_loop():
    B, T, H = 4, 5, 6
    a, b = rand(B, T, H, seed=7), rand(B, T, H, seed=8) + 0.5 * rand(B, T, H, seed=7)
    mask = rand_mask(B, T, seed=9)
    assert cosine_similarity(a, b, mask).item() == pytest.approx(loop_position_loss(py_cosine, a, b, mask), rel=1e-5)


def test_losses_on_attention_shaped_inputs_vs_loop():
    """[batch, query, key] distributions with a query x key mask, as the recipes pass them."""
    B, T = 2, 5
    lengths = [5, 3]
    tm = token_mask(lengths, T)
    pair = tm[:, :, None] & tm[:, None, :]
    p, q = rand(B, T, T, seed=10).softmax(-1), rand(B, T, T, seed=11).softmax(-1)
    assert mse(p, q, pair).item() == pytest.approx(loop_elementwise(lambda x, y: (x - y) ** 2, p, q, pair), rel=1e-5)
    expected = loop_position_loss(py_cross_entropy, p.log(), q.log(), tm)
    assert soft_cross_entropy(p.log(), q.log(), tm).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# padding is absent: what masked-out positions hold, and how many there are, do not matter


def _noise(shape, kind, seed):
    sign = torch.sign(rand(*shape, seed=seed))
    if kind == "noise":
        return rand(*shape, seed=seed) * 1e3
    if kind == "huge":
        return torch.full(shape, 1e20) * sign  # finite in fp32, but its square is not
    if kind == "inf":
        return torch.full(shape, math.inf) * sign
    return torch.full(shape, math.nan)


CASES = {  # name: (loss, size of the last dim of its inputs)
    "mse": (mse, 4),
    "l1": (l1, 4),
    "soft_cross_entropy": (soft_cross_entropy, 7),
    "kl_div": (kl_div, 7),
    "cosine_similarity": (cosine_similarity, 4),
}
ELEMENTWISE = {"mse", "l1"}  # they take a mask with a trailing broadcast dim


def _inputs(name, B=3, T=6, seed=0):
    _, D = CASES[name]
    a, b = rand(B, T, D, seed=seed), rand(B, T, D, seed=seed + 1)
    tm = token_mask([6, 4, 1][:B], T)
    mask = tm[..., None] if name in ELEMENTWISE else tm
    return a, b, tm, mask


@pytest.mark.parametrize("kind", ["noise", "huge", "inf", "nan"])
@pytest.mark.parametrize("name", list(CASES))
def test_masked_out_values_do_not_matter(name, kind):
    """Padded positions hold anything, even inf or nan: the value is bit for bit the same."""
    fn = CASES[name][0]
    a, b, tm, mask = _inputs(name)
    before = fn(a, b, mask)
    pad = ~tm
    a2, b2 = a.clone(), b.clone()
    a2[pad] = _noise(a2[pad].shape, kind, seed=20)
    b2[pad] = _noise(b2[pad].shape, kind, seed=21)
    assert not torch.equal(a, a2) and not torch.equal(b, b2)
    after = fn(a2, b2, mask)
    assert torch.isfinite(after)
    assert torch.equal(after, before), (before, after)


@pytest.mark.parametrize("kind", ["noise", "huge", "inf", "nan"])
@pytest.mark.parametrize("name", list(CASES))
def test_masked_out_values_do_not_change_the_gradient(name, kind):
    fn = CASES[name][0]
    a, b, tm, mask = _inputs(name)
    clean = a.clone().requires_grad_(True)
    fn(clean, b, mask).backward()
    a2, b2 = a.clone(), b.clone()
    a2[~tm] = _noise(a2[~tm].shape, kind, seed=20)
    b2[~tm] = _noise(b2[~tm].shape, kind, seed=21)
    a2.requires_grad_(True)
    fn(a2, b2, mask).backward()
    assert torch.equal(a2.grad[tm], clean.grad[tm])
    assert clean.grad[tm].abs().sum() > 0
    if kind in ("noise", "huge"):  # finite padding gets exactly zero gradient (inf/nan give 0 * inf = nan there)
        assert torch.equal(a2.grad[~tm], torch.zeros_like(a2.grad[~tm]))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("extra", [1, 5])
def test_more_padding_does_not_matter(name, extra):
    fn = CASES[name][0]
    a, b, tm, mask = _inputs(name)
    B, _, D = a.shape
    a2 = torch.cat([a, rand(B, extra, D, seed=30) * 50], dim=1)
    b2 = torch.cat([b, rand(B, extra, D, seed=31) * 50], dim=1)
    tm2 = torch.cat([tm, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    mask2 = tm2[..., None] if name in ELEMENTWISE else tm2
    assert fn(a2, b2, mask2).item() == pytest.approx(fn(a, b, mask).item(), rel=1e-6, abs=1e-7)
    # and removing padding entirely: only the real tokens of each row, flattened
    flat_mask = tm.reshape(-1)
    flat_a, flat_b = a.reshape(-1, D)[flat_mask], b.reshape(-1, D)[flat_mask]
    all_true = torch.ones(len(flat_a), 1, dtype=torch.bool) if name in ELEMENTWISE else torch.ones(len(flat_a), dtype=torch.bool)
    assert fn(flat_a, flat_b, all_true).item() == pytest.approx(fn(a, b, mask).item(), rel=1e-6, abs=1e-7)


def test_padding_changes_the_value_when_not_masked():
    """The invariance tests above are not vacuous: unmasked noise does move every loss."""
    for name, (fn, _) in CASES.items():
        a, b, tm, mask = _inputs(name)
        a2 = a.clone()
        a2[~tm] = _noise(a2[~tm].shape, "noise", seed=20)
        everywhere = torch.ones_like(mask)
        assert fn(a2, b, everywhere).item() != pytest.approx(fn(a, b, everywhere).item(), rel=1e-3), name


# ---------------------------------------------------------------------------------------------
# soft cross-entropy: temperature, relation to KL, log-probabilities with -inf


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_soft_cross_entropy_temperature_is_scaled_by_t_squared(temperature):
    s, t = rand(2, 5, 9, seed=40) * 2, rand(2, 5, 9, seed=41) * 2
    mask = rand_mask(2, 5, seed=42)
    at_t = soft_cross_entropy(s, t, mask, temperature=temperature).item()
    # softmax(x / T) at temperature 1 on pre-divided logits, times T^2
    assert at_t == pytest.approx(temperature**2 * soft_cross_entropy(s / temperature, t / temperature, mask).item(), rel=1e-5)
    assert at_t != pytest.approx(soft_cross_entropy(s, t, mask).item(), rel=1e-2)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_soft_cross_entropy_is_kl_plus_teacher_entropy(temperature):
    s, t = rand(3, 4, 6, seed=43) * 2, rand(3, 4, 6, seed=44) * 2
    mask = rand_mask(3, 4, seed=45)
    entropy = loop_position_loss(lambda _, y: py_entropy(y, temperature), s, t, mask) * temperature**2
    ce = soft_cross_entropy(s, t, mask, temperature).item()
    kl = kl_div(s, t, mask, temperature).item()
    assert entropy > 0.1 * temperature**2
    assert ce == pytest.approx(kl + entropy, rel=1e-5)


def _attention_log_probs(lengths, T, seed):
    """log of per-query distributions over keys; padded keys have probability 0 (log = -inf)."""
    tm = token_mask(lengths, T)
    scores = rand(len(lengths), T, T, seed=seed) * 2
    scores = scores.masked_fill(~tm[:, None, :], -math.inf)
    return scores.log_softmax(-1), tm


def test_soft_cross_entropy_accepts_minus_inf_log_probs():
    lengths, T = [5, 3, 2], 5
    s, tm = _attention_log_probs(lengths, T, seed=50)
    t, _ = _attention_log_probs(lengths, T, seed=51)
    assert torch.isinf(s).any() and torch.isinf(t).any()
    s = s.clone().requires_grad_(True)
    loss = soft_cross_entropy(s, t, tm)
    assert torch.isfinite(loss)
    # the same as the loop over real queries and their real keys only
    expected = []
    for i, n in enumerate(lengths):
        for q in range(n):
            expected.append(py_cross_entropy(s[i, q, :n].tolist(), t[i, q, :n].tolist()))
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    # gradient: finite everywhere; (p_S - p_T) / count at real keys, 0 at padded keys and queries
    loss.backward()
    assert torch.isfinite(s.grad).all()
    count = sum(lengths)
    for i, n in enumerate(lengths):
        for q in range(T):
            for k in range(T):
                g = s.grad[i, q, k].item()
                if q < n and k < n:
                    want = (math.exp(s[i, q, k].item()) - math.exp(t[i, q, k].item())) / count
                    assert g == pytest.approx(want, abs=1e-6)
                else:
                    assert g == 0.0


def test_soft_cross_entropy_minus_inf_with_temperature():
    lengths, T = [4, 2], 4
    s, tm = _attention_log_probs(lengths, T, seed=52)
    t, _ = _attention_log_probs(lengths, T, seed=53)
    loss = soft_cross_entropy(s, t, tm, temperature=2.0)
    expected = [py_cross_entropy(s[i, q, :n].tolist(), t[i, q, :n].tolist(), 2.0)
                for i, n in enumerate(lengths) for q in range(n)]
    assert loss.item() == pytest.approx(4 * sum(expected) / len(expected), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_soft_cross_entropy_gradient_is_finite_and_correct(temperature):
    s = (rand(2, 3, 5, seed=54) * 4).requires_grad_(True)
    t = rand(2, 3, 5, seed=55) * 4
    mask = torch.tensor([[True, True, False], [True, False, False]])
    soft_cross_entropy(s, t, mask, temperature).backward()
    assert torch.isfinite(s.grad).all()
    # d/ds of T^2 * mean CE(softmax(s/T), softmax(t/T)) = T (p_S - p_T) / count
    for p in positions(torch.ones(2, 3, dtype=torch.bool)):
        ps, pt = py_softmax(s[p].tolist(), temperature), py_softmax(t[p].tolist(), temperature)
        for v in range(5):
            want = temperature * (ps[v] - pt[v]) / 3 if mask[p] else 0.0
            assert s.grad[p][v].item() == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# KL divergence


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_div_is_zero_for_identical_inputs(temperature):
    x = rand(3, 4, 8, seed=60) * 5
    mask = rand_mask(3, 4, seed=61)
    assert kl_div(x, x.clone(), mask, temperature).item() == pytest.approx(0.0, abs=1e-6)
    # softmax is shift-invariant: the same distributions from shifted logits
    assert kl_div(x + 3.0, x, mask, temperature).item() == pytest.approx(0.0, abs=1e-5)


def test_kl_div_is_non_negative():
    for seed in range(30):
        s, t = rand(2, 3, 6, seed=100 + seed) * (1 + seed % 5), rand(2, 3, 6, seed=200 + seed) * (1 + seed % 3)
        mask = rand_mask(2, 3, seed=300 + seed)
        value = kl_div(s, t, mask, temperature=1 + seed % 3).item()
        assert value >= -1e-6
        if not torch.allclose(s.softmax(-1)[mask], t.softmax(-1)[mask]):
            assert value > 0


# ---------------------------------------------------------------------------------------------
# empty masks, dtypes, the --criterion table


@pytest.mark.parametrize("name", list(CASES))
def test_empty_mask_gives_zero_not_nan(name):
    fn = CASES[name][0]
    a, b, _, mask = _inputs(name)
    a = a.clone().requires_grad_(True)
    value = fn(a, b, torch.zeros_like(mask))
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(a.grad).all() and not a.grad.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_low_precision_inputs_are_computed_in_fp32(name, dtype):
    fn = CASES[name][0]
    a, b, _, mask = _inputs(name)
    a, b = a.to(dtype), b.to(dtype)
    value = fn(a, b, mask)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(fn(a.float(), b.float(), mask).item(), rel=1e-6, abs=1e-7)


def test_losses_table_is_what_criterion_accepts():
    assert set(LOSSES) == {"MSE", "L1", "CrossEntropy"}
    assert LOSSES["MSE"] is losses.mse
    assert LOSSES["L1"] is losses.l1
    assert LOSSES["CrossEntropy"] is losses.soft_cross_entropy
