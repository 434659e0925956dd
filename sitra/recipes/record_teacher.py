"""Run a distillation job's teacher once over the job's data and record, for every position the
job distils, the teacher's top-k ids and log-probabilities plus the log of the remaining mass (or
K tokens drawn from it: --teacher_logits_sampling random), in shards with an index
(sitra.records). Students of that job then train from the records with `--teacher_logits DIR`,
never loading the teacher.

`--job` names the distillation job (default distill_pythia); every other flag is that job's, as its
students will give them (the teacher, the data, --max_seq_length, --temperature, --seed, ...).
One task records one shard (--shard s --num_shards S), so `jobs/launch.py record_teacher --sweep
shard=0,1,2,3 --num_shards 4 ...` records in parallel; a shard already recorded is skipped, so
rerunning resumes."""
import dataclasses
import importlib
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sitra import records, results, runtime
from sitra.args import SAMPLINGS
from sitra.cli import fail
from sitra.cli import main as job_main
from sitra.data.mlm import example_generator
from sitra.errors import UsageError
from sitra.models.teacher import GGUF_NOTE, is_gguf
from sitra.runtime import progress_bar

JOB = "record_teacher"
POSITIONS_PER_PIECE = 1024  # logits [n, V] of about this many positions exist at a time
LENGTH_GROUP = 100  # batches whose examples are sorted by length together
# the distillation jobs whose teachers can be recorded (each has `teacher_pass(args)`)
RECORDABLE = ("distill_pythia", "distill_classifier", "distill_summarizer", "distill_geneformer")


@dataclass(kw_only=True)
class RecordFields:
    job: str = field(default="distill_pythia", metadata={"help": f"the distillation job whose teacher is recorded: {', '.join(RECORDABLE)}"})
    output: str = field(metadata={"help": "records folder (the index, the tokenizer and every shard go here)"})
    top_k: int = field(default=64, metadata={"help": "ids recorded per position, at most the vocabulary (random: draws per position)"})
    teacher_logits_sampling: Literal[SAMPLINGS] = field(default="top_k", metadata={
        "help": "top_k: the k most likely ids and the rest mass; random: k draws from the teacher (unbiased gradients)"})
    log_prob_dtype: Literal["float16", "float32"] = field(default="float16", metadata={
        "help": "storage of the log-probabilities (float32: twice the bytes, for exact comparisons)"})
    shard: int = field(default=0, metadata={"help": "which shard this task records, 0 to --num_shards - 1"})
    num_shards: int = field(default=1, metadata={"help": "shards the examples are split into (one launcher task each)"})


def _record_args(job: str) -> type:
    """RecordFields plus every flag of `job` (its data, teacher and settings), as one dataclass
    defined at module level, so launcher tasks can pickle it."""
    base = importlib.import_module(f"sitra.recipes.{job}").ARGS
    cls = dataclasses.make_dataclass(f"Record_{job}", [], bases=(RecordFields, base), kw_only=True)
    cls.__module__ = __name__
    return cls


RECORD_ARGS = {job: _record_args(job) for job in RECORDABLE}
globals().update({cls.__name__: cls for cls in RECORD_ARGS.values()})
RecordArgs = RECORD_ARGS["distill_pythia"]


def args_class(argv: list[str]) -> type:
    """The flags of `record_teacher --job JOB ...`: RecordFields and JOB's own."""
    job = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--job"),
               next((a.split("=", 1)[1] for a in argv if a.startswith("--job=")), "distill_pythia"))
    if job not in RECORD_ARGS:
        raise UsageError(f"--job {job}: allowed {', '.join(RECORDABLE)}")
    return RECORD_ARGS[job]


def check(args) -> records.TeacherPass:
    """The job's teacher pass after one-line checks of every flag; no weights."""
    if args.num_shards < 1:
        raise UsageError(f"--num_shards {args.num_shards}: must be at least 1")
    if not 0 <= args.shard < args.num_shards:
        raise UsageError(f"--shard {args.shard}: allowed 0-{args.num_shards - 1} (--num_shards {args.num_shards})")
    if args.teacher_logits_sampling not in SAMPLINGS:
        raise UsageError(f"--teacher_logits_sampling {args.teacher_logits_sampling}: allowed {', '.join(SAMPLINGS)}")
    if getattr(args, "teacher_logits", None):
        raise UsageError("--teacher_logits: a recording runs the teacher itself; leave it out")
    if getattr(args, "teacher_bits", None):
        raise UsageError(f"--teacher_bits {args.teacher_bits}: record with the full-precision teacher")
    if not args.temperature > 0:
        raise UsageError(f"--temperature {args.temperature}: must be positive")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size}: must be at least 1")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output}: not a folder")
    teacher_pass = importlib.import_module(f"sitra.recipes.{args.job}").teacher_pass(args)
    if args.teacher_logits_sampling == "top_k" and not 1 <= args.top_k <= teacher_pass.vocab:
        raise UsageError(f"--top_k {args.top_k}: the teacher's vocabulary has {teacher_pass.vocab:,} ids; "
                         f"allowed 1-{teacher_pass.vocab:,}")
    if not 1 <= args.top_k < 2**16:  # random: draws per position, counted in 16 bits at most
        raise UsageError(f"--top_k {args.top_k}: draws per position; allowed 1-65535")
    runtime.pick_device(args.device)
    return teacher_pass


def make_identity(args, teacher_pass: records.TeacherPass, teacher) -> dict:
    """What the records depend on. `teacher` and `data` are for people; the rest is compared
    when a shard resumes, and `settings` and the parts' fingerprints when a student reads them."""
    tp = teacher_pass
    fingerprints = {id(examples): records.fingerprint(examples) for _, _, examples in tp.parts}  # epochs share examples
    return {
        "job": args.job, "teacher": args.teacher, "teacher_config_sha256": records.config_hash(tp.config),
        "teacher_weights_sha256": records.weights_fingerprint(teacher), "tokenizer_sha256": records.tokenizer_hash(tp.tokenizer),
        "vocab": tp.vocab, "top_k": args.top_k, "teacher_logits_sampling": args.teacher_logits_sampling,
        "log_prob_dtype": args.log_prob_dtype, "seed": args.seed,
        "settings": {"--teacher_logits_sampling": args.teacher_logits_sampling, "--temperature": args.temperature} | tp.settings,
        "parts": [{"split": split, "epoch": epoch, "examples": len(examples), "sha256": fingerprints[id(examples)]}
                  for split, epoch, examples in tp.parts],
        "data": tp.data,
        **({"teacher_weights": GGUF_NOTE} if is_gguf(args.teacher) else {}),
    }


FOR_PEOPLE = ("teacher", "data", "teacher_weights")  # not compared when a shard resumes


def open_output(folder: Path, identity: dict, num_shards: int, teacher_pass: records.TeacherPass) -> dict:
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
    parts, start = [], 0
    for part in identity["parts"]:
        parts.append({"split": part["split"], "epoch": part["epoch"], "range": [start, start + part["examples"]],
                      "sha256": part["sha256"]})
        start += part["examples"]
    index = {"format": records.FORMAT, "identity": identity, "identity_sha256": records.identity_hash(identity),
             "num_shards": num_shards, "parts": parts,
             "shards": [{"file": records.shard_name(s, num_shards), "examples": list(records.shard_range(start, s, num_shards))}
                        for s in range(num_shards)]}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tokenizer.tmp{os.getpid()}"
    teacher_pass.tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, folder / "tokenizer")
    except OSError:  # another task saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    results.atomic_write(folder / "teacher_config.json", lambda p: p.write_text(teacher_pass.config.to_json_string()))
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


def shard_items(parts: list, lo: int, hi: int):
    """(record index, epoch, index in its split, example) of records lo..hi-1, each example read
    when its batch is made (a memory-mapped corpus, recorded for several epochs, stays on disk)."""
    start = 0
    for _, epoch, examples in parts:
        for i in range(max(lo - start, 0), min(hi - start, len(examples))):
            yield start + i, epoch or 0, i, examples[i]
        start += len(examples)


def example_tokens(x) -> int:
    """Tokens of an example as the jobs hold them: ids, or a tuple whose first item is the ids."""
    return len(x[0]) if isinstance(x, tuple) else len(x)


def length_grouped(items, batch_size: int):
    """Batches of `items` (shard_items), each window of LENGTH_GROUP batches sorted by length, so
    the teacher's forwards pad little; what is recorded of an example does not depend on its batch."""
    while window := list(itertools.islice(items, batch_size * LENGTH_GROUP)):
        window.sort(key=lambda item: -example_tokens(item[3]))
        for lo in range(0, len(window), batch_size):
            yield window[lo:lo + batch_size]


@torch.inference_mode()
def record_examples(teacher, items, n_items: int, tp: records.TeacherPass, args, device, desc: str) -> dict:
    """The shard's arrays (sitra.records layout) from teacher forwards over `items` (shard_items),
    collated as the job collates them in their epoch, in length-grouped batches; the arrays keep
    the order of the records."""
    head, k, vocab = tp.head(teacher), args.top_k, tp.vocab
    keys = ("ids", "logp", "rest") if args.teacher_logits_sampling == "top_k" else ("ids", "logp", "counts", "entries")
    recorded = {}  # record index -> its arrays
    for batch in progress_bar(iterable=length_grouped(items, args.batch_size), total=-(-n_items // args.batch_size),
                              desc=desc, unit="batch"):
        collated = tp.collate([x for *_, x in batch], [example_generator(args.seed, epoch, i) for _, epoch, i, _ in batch])
        collated = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in collated.items()}
        scored = tp.scored(collated)
        rows = tp.features(teacher, collated)[scored]  # [positions, D], example by example
        n_scored = scored.sum(1).tolist()
        owner = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(n_scored))
        draws = [records.draw_generator(args.seed, index) for index, *_ in batch]
        got = {key: [] for key in keys}
        for lo, hi in pieces(n_scored, POSITIONS_PER_PIECE):
            logits = head(rows[lo:hi])[:, :vocab].float()
            logp = torch.log_softmax(logits / args.temperature, dim=-1)
            for key, v in zip(keys, records.teacher_entries(logp, k, args.teacher_logits_sampling, draws, owner[lo:hi].tolist())):
                got[key].append(v.numpy())
        got = {key: np.concatenate(v) if v else np.zeros(0) for key, v in got.items()}
        # each example's slice: its positions (top_k: rows of k entries), or (random) the entries of its positions
        per_position = np.cumsum(n_scored)[:-1]
        if "rest" in keys:
            split = {key: np.split(v, per_position) for key, v in got.items()}
        else:
            entries = np.split(got["entries"], per_position)
            per_entry = np.cumsum([int(e.sum()) for e in entries])[:-1]
            split = {key: np.split(v, per_entry) for key, v in got.items() if key != "entries"} | {"entries": entries}
        for j, (index, *_) in enumerate(batch):
            recorded[index] = {key: v[j].reshape(-1) for key, v in split.items()} | {"positions": n_scored[j]}
    order = sorted(recorded)
    parts = {key: [recorded[i][key] for i in order] for key in keys}
    lengths = [recorded[i]["positions"] for i in order]
    cat = {key: np.concatenate(v) if v else np.zeros(0) for key, v in parts.items()}
    dtype = np.float16 if args.log_prob_dtype == "float16" else np.float32
    small = np.uint8 if k < 256 else np.uint16
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


def run(args) -> Path:
    tp = check(args)
    device = runtime.pick_device(args.device)
    teacher = tp.load_teacher(device)
    identity = make_identity(args, tp, teacher)
    folder = Path(args.output)
    index = open_output(folder, identity, args.num_shards, tp)
    info = index["shards"][args.shard]
    path = folder / info["file"]
    name = args.run_name or f"{JOB}_{args.job}_shard{args.shard}of{args.num_shards}"
    with results.RunLog(Path(args.storage_directory) / "eval_results" / f"{name}.h5", JOB, name, results.config_dict(args)) as log:
        started = time.time()
        if path.exists() and records.shard_metadata(path).get("identity_sha256") == index["identity_sha256"]:
            print(f"shard {args.shard} of {args.num_shards} is recorded already: {path}")
        else:
            lo, hi = info["examples"]
            arrays = record_examples(teacher, shard_items(tp.parts, lo, hi), hi - lo, tp, args, device,
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
    print(f"shard {args.shard}/{args.num_shards}: {final['examples']:,} examples, {tokens:,} positions, {size:,} bytes = "
          f"{final['bytes_per_token']:.1f} bytes/token ({what}; ids {records.id_bits(tp.vocab)} bits, {args.log_prob_dtype})")
    done = [s for s in index["shards"] if (folder / s["file"]).exists()]
    if len(done) == len(index["shards"]):
        whole = records.TeacherRecords(folder, "--output")
        print(f"records complete: {folder} ({len(done)} shards, {whole.positions():,} positions, "
              f"{whole.disk_bytes() / max(whole.positions(), 1):.1f} bytes/token)")
    else:
        print(f"records: {len(done)} of {len(index['shards'])} shards done in {folder}")
    return folder


def main(argv=None):
    """jobs/record_teacher.py: the flags depend on --job."""

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cls = args_class(argv)
    except UsageError as e:
        fail(str(e))
    return job_main(cls, run, argv=argv)


ARGS = RecordArgs
