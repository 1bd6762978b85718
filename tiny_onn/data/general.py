"""General-text held-out set: English prose that shares no source with the training mix, so its perplexity measures
what the dense source knew before we touched it.

The bundled text is the Lee news corpus (350 English news articles from the Australian Broadcasting Corporation, Lee,
Pincombe & Welsh 2005) that ships as test data inside the PyPI package `gensim` (installed with `--no-deps`: only the
files are read, gensim is never imported). Users can give their own plain-text file instead (one document per line, or
documents separated by blank lines). No training data source reads these files.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tiny_onn.data.encoding import PackedData, encode_plain_text, pack_examples
from tiny_onn.data.sources import check_not_gzip
from tiny_onn.errors import TinyOnnError

BUNDLED_NEWS = "news"
_LEE_FILES = ("lee.cor", "lee_background.cor")


def bundled_news_files() -> list[Path]:
    """The Lee corpus files inside the installed `gensim` package (found without importing it)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise TinyOnnError("the general-text set needs the package gensim's data files: pip install --no-deps gensim")
    folder = Path(spec.submodule_search_locations[0]) / "test" / "test_data"
    files = [folder / name for name in _LEE_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise TinyOnnError(f"gensim is installed but its news corpus is missing ({', '.join(missing)}); "
                           "reinstall: pip install --no-deps --force-reinstall gensim")
    return files


def _documents(path: Path, encoding: str = "utf-8") -> list[str]:
    if path.is_dir():
        raise TinyOnnError(f"general-text file {path} is a folder; give a plain-text file (documents separated by a "
                           "blank line), or 'news' for the bundled set")
    if not path.is_file():
        raise TinyOnnError(f"general-text file not found: {path}")
    check_not_gzip(path, "general-text file")
    try:
        text = path.read_text(encoding="utf-8-sig" if encoding == "utf-8" else encoding)  # a byte-order mark is not text
    except UnicodeDecodeError as e:
        raise TinyOnnError(f"general-text file {path} is not UTF-8 text ({e})") from e
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]  # a separating line may hold spaces
    parts = blocks if len(blocks) > 1 else text.splitlines()
    return [" ".join(p.split()) for p in parts if p.strip()]


def general_documents(spec: str = BUNDLED_NEWS) -> list[str]:
    """Documents of the general-text set: 'news' (bundled) or a plain-text file."""
    if spec == BUNDLED_NEWS:
        docs = [d for f in bundled_news_files() for d in _documents(f, "latin-1")]  # the Lee files are Latin-1 ("£")
    else:
        docs = _documents(Path(spec).expanduser())
    if not docs:
        raise TinyOnnError(f"the general-text set {spec!r} holds no text")
    return docs


def build_general_dataset(
    tokenizer: PreTrainedTokenizerBase, spec: str = BUNDLED_NEWS, seq_len: int = 256, max_tokens: int | None = None,
    documents: list[str] | None = None,
) -> PackedData:
    """Documents as plain text (no chat template), each followed by the end-of-sequence token, every token scored,
    packed into `seq_len` rows; the first `max_tokens` tokens in the corpus' fixed order. `documents`: the set's
    documents already read by `general_documents(spec)` (None: read here)."""
    encoded, total = [], 0
    for doc in general_documents(spec) if documents is None else documents:
        ids, labels = encode_plain_text(tokenizer, doc)
        if max_tokens is not None:
            ids, labels = ids[: max_tokens - total], labels[: max_tokens - total]
        encoded.append((ids, labels, 0))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return pack_examples(encoded, seq_len, tokenizer.pad_token_id, ["general"])
