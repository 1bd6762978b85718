"""`tiny-onn distil-data`: a distillation corpus written by the dense source itself.

The teacher answers a large, diverse prompt set — fact questions of the *training* split, open questions and
explanation requests on general topics, and the user turns of the training mix — sampled with a temperature, in
left-padded batches with the KV cache. The corpus folder holds `corpus.jsonl` (one record per prompt: the chat, the
exact prompt and response token ids, the prompt set) and `corpus.json` (teacher, tokenizer digest, settings, progress).

Deterministic for a seed: each batch's sampling RNG is seeded from (seed, batch index), so a run that is interrupted
and resumed writes exactly the records of an uninterrupted run, none twice. A corpus folder is a data source
(`--data runs/corpus`, or `--data default,runs/corpus`), usable only with the tokenizer that wrote it.

Open prompts never name a subject of the evaluation facts (a country, capital or element that appears in an `eval`
fact), so the teacher's free text cannot re-teach the facts that measure retention.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from tiny_onn.artifacts import check_output_folder, read_json, versions, write_json
from tiny_onn.config import config_to_dict
from tiny_onn.data.pipeline import check_seed
from tiny_onn.data.sources import absolute_data_spec, same_data_spec
from tiny_onn.errors import TinyOnnError
from tiny_onn.sources import SourceArgs, load_source
from tiny_onn.sources.loading import absolute_model_path, warn_if_beyond_positions

log = logging.getLogger(__name__)

FORMAT = "tiny_onn.corpus/1"
_RECORD_KEYS = ("messages", "category", "prompt_ids", "response_ids")  # what reading a record as data needs
PROMPT_SETS = ("facts", "open", "mix")

# general topics for open questions (none is a country, capital or element: those belong to the fact benchmark)
TOPICS = (
    "photosynthesis", "gravity", "volcanoes", "earthquakes", "the water cycle", "climate change", "the solar system",
    "black holes", "the Moon", "the human heart", "the immune system", "vaccines", "DNA", "evolution", "dinosaurs",
    "bees", "whales", "rainforests", "deserts", "coral reefs", "the Renaissance", "the Industrial Revolution",
    "ancient Egypt", "the Roman Empire", "the printing press", "the steam engine", "electricity", "magnets",
    "the internet", "computers", "smartphones", "artificial intelligence", "renewable energy", "solar panels",
    "wind turbines", "recycling", "democracy", "money", "inflation", "banks", "taxes", "the stock market",
    "music", "the piano", "painting", "poetry", "novels", "theatre", "film", "photography", "architecture",
    "football", "basketball", "tennis", "chess", "the Olympic Games", "running", "swimming", "yoga", "sleep",
    "nutrition", "vitamins", "bread", "coffee", "tea", "chocolate", "cheese", "rice", "pasta", "cooking",
    "gardening", "trees", "flowers", "mushrooms", "birds", "cats", "dogs", "horses", "elephants", "penguins",
    "sharks", "butterflies", "ants", "rivers", "mountains", "oceans", "glaciers", "weather", "rainbows",
    "lightning", "snow", "the seasons", "time zones", "calendars", "clocks", "maps", "compasses", "ships",
    "trains", "airplanes", "bicycles", "cars", "bridges", "roads", "cities", "villages", "libraries",
    "schools", "universities", "hospitals", "doctors", "nurses", "teachers", "farmers", "engineers",
    "scientists", "mathematics", "prime numbers", "fractions", "geometry", "statistics", "probability",
    "algebra", "physics", "chemistry", "biology", "astronomy", "geology", "psychology", "economics",
    "philosophy", "history", "languages", "writing", "reading", "friendship", "kindness", "honesty",
    "teamwork", "leadership", "public speaking", "time management", "saving money", "first aid",
    "fire safety", "the fire brigade", "the postal service", "newspapers", "radio", "television",
    "video games", "board games", "puzzles", "magic tricks", "robots", "satellites", "rockets", "telescopes",
    "microscopes", "batteries", "light bulbs", "plastic", "glass", "paper", "wool", "cotton", "wood",
    "stone", "soil", "sand", "clouds", "wind", "tides", "sound", "light", "colours", "heat", "friction",
)
TEMPLATES = (
    "Explain {t} in simple terms.",
    "Write a short paragraph about {t}.",
    "What are three interesting facts about {t}?",
    "Why is {t} important?",
    "How would you describe {t} to a child?",
)


@dataclass
class DistilDataConfig(SourceArgs):
    """Write a distillation corpus: the dense source (the teacher) answers a large, diverse prompt set."""

    prompts: str = "facts,open,mix"
    """Prompt sets, comma-separated: facts (training-split fact questions), open (questions and explanations on general topics), mix (user turns of the training mix); interleaved so any prefix is balanced."""
    max_prompts: int = 2000
    """How many prompts to answer (0 = all)."""
    data: str = "default"
    """The training mix whose user turns form the 'mix' prompt set."""
    facts: str = "builtin"
    """Fact questions: 'builtin' or a jsonl fact file (only its training split is used)."""
    max_new_tokens: int = 160
    """Longest answer, in tokens."""
    temperature: float = 0.7
    """Sampling temperature (0 = greedy)."""
    batch_size: int = 16
    """Prompts generated together (left-padded, KV cache)."""
    seed: int = 0
    """Seed of the prompt order and of the sampling."""
    out: str = "runs/corpus"
    """Corpus folder: corpus.jsonl + corpus.json. An unfinished corpus with the same settings is resumed."""

    def __post_init__(self) -> None:
        SourceArgs.__post_init__(self)
        check_seed(self.seed)
        unknown = [s for s in self.prompt_sets if s not in PROMPT_SETS]
        if unknown or not self.prompt_sets:
            raise TinyOnnError(f"unknown prompt set(s) {unknown or self.prompts!r}; choose from {', '.join(PROMPT_SETS)}")
        self.prompts = ",".join(self.prompt_sets)  # " facts , open" and "facts,facts,open" name the same corpus
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise TinyOnnError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_prompts < 0 or self.temperature < 0:
            raise TinyOnnError("max_prompts and temperature must be non-negative")

    @property
    def prompt_sets(self) -> list[str]:
        return list(dict.fromkeys(s.strip() for s in self.prompts.split(",") if s.strip()))


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identity of a tokenizer: its vocabulary, special tokens and chat template."""
    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens, tokenizer.chat_template])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# --- prompt sets -------------------------------------------------------------------------------------------------------

def _eval_subjects(facts_spec: str) -> set[str]:
    """Normalised words and phrases named by evaluation facts (their questions' subjects and their answers)."""
    from tiny_onn.data.facts import load_facts, normalise

    names = set()
    for f in load_facts(facts_spec, "eval"):
        names.update(normalise(a) for a in f.answers)
        names.add(normalise(f.question))
    return names


def fact_prompts(facts_spec: str) -> list[str]:
    from tiny_onn.data.facts import load_facts

    return [f.question for f in load_facts(facts_spec, "train")]


def open_prompts(facts_spec: str) -> list[str]:
    from tiny_onn.data.facts import normalise

    banned = _eval_subjects(facts_spec)
    topics = [t for t in TOPICS if not any(f" {normalise(t)} " in f" {b} " for b in banned)]
    return [tpl.format(t=t) for t in topics for tpl in TEMPLATES]


def mix_prompts(data: str, heldout_fraction: float = 0.1) -> list[str]:
    """The first user turn of every training-split example of the mix (its held-out split is never used)."""
    from tiny_onn.data.pipeline import cached_examples
    from tiny_onn.data.sources import split_examples

    train, _ = split_examples(cached_examples(data), heldout_fraction)
    prompts = []
    for ex in train:
        first = next((c for r, c in ex.messages if r == "user" and c.strip()), None)
        if first:
            prompts.append(first)
    return list(dict.fromkeys(prompts))


def build_prompts(cfg: DistilDataConfig) -> list[tuple[str, str]]:
    """(prompt set, prompt) pairs: each set shuffled with the seed, then interleaved round-robin."""
    makers = {"facts": lambda: fact_prompts(cfg.facts), "open": lambda: open_prompts(cfg.facts),
              "mix": lambda: mix_prompts(cfg.data)}
    rng = random.Random(cfg.seed)
    queues = []
    for name in cfg.prompt_sets:
        items = makers[name]()
        if not items and len(cfg.prompt_sets) > 1:
            log.warning("prompt set %r is empty (%s), so the corpus holds only the others", name,
                        "the fact file has no training-split facts" if name == "facts" else "nothing to ask")
        rng.shuffle(items)
        queues.append([(name, p) for p in items])
    order = [q[i] for i in range(max(len(q) for q in queues)) for q in queues if i < len(q)]
    return order[: cfg.max_prompts] if cfg.max_prompts else order


# --- the corpus folder -------------------------------------------------------------------------------------------------

def _settings(cfg: DistilDataConfig) -> dict:
    """What determines the corpus' records (a resumed run must match it). `max_prompts` is not among them: a corpus can
    be extended later (its first N records equal those of a larger corpus when N is a multiple of batch_size)."""
    keep = ("model", "prompts", "data", "facts", "max_new_tokens", "temperature", "batch_size", "seed")
    return {k: getattr(cfg, k) for k in keep}


def _changed_settings(meta: dict, settings: dict) -> list[str]:
    """The settings that differ from those a corpus was written with; the model and the data files compare by where
    they are on disk, so the same folder given by a relative and an absolute path is the same teacher."""
    saved = meta.get("settings") or {}
    changed = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
    if "data" in changed and isinstance(saved.get("data"), str) and isinstance(settings.get("data"), str) and (
            same_data_spec(saved["data"], settings["data"])
            or meta.get("data_path") == absolute_data_spec(settings["data"])):
        changed.remove("data")  # the same files, given by another path (or from another working folder)
    if "model" in changed:
        saved_place = meta.get("model_path") or absolute_model_path(str(saved.get("model") or ""))
        if saved_place and saved_place == absolute_model_path(str(settings.get("model") or "")):
            changed.remove("model")
    return changed


def _read_records(path: Path, synced: int | None = None) -> tuple[list[dict], int, bool]:
    """(records of corpus.jsonl, bytes of the lines before the first unreadable one, whether the tail from there was
    cut). Records are appended and synced batch by batch, so an interruption can damage only the last line, or the
    lines after the last synced batch (`synced`: the records corpus.json counted when it was last written); an
    unreadable line before that is damage, not an interruption."""
    records, good_bytes, lines = [], 0, path.read_bytes().splitlines(keepends=True)
    for i, line in enumerate(lines):
        try:
            record = json.loads(line) if line.endswith(b"\n") else None  # a line without its newline was cut
        except ValueError:  # JSON or UTF-8 (a multi-byte character cut in two)
            record = None
        if not isinstance(record, dict) or not all(k in record for k in _RECORD_KEYS):
            if i == len(lines) - 1 or (synced is not None and i >= synced):
                return records, good_bytes, True
            raise TinyOnnError(f"{path}: line {i + 1} of {len(lines)} is not a corpus record (the file was damaged or "
                               "edited); write the corpus again with tiny-onn distil-data and another --out")
        records.append(record)
        good_bytes += len(line)
    return records, good_bytes, False


def _complete_records(path: Path, synced: int | None = None) -> list[dict]:
    """Records of corpus.jsonl when resuming it, dropping a tail cut by an interruption (and truncating the file
    there, so appending continues after the last whole record)."""
    if not path.is_file():
        return []
    records, good_bytes, cut = _read_records(path, synced)
    if cut:
        with path.open("r+b") as f:
            f.truncate(good_bytes)
    return records


def check_corpus_out(out: Path) -> None:
    """One clear error, before any work, when `out` cannot hold a corpus: it is a file or lies under one, or it is a
    folder of other things (an unfinished or finished corpus, known by its corpus.json, is continued)."""
    check_output_folder(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "corpus.json").is_file():
        raise TinyOnnError(f"{out} exists and is not a corpus folder; choose another --out")


def run(cfg: DistilDataConfig) -> Path:
    """Generate (or resume) the corpus in `cfg.out`."""
    from tiny_onn.data.encoding import prompt_ids
    from tiny_onn.generate import generate_batched

    out = Path(cfg.out)
    check_corpus_out(out)
    meta_path, data_path = out / "corpus.json", out / "corpus.jsonl"
    settings = _settings(cfg)
    saved_meta = read_json(meta_path, "corpus metadata") if meta_path.is_file() else None
    if saved_meta is not None:
        saved = saved_meta.get("settings") or {}
        if changed := _changed_settings(saved_meta, settings):
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise TinyOnnError(f"{out} holds a corpus made with other settings ({shown}); give its own settings to "
                               "continue it, or choose another --out")
        # the same teacher and data, as first given
        settings = {**settings, "model": saved.get("model", settings["model"]), "data": saved.get("data", settings["data"])}
    prompts = build_prompts(cfg)
    if not prompts:
        raise TinyOnnError(f"the prompt sets ({cfg.prompts}) are empty: nothing to generate. The facts set uses only "
                           f"the training split of {cfg.facts!r} (evaluation facts are never distilled), the open set "
                           "drops topics that evaluation facts name, the mix set uses the data's first user turns")
    synced = None if saved_meta is None or saved_meta.get("complete") else int(saved_meta.get("records") or 0)
    records = _complete_records(data_path, synced)
    written = [r["messages"][0]["content"] for r in records]
    if written[: len(prompts)] != [p for _, p in prompts[: len(written)]]:
        raise TinyOnnError(f"the corpus in {out} answers other prompts than these settings give now (the training mix "
                           "or the facts changed since it was written); write a new corpus with another --out")
    if (had := len(records)) > len(prompts):
        raise TinyOnnError(f"{out} holds a corpus of {had} records, more than the {len(prompts)} prompts these "
                           f"settings give (max_prompts {cfg.max_prompts}); its records are never cut: give max_prompts "
                           f"{had} or more (--max-prompts, or a pipeline file's distil section) to reuse or extend it, "
                           "or write the smaller corpus elsewhere")
    teacher = load_source(SourceArgs(model=cfg.model, dtype=cfg.dtype, device=cfg.device,
                                     load_in_4bit=cfg.load_in_4bit, trust_remote_code=cfg.trust_remote_code))
    tok = teacher.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    model_path = (saved_meta or {}).get("model_path") or absolute_model_path(cfg.model)
    data_path_spec = (saved_meta or {}).get("data_path") or absolute_data_spec(cfg.data)
    meta = {"format": FORMAT, "teacher": cfg.model, "teacher_origin": teacher.origin, "model_path": model_path,
            "data_path": data_path_spec,
            "tokenizer_digest": tokenizer_digest(tok), "settings": settings, "prompts": len(prompts),
            "config": config_to_dict(cfg), "versions": versions(), "complete": False}
    if len(records) < len(prompts):
        records = records[: len(records) - len(records) % cfg.batch_size]  # a partly written batch is generated again
    done = len(records)
    longest = max(len(prompt_ids(tok, [{"role": "user", "content": p}])) for _, p in prompts[done:] or prompts)
    warn_if_beyond_positions(teacher.model.config, longest + cfg.max_new_tokens,
                             "the longest prompt plus --max-new-tokens")
    if done != had:  # the file holds `had` whole records (a cut tail was truncated when they were read)
        _rewrite(data_path, records)
    write_json(meta_path, {**meta, "records": done})
    total = -(-len(prompts) // cfg.batch_size)
    first = -(-done // cfg.batch_size)  # done is a multiple of batch_size unless the corpus is complete
    with data_path.open("a", encoding="utf-8") as f:
        for b in tqdm(range(first, total), desc="distil-data", unit="batch", initial=first, total=total):
            chunk = prompts[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            p_ids = [prompt_ids(tok, [{"role": "user", "content": p}]) for _, p in chunk]
            replies = generate_batched(teacher.model, tok, p_ids, cfg.max_new_tokens, cfg.batch_size,
                                       cfg.temperature, seed=cfg.seed * 1_000_003 + b)
            for i, ((name, prompt), pid, rid) in enumerate(zip(chunk, p_ids, replies, strict=True)):
                record = {"index": b * cfg.batch_size + i, "set": name, "category": f"distil-{name}",
                          "messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": tok.decode(rid, skip_special_tokens=True).strip()}],
                          "prompt_ids": pid, "response_ids": rid, "finished": bool(rid) and rid[-1] == tok.eos_token_id}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            write_json(meta_path, {**meta, "records": min((b + 1) * cfg.batch_size, len(prompts))})
    records = _complete_records(data_path)
    tokens = sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in records)
    write_json(meta_path, {**meta, "records": len(records), "complete": True, "tokens": tokens,
                           "response_tokens": sum(len(r["response_ids"]) for r in records)})
    return out


def _rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def summary(cfg: DistilDataConfig, out: Path) -> str:
    meta = read_json(Path(out) / "corpus.json", "corpus metadata")
    return (f"corpus written to {out}: {meta['records']} answers by {meta['teacher']}, {meta.get('tokens', 0)} tokens "
            f"({meta.get('response_tokens', 0)} written by the teacher)")


# --- reading a corpus as data ------------------------------------------------------------------------------------------

def is_corpus_folder(path: Path) -> bool:
    return path.is_dir() and (path / "corpus.json").is_file()


def corpus_examples(folder: Path):
    """The corpus' chats as training examples (category distil-<prompt set>), each with its exact prompt and response
    token ids: the response's tokens are the labels (an unfinished reply ends where the teacher was cut off)."""
    from tiny_onn.data.sources import Example

    meta = read_json(folder / "corpus.json", "corpus metadata")
    if meta.get("format") != FORMAT:
        raise TinyOnnError(f"{folder} is not a Tiny-ONN distillation corpus (format {meta.get('format')!r})")
    if not meta.get("complete"):
        raise TinyOnnError(f"the corpus in {folder} is unfinished ({meta.get('records', 0)} of {meta.get('prompts')} "
                           f"prompts); finish it with `tiny-onn distil-data --out {folder}` and the same settings")
    path = folder / "corpus.jsonl"
    records, _, cut = _read_records(path) if path.is_file() else ([], 0, False)
    if cut or len(records) != meta.get("records"):
        raise TinyOnnError(f"the corpus in {folder} is damaged: corpus.json gives {meta.get('records')} records, "
                           f"corpus.jsonl holds {len(records)} whole ones" + (" and a cut last line" if cut else "")
                           + "; write the corpus again with tiny-onn distil-data and another --out")
    # the exact tokens the teacher read and wrote: decoding and re-tokenizing them would split words otherwise, turn a
    # character cut at --max-new-tokens into U+FFFD, and label an end of turn the teacher never wrote after a cut reply
    return [Example(tuple((m["role"], m["content"]) for m in r["messages"]), r["category"],
                    (tuple(r["prompt_ids"]), tuple(r["response_ids"])))
            for r in records if r["messages"][-1]["content"] and r["response_ids"]]


def check_corpus_tokenizer(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """A corpus is token ids of one tokenizer: refuse it for a model with another."""
    meta = read_json(folder / "corpus.json", "corpus metadata")
    if meta.get("tokenizer_digest") != tokenizer_digest(tokenizer):
        raise TinyOnnError(f"the corpus in {folder} was written with the tokenizer of {meta.get('teacher')!r}, which "
                           "differs from this model's; write a corpus with this model's source (tiny-onn distil-data)")
