"""Instruction data: offline sources with category tags, chat-template encoding with response-only labels, packing."""

from tiny_onn.data.encoding import IGNORE_INDEX, PackedData, encode_example, pack_examples
from tiny_onn.data.pipeline import DataArgs, build_dataset
from tiny_onn.data.scoring import scored_positions
from tiny_onn.data.sources import Example, load_examples, split_examples

__all__ = [
    "IGNORE_INDEX",
    "DataArgs",
    "Example",
    "PackedData",
    "build_dataset",
    "encode_example",
    "load_examples",
    "pack_examples",
    "scored_positions",
    "split_examples",
]
