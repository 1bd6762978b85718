"""scored_positions: the next-token shift and the response mask, written once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tiny_onn.data import IGNORE_INDEX, scored_positions
from tiny_onn.train.losses import response_ce_sum


def test_scored_positions_shift_and_mask():
    I = IGNORE_INDEX  # noqa: E741
    labels = torch.tensor([[I, I, 5, 6, I], [I, 7, I, I, 8]])
    targets, mask = scored_positions(labels)
    # position t is scored when token t+1 is a response token, and its target is that token
    assert mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert targets[mask].tolist() == [5, 6, 7, 8]


def test_response_ce_uses_the_same_positions():
    I = IGNORE_INDEX  # noqa: E741
    labels = torch.tensor([[I, I, 5, 6, I], [I, 7, I, I, 8]])
    logits = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(0))
    ce, _ = response_ce_sum(logits, labels)
    # by hand: the logits at (row, position) predict the label at position + 1
    rows_positions = [(0, 1, 5), (0, 2, 6), (1, 0, 7), (1, 3, 8)]
    expected = sum(F.cross_entropy(logits[b, t][None], torch.tensor([y])) for b, t, y in rows_positions)
    torch.testing.assert_close(ce, expected)
