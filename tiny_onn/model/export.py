"""Write a TinyOnn model as a self-contained Hugging Face folder (weights, config, tokenizer, modeling code, provenance)."""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tiny_onn.artifacts import write_json

_CODE = ("configuration_tiny_onn.py", "modeling_tiny_onn.py")


def save_model_folder(
    model, tokenizer: PreTrainedTokenizerBase, folder: Path, provenance: dict, meta: dict, card: str
) -> None:
    """save_pretrained + tokenizer + the standalone modeling code (so `trust_remote_code=True` loads it without tiny_onn)
    + provenance.json + tiny_onn.json (`meta`) + README.md (`card`)."""
    model.config.auto_map = {
        "AutoConfig": "configuration_tiny_onn.TinyOnnConfig",
        "AutoModelForCausalLM": "modeling_tiny_onn.TinyOnnForCausalLM",
    }
    model.config.architectures = ["TinyOnnForCausalLM"]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    here = Path(__file__).parent
    for name in _CODE:
        shutil.copy(here / name, folder / name)
    write_json(folder / "provenance.json", provenance)
    write_json(folder / "tiny_onn.json", meta)
    (folder / "README.md").write_text(card)
