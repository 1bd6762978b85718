"""Which positions a causal LM is scored on: the one place the next-token shift and the response mask are written."""

from __future__ import annotations

import torch

from tiny_onn.data.encoding import IGNORE_INDEX


def scored_positions(labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [B, T-1], mask [B, T-1]): position t predicts `labels[:, t+1]` and is scored when that is a response token.

    Use as `logits_BTV[:, :-1][mask]` against `targets[mask]` (and `category_BT[:, 1:][mask]` for the targets' categories).
    """
    targets_BT = labels_BT[:, 1:]
    return targets_BT, targets_BT != IGNORE_INDEX
