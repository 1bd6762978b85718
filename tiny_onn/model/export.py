"""Write a TinyOnn model as a self-contained Hugging Face folder (weights, config, tokenizer, modeling code, provenance).

Metadata files inside a model folder, one meaning each:
- `carve.json`: how the MoE was carved (format `tiny_onn.moe/1`: active fraction, calibration, carve config). A trained
  folder keeps its carve's file, since training changes weights, not the layout.
- `train.json`: the training report (format `tiny_onn.train/1`), only in trained folders.
Folders written before this split hold one `tiny_onn.json` with either meaning; `read_carve_metadata` still reads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tiny_onn.artifacts import write_json

_CODE = ("configuration_tiny_onn.py", "modeling_tiny_onn.py")
CARVE_META = "carve.json"
TRAIN_META = "train.json"
_LEGACY_META = "tiny_onn.json"


def save_model_folder(
    model, tokenizer: PreTrainedTokenizerBase, folder: Path, provenance: dict, metadata: dict[str, dict], card: str
) -> None:
    """save_pretrained + tokenizer + the standalone modeling code (so `trust_remote_code=True` loads it without tiny_onn)
    + provenance.json + one JSON file per `metadata` entry (file name -> content: CARVE_META, TRAIN_META) + README.md."""
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
    for name, content in metadata.items():
        write_json(folder / name, content)
    (folder / "README.md").write_text(card)


def carve_metadata_path(folder: str | Path) -> Path:
    """Where a model folder's carve metadata lives: carve.json, or an older folder's tiny_onn.json when that holds it."""
    folder = Path(folder)
    legacy = folder / _LEGACY_META
    legacy_is_carve = legacy.is_file() and json.loads(legacy.read_text()).get("format", "").startswith("tiny_onn.moe/")
    if legacy_is_carve and not (folder / CARVE_META).is_file():
        return legacy
    return folder / CARVE_META


def read_carve_metadata(folder: str | Path) -> dict | None:
    """A model folder's carve metadata (see the module docstring), or None for a folder that was not carved."""
    path = carve_metadata_path(folder)
    return json.loads(path.read_text()) if path.is_file() else None
