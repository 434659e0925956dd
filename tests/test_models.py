"""sitra.models: the student attention block, splicing it into a teacher, save/load, capture, loading.

Reference computations are written out independently (einsum per head, in float64) rather than
calling the code under test; save/load is checked in a fresh Python process that only imports sitra.
"""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM, BertModel
from transformers.models.bert.modeling_bert import BertSelfAttention

from sitra.errors import UsageError
from sitra.models import (
    SitraBertForMaskedLM, SitraBertModel, StudentSelfAttention, attention_probs, block_io, encoder_layers,
    load_config, load_model, load_tokenizer, replace_attention, with_student_blocks,
)

TEXTS = ["the module object is here", "a list", "print the value of x in the list of all the items"]
HIDDEN = 32  # width of the tiny conftest teachers (4 layers, 4 heads)


# ---------------------------------------------------------------------------------------------
# helpers and fixtures


def padded_batch(tokenizer, texts=TEXTS):
    """Batch of 3 rows of different lengths (the middle one padded the most)."""
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    mask = batch["attention_mask"]
    assert len(texts) == 3 and not mask.bool().all() and mask.sum(1).min() < mask.shape[1] - 3
    return batch


def student(hidden, heads, d_k, dropout=0.0, seed=0):
    """A student block with PyTorch's default init (random, non-zero biases)."""
    torch.manual_seed(seed)
    return StudentSelfAttention(hidden, heads, d_k, dropout)


def reference_attention(block, x, key_mask=None):
    """Per-head softmax(Q K^T / sqrt(d_k)) V, heads concatenated, then the output projection.

    Written with explicit einsums and a loop over heads, in float64. key_mask [B, T] bool or None.
    """
    x = x.double()
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (
        (lin.weight.detach().double(), lin.bias.detach().double())
        for lin in (block.query, block.key, block.value, block.output))
    heads = []
    for h in range(block.heads):
        rows = slice(h * block.d_k, (h + 1) * block.d_k)
        q = torch.einsum("btd,ed->bte", x, wq[rows]) + bq[rows]
        k = torch.einsum("btd,ed->bte", x, wk[rows]) + bk[rows]
        v = torch.einsum("btd,ed->bte", x, wv[rows]) + bv[rows]
        scores = torch.einsum("bqe,bke->bqk", q, k) / math.sqrt(block.d_k)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        heads.append(torch.einsum("bqk,bke->bqe", scores.softmax(-1), v))
    concat = torch.cat(heads, dim=-1)
    return (torch.einsum("bte,de->btd", concat, wo) + bo).float()


def outputs_of(model, batch):
    """The non-None tensors a forward returns: logits, or last_hidden_state (+ pooler_output)."""
    with torch.no_grad():
        return dict(model(**batch).items())


def self_prefix(model, layer):
    return ("bert." if isinstance(model, BertForMaskedLM) else "") + f"encoder.layer.{layer}.attention.self."


@pytest.fixture(scope="module")
def tok(tiny_teacher):
    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="module")
def batch(tok):
    return padded_batch(tok)


@pytest.fixture(scope="module")
def mlm_teacher(tiny_teacher):
    return load_model(tiny_teacher)


@pytest.fixture(scope="module")
def enc_teacher(tiny_encoder):
    return load_model(tiny_encoder)


@pytest.fixture(scope="module")
def minilm_teacher(minilm):
    return load_model(minilm)


@pytest.fixture
def x_and_mask():
    torch.manual_seed(3)
    x = torch.randn(3, 7, HIDDEN)
    key_mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2]).bool()
    return x, key_mask


# ---------------------------------------------------------------------------------------------
# StudentSelfAttention


def test_student_returns_output_none_pair_of_right_shape(x_and_mask):
    x, key_mask = x_and_mask
    block = student(HIDDEN, 3, 5).eval()
    assert block.query.weight.shape == block.key.weight.shape == block.value.weight.shape == (15, HIDDEN)
    assert block.output.weight.shape == (HIDDEN, 15)
    result = block(x, key_mask[:, None, None, :])
    assert isinstance(result, tuple) and len(result) == 2  # batch of 3: a bare tensor would not unpack
    out, weights = result
    assert weights is None
    assert out.shape == (3, 7, HIDDEN)


@pytest.mark.parametrize("mask_kind", ["bool", "bool_square", "additive", "none"])
@pytest.mark.parametrize("heads,d_k", [(4, 8), (3, 5), (2, 16)])
def test_student_equals_direct_computation(x_and_mask, mask_kind, heads, d_k):
    """heads * d_k need not be the hidden size (3 x 5 = 15 on a 32-wide model)."""
    x, key_mask = x_and_mask
    block = student(HIDDEN, heads, d_k, dropout=0.3).eval()
    B, T = key_mask.shape
    if mask_kind == "bool":
        mask = key_mask[:, None, None, :]
    elif mask_kind == "bool_square":  # what transformers passes under sdpa: [B, 1, T, T]
        mask = key_mask[:, None, None, :].expand(B, 1, T, T)
    elif mask_kind == "additive":  # what transformers passes under eager: 0 / finfo.min
        mask = torch.zeros(B, 1, 1, T).masked_fill(~key_mask[:, None, None, :], torch.finfo(torch.float32).min)
    else:
        mask, key_mask = None, None
    with torch.no_grad():
        out, _ = block(x, mask)
    expected = reference_attention(block, x, key_mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if key_mask is not None:  # the mask really matters: attending to padding gives other values
        assert not torch.allclose(out, reference_attention(block, x, None), atol=1e-3)


def test_student_ignores_padded_keys(x_and_mask):
    x, key_mask = x_and_mask
    block = student(HIDDEN, 3, 5).eval()
    noisy = x.clone()
    noisy[~key_mask] = 100 * torch.randn(int((~key_mask).sum()), HIDDEN)
    mask = key_mask[:, None, None, :]
    with torch.no_grad():
        a, b = block(x, mask)[0], block(noisy, mask)[0]
    torch.testing.assert_close(a[key_mask], b[key_mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[~key_mask], b[~key_mask])


def test_student_dropout_only_in_train_mode(x_and_mask):
    x, key_mask = x_and_mask
    mask = key_mask[:, None, None, :]
    block = student(HIDDEN, 4, 8, dropout=0.5)
    with torch.no_grad():
        block.eval()
        e1, e2 = block(x, mask)[0], block(x, mask)[0]
        assert torch.equal(e1, e2)
        torch.testing.assert_close(e1, reference_attention(block, x, key_mask), atol=1e-5, rtol=1e-5)
        block.train()
        torch.manual_seed(1)
        t1 = block(x, mask)[0]
        torch.manual_seed(2)
        t2 = block(x, mask)[0]
    assert not torch.allclose(t1, e1, atol=1e-3)
    assert not torch.allclose(t1, t2, atol=1e-3)
    no_dropout = student(HIDDEN, 4, 8, dropout=0.0).train()
    with torch.no_grad():
        torch.testing.assert_close(no_dropout(x, mask)[0], reference_attention(no_dropout, x, key_mask),
                                   atol=1e-5, rtol=1e-5)


def test_student_inside_a_teacher_with_batch_of_three(tiny_teacher, batch):
    """The 2-tuple contract inside BertAttention (a bare tensor passes at batch 2 and fails at 3)."""
    model = load_model(tiny_teacher)
    old = replace_attention(model, 1, student(HIDDEN, 3, 5).eval())
    assert isinstance(old, BertSelfAttention)
    assert isinstance(encoder_layers(model)[1].attention.self, StudentSelfAttention)
    assert batch["input_ids"].shape[0] == 3
    logits = outputs_of(model, batch)["logits"]
    assert logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# attention_probs


def test_attention_probs_are_distributions_over_real_keys(x_and_mask):
    x, key_mask = x_and_mask
    block = student(HIDDEN, 3, 5)
    with torch.no_grad():
        probs = block.attention_probs(x, key_mask)
        same = attention_probs(block.query, block.key, 3, x, key_mask)
    assert probs.shape == (3, 3, 7, 7)
    assert torch.equal(probs, same)
    pad = ~key_mask[:, None, None, :].expand_as(probs)
    assert (probs[pad] == 0).all()
    assert (probs[~pad] > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 3, 7))


def test_attention_probs_are_what_the_student_forward_uses(x_and_mask):
    """probs @ V per head, then the output projection, gives the block's output."""
    x, key_mask = x_and_mask
    block = student(HIDDEN, 3, 5).eval()
    with torch.no_grad():
        probs = block.attention_probs(x, key_mask)
        v = block.value(x).view(3, 7, 3, 5).transpose(1, 2)
        mixed = (probs @ v).transpose(1, 2).reshape(3, 7, 15)
        torch.testing.assert_close(block.output(mixed), block(x, key_mask[:, None, None, :])[0],
                                   atol=1e-5, rtol=1e-5)


def assert_probs_match_eager(model, batch, layers):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**batch, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    token_mask = batch["attention_mask"].bool()
    for i in layers:
        sa = encoder_layers(model)[i].attention.self
        with torch.no_grad():
            probs = attention_probs(sa.query, sa.key, model.config.num_attention_heads, out.hidden_states[i], token_mask)
        assert probs.shape == out.attentions[i].shape
        torch.testing.assert_close(probs, out.attentions[i], atol=1e-6, rtol=1e-5)


def test_attention_probs_of_a_teacher_layer_equal_eager_weights(tiny_teacher, batch):
    model = AutoModelForMaskedLM.from_pretrained(tiny_teacher, attn_implementation="eager").eval()
    assert_probs_match_eager(model, batch, range(4))


# ---------------------------------------------------------------------------------------------
# splicing student blocks into a teacher


def test_with_student_blocks_leaves_the_teacher_unchanged(mlm_teacher, batch):
    before = {k: v.clone() for k, v in mlm_teacher.state_dict().items()}
    logits_before = outputs_of(mlm_teacher, batch)["logits"]
    new = with_student_blocks(mlm_teacher, {1: student(HIDDEN, 3, 5)})
    assert type(mlm_teacher) is BertForMaskedLM and mlm_teacher.config.model_type == "bert"
    assert not hasattr(mlm_teacher.config, "attn_layout")
    assert all(isinstance(layer.attention.self, BertSelfAttention) for layer in encoder_layers(mlm_teacher))
    after = mlm_teacher.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # no storage is shared: training the new model cannot move the teacher
    teacher_ptrs = {p.data_ptr() for p in mlm_teacher.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in new.parameters()}
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    assert torch.equal(outputs_of(mlm_teacher, batch)["logits"], logits_before)


@pytest.mark.parametrize("which", ["mlm", "encoder"])
def test_untouched_weights_equal_the_teacher(which, mlm_teacher, enc_teacher):
    teacher = mlm_teacher if which == "mlm" else enc_teacher
    blocks = {1: student(HIDDEN, 3, 5, seed=1), 3: student(HIDDEN, 2, 16, seed=2)}
    new = with_student_blocks(teacher, blocks)
    assert type(new) is (SitraBertForMaskedLM if which == "mlm" else SitraBertModel)
    assert not new.training
    assert (new.base_model.pooler is None) == (teacher.base_model.pooler is None)
    t_state, n_state = teacher.state_dict(), new.state_dict()
    replaced = tuple(self_prefix(teacher, i) for i in blocks)
    kept = [k for k in t_state if not k.startswith(replaced)]
    assert len(kept) == len(t_state) - 2 * 6  # query/key/value weight+bias of two layers
    for k in kept:
        assert torch.equal(n_state[k], t_state[k]), k
    for i, block in blocks.items():
        spliced = encoder_layers(new)[i].attention.self
        assert type(spliced) is StudentSelfAttention and (spliced.heads, spliced.d_k) == (block.heads, block.d_k)
        for k, v in block.state_dict().items():
            assert torch.equal(spliced.state_dict()[k], v), (i, k)
    assert {k for k in n_state if k.startswith(replaced)} == {
        self_prefix(new, i) + f"{p}.{w}" for i in blocks for p in ("query", "key", "value", "output")
        for w in ("weight", "bias")}
    assert set(t_state) - set(n_state) == set()
    for i in (0, 2):
        assert isinstance(encoder_layers(new)[i].attention.self, BertSelfAttention)


@pytest.mark.parametrize("which", ["mlm", "encoder"])
def test_no_replaced_blocks_gives_the_teachers_outputs(which, mlm_teacher, enc_teacher, batch):
    teacher = mlm_teacher if which == "mlm" else enc_teacher
    new = with_student_blocks(teacher, {})
    assert new.config.model_type == "sitra_bert" and new.config.attn_layout == {}
    expected, got = outputs_of(teacher, batch), outputs_of(new, batch)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_a_student_block_changes_the_outputs(mlm_teacher, batch):
    new = with_student_blocks(mlm_teacher, {2: student(HIDDEN, 3, 5)})
    assert new.config.attn_layout == {"2": [3, 5, 0.0]}
    expected, got = outputs_of(mlm_teacher, batch)["logits"], outputs_of(new, batch)["logits"]
    assert not torch.allclose(got, expected, atol=1e-3)


def test_splicing_onto_a_spliced_model_keeps_earlier_blocks(mlm_teacher, batch):
    first = with_student_blocks(mlm_teacher, {1: student(HIDDEN, 3, 5, dropout=0.1)})
    second = with_student_blocks(first, {3: student(HIDDEN, 2, 8, seed=4)})
    assert second.config.attn_layout == {"1": [3, 5, 0.1], "3": [2, 8, 0.0]}
    f_state, s_state = first.state_dict(), second.state_dict()
    for k, v in f_state.items():
        if not k.startswith(self_prefix(first, 3)):
            assert torch.equal(s_state[k], v), k


@pytest.mark.parametrize("which", ["mlm", "encoder"])
def test_padding_does_not_change_a_rows_outputs(which, mlm_teacher, enc_teacher, batch):
    teacher = mlm_teacher if which == "mlm" else enc_teacher
    new = with_student_blocks(teacher, {1: student(HIDDEN, 3, 5, dropout=0.2), 2: student(HIDDEN, 2, 16)})
    key = "logits" if which == "mlm" else "last_hidden_state"
    padded = outputs_of(new, batch)[key]
    for row in range(3):
        n = int(batch["attention_mask"][row].sum())
        alone = {k: v[row:row + 1, :n] for k, v in batch.items()}
        torch.testing.assert_close(padded[row, :n], outputs_of(new, alone)[key][0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# save / load round trip in a fresh process

CHILD = textwrap.dedent("""
    import json, sys, traceback
    import torch
    import sitra
    from transformers import AutoModel, AutoModelForMaskedLM

    torch.set_num_threads(1)


    def reload(case):
        auto = AutoModelForMaskedLM if case["mlm"] else AutoModel
        model, info = auto.from_pretrained(case["folder"], output_loading_info=True)
        batch = torch.load(case["batch"])
        with torch.no_grad():
            outputs = dict(model(**batch).items())
        layers = model.base_model.encoder.layer
        result = {
            "class": type(model).__name__,
            "training": model.training,
            "info": {k: sorted(map(str, v)) for k, v in info.items()},
            "outputs": outputs,
            "self_attention": [[type(s).__name__, *([s.heads, s.d_k, s.dropout] if hasattr(s, "d_k") else [])]
                               for s in (l.attention.self for l in layers)],
        }
        if case["mlm"]:
            out_w, in_w = model.get_output_embeddings().weight, model.get_input_embeddings().weight
            result["tied"] = out_w is in_w or out_w.data_ptr() == in_w.data_ptr()
        return result


    for case in json.load(open(sys.argv[1])):
        try:
            result = reload(case)
        except Exception:
            result = {"error": traceback.format_exc()}
        torch.save(result, case["result"])
""")

TINY_CASES = {
    "mlm_1_block": ("mlm", {2: (3, 5, 0.1)}),
    "mlm_2_blocks": ("mlm", {0: (2, 8, 0.0), 3: (6, 4, 0.2)}),
    "encoder_1_block": ("encoder", {1: (3, 5, 0.0)}),
    "encoder_2_blocks": ("encoder", {1: (2, 16, 0.1), 2: (8, 2, 0.0)}),
}


@pytest.fixture(scope="module")
def round_trips(request, tmp_path_factory, mlm_teacher, enc_teacher, batch):
    """Every case saved, then reloaded by ONE fresh interpreter (an import of sitra costs ~10 s)."""
    root = tmp_path_factory.mktemp("round_trips")
    cases = {}
    for name, (which, layout) in TINY_CASES.items():
        teacher = mlm_teacher if which == "mlm" else enc_teacher
        blocks = {i: student(HIDDEN, h, d, p, seed=i) for i, (h, d, p) in layout.items()}
        cases[name] = (with_student_blocks(teacher, blocks), batch, layout)
    try:
        minilm = request.getfixturevalue("minilm_teacher")
        mini_tok = AutoTokenizer.from_pretrained(request.getfixturevalue("minilm"))
        cases["minilm"] = (with_student_blocks(minilm, {2: student(384, 4, 32, seed=7)}),
                           padded_batch(mini_tok), {2: (4, 32, 0.0)})
    except pytest.skip.Exception:
        pass
    spec, results = [], {}
    for name, (model, b, layout) in cases.items():
        folder = root / name
        model.save_pretrained(folder)
        torch.save(b, root / f"{name}.batch.pt")
        spec.append({"folder": str(folder), "mlm": isinstance(model, BertForMaskedLM),
                     "batch": str(root / f"{name}.batch.pt"), "result": str(root / f"{name}.result.pt")})
    (root / "child.py").write_text(CHILD)
    (root / "cases.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(root / "child.py"), str(root / "cases.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (model, b, layout) in cases.items():
        results[name] = dict(model=model, batch=b, layout=layout, folder=root / name,
                             reloaded=torch.load(root / f"{name}.result.pt", weights_only=False))
    return results


def check_round_trip(case):
    model, layout, reloaded = case["model"], case["layout"], case["reloaded"]
    mlm = isinstance(model, BertForMaskedLM)
    assert "error" not in reloaded, reloaded.get("error")
    config = json.loads((case["folder"] / "config.json").read_text())
    assert config["model_type"] == "sitra_bert"
    assert config["architectures"] == ["SitraBertForMaskedLM" if mlm else "SitraBertModel"]
    assert config["attn_layout"] == {str(i): list(v) for i, v in layout.items()}
    assert reloaded["class"] == type(model).__name__
    assert reloaded["training"] is False
    assert all(not v for v in reloaded["info"].values()), reloaded["info"]
    n_layers = model.config.num_hidden_layers
    assert reloaded["self_attention"] == [
        ["StudentSelfAttention", *layout[i]] if i in layout else ["BertSelfAttention"]
        for i in range(n_layers)]
    expected = outputs_of(model, case["batch"])
    assert reloaded["outputs"].keys() == expected.keys() == ({"logits"} if mlm else {"last_hidden_state", "pooler_output"})
    for k, v in expected.items():
        assert torch.equal(reloaded["outputs"][k], v), k
    if mlm:
        assert reloaded["tied"] is True
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("name", TINY_CASES)
def test_save_load_round_trip_in_a_fresh_process(round_trips, name):
    check_round_trip(round_trips[name])


def test_saved_folder_loads_through_load_model(round_trips, batch):
    """A spliced folder is a model folder like any other: MLM class from its architectures, frozen."""
    case = round_trips["mlm_1_block"]
    folder = str(case["folder"])
    model = load_model(folder, flag="--output")
    assert type(model) is SitraBertForMaskedLM and not model.training
    assert torch.equal(outputs_of(model, batch)["logits"], outputs_of(case["model"], batch)["logits"])
    base = load_model(folder, mlm=False)
    assert type(base) is SitraBertModel
    with torch.no_grad():
        expected = case["model"].bert(**batch).last_hidden_state
    assert torch.equal(outputs_of(base, batch)["last_hidden_state"], expected)


# ---------------------------------------------------------------------------------------------
# block_io


def capture_layer_mask(model, layer, batch):
    """The 4-D mask transformers hands to `layer`, and the forward's hidden states."""
    seen = {}

    def hook(module, args, kwargs):
        seen["mask"] = args[1] if len(args) > 1 else kwargs.get("attention_mask")

    handle = encoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    finally:
        handle.remove()
    return seen["mask"], out.hidden_states


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_block_io_equals_hidden_states_and_recomputation(mlm_teacher, batch, layer):
    with torch.inference_mode():
        x, out = block_io(mlm_teacher, layer, batch["input_ids"], batch["attention_mask"])
    mask, hidden_states = capture_layer_mask(mlm_teacher, layer, batch)
    assert torch.equal(x, hidden_states[layer])
    with torch.no_grad():
        recomputed = encoder_layers(mlm_teacher)[layer].attention(x, mask)[0]
    assert torch.equal(out, recomputed)
    assert not torch.equal(out, x)


@pytest.mark.parametrize("layer", [1, 3])
def test_block_io_stops_after_the_attention_block(mlm_teacher, batch, layer):
    layers = encoder_layers(mlm_teacher)
    calls = []
    watched = [layers[layer].intermediate, layers[layer].output, mlm_teacher.cls]
    watched += list(layers[layer + 1:])
    handles = [m.register_forward_hook(lambda *a, m=m: calls.append(m)) for m in watched]
    attention_calls = []
    handles.append(layers[layer].attention.register_forward_hook(lambda *a: attention_calls.append(1)))
    try:
        with torch.inference_mode():
            block_io(mlm_teacher, layer, batch["input_ids"], batch["attention_mask"])
        assert calls == [] and attention_calls == [1]
    finally:
        for h in handles:
            h.remove()
    # its own hooks are gone: a normal forward runs through every layer
    assert not layers[layer]._forward_pre_hooks and not layers[layer].attention._forward_hooks
    assert outputs_of(mlm_teacher, batch)["logits"].shape[:2] == batch["input_ids"].shape


def test_block_io_of_a_spliced_block_equals_the_training_computation(mlm_teacher, batch):
    """What the trainer computes for a block (student on a [B,1,1,T] mask + the teacher's
    BertSelfOutput) is what the spliced model computes at that layer."""
    block = student(HIDDEN, 3, 5, seed=5).eval()
    new = with_student_blocks(mlm_teacher, {2: block})
    token_mask = batch["attention_mask"].bool()
    with torch.inference_mode():
        x_t, _ = block_io(mlm_teacher, 2, batch["input_ids"], batch["attention_mask"])
        x_s, out_s = block_io(new, 2, batch["input_ids"], batch["attention_mask"])
        trained = encoder_layers(mlm_teacher)[2].attention.output(block(x_t, token_mask[:, None, None, :])[0], x_t)
    assert torch.equal(x_s, x_t)
    torch.testing.assert_close(out_s[token_mask], trained[token_mask], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# load_config / load_model / load_tokenizer


MISSING = ["./no/such/folder", "/tmp/definitely-missing-xyz"]


@pytest.mark.parametrize("loader", [load_config, load_model, load_tokenizer])
@pytest.mark.parametrize("name", MISSING)
def test_missing_folder_is_a_usage_error_naming_the_flag(loader, name):
    with pytest.raises(UsageError) as e:
        loader(name)
    assert str(e.value).startswith(f"--teacher {name}")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError) as e:
        loader(name, flag="--student")
    assert str(e.value).startswith(f"--student {name}")


@pytest.mark.parametrize("loader", [load_config, load_model])
def test_missing_folder_message_says_so(loader):
    with pytest.raises(UsageError, match="no such model folder"):
        loader("/tmp/definitely-missing-xyz")


@pytest.mark.parametrize("loader", [load_config, load_model, load_tokenizer])
def test_folder_without_config_is_a_usage_error(loader, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UsageError) as e:
        loader(str(tmp_path), flag="--output")
    assert str(e.value).startswith(f"--output {tmp_path}")
    if loader is not load_tokenizer:
        assert "config.json" in str(e.value)


@pytest.mark.parametrize("content", ["{not json", "{}"])
def test_unreadable_config_is_a_usage_error(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(UsageError, match="^--teacher .*cannot load a model config"):
        load_config(str(tmp_path))


def test_unknown_hub_id_offline_is_a_usage_error():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (conftest sets it unless the environment overrides it)")
    with pytest.raises(UsageError, match="^--teacher no-such-org/no-such-model: cannot load a model config"):
        load_config("no-such-org/no-such-model")


def assert_frozen_teacher(model):
    params = list(model.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert not model.training
    assert all(not m.training for m in model.modules())


def test_load_model_picks_the_mlm_class_from_architectures(tiny_teacher, tiny_encoder):
    assert load_config(tiny_teacher).architectures == ["BertForMaskedLM"]
    mlm = load_model(tiny_teacher)
    assert type(mlm) is BertForMaskedLM
    assert_frozen_teacher(mlm)
    assert load_config(tiny_encoder).architectures == ["BertModel"]
    enc = load_model(tiny_encoder)
    assert type(enc) is BertModel
    assert_frozen_teacher(enc)
    forced = load_model(tiny_teacher, mlm=False)
    assert type(forced) is BertModel
    assert_frozen_teacher(forced)


def test_load_tokenizer(tiny_teacher, batch):
    tokenizer = load_tokenizer(tiny_teacher)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.mask_token == "[MASK]"
    assert torch.equal(tokenizer(TEXTS, padding=True, return_tensors="pt")["input_ids"], batch["input_ids"])


def test_load_tokenizer_on_a_folder_without_tokenizer_files(tmp_path, mlm_teacher):
    mlm_teacher.save_pretrained(tmp_path)  # config.json + model.safetensors, no tokenizer
    with pytest.raises(UsageError, match="^--teacher "):
        tokenizer = load_tokenizer(str(tmp_path))
        print(f"got {type(tokenizer).__name__} of {len(tokenizer)} tokens: {tokenizer('the list')['input_ids']}")


def test_load_model_on_a_folder_without_weights(tmp_path, mlm_teacher):
    mlm_teacher.config.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="^--teacher "):
        load_model(str(tmp_path))


def test_with_student_blocks_keeps_the_attention_implementation(tiny_teacher, batch):
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_teacher, attn_implementation="eager").eval()
    new = with_student_blocks(teacher, {})
    assert new.config._attn_implementation == "eager"
    assert torch.equal(outputs_of(new, batch)["logits"], outputs_of(teacher, batch)["logits"])


def test_with_student_blocks_keeps_the_dtype(tiny_teacher):
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_teacher, dtype=torch.bfloat16)
    new = with_student_blocks(teacher, {1: student(HIDDEN, 3, 5).to(torch.bfloat16)})
    assert {p.dtype for p in new.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# the real MiniLM teacher


@pytest.mark.slow
@pytest.mark.quickstart
def test_minilm_loads_as_a_frozen_encoder(minilm, minilm_teacher):
    config = load_config(minilm)
    assert config.architectures == ["BertModel"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (6, 384, 12)
    assert type(minilm_teacher) is BertModel
    assert_frozen_teacher(minilm_teacher)


@pytest.mark.slow
@pytest.mark.quickstart
def test_minilm_attention_probs_equal_eager_weights(minilm):
    model = AutoModel.from_pretrained(minilm, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    assert_probs_match_eager(model, padded_batch(tokenizer), [0, 2, 5])


@pytest.mark.slow
@pytest.mark.quickstart
def test_minilm_with_a_small_block_round_trips_in_a_fresh_process(minilm_teacher, round_trips):
    case = round_trips["minilm"]
    model, b = case["model"], case["batch"]
    assert type(model) is SitraBertModel
    spliced = encoder_layers(model)[2].attention.self
    assert (spliced.heads, spliced.d_k, spliced.query.weight.shape) == (4, 32, (128, 384))
    teacher_out = outputs_of(minilm_teacher, b)["last_hidden_state"]
    assert not torch.allclose(outputs_of(model, b)["last_hidden_state"], teacher_out, atol=1e-3)
    with torch.inference_mode():  # layers below the block are the teacher's
        x_t, _ = block_io(minilm_teacher, 2, b["input_ids"], b["attention_mask"])
        x_s, _ = block_io(model, 2, b["input_ids"], b["attention_mask"])
    assert torch.equal(x_s, x_t)
    check_round_trip(case)
