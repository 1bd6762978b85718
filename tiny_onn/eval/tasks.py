"""Multiple-choice tasks scored by log-likelihood, read from local jsonl in the ARC, OpenBookQA, MMLU, HellaSwag,
C-Eval, PIQA, Social IQa, COPA, BoolQ and Winogrande formats (as their Hugging Face datasets write them).

Each item becomes (context, choices, gold). A choice's score is the summed log-probability of its tokens after the
context; `acc` takes the highest sum, `acc_norm` the highest sum per character of the choice (lm-eval's length norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tiny_onn.data.encoding import holds_special_token_text
from tiny_onn.data.sources import jsonl_records
from tiny_onn.errors import TinyOnnError

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    gold: int
    contexts: tuple[str, ...] | None = None  # one context per choice (Winogrande: the option fills the blank)

    def context_of(self, i: int) -> str:
        return self.contexts[i] if self.contexts is not None else self.context


def _texts(value: object, field: str) -> list[str]:
    """A list of choice texts (numbers are written as text); anything else is refused, not coerced."""
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, str | int | float) for v in value):
        raise ValueError(f"'{field}' must be a list of strings")
    if any(isinstance(v, float) and not math.isfinite(v) for v in value):
        raise ValueError(f"'{field}' holds {value}, not finite numbers; write choices as strings")
    return [str(v) for v in value]


def _question(r: dict) -> str:
    if not isinstance(r["question"], str) or not r["question"].strip():
        raise ValueError("'question' must be a non-empty string")
    return r["question"].strip()


def _index(value: object, field: str) -> int:
    """A 0-based index given as an integer or its digits; a bool or a fraction is refused, not rounded."""
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, str) and value.strip().isdigit()):
        raise ValueError(f"'{field}' must be a whole number, got {value!r}")
    return int(value)


def _arc(r: dict) -> MCItem:
    ch = r["choices"]
    if isinstance(ch, dict):
        texts, labels = _texts(ch.get("text"), "choices.text"), _texts(ch.get("label"), "choices.label")
        if len(texts) != len(labels) or len(set(labels)) != len(labels):
            raise ValueError("'choices.label' must give one distinct label per text of 'choices.text'")
    else:
        texts = _texts(ch, "choices")
        labels = list(LETTERS[: len(texts)])
    key = str(r["answerKey"]).strip()
    if key in labels:
        gold = labels.index(key)
    elif key.isdigit():
        gold = int(key) - 1  # a 1-based number, as some ARC items give it
    else:
        raise ValueError(f"answerKey {key!r} is not one of the labels {', '.join(labels)}")
    return MCItem(f"Question: {_question(r)}\nAnswer:", tuple(f" {t}" for t in texts), gold)


def _answer_index(answer: object, choices: list) -> int:
    """A gold answer given as an index (0-based), as a letter ("B") or as the text of one of the choices."""
    if isinstance(answer, str):
        text = answer.strip()
        matches = [i for i, c in enumerate(choices) if str(c).strip() == text]
        if len(text) == 1 and text.upper() in LETTERS:
            letter = LETTERS.index(text.upper())
            if not matches or matches == [letter]:
                return letter
            if letter >= len(choices) and len(matches) == 1:  # no such letter here: the answer is that choice's text
                return matches[0]
            raise ValueError(f"answer {answer!r} is both the letter of choice {letter} and the text of choice "
                             f"{matches[0]}: give the answer as the choice's index (a number) instead")
        if not text.lstrip("-").isdigit():
            if len(matches) != 1:
                raise ValueError(f"answer {answer!r} is neither an index, a letter nor exactly one of the choices")
            return matches[0]
        if matches and matches != [int(text)]:
            raise ValueError(f"answer {answer!r} is both an index and the text of choice {matches[0]}: give the index "
                             "as a number or the letter")
    return _index(answer, "answer")


def _mmlu(r: dict) -> MCItem:
    if len(_texts(r["choices"], "choices")) > len(LETTERS):
        raise ValueError(f"{len(r['choices'])} choices; lettered formats take at most {len(LETTERS)}")
    opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(r["choices"]))
    return MCItem(f"{_question(r)}{opts}\nAnswer:", tuple(f" {LETTERS[i]}" for i in range(len(r["choices"]))),
                  _answer_index(r["answer"], r["choices"]))


def _hellaswag(r: dict) -> MCItem:
    if not isinstance(r["ctx"], str) or not r["ctx"].strip():
        raise ValueError("'ctx' must be a non-empty string")
    return MCItem(r["ctx"], tuple(f" {e}" for e in _texts(r["endings"], "endings")), _index(r["label"], "label"))


def _ceval(r: dict) -> MCItem:
    letters = [c for c in "ABCD" if c in r]
    _texts([r[c] for c in letters], "A-D")
    if r["answer"] not in letters:
        raise ValueError(f"'answer' must be one of the option letters {', '.join(letters)}, got {r['answer']!r}")
    opts = "".join(f"\n{c}. {r[c]}" for c in letters)
    return MCItem(f"{_question(r)}{opts}\n答案：", tuple(f" {c}" for c in letters), letters.index(r["answer"]))


def _text(r: dict, field: str) -> str:
    if not isinstance(r[field], str) or not r[field].strip():
        raise ValueError(f"'{field}' must be a non-empty string")
    return r[field].strip()


def _openbookqa(r: dict) -> MCItem:
    return _arc({**r, "question": r["question_stem"]})


def _piqa(r: dict) -> MCItem:
    return MCItem(f"Question: {_text(r, 'goal')}\nAnswer:", (f" {_text(r, 'sol1')}", f" {_text(r, 'sol2')}"),
                  _index(r["label"], "label"))


def _siqa(r: dict) -> MCItem:
    answers = tuple(f" {_text(r, f'answer{c}')}" for c in "ABC")
    gold = _index(r["label"], "label") - 1  # 1-based, as the dataset gives it
    if gold < 0:
        raise ValueError(f"'label' is 1-based (1-3), got {r['label']!r}")
    return MCItem(f"{_text(r, 'context')}\nQuestion: {_text(r, 'question')}\nAnswer:", answers, gold)


def _copa(r: dict) -> MCItem:
    relation = {"cause": "because", "effect": "therefore"}.get(r["question"])
    if relation is None:
        raise ValueError(f"'question' must be 'cause' or 'effect', got {r['question']!r}")
    premise = _text(r, "premise").rstrip(".")
    choices = tuple(" " + _text(r, c)[:1].lower() + _text(r, c)[1:] for c in ("choice1", "choice2"))
    return MCItem(f"{premise} {relation}", choices, _index(r["label"], "label"))


def _boolq(r: dict) -> MCItem:
    if not isinstance(r["answer"], bool):
        raise ValueError(f"'answer' must be true or false, got {r['answer']!r}")
    question = _text(r, "question").rstrip("?")
    return MCItem(f"{_text(r, 'passage')}\nQuestion: {question}?\nAnswer:", (" no", " yes"), int(r["answer"]))


def _winogrande(r: dict) -> MCItem:
    """Partial scoring, as the paper and lm-eval do: each option fills the blank, and the choice scored is the rest
    of the sentence after it (the same text for both options)."""
    sentence = _text(r, "sentence")
    if sentence.count("_") != 1:
        raise ValueError(f"'sentence' must hold one blank '_', got {sentence.count('_')}")
    before, after = sentence.split("_")
    if not after.strip():
        raise ValueError("the blank '_' must be followed by the words the options are scored on")
    answer = str(r["answer"]).strip()
    if answer not in ("1", "2"):
        raise ValueError(f"'answer' must be 1 or 2 (the option), got {r['answer']!r}")
    contexts = tuple(before + _text(r, o) for o in ("option1", "option2"))
    rest = " " + after.strip()
    return MCItem(contexts[0], (rest, rest), int(answer) - 1, contexts)


# the first format whose keys a record has is its format: the more specific key sets come first
FORMATS = {
    "openbookqa": (("question_stem", "choices", "answerKey"), _openbookqa),
    "arc": (("question", "choices", "answerKey"), _arc),
    "mmlu": (("question", "choices", "answer"), _mmlu),
    "hellaswag": (("ctx", "endings", "label"), _hellaswag),
    "ceval": (("question", "A", "B", "answer"), _ceval),
    "piqa": (("goal", "sol1", "sol2", "label"), _piqa),
    "siqa": (("context", "question", "answerA", "answerB", "answerC", "label"), _siqa),
    "copa": (("premise", "choice1", "choice2", "question", "label"), _copa),
    "boolq": (("passage", "question", "answer"), _boolq),
    "winogrande": (("sentence", "option1", "option2", "answer"), _winogrande),
}


def detect_format(record: dict) -> str:
    for name, (keys, _) in FORMATS.items():
        if all(k in record for k in keys):
            return name
    raise TinyOnnError(
        "unknown multiple-choice format (keys: " + ", ".join(sorted(record)) + "); expected ARC (question, choices, "
        "answerKey), OpenBookQA (question_stem, choices, answerKey), MMLU (question, choices, answer), HellaSwag (ctx, "
        "endings, label), C-Eval (question, A-D, answer), PIQA (goal, sol1, sol2, label), Social IQa (context, "
        "question, answerA-C, label), COPA (premise, choice1, choice2, question, label), BoolQ (passage, question, "
        "answer) or Winogrande (sentence, option1, option2, answer)"
    )


def load_mc(path: str | Path) -> tuple[str, list[MCItem]]:
    """(format name, items) of a local jsonl file."""
    path = Path(path)
    items, fmt = [], None
    for where, record in jsonl_records(path, "task file"):
        if not isinstance(record, dict):
            raise TinyOnnError(f"{where}: each line must be one JSON object (a multiple-choice item), got a "
                               f"{type(record).__name__}")
        try:
            fmt = fmt or detect_format(record)
            item = FORMATS[fmt][1](record)
            if len(item.choices) < 2:
                raise ValueError(f"{len(item.choices)} choice(s); an item needs at least 2")
            empty = [i + 1 for i, c in enumerate(item.choices) if not c.strip()]
            if empty:  # no tokens: a log-likelihood of 0 that beats every real choice
                raise ValueError(f"choice {', '.join(map(str, empty))} is empty; every choice needs text to score")
            if not 0 <= item.gold < len(item.choices):
                raise ValueError(f"the gold answer points outside its {len(item.choices)} choices")
            items.append(item)
        except KeyError as e:
            raise TinyOnnError(f"{where}: not a valid {fmt} item (no field {e})") from e
        except (ValueError, IndexError, TypeError, AttributeError) as e:
            raise TinyOnnError(f"{where}: not a valid {fmt or 'multiple-choice'} item ({e})") from e
    if not items:
        raise TinyOnnError(f"task file {path} holds no items")
    return fmt, items


def choice_sequences(tokenizer, item: MCItem) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Each choice's scored sequence (its context, then the choice) and the span [start, end) of the choice's tokens."""
    seqs, spans = [], []
    for i, choice in enumerate(item.choices):
        context = item.context_of(i)
        # the items are plain text: the text of a special token in them (a question about "<|im_end|>") stays text
        literal = holds_special_token_text(tokenizer, context + choice)

        def ids(text: str, literal: bool = literal) -> list[int]:
            return tokenizer(text, add_special_tokens=False, split_special_tokens=literal)["input_ids"]

        ctx, full = ids(context), ids(context + choice)
        start = len(ctx) if full[: len(ctx)] == ctx else len(ids(context.rstrip()))
        seqs.append(full)
        spans.append((max(start, 1), len(full)))
    return seqs, spans


@torch.no_grad()
def choice_logliks(model, tokenizer, item: MCItem) -> list[float]:
    """Summed log-probability of each choice's tokens after the context."""
    device = next(model.parameters()).device
    seqs, spans = choice_sequences(tokenizer, item)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), dim=-1)
    out = []
    for i, (a, b) in enumerate(spans):
        targets = ids[i, a:b]
        out.append(float(logp[i, a - 1 : b - 1].gather(-1, targets[:, None]).sum()))
    return out


def is_gold(item: MCItem, picked: int) -> bool:
    """Whether the picked choice is the gold answer: by its text, so that an item listing the gold text twice (some
    benchmark files do) scores a pick of either copy, which score the same, as right."""
    def text(i: int) -> tuple[str, str]:
        return item.context_of(i).strip(), item.choices[i].strip()

    return text(picked) == text(item.gold)


def longest_mc_sequence(tokenizer, items: list[MCItem]) -> int:
    """Tokens in the longest scored sequence of the items (context + choice: what one scoring forward reads)."""
    return max(len(seq) for item in items for seq in choice_sequences(tokenizer, item)[0])


def score_mc(model, tokenizer, items: list[MCItem]) -> dict:
    """acc and acc_norm over the items."""
    correct = correct_norm = 0
    for item in items:
        ll = choice_logliks(model, tokenizer, item)
        norm = [v / max(len(c), 1) for v, c in zip(ll, item.choices, strict=True)]
        correct += int(is_gold(item, max(range(len(ll)), key=ll.__getitem__)))
        correct_norm += int(is_gold(item, max(range(len(norm)), key=norm.__getitem__)))
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "n": len(items)}
