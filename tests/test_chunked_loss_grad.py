"""chunked_distill_loss: forward KL and cross-entropy with their logit gradients computed directly.

Each case is checked against distill_loss on the full logits with plain autograd (value and the
gradients of every parameter and of the hidden states, 1e-6 relative), for every kind of student
head: an nn.Linear with a bias and one without (taken by matmul), an nn.Linear cut by vocab=, a
head tied to the input embeddings, and a function of the hidden states (taken by autograd.grad);
the teacher's head as an nn.Linear (taken by matmul, 1/T folded in) or as a function.
"""
import pytest
import torch

from sitra.losses import chunked_distill_loss, distill_loss, kl_div

N, H, V = 30, 6, 11
# positions 10..14 (a whole piece with 6 chunks of 5) and three scattered ones are padding
MASK = torch.tensor([not (10 <= i < 15 or i in (3, 21, 29)) for i in range(N)])
HEADS = ["linear", "linear_no_bias", "vocab_cut", "tied", "function"]


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Student(torch.nn.Module):
    """Hidden states from token ids (an embedding and a layer), and an LM head of the given kind."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(7)
        self.kind = kind
        self.emb = torch.nn.Embedding(V + 3, H)
        self.layer = torch.nn.Linear(H, H)
        wide = kind in ("vocab_cut", "function", "tied")  # a head wider than the compared vocabulary
        self.lm = torch.nn.Linear(H, V + 3 if wide else V, bias=kind not in ("linear_no_bias", "tied"))
        if kind == "tied":
            self.lm.weight = self.emb.weight

    def hidden(self, ids):
        return torch.tanh(self.layer(self.emb(ids))) * 3

    def plain_logits(self, h):
        return self.lm(h)[..., :V]

    def chunk_head(self):
        """(head, vocab) as chunked_distill_loss takes them."""
        if self.kind == "function":
            return (lambda h: self.lm(h)[..., :V]), None
        return self.lm, (V if self.lm.out_features > V else None)


def teacher(width=V):
    head = torch.nn.Linear(H, width)
    with torch.no_grad():
        head.weight.copy_(rand(width, H, seed=11) * 2)
        head.bias.copy_(rand(width, seed=12))
    h_t = rand(N, H, seed=13).requires_grad_(True)  # to see that nothing flows back to the teacher
    return h_t, head


def run(head_kind, objective, mask=MASK, chunks=None, with_targets=True, with_teacher=True, teacher_kind="module"):
    """(value, gradients by name): distill_loss on the full logits (chunks None) or chunked_distill_loss,
    the teacher head given as an nn.Linear (taken by matmul) or as a function of the hidden states."""
    student = Student(head_kind)
    h_t, t_head = teacher()
    ids = torch.randint(0, V + 3, (N,), generator=torch.Generator().manual_seed(14))
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(15)) if with_targets else None
    hidden = student.hidden(ids)
    hidden.retain_grad()
    if chunks is None:
        with torch.no_grad():
            t_logits = t_head(h_t)
        value = distill_loss(student.plain_logits(hidden), t_logits, mask, targets, **objective)[0]
    else:
        head, vocab = student.chunk_head()
        value = chunked_distill_loss(hidden, head, h_t if with_teacher else None,
                                     t_head if teacher_kind == "module" else (lambda h: t_head(h) * 1),
                                     mask, targets, chunks=chunks, vocab=vocab, **objective)
    value.backward()
    assert h_t.grad is None and t_head.weight.grad is None
    return value.detach(), {"hidden": hidden.grad, **{n: p.grad for n, p in student.named_parameters()}}


def max_rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def assert_equal_to_plain(got, want):
    (value, grads), (plain, plain_grads) = got, want
    assert abs(value.item() - plain.item()) <= 1e-6 * abs(plain.item()), (value.item(), plain.item())
    assert set(grads) == set(plain_grads)
    for name, g in plain_grads.items():
        assert g.abs().max() > 0, name
        assert max_rel(grads[name], g) <= 1e-6, (name, max_rel(grads[name], g))


OBJECTIVES = {
    "kl_T1": {"temperature": 1.0, "kd_weight": 1.0, "ce_weight": 0.0},
    "kl_T2": {"temperature": 2.0, "kd_weight": 0.7, "ce_weight": 0.0},
    "kl_ce_T1": {"temperature": 1.0, "kd_weight": 0.7, "ce_weight": 0.4},
    "kl_ce_T2": {"temperature": 2.0, "kd_weight": 0.7, "ce_weight": 0.4},
    "kl_ce_T3": {"temperature": 3.0, "kd_weight": 0.7, "ce_weight": 0.4},  # 1/T not exact in binary
    "kl_T3": {"temperature": 3.0, "kd_weight": 0.7, "ce_weight": 0.0},
}


@pytest.mark.parametrize("teacher_kind", ["module", "function"])
@pytest.mark.parametrize("chunks", [1, 6, 40])
@pytest.mark.parametrize("head_kind", HEADS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_forward_kl_and_ce_equal_plain(objective, head_kind, chunks, teacher_kind):
    if chunks == 6:  # one piece has nothing to score
        assert any(not MASK[p].any() for p in torch.arange(N).chunk(6))
    kw = OBJECTIVES[objective]
    plain = run(head_kind, kw)
    assert plain[0].item() > 1e-2
    got = run(head_kind, kw, chunks=chunks, teacher_kind=teacher_kind)
    assert_equal_to_plain(got, plain)
    assert not got[1]["hidden"][~MASK].any()  # padding gets no gradient


@pytest.mark.parametrize("head_kind", ["linear", "function"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cross_entropy_alone_equals_plain(head_kind, temperature):
    """No teacher (or kd_weight 0): ce_weight * CE, its gradient softmax(s) - onehot."""
    kw = {"temperature": temperature, "kd_weight": 0.0, "ce_weight": 0.6}
    plain = run(head_kind, kw)
    assert_equal_to_plain(run(head_kind, kw, chunks=4), plain)
    assert_equal_to_plain(run(head_kind, kw, chunks=4, with_teacher=False), plain)


@pytest.mark.parametrize("head_kind", ["linear", "function"])
def test_targets_none_means_no_cross_entropy(head_kind):
    kw = OBJECTIVES["kl_ce_T2"]
    plain = run(head_kind, kw, with_targets=False)
    assert plain[0].item() != pytest.approx(run(head_kind, kw)[0].item(), rel=1e-3)
    assert_equal_to_plain(run(head_kind, kw, chunks=4, with_targets=False), plain)


@pytest.mark.parametrize("head_kind", ["linear", "function"])
def test_empty_mask_gives_zero_and_zero_gradients(head_kind):
    nothing = torch.zeros(N, dtype=torch.bool)
    value, grads = run(head_kind, OBJECTIVES["kl_ce_T2"], mask=nothing, chunks=4)
    assert value.item() == 0.0
    assert not grads["hidden"].any()


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("head_kind", ["linear", "tied", "function"])
def test_other_divergences_take_the_autograd_path_and_equal_plain(divergence, head_kind):
    kw = {"divergence": divergence, "temperature": 2.0, "beta": 0.3, "kd_weight": 0.7, "ce_weight": 0.4}
    assert_equal_to_plain(run(head_kind, kw, chunks=6), run(head_kind, kw))


def test_a_plain_linear_head_is_not_run_as_a_module(monkeypatch):
    """nn.Linear heads are taken by matmul (their forward never runs); others through autograd."""
    calls = []
    forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: calls.append(self) or forward(self, x))
    student = Student("linear")
    h = student.hidden(torch.arange(N) % V)
    h_t, t_linear = teacher()
    calls.clear()
    chunked_distill_loss(h, student.lm, h_t, t_linear, MASK, chunks=3).backward()
    assert calls == []
    student.lm.register_forward_hook(lambda *_: None)  # a hook must run: the module is called
    chunked_distill_loss(student.hidden(torch.arange(N) % V), student.lm, h_t, t_linear, MASK, chunks=3)
    assert calls.count(student.lm) == 3
    seen = []
    other = Student("linear")
    other.lm.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0].shape))
    calls.clear()
    chunked_distill_loss(other.hidden(torch.arange(N) % V), other.lm, h_t, t_linear, MASK, chunks=3).backward()
    assert calls.count(other.lm) == 3 and len(seen) == 3  # a backward hook sees each piece's gradient


@pytest.mark.parametrize("kind", ["noise", "huge"])
def test_padding_rows_holding_anything_finite_change_nothing(kind):
    student = Student("linear")
    h_t, t_head = teacher()
    h = student.hidden(torch.arange(N) % V).detach()
    noisy, noisy_t = h.clone(), h_t.detach().clone()
    pad = int((~MASK).sum())
    scale = 1e30 if kind == "huge" else 100.0  # huge: logits of +-inf in those rows
    noisy[~MASK], noisy_t[~MASK] = rand(pad, H, seed=16) * scale, rand(pad, H, seed=17) * scale
    results = []
    for hs, ht in ((h, h_t), (noisy, noisy_t)):
        hs = hs.clone().requires_grad_(True)
        student.lm.zero_grad()
        value = chunked_distill_loss(hs, student.lm, ht, t_head, MASK, torch.arange(N) % V, chunks=4,
                                     **OBJECTIVES["kl_ce_T2"])
        value.backward()
        results.append((value.item(), hs.grad.clone(), student.lm.weight.grad.clone()))
    (v, gh, gw), (nv, ngh, ngw) = results
    assert nv == v and torch.equal(ngh, gh) and torch.equal(ngw, gw)
    assert not ngh[~MASK].any()


def test_a_teacher_giving_probability_zero_counts_zero():
    """0 log 0 = 0: teacher logits of -inf (ids it rules out) add nothing, as in kl_div."""
    student = Student("linear")
    h_t, t_head = teacher()
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[2, 5]] = True

    def t_banned(h):
        return t_head(h).masked_fill(banned, float("-inf"))

    h = student.hidden(torch.arange(N) % V)
    with torch.no_grad():
        t_logits = t_banned(h_t)
    plain = kl_div(student.lm(h), t_logits, MASK, temperature=2.0)
    want = torch.autograd.grad(plain, [student.lm.weight])[0]
    value = chunked_distill_loss(h, student.lm, h_t, t_banned, MASK, chunks=4, temperature=2.0)
    got = torch.autograd.grad(value, [student.lm.weight])[0]
    assert torch.isfinite(value) and abs(value.item() - plain.item()) <= 1e-6 * plain.item()
    assert max_rel(got, want) <= 1e-6


def test_without_grad_the_value_only():
    student = Student("tied")
    h_t, t_head = teacher()
    h = student.hidden(torch.arange(N) % V).detach()
    with torch.no_grad():
        want = distill_loss(student.plain_logits(h), t_head(h_t), MASK, torch.arange(N) % V,
                            **OBJECTIVES["kl_ce_T2"])[0]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            value = chunked_distill_loss(h, student.lm, h_t, t_head, MASK, torch.arange(N) % V, chunks=4, vocab=V,
                                         **OBJECTIVES["kl_ce_T2"])
        assert not value.requires_grad and abs(value.item() - want.item()) <= 1e-6 * want.item()


def test_backward_runs_once():
    """The gradients were handed out by the first backward: a second one is refused, not wrong."""
    student = Student("linear")
    h = student.hidden(torch.arange(N) % V)
    h_t, t_head = teacher()
    value = chunked_distill_loss(h, student.lm, h_t, t_head, MASK, chunks=3, temperature=2.0, vocab=V)
    value.backward(retain_graph=True)
    first = student.lm.weight.grad.clone()
    assert first.abs().max() > 0
    with pytest.raises(RuntimeError, match="cannot backpropagate twice"):
        value.backward()
    assert torch.equal(student.lm.weight.grad, first)


def test_under_autocast_close_to_plain():
    """bf16 autocast: the head runs as a module (autograd path), the loss in fp32, close to plain's."""
    results = []
    for chunks in (None, 4):
        student = Student("tied")
        h_t, t_head = teacher()
        hidden = student.hidden(torch.arange(N) % V)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunks is None:
                with torch.no_grad():
                    t_logits = t_head(h_t)
                value = distill_loss(student.plain_logits(hidden), t_logits, MASK, **OBJECTIVES["kl_T2"])[0]
            else:
                value = chunked_distill_loss(hidden, student.lm, h_t, t_head, MASK, chunks=chunks, vocab=V,
                                             **OBJECTIVES["kl_T2"])
        assert value.dtype == torch.float32
        value.backward()
        results.append((value.item(), {n: p.grad for n, p in student.named_parameters()}))
    (plain, want), (value, got) = results
    assert value == pytest.approx(plain, rel=1e-3)
    for n in want:
        assert torch.isfinite(got[n]).all() and max_rel(got[n], want[n]) <= 2e-2, n


def test_teacher_and_student_vocabularies_must_agree():
    student = Student("linear")
    h_t, t_head = teacher(V + 3)  # V + 3 logits against the student's V
    with pytest.raises(ValueError, match="teacher logits"):
        chunked_distill_loss(student.hidden(torch.arange(N) % V), student.lm, h_t, t_head, MASK, chunks=3)


def test_cancelling_weights_at_temperature_one():
    """kd_weight = -ce_weight: the student softmax drops out of the gradient; still equal to plain."""
    kw = {"temperature": 1.0, "kd_weight": 0.5, "ce_weight": -0.5}
    assert_equal_to_plain(run("linear", kw, chunks=4), run("linear", kw))


def test_nothing_to_compute_is_refused():
    student = Student("linear")
    with pytest.raises(ValueError, match="nothing to compute"):
        chunked_distill_loss(student.hidden(torch.arange(N) % V), student.lm, None, None, MASK, chunks=3)


def test_scored_targets_must_be_class_ids():
    """-100 (cross_entropy's ignore_index) where the mask is True is refused; where it is False it is never read."""
    student = Student("linear")
    h_t, t_head = teacher()
    h = student.hidden(torch.arange(N) % V)
    targets = torch.arange(N) % V
    targets[~MASK] = -100
    value = chunked_distill_loss(h, student.lm, h_t, t_head, MASK, targets, chunks=3, **OBJECTIVES["kl_ce_T1"])
    with torch.no_grad():
        want = distill_loss(student.lm(h), t_head(h_t), MASK, targets, **OBJECTIVES["kl_ce_T1"])[0]
    assert abs(value.item() - want.item()) <= 1e-6 * want.item()
    targets[0] = -100
    with pytest.raises(ValueError, match="class ids"):
        chunked_distill_loss(h, student.lm, h_t, t_head, MASK, targets, chunks=3, **OBJECTIVES["kl_ce_T1"])
