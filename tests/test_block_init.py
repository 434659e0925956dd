"""--block_init teacher_svd: a student block that starts as the teacher's block truncated to its
d_k, checked against the teacher's own attention and an independent SVD in numpy."""
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from sitra.errors import UsageError
from sitra.models.attention import student_block
from sitra.recipes import retrain_single_block
from sitra.results import read_log

HIDDEN, HEADS = 32, 4  # the teacher's heads are 8 wide


@pytest.fixture(scope="module")
def teacher_self():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=64, num_hidden_layers=1,
                        initializer_range=0.3)
    model = BertModel(config).eval()
    for p in model.parameters():  # biases too: the augmented [W | b] path must carry them
        p.data.normal_(0, 0.3)
    return config, model.encoder.layer[0].attention.self


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, HIDDEN, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    return x, mask


def test_at_the_teachers_d_k_the_student_is_the_teacher(teacher_self):
    config, t = teacher_self
    s = student_block(config, HEADS, 8, 0.0, "teacher_svd", t).eval()
    x, mask = inputs()
    with torch.no_grad():
        expected = t(x, attention_mask=mask[:, None, None, :])[0]
        got = s(x, mask[:, None, None, :])[0]
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def truncated(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.parametrize("d_k", [2, 4, 6])
def test_below_it_scores_and_values_are_the_rank_d_k_truncations(teacher_self, d_k):
    config, t = teacher_self
    s = student_block(config, HEADS, d_k, 0.0, "teacher_svd", t).eval()
    x, _ = inputs()
    xa = np.concatenate([x.double().numpy(), np.ones((2, 7, 1))], -1)  # [x, 1]
    d_t = HIDDEN // HEADS
    with torch.no_grad():
        q, k, v = (p(x).view(2, 7, HEADS, d_k).transpose(1, 2).double().numpy() for p in (s.query, s.key, s.value))
    for h in range(HEADS):
        rows = slice(h * d_t, (h + 1) * d_t)
        wq, wk, wv = (np.concatenate([lin.weight[rows].detach().double().numpy(), lin.bias[rows, None].detach().double().numpy()], 1)
                      for lin in (t.query, t.key, t.value))
        want_scores = xa @ truncated(wq.T @ wk, d_k) @ xa.transpose(0, 2, 1) / np.sqrt(d_t)
        got_scores = q[:, h] @ k[:, h].transpose(0, 2, 1) / np.sqrt(d_k)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-4)
        # the value path: output's head-h columns map the student's values into the teacher's slot of head h
        o = s.output.weight[rows, h * d_k:(h + 1) * d_k].detach().double().numpy()
        np.testing.assert_allclose(v[:, h] @ o.T, xa @ truncated(wv, d_k).T, atol=1e-4)
    # and nothing leaks between heads: the output's columns of head h touch only its slot
    w = s.output.weight.detach().view(HIDDEN, HEADS, d_k)
    for h in range(HEADS):
        outside = torch.ones(HIDDEN, dtype=torch.bool)
        outside[h * d_t:(h + 1) * d_t] = False
        assert torch.count_nonzero(w[outside][:, h]) == 0


def test_the_job_starts_near_the_teacher(tiny_teacher, text_files, tmp_path):
    """retrain_single_block --block_init teacher_svd: the held-out block MSE before any step is
    far below a random start's, and the run has its own name."""
    def run(init):
        args = retrain_single_block.BlockArgs(
            teacher=tiny_teacher, block=1, block_heads=4, block_d_k=4, block_init=init, train_file=str(text_files / "train.txt"),
            eval_file=str(text_files / "eval.txt"), storage_directory=str(tmp_path), max_seq_length=32, batch_size=8,
            max_steps=2, eval_steps=2, lr=1e-3, device="cpu", block_dropout=0.0)
        return retrain_single_block.run(args)

    svd, random = run("teacher_svd"), run("random")
    assert svd.name.endswith("_svd") and not random.name.endswith("_svd")
    first = {r.name: read_log(r.log_path)["eval"]["block_mse"][0] for r in (svd, random)}
    assert read_log(svd.log_path)["eval"]["step"][0] == 0
    assert first[svd.name] < 0.25 * first[random.name], first


def test_other_head_counts_are_refused_before_anything_loads(tiny_teacher, text_files, tmp_path):
    args = retrain_single_block.BlockArgs(teacher=tiny_teacher, block=1, block_heads=2, block_init="teacher_svd",
                                          train_file=str(text_files / "train.txt"), storage_directory=str(tmp_path))
    with pytest.raises(UsageError, match=r"^--block_init teacher_svd: needs --block_heads 4 \(the teacher's heads\), not 2"):
        retrain_single_block.check(args)
