"""Export stage: a carved/trained MoE folder -> a file that a local runtime loads (GGUF for llama.cpp)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tiny_onn.errors import TinyOnnError
from tiny_onn.export.to_gguf import QUANTS, export_gguf

FORMATS = ("gguf",)


@dataclass
class ExportConfig:
    """Export a TinyOnn MoE folder for llama.cpp (and Ollama, LM Studio, llama-cpp-python)."""

    model: str = "runs/demo/train/model"
    """The MoE folder to export (from `tiny-onn carve` or `train`; carved with --router flat --expert-weighting probs)."""
    format: str = "gguf"
    """Output format: gguf (llama.cpp's file; architecture deepseek for Llama-family sources, dots1 for Qwen3)."""
    quant: str = "f16"
    """Weight type: f32, f16, q8_0, q4_0 or q4_1 (norms and routers stay f32; token embeddings q8_0 under 4-bit types)."""
    out: str = ""
    """Output file; empty = MODEL-QUANT.gguf beside the model folder."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise TinyOnnError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.quant not in QUANTS:
            raise TinyOnnError(f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.out.endswith(("/", "\\")):
            stem = self.out.rstrip("/\\")
            example = stem if stem.endswith(".gguf") else f"{stem or '.'}/moe-{self.quant}.gguf"
            raise TinyOnnError(f"--out {self.out} ends with a path separator, so it names a folder; the export is one "
                               f"file: give its path (e.g. {example})")

    @property
    def out_path(self) -> Path:
        if self.out:
            return Path(self.out)
        folder = Path(self.model)
        return folder.parent / f"{folder.name}-{self.quant}.gguf"


def run(cfg: ExportConfig) -> dict:
    """Write the GGUF; returns a summary (architecture, tensor types, size, where the tokenizer came from)."""
    return export_gguf(cfg.model, cfg.out_path, cfg.quant)


def summary(cfg: ExportConfig, info: dict) -> str:
    """The lines the CLI prints after exporting."""
    types = ", ".join(f"{n} {t}" for t, n in sorted(info["tensor_types"].items()))
    return (f"GGUF written to {info['out']} ({info['bytes'] / 2**20:.1f} MiB, llama.cpp architecture "
            f"{info['architecture']}, tensors: {types}; tokenizer {info['tokenizer']})\n"
            f"run it: llama-cli -m {info['out']} -cnv")


__all__ = ["ExportConfig", "export_gguf", "run", "summary"]
