"""Reading a scan artifact back (carve and interpret use this, never the scanner's internals)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tiny_onn.artifacts import read_json
from tiny_onn.errors import TinyOnnError

STATS = ("act", "grad", "freq", "delta_sc", "s_p", "fingerprint")


@dataclass
class ScanResult:
    """Per-layer, per-neuron statistics of one scan and its meta data (scan.json)."""

    meta: dict
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, folder: str | Path) -> ScanResult:
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise TinyOnnError(f"{folder} is a file, not a scan folder; give the folder `tiny-onn scan --out` wrote")
        if not folder.is_dir():
            raise TinyOnnError(f"scan folder not found: {folder}; run `tiny-onn scan --out {folder}` first")
        meta = read_json(folder / "scan.json", "scan meta data")
        if meta.get("format") != "tiny_onn.scan/1":
            raise TinyOnnError(f"{folder}/scan.json is not a Tiny-ONN scan (format {meta.get('format')!r})")
        path = folder / "scan.safetensors"
        if not path.is_file():
            raise TinyOnnError(f"{path} is missing; the scan is incomplete: run `tiny-onn scan` again")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise TinyOnnError(f"{path} is corrupt or truncated ({e}); run `tiny-onn scan` again") from e
        missing = [f"layers.{i}.{s}" for i in range(meta["layers"]) for s in STATS if f"layers.{i}.{s}" not in tensors]
        if missing:
            raise TinyOnnError(f"{path} lacks {len(missing)} statistics (e.g. {missing[0]}); run `tiny-onn scan` again")
        return cls(meta, tensors)

    @property
    def num_layers(self) -> int:
        return int(self.meta["layers"])

    @property
    def categories(self) -> list[str]:
        return list(self.meta["categories"])

    def stat(self, layer: int, name: str, category: str | None = None) -> torch.Tensor:
        """One statistic of one layer: `act`, `grad`, `freq`, `delta_sc`, `s_p`, `fingerprint` (or a category's act/grad/freq)."""
        key = f"layers.{layer}.{name}" if category is None else f"layers.{layer}.by_category.{category}.{name}"
        if key not in self.tensors:
            raise KeyError(key)
        return self.tensors[key]
