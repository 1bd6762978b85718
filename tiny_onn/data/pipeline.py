"""From a data spec to packed, tokenized sequences for one split."""

from __future__ import annotations

import functools
import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tiny_onn.data.encoding import IGNORE_INDEX, PackedData, encode_example, pack_examples
from tiny_onn.data.sources import Example, load_examples, split_examples
from tiny_onn.errors import TinyOnnError


@dataclass
class DataArgs:
    """Options that choose and shape the instruction data."""

    data: str = "default"
    """Data: 'default' (chat + code + math, offline), a .jsonl file (chat 'messages', ShareGPT 'conversations', or prompt/answer records such as Alpaca's and Dolly's), a distillation corpus folder (tiny-onn distil-data), a hub dataset name, or several joined by commas."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    heldout_fraction: float = 0.1
    """Fraction of examples held out (chosen by content hash, the same in every run)."""
    seed: int = 0
    """Seed for the training example order (and anything else random in the stage); the held-out set never depends on it."""
    categories: str = ""
    """Use only these data categories (comma-separated, e.g. 'math,code'; a category whose name holds a comma is given alone, by its whole name); empty = all."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise TinyOnnError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise TinyOnnError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        check_seed(self.seed)


SEED_LIMIT = 2**32  # numpy and scikit-learn take seeds in [0, 2**32)


def check_seed(seed: int) -> None:
    """One clear error for a seed the random generators cannot take."""
    if not 0 <= seed < SEED_LIMIT:
        raise TinyOnnError(f"seed must be in [0, {SEED_LIMIT - 1}], got {seed}")


def cached_examples(spec: str) -> tuple[Example, ...]:
    """`load_examples(spec)`, cached in memory while the local files it reads are unchanged."""
    return _examples_for_state(spec, _local_file_state(spec))


def _local_file_state(spec: str) -> tuple:
    """(path, size, mtime) of every local file a data spec reads (a corpus folder: its two files)."""
    state = []
    for part in spec.split(","):
        path = Path(part.strip()).expanduser()
        files = [path / "corpus.json", path / "corpus.jsonl"] if path.is_dir() else [path]
        state += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return tuple(state)


@functools.lru_cache(maxsize=4)
def _examples_for_state(spec: str, state: tuple) -> tuple[Example, ...]:
    return tuple(load_examples(spec))


def data_identity(spec: str) -> str:
    """A hash of the examples a data spec yields (their content hashes, in order): changes when a file, the default mix
    or a dataset changes, not when a file is only touched or reformatted."""
    h = hashlib.sha256()
    for ex in cached_examples(spec):
        h.update(ex.uid.encode())
    return h.hexdigest()


def shuffled_by_category(examples: list[Example], seed: int) -> dict[str, list[Example]]:
    """Group examples by category, each group shuffled with `seed`."""
    by_cat: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_cat[ex.category].append(ex)
    rng = random.Random(seed)
    for cat in sorted(by_cat):
        rng.shuffle(by_cat[cat])
    return dict(sorted(by_cat.items()))


def check_corpus_tokenizers(spec: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """Distillation corpora in a data spec must have been written with this tokenizer."""
    from tiny_onn.data.distil import check_corpus_tokenizer, is_corpus_folder

    for part in spec.split(","):
        path = Path(part.strip()).expanduser()
        if is_corpus_folder(path):
            check_corpus_tokenizer(path, tokenizer)


def selected_categories(option: str, available) -> list[str]:
    """The category names `--categories` asks for: comma-separated, or the whole option when it is itself the name of
    an available category (a name that holds a comma)."""
    if option.strip() in available:
        return [option.strip()]
    return [c.strip() for c in option.split(",") if c.strip()]


def build_dataset(
    tokenizer: PreTrainedTokenizerBase, args: DataArgs, split: str = "train", max_tokens: int | None = None
) -> PackedData:
    """Encode and pack the `split` ('train' or 'heldout') of `args.data`, stopping once `max_tokens` tokens are encoded.
    The last record is kept whole (so the count ends a little past the budget), unless the count with it would pass
    twice the budget: then it is cut at the budget, where that leaves tokens to score (one very long record would
    otherwise replace the budget)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    check_corpus_tokenizers(args.data, tokenizer)
    train, heldout = split_examples(cached_examples(args.data), args.heldout_fraction)
    # the held-out order is fixed so that runs with different seeds are scored on the same tokens
    queues = shuffled_by_category(train, args.seed) if split == "train" else shuffled_by_category(heldout, 0)
    if not queues:
        raise TinyOnnError(f"the {split} split of data {args.data!r} is empty (too few examples for heldout_fraction?)")
    if args.categories:
        wanted = selected_categories(args.categories, queues)
        unknown = sorted(set(wanted) - set(queues))
        if unknown:
            with_comma = [c for c in queues if "," in c]
            hint = (f"; a category whose name holds a comma ({', '.join(map(repr, with_comma))}) is selected by giving "
                    "its whole name alone" if with_comma else "")
            raise TinyOnnError(f"categories {', '.join(unknown)} are not in data {args.data!r} "
                               f"(its {split} split has: {', '.join(queues)}){hint}")
        queues = {c: q for c, q in queues.items() if c in wanted}
    if not queues:
        raise TinyOnnError(f"the {split} split of data {args.data!r} is empty (too few examples for heldout_fraction?)")
    names = list(queues)
    # balance categories by tokens: always encode next from the category with the fewest tokens so far,
    # so any prefix of the stream (any --tokens budget) is an even mix
    tokens_so_far = dict.fromkeys(names, 0)
    position = dict.fromkeys(names, 0)
    encoded, total = [], 0
    while max_tokens is None or total < max_tokens:
        open_cats = [c for c in names if position[c] < len(queues[c])]
        if not open_cats:
            break
        cat = min(open_cats, key=lambda c: (tokens_so_far[c], c))
        ex = queues[cat][position[cat]]
        position[cat] += 1
        ids, labels = encode_example(tokenizer, ex)
        cut = max_tokens - total if max_tokens is not None and total + len(ids) > 2 * max_tokens else len(ids)
        if any(lab != IGNORE_INDEX for lab in labels[:cut]):  # a cut that would leave nothing to score keeps it whole
            ids, labels = ids[:cut], labels[:cut]
        if all(lab == IGNORE_INDEX for lab in labels):
            continue
        encoded.append((ids, labels, names.index(cat)))
        tokens_so_far[cat] += len(ids)
        total += len(ids)
    # keep only categories that made it into the selection, renumbered densely
    used = sorted({e[2] for e in encoded})
    remap = {old: new for new, old in enumerate(used)}
    encoded = [(i, lab, remap[c]) for i, lab, c in encoded]
    return pack_examples(encoded, args.seq_len, tokenizer.pad_token_id, [names[c] for c in used])
