"""Tokenising lines and BERT's masked-language-model masking, reproducible per example."""
import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from sitra.data.text import TextDataArgs, load_texts, take_fraction
from sitra.errors import UsageError


def tokenize_lines(lines: list[str], tokenizer, max_seq_length: int, min_tokens: int = 4) -> list[list[int]]:
    """Token ids per line, with special tokens, cut to `max_seq_length`; very short lines dropped."""
    ids = tokenizer(lines, truncation=True, max_length=max_seq_length, add_special_tokens=True)["input_ids"]
    return [x for x in ids if len(x) >= min_tokens]


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of one example in one epoch: its masks do not depend on the batch size,
    the order, the padding or how many processes share the batch."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def pad(examples: list[list[int]], pad_id: int, pad_to_multiple_of: int | None = None):
    """(input_ids, attention_mask), right-padded to the longest example (rounded up to a multiple)."""
    T = max(len(x) for x in examples)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, x in enumerate(examples):
        input_ids[i, : len(x)] = torch.as_tensor(x)
        attention_mask[i, : len(x)] = 1
    return input_ids, attention_mask


class MLMCollator:
    """Pads a list of token-id lists and applies BERT masking.

    Of the non-special, non-padding tokens, each is chosen with probability `mlm_probability`;
    a chosen token becomes the mask token (80%), a random non-special token (10%) or stays (10%).
    `labels` hold the original ids at chosen positions and -100 elsewhere. Each example draws from
    its own generator, so its masks are the same however it is batched or padded.
    """

    def __init__(self, pad_id: int, mask_id: int, special_ids, vocab_size: int, mlm_probability: float = 0.15,
                 pad_to_multiple_of: int | None = None):
        self.pad_id, self.mask_id = pad_id, mask_id
        self.special_ids = torch.tensor(sorted(set(special_ids)))
        vocab = torch.arange(vocab_size)
        self.random_ids = vocab[~torch.isin(vocab, self.special_ids)]
        self.mlm_probability = mlm_probability
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer, mlm_probability: float = 0.15, pad_to_multiple_of: int | None = None):
        return cls(tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.all_special_ids, len(tokenizer),
                   mlm_probability, pad_to_multiple_of)

    def pad(self, examples: list[list[int]]):
        return pad(examples, self.pad_id, self.pad_to_multiple_of)

    def __call__(self, examples: list[list[int]], generators: list[torch.Generator]) -> dict:
        input_ids, attention_mask = self.pad(examples)
        draws = torch.ones((2, *input_ids.shape))
        random_tokens = torch.zeros_like(input_ids)
        for i, (x, g) in enumerate(zip(examples, generators)):
            draws[:, i, : len(x)] = torch.rand((2, len(x)), generator=g)
            random_tokens[i, : len(x)] = self.random_ids[torch.randint(len(self.random_ids), (len(x),), generator=g)]
        choose, action = draws
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        chosen = (choose < self.mlm_probability) & maskable
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        masked = input_ids.clone()
        masked[chosen & (action < 0.8)] = self.mask_id
        replace = chosen & (action >= 0.8) & (action < 0.9)
        masked[replace] = random_tokens[replace]
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}


class Batches:
    """Epochs of collated batches over in-memory examples, resumable at any batch.

    The order of epoch e is a permutation drawn from (seed, e), so a resumed run that skips the
    first `start` batches sees exactly what an uninterrupted run saw; masks come from
    `example_generator(seed, epoch, example index)`. With shuffle=False (evaluation) every model sees
    the same batches with the same masks. `shard(rank, world)` gives one process its part of each
    batch when several processes train together.
    """

    rank, world = 0, 1

    def __init__(self, examples, batch_size: int, collate, seed: int = 0, shuffle: bool = True):
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        self._bounds = None

    def shard(self, rank: int, world: int) -> "Batches":
        """This process's part of every batch when `world` processes share the epoch.

        Batch b then holds `batch_size * world` examples (batch_size is per process); process r
        reads the r-th of `world` near-equal slices of it, so in an epoch every example is read
        once by one process. A last batch too small to give every process an example joins the
        batch before it.
        """
        if len(self.examples) < world:

            raise UsageError(f"{len(self.examples)} training examples cannot be shared by {world} processes")
        part = copy.copy(self)
        part.rank, part.world, part._bounds = rank, world, None
        return part

    def bounds(self) -> list[int]:
        """Where each (global) batch starts in the epoch's order, and the end."""
        if self._bounds is None:
            n, size = len(self.examples), self.batch_size * self.world
            starts = list(range(0, n, size))
            if len(starts) > 1 and n - starts[-1] < self.world:
                starts.pop()
            self._bounds = starts + [n]
        return self._bounds

    def __len__(self):
        return len(self.bounds()) - 1

    def share(self, b: int) -> float:
        """world x the fraction of batch b this process holds: 1.0 when the slices are equal."""
        lo, hi = self.bounds()[b], self.bounds()[b + 1]
        mine = len(range(hi - lo)[self._slice(hi - lo)])
        return mine * self.world / (hi - lo)

    def _slice(self, n: int) -> slice:
        """The rank's slice of n items, as torch.tensor_split cuts them."""
        q, r = divmod(n, self.world)
        lo = self.rank * q + min(self.rank, r)
        return slice(lo, lo + q + (self.rank < r))

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.examples))
        state = np.random.SeedSequence([self.seed, epoch], spawn_key=(1,)).generate_state(2, dtype=np.uint32)
        return torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))

    def epoch(self, epoch: int = 0, start: int = 0):
        order, bounds = self.order(epoch), self.bounds()
        # a collator whose batches differ by epoch (recorded teachers of masked inputs) says so
        collate = self.collate.for_epoch(epoch) if hasattr(self.collate, "for_epoch") else self.collate
        for b in range(start, len(self)):
            idx = order[bounds[b]:bounds[b + 1]]
            idx = idx[self._slice(len(idx))].tolist()
            yield collate([self.examples[i] for i in idx], [example_generator(self.seed, epoch, i) for i in idx])


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch], spawn_key=(stream,)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class LengthGroupedBatches(Batches):
    """Batches of examples of similar length, in random order: each epoch the examples are shuffled,
    cut into mega-batches of `group_size` batches, each mega-batch is sorted by length and cut into
    batches, and the full batches are shuffled (the last, partial batch stays last). The batch
    holding the longest example goes first, so a batch size that does not fit fails at once.

    Only `order(epoch)` differs from `Batches`: resuming, masking and sharding work as there. When
    `world` processes share each batch, a batch is the `batch_size * world` examples they share, so
    every process gets examples of similar length.
    """

    def __init__(self, examples, batch_size: int, collate, lengths, seed: int = 0, group_size: int = 100, **kwargs):
        super().__init__(examples, batch_size, collate, seed=seed, **kwargs)
        self.lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.long)
        self.group_size = group_size

    def order(self, epoch: int) -> torch.Tensor:
        g = _generator(self.seed, epoch, 2)
        size = self.batch_size * getattr(self, "world", 1)
        perm = torch.randperm(len(self.lengths), generator=g)
        groups = [m[torch.argsort(self.lengths[m], descending=True, stable=True)] for m in perm.split(self.group_size * size)]
        batches = list(torch.cat(groups).split(size))
        n_full = len(batches) if len(batches[-1]) == size else len(batches) - 1
        full = [batches[i] for i in torch.randperm(n_full, generator=g).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda b: int(self.lengths[full[b]].max()))
            full[0], full[longest] = full[longest], full[0]
        return torch.cat(full + batches[n_full:])


def padding_fraction(order, lengths, batch_size: int, pad_to=None) -> float:
    """Share of padding among all positions of an epoch's batches (`pad_to(longest)` gives the padded
    length; default the longest example of the batch)."""
    lengths = np.asarray(lengths)[np.asarray(order)]
    real = padded = 0
    for b in range(0, len(lengths), batch_size):
        part = lengths[b:b + batch_size]
        T = pad_to(int(part.max())) if pad_to else int(part.max())
        real, padded = real + int(part.sum()), padded + T * len(part)
    return 1 - real / max(padded, 1)


@dataclass(kw_only=True)
class LengthGroupingArgs:
    """How training batches are drawn: length-grouped (little padding) or uniformly at random."""
    group_by_length: bool = field(default=True, metadata={"help": "length-grouped batches (--no_group_by_length: random)"})
    length_group_size: int = field(default=100, metadata={"help": "batches per length-sorted mega-batch"})


def check_length_grouping(args: LengthGroupingArgs):
    if args.length_group_size < 1:
        raise UsageError(f"--length_group_size {args.length_group_size}: must be at least 1")


def training_batches(args: LengthGroupingArgs, examples, batch_size: int, collate, lengths, seed: int) -> Batches:
    """The training batches --group_by_length asks for: `lengths` are the examples' token counts."""
    if args.group_by_length:
        return LengthGroupedBatches(examples, batch_size, collate, lengths, seed=seed, group_size=args.length_group_size)
    return Batches(examples, batch_size, collate, seed=seed)


def text_batches(args: TextDataArgs, tokenizer, batch_size: int, seed: int, need_train: bool = True):
    """(train batches or None, held-out batches with fixed masks) of tokenised, masked text."""
    train_lines, eval_lines = load_texts(args.dataset_name, args.dataset_config, args.train_file, args.eval_file)
    collate = MLMCollator.for_tokenizer(tokenizer, args.mlm_probability)
    held_out = tokenize_lines(take_fraction(eval_lines, args.percentage_data), tokenizer, args.max_seq_length)
    if not held_out:
        raise UsageError("the held-out text is empty: give --eval_file or more data")
    eval_batches = Batches(held_out, batch_size, collate, seed=seed, shuffle=False)
    if not need_train:
        return None, eval_batches
    train = tokenize_lines(take_fraction(train_lines, args.percentage_data), tokenizer, args.max_seq_length)
    if not train:
        raise UsageError("the training text is empty: give --train_file or more data")
    return Batches(train, batch_size, collate, seed=seed), eval_batches
