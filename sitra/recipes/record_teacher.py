"""Run a causal-LM teacher once over the distillation corpus and record, for every scored token,
its top-k ids and log-probabilities plus the log of the remaining mass (or K tokens drawn from it:
--teacher_logits_sampling random), in shards with an index (sitra.records). Students then train
from the records with `distill_pythia --teacher_logits DIR`, never loading the teacher.

One task records one shard (--shard s --num_shards S), so `jobs/launch.py record_teacher --sweep
shard=0,1,2,3 --num_shards 4 ...` records in parallel; a shard already recorded is skipped, so
rerunning resumes."""
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from sitra import data, models, records, results
from sitra.cli import UsageError
from sitra.data.mlm import example_generator, pad
from sitra.data.text import BUILTIN
from sitra.models.causal import final_hidden, lm_head
from sitra.train import progress_bar

JOB = "record_teacher"
POSITIONS_PER_PIECE = 1024  # logits [n, V] of about this many positions exist at a time


@dataclass(kw_only=True)
class RecordArgs:
    teacher: str = field(default="EleutherAI/pythia-160m", metadata={"help": "causal LM: hub id or local folder"})
    output: str = field(metadata={"help": "records folder (the index, the tokenizer and every shard go here)"})
    top_k: int = field(default=64, metadata={"help": "ids recorded per token (random: draws per token)"})
    teacher_logits_sampling: Literal[records.SAMPLINGS] = field(default="top_k", metadata={
        "help": "top_k: the k most likely ids and the rest mass; random: k draws from the teacher (unbiased gradients)"})
    temperature: float = field(default=2.0, metadata={
        "help": "softmax temperature of the recorded distribution (students must distil at the same)"})
    log_prob_dtype: Literal["float16", "float32"] = field(default="float16", metadata={
        "help": "storage of the log-probabilities (float32: twice the bytes, for exact comparisons)"})
    dataset_name: str = field(default="wikitext", metadata={"help": f"datasets hub name, or '{BUILTIN}'"})
    dataset_config: str | None = field(default="wikitext-2-raw-v1", metadata={"help": "datasets config name"})
    train_file: str | None = field(default=None, metadata={"help": "local text file, one example per line"})
    eval_file: str | None = field(default=None, metadata={"help": "local held-out text file (recorded too)"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per example, as the students will use"})
    packing: bool = field(default=False, metadata={"help": "concatenate the training text into constant-length blocks"})
    percentage_data: float = field(default=1.0, metadata={"help": "fraction in (0, 1] of the data, taken evenly"})
    shard: int = field(default=0, metadata={"help": "which shard this task records, 0 to --num_shards - 1"})
    num_shards: int = field(default=1, metadata={"help": "shards the examples are split into (one launcher task each)"})
    batch_size: int = field(default=16, metadata={"help": "examples per teacher forward"})
    seed: int = field(default=42, metadata={"help": "random stream of the draws (random sampling)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    storage_directory: str = field(default=".", metadata={"help": "where eval_results/ (the shard's log) goes"})
    run_name: str | None = field(default=None, metadata={"help": "name of the shard's log (default: record_teacher_shardSofN)"})


def check(args: RecordArgs):
    """(teacher config, tokenizer, vocabulary) after one-line checks of every flag; no weights."""
    if args.num_shards < 1:
        raise UsageError(f"--num_shards {args.num_shards}: must be at least 1")
    if not 0 <= args.shard < args.num_shards:
        raise UsageError(f"--shard {args.shard}: allowed 0-{args.num_shards - 1} (--num_shards {args.num_shards})")
    if not args.temperature > 0:
        raise UsageError(f"--temperature {args.temperature}: must be positive")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.max_seq_length < 2:
        raise UsageError(f"--max_seq_length {args.max_seq_length}: must be at least 2")
    if not 0 < args.percentage_data <= 1:
        raise UsageError(f"--percentage_data {args.percentage_data}: must be in (0, 1]")
    for flag in ("train_file", "eval_file"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise UsageError(f"--{flag} {path}: no such file")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output}: not a folder")
    config = models.load_config(args.teacher)
    tokenizer = models.load_tokenizer(args.teacher)
    vocab = min(max(tokenizer.get_vocab().values()) + 1, config.vocab_size)
    if not 1 <= args.top_k <= vocab:
        raise UsageError(f"--top_k {args.top_k}: the teacher's vocabulary has {vocab:,} ids; allowed 1-{vocab:,}")
    models.pick_device(args.device)
    return config, tokenizer, vocab


def make_identity(args: RecordArgs, config, tokenizer, vocab: int, teacher, train, held_out) -> dict:
    """What the records depend on. `teacher` and `data` (paths, names) are for people; the rest
    is compared when a shard resumes and when a student reads the records."""
    return {
        "teacher": args.teacher, "teacher_config_sha256": records.config_hash(config),
        "teacher_weights_sha256": records.weights_fingerprint(teacher), "tokenizer_sha256": records.tokenizer_hash(tokenizer),
        "vocab": vocab, "top_k": args.top_k, "teacher_logits_sampling": args.teacher_logits_sampling,
        "temperature": args.temperature, "log_prob_dtype": args.log_prob_dtype,
        "seed": args.seed if args.teacher_logits_sampling == "random" else None,
        "max_seq_length": args.max_seq_length, "packing": args.packing, "percentage_data": args.percentage_data,
        "train_sha256": records.fingerprint(train), "eval_sha256": records.fingerprint(held_out),
        "train_examples": len(train), "eval_examples": len(held_out),
        "data": {"dataset_name": args.dataset_name, "dataset_config": args.dataset_config,
                 "train_file": args.train_file, "eval_file": args.eval_file},
    }


FOR_PEOPLE = ("teacher", "data")


def open_output(folder: Path, identity: dict, num_shards: int, n_train: int, n_total: int, tokenizer, config) -> dict:
    """The folder's index: made on first use (any task may be first: each write is whole and
    renamed into place), else checked against this task's identity and shard count."""
    index_path = folder / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        old = index["identity"]
        differ = [f"{k}: {old.get(k)!r} there, {identity.get(k)!r} here" for k in sorted(identity)
                  if k not in FOR_PEOPLE and old.get(k) != identity[k]]
        if differ:
            raise UsageError(f"--output {folder}: holds records of another teacher, data or settings ({'; '.join(differ)[:300]}); "
                             "choose another --output or delete it")
        if index["num_shards"] != num_shards:
            raise UsageError(f"--num_shards {num_shards}: {folder} is being recorded in {index['num_shards']} shards")
        return index
    index = {"format": records.FORMAT, "identity": identity, "identity_sha256": records.identity_hash(identity),
             "num_shards": num_shards, "splits": {"train": [0, n_train], "eval": [n_train, n_total]},
             "shards": [{"file": records.shard_name(s, num_shards), "examples": list(records.shard_range(n_total, s, num_shards))}
                        for s in range(num_shards)]}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tokenizer.tmp{os.getpid()}"
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, folder / "tokenizer")
    except OSError:  # another task saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    results.atomic_write(folder / "teacher_config.json", lambda p: p.write_text(config.to_json_string()))
    results.atomic_write(index_path, lambda p: p.write_text(json.dumps(index, indent=1)))
    return index


def pieces(lengths: list[int], size: int) -> list[tuple[int, int]]:
    """Position ranges of whole examples, about `size` positions each (an example is never cut:
    its draws come from its own generator in one call, whatever the batch)."""
    out, lo, end = [], 0, 0
    for n in lengths:
        if end > lo and end + n - lo > size:
            out.append((lo, end))
            lo = end
        end += n
    return out + ([(lo, end)] if end > lo else [])


@torch.inference_mode()
def record_examples(teacher, examples: list[tuple[int, list[int]]], args: RecordArgs, vocab: int, device, desc: str) -> dict:
    """The shard's arrays (sitra.records layout) from teacher forwards over `examples`."""
    head, k = lm_head(teacher), args.top_k
    parts = {"ids": [], "logp": [], "rest": [], "counts": [], "entries": []}
    lengths = []
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    for batch in progress_bar(iterable=batches, total=len(batches), desc=desc, unit="batch"):
        input_ids, attention_mask = pad([x for _, x in batch], 0)
        hidden = final_hidden(teacher, {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}).last_hidden_state
        n_scored = [len(x) - 1 for _, x in batch]
        scored = torch.arange(input_ids.shape[1])[None, :] < torch.tensor(n_scored)[:, None]
        h = hidden[scored.to(device)]  # [positions, H], example by example
        rows = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(n_scored))
        generators = [example_generator(args.seed, 0, i) for i, _ in batch]
        for lo, hi in pieces(n_scored, POSITIONS_PER_PIECE):
            logits = head(h[lo:hi])[:, :vocab].float()
            logp = torch.log_softmax(logits / args.temperature, dim=-1)
            got = records.teacher_entries(logp, k, args.teacher_logits_sampling, generators, rows[lo:hi].tolist())
            if args.teacher_logits_sampling == "top_k":
                for key, v in zip(("ids", "logp", "rest"), got):
                    parts[key].append(v.numpy().reshape(-1))
            else:
                for key, v in zip(("ids", "logp", "counts", "entries"), got):
                    parts[key].append(v.numpy())
        lengths += n_scored
    cat = {key: np.concatenate(v) if v else np.zeros(0) for key, v in parts.items()}
    dtype = np.float16 if args.log_prob_dtype == "float16" else np.float32
    small = np.uint8 if k < 256 else np.uint16 if k < 65536 else np.uint32
    arrays = {"example_offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
              "ids": records.pack_ids(cat["ids"].astype(np.int64), records.id_bits(vocab)),
              "logp": cat["logp"].astype(dtype)}
    if args.teacher_logits_sampling == "top_k":
        arrays["rest"] = cat["rest"].astype(dtype)
    else:
        entries = cat["entries"].astype(np.int64)
        per_example = np.add.reduceat(entries, arrays["example_offsets"][:-1]) if len(entries) else np.zeros(len(lengths), np.int64)
        per_example[np.diff(arrays["example_offsets"]) == 0] = 0  # reduceat repeats a value for empty ranges
        arrays.update(entries=entries.astype(small), counts=cat["counts"].astype(small),
                      example_entries=np.concatenate([[0], np.cumsum(per_example)]).astype(np.int64))
    return arrays


def run(args: RecordArgs) -> Path:
    config, tokenizer, vocab = check(args)
    train, held_out = data.lm_corpus(tokenizer, args.dataset_name, args.dataset_config, args.train_file, args.eval_file,
                                        args.max_seq_length, args.packing, args.percentage_data)
    if not train or not held_out:
        raise UsageError("the training or held-out text is empty: give --train_file/--eval_file or more data")
    device = models.pick_device(args.device)
    teacher = models.load_model(args.teacher, device, auto=AutoModelForCausalLM)
    identity = make_identity(args, config, tokenizer, vocab, teacher, train, held_out)
    folder = Path(args.output)
    everything = records.indexed(train) + records.indexed(held_out, len(train))
    index = open_output(folder, identity, args.num_shards, len(train), len(everything), tokenizer, config)
    info = index["shards"][args.shard]
    path = folder / info["file"]
    name = args.run_name or f"{JOB}_shard{args.shard}of{args.num_shards}"
    with results.RunLog(Path(args.storage_directory) / "eval_results" / f"{name}.h5", JOB, name, results.config_dict(args)) as log:
        started = time.time()
        if path.exists() and records.shard_metadata(path).get("identity_sha256") == index["identity_sha256"]:
            print(f"shard {args.shard} of {args.num_shards} is recorded already: {path}")
        else:
            lo, hi = info["examples"]
            arrays = record_examples(teacher, everything[lo:hi], args, vocab, device,
                                     desc=f"recording shard {args.shard}/{args.num_shards}")
            records.write_shard(path, arrays, {"identity_sha256": index["identity_sha256"], "shard": args.shard,
                                               "num_shards": args.num_shards, "examples": hi - lo,
                                               "tokens": int(arrays["example_offsets"][-1])})
        meta = records.shard_metadata(path)
        tokens, size = int(meta["tokens"]), path.stat().st_size
        final = {"shard": args.shard, "examples": int(meta["examples"]), "tokens": tokens, "bytes": size,
                 "bytes_per_token": size / max(tokens, 1), "seconds": time.time() - started}
        log.complete(final)
    what = (f"top-{args.top_k} ids and log-probabilities + rest mass" if args.teacher_logits_sampling == "top_k"
            else f"distinct ids of {args.top_k} draws with log-probabilities and counts")
    print(f"shard {args.shard}/{args.num_shards}: {final['examples']:,} examples, {tokens:,} tokens, {size:,} bytes = "
          f"{final['bytes_per_token']:.1f} bytes/token ({what}; ids {records.id_bits(vocab)} bits, {args.log_prob_dtype})")
    done = [s for s in index["shards"] if (folder / s["file"]).exists()]
    if len(done) == len(index["shards"]):
        whole = records.TeacherRecords(folder, "--output")
        print(f"records complete: {folder} ({len(done)} shards, {whole.positions():,} tokens, "
              f"{whole.disk_bytes() / max(whole.positions(), 1):.1f} bytes/token)")
    else:
        print(f"records: {len(done)} of {len(index['shards'])} shards done in {folder}")
    return folder


ARGS = RecordArgs
