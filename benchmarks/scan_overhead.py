"""Scan overhead: one scan step (hooks + statistics) vs the same forward+backward without hooks, SmolLM2, batch 8x256.

    python benchmarks/scan_overhead.py [--repeats 5]

Writes benchmarks/results/scan_overhead.json. The target ratio (scan / plain) is <= 1.05.
Both steps freeze the weights and back-propagate to activations only, as the scanner does; a standard HF training step
(loss over all logits, weight gradients) is timed too, for reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, median, write_result  # noqa: E402

from tiny_onn.data import DataArgs, build_dataset  # noqa: E402
from tiny_onn.scan.scanner import (  # noqa: E402
    NeuronScanner,
    activation_gradients_only,
    scan_batch,
    summed_response_loss,
)
from tiny_onn.sources import SourceArgs, load_source  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    source = load_source(SourceArgs(model="smollm2", device="cpu"))
    model = source.model
    data = build_dataset(source.tokenizer, DataArgs(seq_len=args.seq_len), max_tokens=args.batch_size * args.seq_len)
    batch = next(data.batches(args.batch_size))
    assert batch["input_ids"].shape == (args.batch_size, args.seq_len)
    scanner = NeuronScanner(model, len(data.category_names))
    scanner.remove()  # hooks are re-attached only around the scan step

    def plain_step() -> None:
        with activation_gradients_only(model):
            summed_response_loss(model, batch).backward()

    def scan_step() -> None:
        scanner.attach()
        with activation_gradients_only(model):
            scan_batch(scanner, batch)
        scanner.remove()

    def hf_training_step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        model.zero_grad(set_to_none=True)

    times = interleaved({"plain": plain_step, "scan": scan_step, "hf_training_step": hf_training_step}, args.repeats)
    med = {k: median(v) for k, v in times.items()}
    tokens = args.batch_size * args.seq_len
    result = {
        "model": "smollm2 (SmolLM2-135M-Instruct, fp32)",
        "batch": [args.batch_size, args.seq_len],
        "repeats": args.repeats,
        "median_seconds": med,
        "tokens_per_second": {k: tokens / v for k, v in med.items()},
        "ratio_scan_over_plain": med["scan"] / med["plain"],
        "ratio_scan_over_hf_training_step": med["scan"] / med["hf_training_step"],
        "target_ratio_scan_over_plain": 1.05,
        "all_seconds": times,
    }
    write_result("scan_overhead", result)
    print(f"scan/plain = {result['ratio_scan_over_plain']:.3f}  (plain {med['plain']:.2f}s, scan {med['scan']:.2f}s, "
          f"HF training step {med['hf_training_step']:.2f}s)")


if __name__ == "__main__":
    main()
