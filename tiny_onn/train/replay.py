"""Replay buffer for perpetual training: sequences of earlier data replayed beside the new stream.

The buffer holds the first `size` packed training sequences of its data spec (the same for a given seed), and step s
draws its rows with a generator seeded by (seed, s). So it is deterministic, and resumable without saving anything:
a resumed run draws at every step exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from tiny_onn.data import DataArgs, PackedData, build_dataset
from tiny_onn.errors import TinyOnnError

_FIELDS = ("input_ids", "labels", "attention_mask", "category")


class ReplayBuffer:
    """A fixed set of earlier sequences and a per-step, seeded draw from it."""

    def __init__(self, data: PackedData, seed: int):
        if len(data) == 0:
            raise TinyOnnError("the replay data produced no sequences: give more --replay-data")
        self.data = data
        self.seed = seed

    @classmethod
    def build(cls, tokenizer: PreTrainedTokenizerBase, args: DataArgs, spec: str, size: int) -> ReplayBuffer:
        """The first `size` training sequences of data `spec`, packed like the training data `args` (all categories)."""
        replay_args = DataArgs(data=spec, seq_len=args.seq_len, heldout_fraction=args.heldout_fraction, seed=args.seed)
        data = build_dataset(tokenizer, replay_args, "train", max_tokens=size * args.seq_len)
        keep = slice(0, size)
        data = PackedData(*(getattr(data, k)[keep] for k in _FIELDS), data.category_names)
        return cls(data, args.seed)

    def __len__(self) -> int:
        return len(self.data)

    def draw(self, step: int, n: int) -> torch.Tensor:
        """The buffer rows replayed at `step`: `n` distinct rows (with repeats only if n exceeds the buffer)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        reps = -(-n // len(self))
        return torch.cat([torch.randperm(len(self), generator=gen) for _ in range(reps)])[:n]

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sequences at `index`; their category is -1 (replayed tokens are not counted as any new category)."""
        batch = {k: getattr(self.data, k)[index] for k in _FIELDS}
        batch["category"] = torch.full_like(batch["category"], -1)
        return batch
