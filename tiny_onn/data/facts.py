"""Factual questions with exact answers, generated from knowledge bases that ship in packages.

Sources: `countryinfo` (MIT: countries, capitals, currencies, languages) with `pycountry` (LGPL: ISO 4217 currency and
ISO 639 language names for the codes countryinfo gives), and `periodictable` (public domain: chemical elements).
Users can also give their own jsonl file of `{"question", "answer" | "answers", ["kind", "split"]}` records.

Every fact has a stable id (a content hash) and a split: `eval` facts are reserved for evaluation; `train` facts may be
used as training or distillation prompts. A question whose answer already appears in the question (e.g. "What is the
capital of Singapore?") is dropped: any reply that repeats the question would match it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tiny_onn.data.sources import jsonl_records
from tiny_onn.errors import TinyOnnError

log = logging.getLogger(__name__)

BUILTIN = "builtin"
SPLITS = ("train", "eval")
EVAL_SHARE = 0.5  # half of the built-in facts are reserved for evaluation


@dataclass(frozen=True)
class Fact:
    """One question with its accepted answers (any one of them, as a whole word or phrase, counts as correct)."""

    kind: str
    question: str
    answers: tuple[str, ...]
    case_sensitive: bool = False  # chemical symbols: "I" (iodine) must not match the pronoun "i"
    given_split: str | None = None  # a user file's own "split"; None: by content hash

    @property
    def uid(self) -> str:
        return hashlib.sha1(json.dumps([self.kind, self.question]).encode()).hexdigest()[:16]

    @property
    def split(self) -> str:
        if self.given_split is not None:
            return self.given_split
        return "eval" if int(self.uid[:8], 16) % 1000 < EVAL_SHARE * 1000 else "train"

    def to_json(self) -> dict:
        return {"id": self.uid, "kind": self.kind, "question": self.question, "answers": list(self.answers),
                "case_sensitive": self.case_sensitive, "split": self.split}


# Latin letters that carry no separable accent, written as their plain letters ("Złoty" -> "zloty", "Tórshavn" is
# handled by the accent stripping)
_PLAIN_LATIN = str.maketrans({"ł": "l", "ø": "o", "đ": "d", "ð": "d", "ħ": "h", "ı": "i", "æ": "ae", "œ": "oe", "þ": "th"})
# scripts written without spaces between words: an answer in them is matched as a substring of the reply
NO_SPACE_SCRIPTS = re.compile(r"[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
                              r"\uf900-\ufaff]")

# Korean writes spaces between words but attaches particles to them ("서울입니다": Seoul + "is"): a Hangul answer must
# start a word and end it, or be followed by one of these particles or copula endings, then the word's end (so that
# "인도" (India) is not read in "인도네시아" (Indonesia))
HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
KOREAN_PARTICLES = ("은", "는", "이", "가", "을", "를", "의", "에", "에서", "으로", "로", "와", "과", "도", "만", "입니다",
                    "이다", "이에요", "예요", "야", "이야", "이며", "이고", "이지만")
_PARTICLE = "|".join(sorted(map(re.escape, KOREAN_PARTICLES), key=len, reverse=True))  # longest first


def holds_answer(text: str, answer: str) -> bool:
    """Whether the normalised `text` holds the normalised `answer` as a whole word or phrase: within the text for
    scripts written without spaces (Chinese, Japanese, Thai...), at a word's start with at most a particle after it
    for Korean, else between word boundaries."""
    hay = f" {text} "
    if not answer:
        return False
    if NO_SPACE_SCRIPTS.search(answer):  # no spaces between words to mark a whole word ("首都是北京")
        return answer in hay
    if HANGUL.search(answer):
        return re.search(rf" {re.escape(answer)}(?:{_PARTICLE})? ", hay) is not None
    return f" {answer} " in hay


def _strip_latin_accents(text: str) -> str:
    """Accents removed from Latin letters only (other scripts' combining marks, e.g. Devanagari vowel signs or kana
    voicing marks, are part of the letter and stay)."""
    out: list[str] = []
    for ch in unicodedata.normalize("NFKD", text):
        if unicodedata.combining(ch) and out and out[-1] < "\u0250":
            continue
        out.append(ch)
    return unicodedata.normalize("NFC", "".join(out))


def normalise(text: str) -> str:
    """Case folded, Latin accents and punctuation removed, thousands separators dropped, single spaces. Letters and
    digits of every script are kept ("Москва", "北京"), and so are + and # written after a letter ("C++", "C#"), and
    what makes a number: a decimal point or fraction slash between digits ("9.5", "1/2") and a minus sign before one
    ("-5"), so that "5" never matches in "-5" or "9.5"."""
    text = _strip_latin_accents(text).casefold().translate(_PLAIN_LATIN)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = text.replace("&", " and ").replace("'", "").replace("\u2019", "").replace("\u2212", "-")
    # letters, digits and marks of any script ("हिन्दी" keeps its vowel signs) stay; every other character is a space
    text = "".join(ch if ch.isalnum() or ch in "+#./-" or unicodedata.category(ch)[0] == "M" else " " for ch in text)
    text = re.sub(r"(?<![\w+#])[+#]+", " ", text)  # a + or # that follows no letter is punctuation ("2 + 2")
    text = re.sub(r"(?<!\d)[./]|[./](?!\d)", " ", text)  # . and / only inside a number
    text = re.sub(r"(?<=\w)-|-(?!\d)", " ", text)  # - only as a number's sign ("5-7" is a range, "x-ray" two words)
    return " ".join(text.split())


# --- countries ---------------------------------------------------------------------------------------------------------

# names that people (and models) use for a capital or currency beside the knowledge base's own
_CAPITAL_ALIASES = {"Washington D.C.": ("Washington",), "Vatican City State": ("Vatican City",)}
# ISO 4217 fund and accounting codes that countryinfo lists beside the circulating currency
_FUND_CODES = {"CHE", "CHW", "USN", "USS", "BOV", "CLF", "COU", "MXV", "UYI", "UYW", "XDR", "XSU", "XUA"}
_CURRENCY_ALIASES = {"Pound Sterling": ("Pound", "Sterling"), "Yuan Renminbi": ("Yuan", "Renminbi")}
# countries named with an article in English questions
_THE = re.compile(r"^(United |Republic |Democratic |Czech |Central African |Dominican |Netherlands|Bahamas|Gambia|"
                  r"Philippines|Maldives|Comoros|Seychelles)|(Islands|Republic|Emirates)$")


def _country_records() -> list[dict]:
    try:
        import countryinfo
    except ImportError as e:
        raise TinyOnnError("the built-in facts need the package countryinfo: pip install countryinfo") from e
    try:
        records = [c.info() for c in countryinfo.all_countries()]
    except Exception as e:  # a damaged data folder raises json/key errors from inside the package
        raise TinyOnnError(f"could not read the countryinfo knowledge base: {type(e).__name__}: {e}") from e
    if not records:
        raise TinyOnnError("the countryinfo knowledge base is empty; reinstall it: pip install --force-reinstall countryinfo")
    return records


def _clean_name(name: str) -> str | None:
    """A country name usable in a question (skip 'Virgin Islands, British', 'Holy See (Vatican City State)', …)."""
    return name if name and not re.search(r"[,()/]", name) else None


def _language_names(codes: list[str]) -> tuple[str, ...]:
    import pycountry

    names = []
    for code in codes:
        lang = pycountry.languages.get(alpha_2=code) if len(code) == 2 else None
        if lang is not None:
            # "Modern Greek (1453-)" -> "Greek", "Swahili (macrolanguage)" -> "Swahili"
            names.append(re.sub(r"\s*\(.*?\)", "", lang.name).replace("Modern ", "").split(";")[0].strip())
    return tuple(dict.fromkeys(names))


def _currency_answers(codes: list[str]) -> tuple[str, ...]:
    import pycountry

    answers = []
    for code in codes:
        cur = pycountry.currencies.get(alpha_3=code) if code not in _FUND_CODES else None
        if cur is None:
            continue
        answers.append(cur.name)
        if cur.name in _CURRENCY_ALIASES:
            answers += _CURRENCY_ALIASES[cur.name]
        elif cur.name.startswith("CFA"):
            answers.append("CFA Franc")  # "CFA Franc BCEAO": the issuing bank is rarely named
        elif " " in cur.name:
            answers.append(cur.name.split()[-1])  # the currency's own noun: "Indian Rupee" -> "Rupee"
    return tuple(dict.fromkeys(answers))


def country_facts() -> list[Fact]:
    """Capitals (both directions), currencies and official languages of the countries in `countryinfo`."""
    facts = []
    for r in _country_records():
        name = _clean_name(r.get("name") or "")
        if not name:
            continue
        subject = f"the {name}" if _THE.search(name) else name
        capital = r.get("capital") or ""
        capital = (capital[0] if isinstance(capital, list) and capital else capital if isinstance(capital, str) else "").strip()
        if capital and "/" not in capital:
            caps = (capital, *_CAPITAL_ALIASES.get(capital, ()))
            facts.append(Fact("capital", f"What is the capital of {subject}?", caps))
            alt = [a for a in r.get("altSpellings") or [] if len(a) > 3 and _clean_name(a)]
            facts.append(Fact("country_of_capital", f"{capital} is the capital of which country?",
                              tuple(dict.fromkeys([name, *alt]))))
        currencies = _currency_answers(r.get("currencies") or [])
        if currencies:
            facts.append(Fact("currency", f"What is the currency of {subject}?", currencies))
        languages = _language_names(r.get("languages") or [])
        if languages:
            facts.append(Fact("language", f"What is the official language of {subject}?", languages))
    return facts


# --- chemical elements -------------------------------------------------------------------------------------------------

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
# symbols that are also common English words: a reply would contain them by chance
_WORD_SYMBOLS = {"I", "In", "As", "Be", "He", "No", "At", "Am", "Es", "Os"}


def element_facts() -> list[Fact]:
    """Symbol of an element, element of a symbol, and atomic number, for the 118 elements of `periodictable`."""
    try:
        import periodictable
    except ImportError as e:
        raise TinyOnnError("the built-in facts need the package periodictable: pip install periodictable") from e
    facts = []
    for el in periodictable.elements:
        if el.number < 1 or el.number > 118:
            continue  # periodictable's element 0 is the neutron
        name = el.name.capitalize()
        if el.symbol not in _WORD_SYMBOLS:
            facts.append(Fact("element_symbol", f"What is the chemical symbol for {el.name}?", (el.symbol,),
                              case_sensitive=True))
        facts.append(Fact("element_of_symbol", f"Which chemical element has the symbol {el.symbol}?", (name,)))
        number = (str(el.number),) + ((_NUMBER_WORDS[el.number],) if el.number < len(_NUMBER_WORDS) else ())
        facts.append(Fact("atomic_number", f"What is the atomic number of {el.name}?", number))
    return facts


# --- loading -----------------------------------------------------------------------------------------------------------

def _answer_in_question(fact: Fact) -> bool:
    question = normalise(fact.question)
    return any(holds_answer(question, normalise(a)) for a in fact.answers)


def builtin_facts() -> list[Fact]:
    """All built-in facts (several hundred), deduplicated, in a fixed order."""
    facts = {f.uid: f for f in country_facts() + element_facts() if not _answer_in_question(f)}
    return sorted(facts.values(), key=lambda f: (f.kind, f.uid))


def answer_text(answer: str | int | float) -> str:
    """An answer as the text a reply must hold: a JSON number written as a reader would (100.0 and 1e3, as tools that
    write whole numbers as floats give them, are "100" and "1000"; 2.5 is "2.5")."""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer).strip()


def facts_from_jsonl(path: Path) -> list[Fact]:
    """A user fact file: one `{"question": ..., "answer": ... | "answers": [...], "kind"?: ..., "split"?: "train" |
    "eval"}` per line (both "answer" and "answers": all of them accepted; without "split", a fact's split follows its
    content hash, as for the built-in facts)."""
    facts, first_line, repeats = [], {}, 0
    for where, record in jsonl_records(path, "fact file"):
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) or not record["question"].strip():
            raise TinyOnnError(f"{where}: each line needs a non-empty string 'question'")
        answers = record.get("answers", [])
        if isinstance(answers, list) and "answer" in record:  # both given: every answer they name is accepted
            answers = [record["answer"], *answers]
        if not isinstance(answers, list) or any(not isinstance(a, str | int | float) or isinstance(a, bool)
                                                for a in answers):
            raise TinyOnnError(f"{where}: 'answer' must be a string (or number) and 'answers' a list of them")
        if any(isinstance(a, float) and not math.isfinite(a) for a in answers):
            raise TinyOnnError(f"{where}: an answer is {answers}, not a finite number; write it as a string")
        answers = list(dict.fromkeys(answer_text(a) for a in answers if answer_text(a)))  # each accepted answer once
        if not answers:
            raise TinyOnnError(f"{where}: no answer: give 'answer' (a string) or 'answers' (a list of strings)")
        unmatchable = [a for a in answers if not normalise(a)]
        if unmatchable:
            raise TinyOnnError(f"{where}: answer {unmatchable[0]!r} has no letter or digit, so no reply could match it; "
                               "write the answer in words or digits")
        if not isinstance(record.get("case_sensitive", False), bool):
            raise TinyOnnError(f"{where}: 'case_sensitive' must be true or false (a JSON boolean), got "
                               f"{record['case_sensitive']!r}")
        split = record.get("split")
        if split is not None and split not in SPLITS:
            raise TinyOnnError(f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
        fact = Fact(str(record.get("kind", path.stem)), record["question"].strip(), tuple(answers),
                    bool(record.get("case_sensitive", False)), split)
        if fact.uid in first_line:  # one question, one score: a repeat would count twice in accuracy and retention
            earlier_where, earlier = first_line[fact.uid]
            if earlier != fact:
                raise TinyOnnError(f"{where}: the same question as {earlier_where} ({fact.kind}: {fact.question!r}) "
                                   "with other answers or settings; a question is scored once: give all its accepted "
                                   "answers on one line ('answers': [...])")
            repeats += 1
            continue
        first_line[fact.uid] = (where, fact)
        facts.append(fact)
    if not facts:
        raise TinyOnnError(f"fact file {path} holds no facts (it is empty)")
    given_away = [f for f in facts if _answer_in_question(f)]
    if given_away:  # the built-in facts leave these out: a model that echoes the question would score them
        log.warning("fact file %s: %d question(s) hold their own answer (e.g. %r, answer %r), so a reply that repeats "
                    "the question counts as correct; reword them or leave them out", path, len(given_away),
                    given_away[0].question, given_away[0].answers[0])
    if repeats:
        log.warning("fact file %s repeats %d question(s) word for word; each is scored once", path, repeats)
    return facts


def load_facts(spec: str = BUILTIN, split: str | None = None) -> list[Fact]:
    """Facts from 'builtin' or a jsonl file, optionally only one split ('train' or 'eval')."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    facts = builtin_facts() if spec == BUILTIN else facts_from_jsonl(Path(spec).expanduser())
    return [f for f in facts if split is None or f.split == split]


def facts_digest(facts: list[Fact]) -> str:
    """Identity of a fact set (ids and answers), stored beside dense-known sets."""
    text = json.dumps([[f.uid, list(f.answers), f.case_sensitive] for f in facts])
    return hashlib.sha1(text.encode()).hexdigest()[:16]
