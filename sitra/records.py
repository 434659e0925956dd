"""Recorded teachers: the teacher of a distillation job runs once over the job's data
(jobs/record_teacher.py --job JOB) and any number of students of that job train from its records
(`--teacher_logits DIR`) without loading it.

A records folder holds
  index.json              format, the identity (job, teacher, tokenizer, data, settings), shards, parts
  tokenizer/              the teacher's tokenizer
  teacher_config.json     the teacher's config (a random student can be built from it)
  shard-00000-of-00004.safetensors, ...   one per launcher task; a shard file exists only complete

A job's data comes in parts: its splits (train, then held-out), and where the job's inputs differ
every epoch (random masks), one part per epoch of the training split. The examples of all parts
are numbered 0..N-1 in one index space and shard s holds examples [s N / S, (s + 1) N / S). For
every position the job distils (the tokens with a next token; the summary; the masked tokens;
one per example for a classifier) a shard holds, with `--teacher_logits_sampling`
  top_k:   the k most likely ids, their log-probabilities log p_T at temperature T, and the log of
           the mass outside them, log(1 - sum_k p_T)  (the missing-mass term of losses.sparse_kl)
  random:  the distinct ids among K draws from p_T, their log-probabilities and their counts,
           and how many distinct ids each position has  (losses.sampled_kl: unbiased gradients)
and per example where its positions (and, for random, its entries) start.

Compact: ids are bit-packed at ceil(log2 V) bits (9 bits for a 400-id vocabulary, 16 for Pythia's
50,277 ids, 17 for a 128k vocabulary instead of 32). Log-probabilities and the rest mass are
float16 (`--log_prob_dtype float32` for bit-exact comparisons): float16 keeps 11 significant
bits, so a recorded log p is off by at most |log p| / 2,048, i.e. p itself by at most that
fraction: 0.05% at p = e^-1, where the mass is; the tail (log p = -20, p = 2e-9) is still within
1%. bfloat16 would be 8 times coarser and an 8-bit code needs a scale per row for a few % error,
while the ids cost 16 bits anyway. Top-64 at V = 50,277: 64 x (2 + 2) + 2 = 258 bytes a token.
"""
import copy
import dataclasses
import hashlib
import json
import os
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sitra.errors import UsageError
from sitra.losses import RECORD_LOSSES, Sampled, TopK
from sitra.results import atomic_write

FORMAT = "sitra-teacher-records/2"
# the batch tensors RecordCollator adds, in the order the record losses take them
RECORD_KEYS = {"top_k": ("teacher_ids", "teacher_logp", "teacher_rest"),
               "random": ("teacher_ids", "teacher_logp", "teacher_weight")}
PACK_CHUNK = 1 << 20  # ids packed at a time (a multiple of 8: every chunk ends on a byte)


# ---------------------------------------------------------------------------------------------
# what a job tells the recording


@dataclass
class TeacherPass:
    """A distillation job's teacher work, which record_teacher runs once for many students.

    parts: (split, epoch, examples) in the job's order; epoch None where the job's inputs are the
    same every epoch, else one part per epoch of training (its masks differ). collate(examples,
    generators) makes a batch as the job does; scored(batch) -> bool [B, P] marks the positions
    the job distils; features(teacher, batch) -> [B, P, D] and head(teacher) -> (rows [n, D] ->
    logits [n, V]) give the teacher's logits there; vocab: the logits recorded (the first
    `vocab`). settings: the job's flags the records depend on beyond the data itself ({'--flag':
    value}), which a student must match; data: where the data came from, for people."""
    parts: list[tuple[str, int | None, list]]
    collate: Callable
    scored: Callable
    load_teacher: Callable
    features: Callable
    head: Callable
    tokenizer: object
    config: object
    vocab: int
    data: str
    settings: dict = field(default_factory=dict)


def open_records(args, job: str, settings: dict | None = None) -> "TeacherRecords":
    """The records of `args.teacher_logits` for a student of `job`, refused (one line) where they
    cannot stand in for its teacher: a --loss they cannot serve (raw logits; sampled records serve
    forward KL only), another job, teacher, sampling, --temperature or other setting of the job's."""
    loss = getattr(args, "loss", "forward_kl")
    if loss not in RECORD_LOSSES:
        raise UsageError(f"--loss {loss}: compares raw logits, which records do not keep; with --teacher_logits "
                         f"allowed: {', '.join(RECORD_LOSSES)}")
    rec = TeacherRecords(args.teacher_logits)
    if rec.sampling == "random" and loss != "forward_kl":
        raise UsageError(f"--loss {loss}: sampled records (--teacher_logits_sampling random) estimate forward_kl only")
    if rec.identity["job"] != job:
        raise UsageError(f"--teacher_logits {args.teacher_logits}: recorded for {rec.identity['job']}, not {job}; "
                         f"record with --job {job}")
    recorded = rec.identity["teacher"]
    default = next(f.default for f in dataclasses.fields(args) if f.name == "teacher")
    if args.teacher not in (recorded, default):
        raise UsageError(f"--teacher {args.teacher}: with --teacher_logits the teacher is the recorded one ({recorded}); "
                         "leave --teacher out")
    if getattr(args, "teacher_bits", None):
        raise UsageError(f"--teacher_bits {args.teacher_bits}: with --teacher_logits the teacher is not loaded")
    rec.check({"--teacher_logits_sampling": args.teacher_logits_sampling or rec.sampling, "--temperature": args.temperature}
              | (settings or {}))
    return rec


def as_teacher(sampling: str, ids, logp, third):
    """The recorded teacher of some positions as sitra.losses.distill_loss takes it: the
    tensors RecordCollator adds (RECORD_KEYS[sampling], in that order) at those positions."""
    return (TopK if sampling == "top_k" else Sampled)(ids, logp, third)


def from_batch(batch, sampling: str, where=slice(None)):
    """as_teacher of a batch's records at `where` (an index or mask of the batch's positions)."""
    return as_teacher(sampling, *(batch[k][where] for k in RECORD_KEYS[sampling]))


def with_recorded_teacher(args, rec: "TeacherRecords"):
    """args naming the recorded teacher and what the records hold, for the run's log and model card."""
    return dataclasses.replace(args, teacher=rec.identity["teacher"], teacher_logits_sampling=rec.sampling)


def name_suffix(rec: "TeacherRecords | None") -> str:
    """What a distillation job adds to its run name: a records run never shares a folder with an online one."""
    return f"_records-{rec.sampling}{rec.k}" if rec else ""


def card_line(rec: "TeacherRecords", where: str, drawn: str = "tokens") -> str:
    """The model card's sentence on a recorded teacher: what the records hold at `where` (e.g.
    'every token'; `drawn` names what the teacher's draws are) and that it was never loaded."""
    if rec.sampling == "random":
        held = f"the distinct {drawn} of {rec.k} draws from it with their counts, an unbiased estimate of the forward KL"
    elif rec.k >= rec.vocab:
        held = f"all its {rec.vocab} log-probabilities"
    else:
        held = f"its top-{rec.k} log-probabilities and the missing mass"
    weights = f" Its weights were {rec.identity['teacher_weights']}." if rec.identity.get("teacher_weights") else ""
    return (f"Teacher: recorded once by `jobs/record_teacher.py` in `{rec.folder}` ({held}, at temperature "
            f"{rec.identity['settings']['--temperature']:g}) at {where}; the teacher was never loaded while training.{weights}")


# ---------------------------------------------------------------------------------------------
# identity


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(examples) -> str:
    """sha256 of the examples, in order: token ids (lists or arrays, with their lengths), labels,
    and tuples or dicts of them."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, dict):
            for k in sorted(x):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, tuple):
            h.update(b"(%d" % len(x))
            for v in x:
                feed(v)
        elif isinstance(x, (int, float, str, np.integer, np.floating)) or x is None:
            h.update(repr(x.item() if isinstance(x, np.generic) else x).encode() + b";")  # np.int64(1) as 1
        else:  # a sequence of ids: list, array or tensor
            a = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
            h.update(np.int64(a.size).tobytes())
            h.update(a.astype(np.int64).tobytes())

    for x in examples:
        feed(x)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    return _sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())


def config_hash(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
    return _sha256(json.dumps(d, sort_keys=True, default=str).encode())


def weights_fingerprint(model, samples: int = 4096) -> str:
    """sha256 over every tensor's name, shape and `samples` values at an even stride: cheap even
    for large teachers, and any retraining changes it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // samples)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def identity_hash(identity: dict) -> str:
    return _sha256(json.dumps(identity, sort_keys=True).encode())[:16]


# ---------------------------------------------------------------------------------------------
# bit-packed ids


def id_bits(vocab: int) -> int:
    return max(1, (vocab - 1).bit_length())


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """uint8 stream of `ids` at `bits` bits each, least significant bit first."""
    ids = np.asarray(ids).reshape(-1)
    if bits in (8, 16, 32):
        return ids.astype(f"<u{bits // 8}").view(np.uint8)
    parts = []
    for i in range(0, len(ids), PACK_CHUNK):
        chunk = ids[i:i + PACK_CHUNK].astype(np.uint64)
        b = ((chunk[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
        parts.append(np.packbits(b.reshape(-1), bitorder="little"))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack_ids(stream, start: int, count: int, bits: int) -> np.ndarray:
    """ids start..start+count-1 of a packed uint8 stream."""
    if bits in (8, 16, 32):
        n = bits // 8
        return np.asarray(stream[start * n:(start + count) * n]).view(f"<u{n}").astype(np.int64)
    lo, hi = start * bits, (start + count) * bits
    b = np.unpackbits(np.asarray(stream[lo // 8: -(-hi // 8)]), bitorder="little")[lo % 8: lo % 8 + count * bits]
    return (b.reshape(count, bits).astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(1)


# ---------------------------------------------------------------------------------------------
# what a position's record holds


def teacher_entries(log_probs: torch.Tensor, k: int, sampling: str, generators: list | None = None, rows: list[int] | None = None):
    """The record of each position from the teacher's log-probabilities [n, V] (at temperature T).

    top_k: (ids [n, k], log p [n, k], log rest [n]) with rest = logsumexp of the other ids (-inf
    when k = V). random: (ids [m], log p [m], counts [m], entries [n]): K = k draws per position
    from p_T with replacement, merged into distinct ids with counts; position i draws from
    generators[g] for its `rows[i]` = g (one generator per example: the draws do not depend on the
    batch). All on the CPU.
    """
    log_probs = log_probs.float()
    if sampling == "top_k":
        logp, ids = log_probs.topk(k, dim=-1)
        outside = log_probs.scatter(-1, ids, float("-inf"))
        return ids.cpu(), logp.cpu(), outside.logsumexp(-1).cpu()
    draws = torch.empty(len(log_probs), k, dtype=torch.long)
    probs = log_probs.exp().cpu()
    rows = torch.as_tensor(rows)
    for g in rows.unique().tolist():
        sel = (rows == g).nonzero()[:, 0]
        draws[sel] = torch.multinomial(probs[sel], k, replacement=True, generator=generators[g])
    draws = draws.sort(-1).values
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    flat_new = new.reshape(-1)
    starts = flat_new.nonzero()[:, 0]
    counts = torch.diff(starts, append=torch.tensor([draws.numel()]))
    ids = draws.reshape(-1)[starts]
    position = starts // k
    return ids, log_probs.cpu()[position, ids], counts, new.sum(-1)


def draw_generator(seed: int, index: int) -> torch.Generator:
    """The stream of one example's draws (random sampling): apart from its mask stream."""
    state = np.random.SeedSequence([seed, index], spawn_key=(2,)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    return n * shard // num_shards, n * (shard + 1) // num_shards


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.safetensors"


# ---------------------------------------------------------------------------------------------
# shard files: safetensors, written whole and renamed into place


SAFETENSORS_DTYPES = {"U8": "u1", "U16": "<u2", "U32": "<u4", "I64": "<i8", "F16": "<f2", "F32": "<f4"}


def write_shard(path: Path, arrays: dict, metadata: dict):
    from safetensors.numpy import save_file


    atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
                                             metadata={k: str(v) for k, v in metadata.items()}))


class Column:
    """One tensor of a shard file, read on demand: column[a:b] reads rows a..b-1 with one pread.
    Not memory-mapped on purpose: mapped pages a job has touched count as its resident memory,
    and over an epoch that is the whole records file (SLURM's RSS accounting would see it)."""

    def __init__(self, fd: int, offset: int, dtype: str, shape: list[int]):
        self.fd, self.offset, self.dtype, self.shape = fd, offset, np.dtype(dtype), tuple(shape)
        self.row = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        lo, hi, _ = rows.indices(self.shape[0])
        hi = max(lo, hi)
        data = os.pread(self.fd, (hi - lo) * self.row, self.offset + lo * self.row) if hi > lo else b""
        return np.frombuffer(data, self.dtype).reshape(hi - lo, *self.shape[1:])


def shard_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int(np.frombuffer(f.read(8), "<u8")[0])
        return json.loads(f.read(n)).get("__metadata__") or {}


def read_shard(path: Path) -> tuple[dict, dict]:
    """({name: Column}, metadata) of a safetensors shard file, which stays open for reading."""
    fd = os.open(path, os.O_RDONLY)
    n = int(np.frombuffer(os.pread(fd, 8, 0), "<u8")[0])
    header = json.loads(os.pread(fd, n, 8))
    metadata = header.pop("__metadata__", None) or {}
    columns = {name: Column(fd, 8 + n + h["data_offsets"][0], SAFETENSORS_DTYPES[h["dtype"]], h["shape"])
               for name, h in header.items()}
    return columns, metadata


# ---------------------------------------------------------------------------------------------
# reading


class TeacherRecords:
    """A complete records folder, opened for lookups by example index (`--teacher_logits DIR`)."""

    def __init__(self, folder, flag: str = "--teacher_logits"):
        self.folder, self.flag = Path(folder), flag
        where = f"{flag} {folder}"
        try:
            self.index = json.loads((self.folder / "index.json").read_text())
        except (OSError, ValueError):
            raise UsageError(f"{where}: no readable index.json (not a records folder; make one with "
                             "jobs/record_teacher.py)") from None
        if self.index.get("format") != FORMAT:
            raise UsageError(f"{where}: records of format {self.index.get('format')!r}; this sitra reads {FORMAT}")
        self.identity = self.index["identity"]
        shards = self.index["shards"]
        missing = [s for s, info in enumerate(shards) if not self._complete(info)]
        if missing:
            raise UsageError(f"{where}: shard(s) {', '.join(map(str, missing))} of {len(shards)} are missing or from other "
                             f"records; run jobs/record_teacher.py for them (--shard, --num_shards {len(shards)})")
        self.starts = [info["examples"][0] for info in shards]
        self.files = [read_shard(self.folder / info["file"])[0] for info in shards]
        for f in self.files:  # 8 bytes an example: kept in memory
            f["example_offsets"] = f["example_offsets"][:]
            if "example_entries" in f:
                f["example_entries"] = f["example_entries"][:]
        self.bits = id_bits(self.vocab)

    def _complete(self, info) -> bool:
        path = self.folder / info["file"]
        return path.exists() and shard_metadata(path).get("identity_sha256") == self.index["identity_sha256"]

    k = property(lambda self: self.identity["top_k"])
    vocab = property(lambda self: self.identity["vocab"])
    sampling = property(lambda self: self.identity["teacher_logits_sampling"])

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder / "tokenizer")

    def teacher_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.folder / "teacher_config.json")

    def parts(self, split: str) -> list[dict]:
        return [p for p in self.index["parts"] if p["split"] == split]

    def offsets(self, split: str) -> int | dict[int, int]:
        """Where the records of `split` start: one index, or one per epoch (RecordCollator)."""
        parts = self.parts(split)
        if len(parts) == 1 and parts[0]["epoch"] is None:
            return parts[0]["range"][0]
        return {p["epoch"]: p["range"][0] for p in parts}

    def split(self, name: str) -> range:
        lo, hi = self.parts(name)[0]["range"]
        return range(lo, hi)

    def positions(self) -> int:
        return sum(int(f["example_offsets"][-1]) for f in self.files)

    def disk_bytes(self) -> int:
        return sum((self.folder / info["file"]).stat().st_size for info in self.index["shards"])

    def check(self, values: dict):
        """One-line error for the first flag whose value differs from the one the records were
        made with: values maps '--flag' to its value here."""
        for flag, value in values.items():
            recorded = self.identity["settings"][flag]
            if recorded != value:
                raise UsageError(f"{flag} {value}: the records at {self.flag} {self.folder} were made with "
                                 f"{recorded}; use that, or record again")

    def check_data(self, split: str, examples, what: str):
        """Refuse records of other data: the examples must be the recorded ones, id for id."""
        here = fingerprint(examples)
        for part in self.parts(split):
            lo, hi = part["range"]
            if hi - lo != len(examples) or part["sha256"] != here:
                raise UsageError(f"{self.flag} {self.folder}: recorded on other {what} ({hi - lo:,} examples of "
                                 f"{self.identity['data']}; here {len(examples):,}); give the same data flags as the "
                                 "recording, or record again")

    def example(self, index: int) -> dict:
        """The record of one example as numpy arrays (one row per scored position)."""
        s = bisect_right(self.starts, index) - 1
        f, local = self.files[s], index - self.starts[s]
        p0, p1 = (int(v) for v in f["example_offsets"][local:local + 2])
        if self.sampling == "top_k":
            k = self.k
            ids = unpack_ids(f["ids"], p0 * k, (p1 - p0) * k, self.bits).reshape(p1 - p0, k)
            return {"teacher_ids": ids, "teacher_logp": f["logp"][p0 * k:p1 * k].reshape(p1 - p0, k),
                    "teacher_rest": f["rest"][p0:p1]}
        e0, e1 = (int(v) for v in f["example_entries"][local:local + 2])
        return {"entries": f["entries"][p0:p1], "teacher_ids": unpack_ids(f["ids"], e0, e1 - e0, self.bits),
                "teacher_logp": f["logp"][e0:e1], "counts": f["counts"][e0:e1]}

    def lookup(self, indices: list[int], scored: torch.Tensor) -> dict:
        """Teacher tensors of a batch whose examples are `indices`, at the positions `scored`
        [B, P] marks (the ones the job distils): [B, P, k] each (the rest mass [B, P]); other
        positions hold id 0, weight 0. An example must have as many records as scored positions."""
        recs = [self.example(i) for i in indices]
        B, P = scored.shape
        for i, r, n in zip(indices, recs, scored.sum(1).tolist()):
            got = len(r["teacher_rest"] if self.sampling == "top_k" else r["entries"])
            if got != n:
                raise UsageError(f"{self.flag} {self.folder}: example {i} has {got} recorded positions, the job scores {n} "
                                 "there; the records belong to other data or settings")
        if self.sampling == "top_k":
            out = {"teacher_ids": torch.zeros(B, P, self.k, dtype=torch.long), "teacher_logp": torch.zeros(B, P, self.k),
                   "teacher_rest": torch.zeros(B, P)}
            for b, r in enumerate(recs):
                where = scored[b].nonzero()[:, 0]
                for key, v in r.items():
                    out[key][b, where] = torch.from_numpy(np.array(v, dtype=np.int64 if key == "teacher_ids" else np.float32))
            return out
        width = max([int(r["entries"].max()) if len(r["entries"]) else 1 for r in recs] + [1])
        out = {"teacher_ids": torch.zeros(B, P, width, dtype=torch.long), "teacher_logp": torch.zeros(B, P, width),
               "teacher_weight": torch.zeros(B, P, width)}
        for b, r in enumerate(recs):
            n = torch.from_numpy(r["entries"].astype(np.int64))
            row = scored[b].nonzero()[:, 0][torch.repeat_interleave(torch.arange(len(n)), n)]
            col = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            out["teacher_ids"][b, row, col] = torch.from_numpy(r["teacher_ids"])
            out["teacher_logp"][b, row, col] = torch.from_numpy(r["teacher_logp"].astype(np.float32))
            out["teacher_weight"][b, row, col] = torch.from_numpy(r["counts"].astype(np.float32)) / self.k
        return out


class RecordCollator:
    """A job's collator for (record index, example) pairs that adds each example's recorded
    teacher values at the positions `scored(batch)` marks, looked up by its index (never by batch
    position: data-parallel processes each read their own slice of a batch), and the indices
    themselves as `example_index`. `offsets` maps an epoch to where its examples' records start
    (one entry: the same records every epoch)."""

    def __init__(self, collate, records: TeacherRecords, scored, offsets: dict[int, int] | int = 0):
        self.collate, self.records, self.scored = collate, records, scored
        self.offsets, self.offset = offsets, offsets if isinstance(offsets, int) else offsets[0]

    def for_epoch(self, epoch: int) -> "RecordCollator":
        """The collator of epoch `epoch` (Batches asks): records made per epoch (masks that differ
        every epoch) start elsewhere for each."""
        if isinstance(self.offsets, int):
            return self
        if epoch not in self.offsets:
            raise UsageError(f"{self.records.flag} {self.records.folder}: recorded for epochs 0-{max(self.offsets)}, "
                             f"training reached epoch {epoch}; record more (--epochs) or train less")
        part = copy.copy(self)
        part.offset = self.offsets[epoch]
        return part

    def __call__(self, examples: list, generators=None) -> dict:
        indices = [self.offset + i for i, _ in examples]
        batch = self.collate([x for _, x in examples], generators)
        return batch | {"example_index": torch.tensor(indices), **self.records.lookup(indices, self.scored(batch))}


class Indexed:
    """(index in the split, example) pairs for RecordCollator (which adds the split's offset),
    read on demand like the examples themselves: a memory-mapped corpus stays on disk."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return i, self.examples[i]
