"""Chat-template encoding with response-only labels, and packing into fixed-length sequences."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from tiny_onn.data.sources import Example
from tiny_onn.errors import TinyOnnError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# used only when a tokenizer has no chat template of its own (e.g. tiny test tokenizers)
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _render(tokenizer: PreTrainedTokenizerBase, chat: list[dict], generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    template = None if tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )
    except TemplateError as e:  # templates that raise on turns they do not take (Mistral's, Llama 2's, Gemma's)
        roles = ", ".join(m["role"] for m in chat)
        first = chat[0]["content"][:40] if chat else ""
        raise TinyOnnError(f"the model's chat template refuses a conversation of the data (turns: {roles}; it begins "
                           f"{first!r}): {e}. Give data whose turns this template takes (e.g. no system turn, user and "
                           "assistant alternating)") from e


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# private-use characters: no chat template or real text produces them, so they mark a position in a rendering
_MARK = "\ue000tiny-onn\ue001"


def _with_marker(chat: list[dict], i: int, before: bool = False) -> list[dict]:
    """`chat` with the marker appended to message i's content (`before`: put in front of it)."""
    return [{**m, "content": _MARK + m["content"] if before else m["content"] + _MARK} if j == i else m
            for j, m in enumerate(chat)]


def _first_turn_start(tokenizer: PreTrainedTokenizerBase, chat: list[dict], full: str) -> int:
    """Where the content of an opening assistant turn starts in the rendering `full`: a marker put in front of the
    content says where, unless the template drops it (Qwen3's and R1-style templates keep only what follows a reasoning
    block's `</think>`); then a marker given as the turn's whole content does."""
    for marked_chat in (_with_marker(chat, 0, before=True), [{**chat[0], "content": _MARK}, *chat[1:]]):
        marked = _render(tokenizer, marked_chat)
        if _MARK in marked:
            return min(marked.index(_MARK), _common_prefix_len(marked, full))
    return 0  # a template that drops every content of the turn: nothing of it is learnt but its end of turn


def assistant_spans(tokenizer: PreTrainedTokenizerBase, chat: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn marker included).

    Every turn is located inside the full rendering itself, not by rendering the conversation cut after that turn:
    templates render a turn differently when it is the last one (Qwen3 adds an empty `<think></think>` block to the
    assistant turns after the last user message), so the cut rendering need not be a prefix of the full one. For turn i:
    it starts where the rendering of the turns before it plus the generation prompt ends (a first turn, with no turns
    before it: where its content starts, so that nothing the template writes before it — a default system prompt, the
    turn's header — is learnt); its content ends where the full rendering and the one with a marker appended to that
    content part; its end-of-turn text is what the template writes after the content when the turn is the last one, as
    far as the full rendering agrees with it.
    """
    full = _render(tokenizer, chat)
    spans = []
    for i, m in enumerate(chat):
        if m["role"] != "assistant":
            continue
        if i:
            before = _render(tokenizer, chat[:i], generation_prompt=True)
            # templates that rewrite earlier turns (e.g. dropping reasoning) are not prefix-stable: the common prefix then
            start = len(before) if full.startswith(before) else _common_prefix_len(before, full)
        else:
            start = _first_turn_start(tokenizer, chat, full)
        content_end = _common_prefix_len(_render(tokenizer, _with_marker(chat, i)), full)
        cut = _render(tokenizer, _with_marker(chat[: i + 1], i))
        end_of_turn = cut[cut.index(_MARK) + len(_MARK):] if _MARK in cut else ""
        end = content_end + _common_prefix_len(end_of_turn, full[content_end:])
        if end > start:
            spans.append((start, end))
    return full, spans


def special_token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text forms of the tokenizer's special tokens (e.g. "<|im_end|>"), which it reads out of a text as single
    control tokens."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content]


def holds_special_token_text(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    return any(special in text for special in special_token_texts(tokenizer))


# a private-use placeholder for the n-th special-token text inside a message, while the chat is rendered: no template
# trims, strips or rewrites it, so its position in the rendering says where that text lands
_PLACEHOLDER = re.compile("\ue002(\\d+)\ue003")


def _literal_spans(tokenizer: PreTrainedTokenizerBase, chat: list[dict], full: str,
                   generation_prompt: bool) -> list[tuple[int, int]]:
    """Character spans, in the rendering `full` of `chat`, of the special-token texts the messages hold (found
    however the template rewrites the content around them: trims it, adds to it, drops earlier reasoning). Empty
    when the template changes those texts themselves, so that they cannot be told from its own markers."""
    specials = sorted(special_token_texts(tokenizer), key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, specials)))
    texts: list[str] = []

    def mark(match: re.Match) -> str:
        texts.append(match.group(0))
        return f"\ue002{len(texts) - 1}\ue003"

    marked = [{**m, "content": pattern.sub(mark, m["content"])} for m in chat]
    rendered = _render(tokenizer, marked, generation_prompt=generation_prompt)
    spans, parts, length, pos = [], [], 0, 0
    for match in _PLACEHOLDER.finditer(rendered):
        before = rendered[pos:match.start()]
        text = texts[int(match.group(1))]
        parts += [before, text]
        spans.append((length + len(before), length + len(before) + len(text)))
        length += len(before) + len(text)
        pos = match.end()
    parts.append(rendered[pos:])
    if "".join(parts) != full:
        log.warning("the chat template rewrites the special-token text of a message (%r), so it is read as control "
                    "tokens", texts[0] if texts else "")
        return []
    return spans


def _encode_piece(tokenizer: PreTrainedTokenizerBase, text: str, first: bool, literal: bool, offsets: bool):
    """One piece of a rendering: its ids and offsets. A piece after the first is encoded behind a newline that is then
    dropped, so that tokenizers which mark the start of a text (SentencePiece's "▁" before the first word) read it
    as the continuation it is; where the newline's ids do not come first, the piece is encoded alone."""
    kwargs = dict(add_special_tokens=False, return_offsets_mapping=offsets, split_special_tokens=literal)
    if not first:
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        enc = tokenizer("\n" + text, **kwargs)
        if newline and enc["input_ids"][: len(newline)] == newline:
            ids = enc["input_ids"][len(newline):]
            spans = [(a - 1, b - 1) for a, b in enc["offset_mapping"][len(newline):]] if offsets else []
            return ids, spans
    enc = tokenizer(text, **kwargs)
    return enc["input_ids"], list(enc["offset_mapping"]) if offsets else []


def tokenize_rendered(
    tokenizer: PreTrainedTokenizerBase, chat: list[dict], full: str, offsets: bool = True,
    generation_prompt: bool = False,
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and (`offsets`; else an empty list) character offsets of a conversation's rendering `full`
    (`generation_prompt`: whether `full` ends with the assistant's generation prompt). The template's own markers
    become their control tokens; the text of a special token inside a message (a chat quoting "<|im_end|>", code that
    prints "<|endoftext|>") stays text, as the data wrote it, instead of ending a turn or a document mid-message. A
    conversation without such text is one call of the tokenizer, as before."""
    if not any(holds_special_token_text(tokenizer, m["content"]) for m in chat):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=offsets)
        return enc["input_ids"], list(enc["offset_mapping"]) if offsets else []
    pieces, pos = [], 0
    for start, end in _literal_spans(tokenizer, chat, full, generation_prompt):
        pieces += [(pos, start, False), (start, end, True)]
        pos = end
    pieces.append((pos, len(full), False))
    ids: list[int] = []
    spans_out: list[tuple[int, int]] = []
    for start, end, literal in pieces:
        if end <= start:
            continue
        piece_ids, piece_spans = _encode_piece(tokenizer, full[start:end], not ids, literal, offsets)
        ids += piece_ids
        spans_out += [(a + start, b + start) for a, b in piece_spans]
    return ids, spans_out


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the chat template writes after an assistant reply's text (SmolLM2's "<|im_end|>\n": the end-of-turn
    token generation stops at, then what follows it), computed once per tokenizer."""
    cached = getattr(tokenizer, "_tiny_onn_end_of_turn", None)
    if cached is None:
        rendered = _render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}])
        tail = rendered[rendered.index(_MARK) + len(_MARK):] if _MARK in rendered else ""
        cached = list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []
        tokenizer._tiny_onn_end_of_turn = cached
    return cached


def encode_plain_text(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """A plain document's token ids and labels, no chat template: the special tokens the tokenizer itself adds to a
    text (a beginning-of-sequence token for Llama-style tokenizers, none for SmolLM2's or Qwen's), then the document,
    then the end-of-sequence token (so that packed documents are separated as in pretraining). Every token is a label
    but a leading BOS, which nothing predicts. The text of a special token inside the document stays text."""
    literal = holds_special_token_text(tokenizer, text)
    ids = list(tokenizer(text, add_special_tokens=True, split_special_tokens=literal)["input_ids"])
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    labels = list(ids)
    if ids and bos is not None and ids[0] == bos and bos != eos:
        labels[0] = IGNORE_INDEX
    return ids, labels


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and labels that keep only assistant tokens (others = IGNORE_INDEX);
    a plain document: its tokens, every one a label; an example with its `token_ids`: those, the response labelled."""
    if example.token_ids is not None:  # the exact tokens, e.g. a teacher's sampled reply: no re-tokenization
        prompt, response = example.token_ids
        end = end_of_turn_ids(tokenizer)
        if end and response and response[-1] == end[0]:  # a finished reply ends its turn as the template ends one
            response = (*response, *end[1:])
        return [*prompt, *response], [IGNORE_INDEX] * len(prompt) + list(response)
    if example.is_plain_text:
        return encode_plain_text(tokenizer, example.messages[0][1])
    text, spans = assistant_spans(tokenizer, example.chat)
    ids, offsets = tokenize_rendered(tokenizer, example.chat, text)
    labels = [
        tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, offsets, strict=True)
    ]
    return ids, labels


@dataclass
class PackedData:
    """Fixed-length sequences with response-only labels and a category id per token (-1 on padding)."""

    input_ids: torch.Tensor  # [S, T]
    labels: torch.Tensor  # [S, T], IGNORE_INDEX outside assistant turns
    attention_mask: torch.Tensor  # [S, T]
    category: torch.Tensor  # [S, T], index into category_names, -1 on padding
    category_names: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1):
        """Yield dict batches; batch b goes to rank b % world_size, so ranks together see every sequence once."""
        for b, start in enumerate(range(0, len(self), batch_size)):
            if b % world_size == rank:
                sl = slice(start, start + batch_size)
                yield {
                    "input_ids": self.input_ids[sl],
                    "labels": self.labels[sl],
                    "attention_mask": self.attention_mask[sl],
                    "category": self.category[sl],
                }


def pack_examples(
    encoded: Sequence[tuple[list[int], list[int], int]], seq_len: int, pad_id: int, category_names: list[str]
) -> PackedData:
    """Concatenate (ids, labels, category) examples and cut the stream into `seq_len` rows; the last row is padded."""
    if seq_len < 2:
        raise TinyOnnError(f"seq_len must be at least 2, got {seq_len}")
    if not encoded:
        raise TinyOnnError("no examples to pack: the data selection is empty")
    ids = [t for e in encoded for t in e[0]]
    labels = [t for e in encoded for t in e[1]]
    cats = [e[2] for e in encoded for _ in e[0]]
    pad = (-len(ids)) % seq_len
    mask = [1] * len(ids) + [0] * pad
    ids += [pad_id] * pad
    labels += [IGNORE_INDEX] * pad
    cats += [-1] * pad

    def rows(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long).view(-1, seq_len)  # [S, T]

    return PackedData(rows(ids), rows(labels), rows(mask), rows(cats), list(category_names))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, chat: list[dict]) -> list[int]:
    """Token ids of a conversation rendered with the chat template and the assistant's generation prompt (the input a
    chat model answers)."""
    full = _render(tokenizer, chat, generation_prompt=True)
    return tokenize_rendered(tokenizer, chat, full, offsets=False, generation_prompt=True)[0]
