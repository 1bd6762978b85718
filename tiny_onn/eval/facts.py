"""Fact benchmark: greedy answers to fact questions, strict matching, accuracy and *retention*.

A reply is correct when one of the fact's answers appears as a whole word or phrase in the reply's first sentence
(after lower-casing and removing accents and punctuation; chemical symbols are matched case-sensitively). So "au" in
"because" and "7" in "17" are not hits, while "Paris.", "It is Paris" and "The capital of France is Paris" are.

Retention = accuracy on the facts the dense source answers correctly ("dense-known facts"). The dense-known set is
computed once per source (identified by a digest of its weights) and generation settings, and stored under the cache
folder (`$TINY_ONN_CACHE/facts/`), so every later model carved from that source is scored against the same set.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from tiny_onn.artifacts import read_json, write_json
from tiny_onn.data.encoding import prompt_ids
from tiny_onn.data.facts import Fact, holds_answer, normalise
from tiny_onn.generate import generate_batched

# a sentence ends at . ! or ? followed by a space or the end, unless the period closes an initial ("D.C.", "J. K.") or
# a common abbreviation ("St. George's"); decimals ("3.14") never end one (no space after the period)
_SENTENCE_END = re.compile(r"(?<!\b[A-Z])(?<!\bSt)(?<!\bMt)(?<!\bDr)(?<!\bMr)(?<!\bMs)(?<!\bvs)[.!?](?=\s|$)|[。！？]")


def first_sentence(reply: str) -> str:
    """The reply's first sentence (on its first non-empty line)."""
    line = reply.strip().split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    return line[: end.end()] if end else line


def answer_matches(reply: str, fact: Fact) -> bool:
    """Does one of the fact's answers appear as a whole word/phrase in the reply's first sentence?"""
    sentence = first_sentence(reply)
    if fact.case_sensitive:
        return any(re.search(rf"(?<![\w+#]){re.escape(a)}(?![\w+#])", sentence) for a in fact.answers)
    hay = normalise(sentence)
    return any(holds_answer(hay, normalise(answer)) for answer in fact.answers)


def fact_key(fact: Fact) -> str:
    """Identity of a fact including its answers (a changed answer list is a different fact for the stored sets)."""
    return hashlib.sha1(json.dumps([fact.kind, fact.question, list(fact.answers), fact.case_sensitive]).encode()
                        ).hexdigest()[:16]


def answer_facts(model, tokenizer, facts: list[Fact], max_new_tokens: int = 32, batch_size: int = 16,
                 desc: str | None = "facts") -> list[dict]:
    """Greedy replies to each fact's question (chat template, batched, KV cache) and whether each is correct."""
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": f.question}]) for f in facts]
    # batch prompts of similar length together (less padding), then restore the facts' order
    order = sorted(range(len(facts)), key=lambda i: (len(prompts[i]), i))
    generated = generate_batched(model, tokenizer, [prompts[i] for i in order], max_new_tokens, batch_size, desc=desc)
    replies = [""] * len(facts)
    for i, ids in zip(order, generated, strict=True):
        replies[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return [{"id": f.uid, "key": fact_key(f), "kind": f.kind, "question": f.question, "reply": r,
             "correct": answer_matches(r, f)} for f, r in zip(facts, replies, strict=True)]


# --- dense-known sets ----------------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt"})
ANSWER_SHAPING_FILES = frozenset({"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                  "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt"})


def source_identity(spec: str) -> str:
    """A digest naming a dense source by its weights: the same file or folder gives the same identity on any path."""
    from tiny_onn.sources.loading import _resolve

    target, _ = _resolve(spec)
    folder = Path(target)
    if not folder.is_dir():
        return hashlib.sha1(f"hub:{target}".encode()).hexdigest()[:16]  # a hub id: its name is all we have
    h = hashlib.sha1()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES]
    # the weights in any format, and what shapes the answers besides them (the config, the tokenizer, the chat
    # template); a folder with no weight file we know is hashed whole
    for path in (weights + [p for p in files if p.name in ANSWER_SHAPING_FILES]) if weights else files:
        if path.is_file():
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def known_store_path(identity: str, max_new_tokens: int) -> Path:
    from tiny_onn.sources.loading import cache_root

    # m2: the matcher of commit "facts: Unicode" (letters of every script, C++/C#); sets stored by the earlier one differ
    return cache_root() / "facts" / f"known-{identity}-greedy{max_new_tokens}-m3.json"


class KnownFacts:
    """The stored dense-known results of one source: fact key -> answered correctly by the dense source."""

    def __init__(self, spec: str, max_new_tokens: int = 32):
        self.spec = spec
        self.identity = source_identity(spec)
        self.path = known_store_path(self.identity, max_new_tokens)
        self.results: dict[str, bool] = {}
        if self.path.is_file():
            self.results = read_json(self.path, "stored dense-known facts")["results"]

    def missing(self, facts: list[Fact]) -> list[Fact]:
        return [f for f in facts if fact_key(f) not in self.results]

    def add(self, answers: list[dict]) -> None:
        """Record the dense source's own answers and store the set (atomically)."""
        self.results.update({a["key"]: bool(a["correct"]) for a in answers})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"source": self.spec, "identity": self.identity, "results": self.results})

    def known(self, facts: list[Fact]) -> set[str]:
        """Keys of the facts (among `facts`) the dense source answers correctly."""
        return {fact_key(f) for f in facts if self.results.get(fact_key(f))}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for z = 1.96): how far a retention of k of n known
    facts could move by the luck of which facts were drawn. Defined at k = 0 and k = n, unlike the normal interval."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def facts_scores(answers: list[dict], known: set[str] | None) -> dict:
    """Accuracy (all facts), per kind, and retention (accuracy on the dense-known facts)."""
    n = len(answers)
    out: dict = {"accuracy": sum(a["correct"] for a in answers) / n if n else float("nan"), "n": n}
    kinds = sorted({a["kind"] for a in answers})
    out["by_kind"] = {k: sum(a["correct"] for a in answers if a["kind"] == k) / sum(a["kind"] == k for a in answers)
                      for k in kinds}
    if known is not None:
        kept = [a for a in answers if a["key"] in known]
        out["known"] = len(kept)
        out["retained"] = sum(a["correct"] for a in kept)
        # undefined (None) when the dense source knows none of these facts
        out["retention"] = out["retained"] / len(kept) if kept else None
        out["retention_ci95"] = list(wilson_interval(out["retained"], len(kept))) if kept else None
    return out
