"""Judge-free, deterministic scoring of free-form model outputs against benchmark answers.

`score(sample, prediction)` dispatches on `sample.answer_type`:

* ``choice``  - extract one option letter (`extract_choice`), compare with the gold letter.
* ``number``  - extract one number (`extract_number`), compare with tolerances (`numbers_match`).
* ``yesno``   - extract yes / no (`extract_yesno`).
* ``text``    - normalised exact match (`normalize_text`) of the extracted answer span.

Shared extraction rules (all extractors):

1. Reasoning is dropped: if the output contains ``</think>``, only the text after the last one is read
   (unless that is empty). Markdown bold ``**`` / ``__`` and backticks are removed.
2. *Explicit* answers are ``\\boxed{...}`` (nested braces allowed) and answer markers ("answer is",
   "Answer:", "final answer", "correct option is", "I choose", "Therefore,", ...). When there are
   several, the one that appears LAST in the text wins; an explicit answer beats every other rule.
3. Without an explicit answer each type falls back to weaker, documented rules (see each extractor).
4. Anything ambiguous ("A or B", "yes and no") extracts nothing (`None`), which scores as wrong.

The `method` field of `ScoreResult` names the rule that produced the extraction, so sweeps can report how
often the answer was found at all (`aggregate` adds an extraction rate).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

__all__ = [
    "ScoreResult",
    "Extraction",
    "score",
    "aggregate",
    "extract_boxed",
    "extract_all_boxed",
    "extract_choice",
    "extract_number",
    "extract_yesno",
    "extract_text",
    "parse_number",
    "numbers_match",
    "normalize_text",
    "strip_reasoning",
]


@dataclass(frozen=True)
class ScoreResult:
    """Outcome of scoring one prediction: correctness, the extracted answer and the rule that found it."""

    correct: bool
    extracted: str | None
    method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Extraction(NamedTuple):
    """An extracted answer (canonical string or None) and the rule that produced it."""

    value: str | None
    method: str


# --------------------------------------------------------------------------------------------- helpers


def strip_reasoning(text: str) -> str:
    """Keep the text after the last ``</think>`` (if non-empty); drop markdown bold and backticks."""
    text = "" if text is None else str(text)
    text = unicodedata.normalize("NFKC", text)
    if "</think>" in text:
        tail = text.rsplit("</think>", 1)[1]
        if tail.strip():
            text = tail
    text = text.replace("<think>", " ")
    return text.replace("**", "").replace("__", "").replace("`", "").strip()


def extract_all_boxed(text: str) -> list[tuple[int, str]]:
    """All ``\\boxed{...}`` / ``\\fbox{...}`` contents as (position, content), nested braces handled.

    An unclosed box (truncated output) is ignored.
    """
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            out.append((m.start(), text[m.end() : i - 1].strip()))
    return out


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in `text`, or None."""
    boxes = extract_all_boxed(text)
    return _unlatex(boxes[-1][1]) if boxes else None


def _unlatex(s: str) -> str:
    """Unwrap ``\\text{..}``-like commands and ``$`` so box contents read as plain text."""
    prev = None
    while prev != s:
        prev = s
        s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    return s.replace("$", "").strip()


# Answer markers: what precedes an explicit answer. The letter/number/word that follows is parsed per type.
_MARKER = re.compile(
    r"\b(?:(?:final|correct|right|best|the|my|short)\s+)*(?:answer|option|choice)s?"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be|=))+\s*:?"
    r"|\b(?:final\s+)?answer\s*[:：=]"
    r"|答案\s*[:：]?\s*(?:是|为)?"
    r"|\bI\s+(?:would\s+|will\s+)?(?:choose|select|pick|go\s+with)\b"
    r"|\b(?:therefore|thus|hence|so)\b\s*,?",
    re.IGNORECASE,
)
_WEAK_MARKERS = ("therefore", "thus", "hence", "so")  # need a strictly delimited answer after them


def _markers(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every answer marker in text order; kind is "answer" ("the answer is", "Answer:",
    "I choose"), "option" ("the correct option is": a letter must follow) or "weak" ("therefore", "so")."""
    out = []
    for m in _MARKER.finditer(text):
        word = m.group(0).strip(" ,").lower()
        if word in _WEAK_MARKERS:
            kind = "weak"
        elif "answer" in word or "答案" in word or word.startswith("i "):
            kind = "answer"
        else:
            kind = "option"
        out.append((m.start(), m.end(), kind))
    return out


def _segment(text: str, start: int) -> str:
    """The answer span after a marker: up to the end of the line / sentence."""
    rest = text[start:].lstrip(" \t:：")
    line = rest.split("\n", 1)[0]
    m = re.search(r"(?<!\d)[.!?](?!\d)(?:\s|$)", line[1:])  # a sentence end not inside a number
    return line[: m.start() + 1] if m else line


# --------------------------------------------------------------------------------------------- choice

_LETTER_TOKEN = re.compile(
    r"(?<![A-Za-z0-9_\\'’])"  # not inside a word, number or LaTeX command
    r"(?P<open>[(\[{]\s*)?(?P<l>[A-Za-z])(?P<close>\s*[)\]}])?"
    r"(?!\.[A-Za-z])"  # not an abbreviation like "e.g." / "U.S."
    r"(?![A-Za-z0-9_'’])"
)
_ARTICLE_FOLLOW = re.compile(r"[ \t]+(?!(?:or|and)\b)[a-z]")  # "A dog", "I think", "a cat": an article / pronoun, not a letter
_STRICT_FOLLOW = re.compile(
    r"\s*(?:$|[.,;:!?)\]]|\n)|\s+[A-Z(]|(?i:\s+is\s+(?:the\s+)?(?:correct|right|answer|best)\b)"
)
_OPTION_WORD = re.compile(r"\s*(?:(?:the\s+)?(?:options?|choices?)\s*)?", re.IGNORECASE)
_ALT_FOLLOW = re.compile(r"\s*(?:,|/|\bor\b|\band\b|&)\s*(?:options?\s+|choices?\s+)?[(\[]?\s*([A-Za-z])(?![A-Za-z0-9])")
# "B C", "(B) (C)": a second stand-alone capital letter right after the first, then punctuation or the end
_SPACE_ALT = re.compile(r"[ \t]+[(\[]?([A-Z])[)\]]?(?![A-Za-z0-9])(?=\s*(?:$|[.,;:!?]))")
# "(A) is wrong", "A isn't correct", "B can be ruled out": the letter is explicitly rejected
_NEGATED_AFTER = re.compile(
    r"\s*(?:(?:is|are|was|seems|looks)\s+(?:also\s+|clearly\s+|definitely\s+|obviously\s+)?"
    r"(?:wrong|incorrect|false|impossible|not\s+(?:correct|right|true|it|the\s+(?:correct\s+|right\s+)?answer))"
    r"|isn[’']t\b|(?:can|could|should)\s+be\s+(?:ruled\s+out|eliminated|excluded))",
    re.IGNORECASE,
)
_QUOTED_LETTER = re.compile(r"(?<![A-Za-z0-9])[\"'“‘«]([A-Za-z])[\"'”’»](?![A-Za-z0-9])")


def _letter_at(text: str, pos: int, letters: str, *, strict: bool) -> tuple[str | None, int, bool]:
    """Parse an option-letter token at `pos` (after optional "option"/"choice").

    Returns (letter or None, end position, ambiguous). `strict` demands punctuation, a bracket or the end of the
    text right after a bare letter (used after weak markers and at the start of a response).
    """
    pos = _OPTION_WORD.match(text, pos).end()
    m = _LETTER_TOKEN.match(text, pos)
    if not m:
        return None, pos, False
    raw = m.group("l")
    letter = raw.upper()
    if letter not in letters:
        return None, pos, False
    bracketed = bool(m.group("open") or m.group("close"))
    after = text[m.end() :]
    if _NEGATED_AFTER.match(after):
        return None, pos, False  # "(A) is wrong, (B) is right": A is not the answer
    alt = _ALT_FOLLOW.match(after)
    if alt and alt.group(1).upper() in letters and alt.group(1).upper() != letter:
        if alt.group(1).isupper() or bracketed:
            return letter, m.end(), True  # "A or B", "(A)/(B)", "C, D"
    alt = _SPACE_ALT.match(after)
    if alt and alt.group(1) in letters and alt.group(1) != letter and (raw.isupper() or bracketed):
        return letter, m.end(), True  # "B C"
    if not bracketed:
        if (raw.islower() or raw == "I") and _ARTICLE_FOLLOW.match(after):
            return None, pos, False  # "a dog", "I think": prose; a bare lower-case letter needs punctuation after it
        if strict and after and not _STRICT_FOLLOW.match(after):
            return None, pos, False  # "A dog is ...", "so B is wrong"
    return letter, m.end(), False


def _norm_phrase(s: str) -> str:
    s = unicodedata.normalize("NFKC", str(s)).lower()
    s = re.sub(r"[\s]+", " ", s)
    return s.strip(" \t\n.,;:!?'\"()[]{}")


def _match_option_text(text: str, options: Mapping[str, str]) -> tuple[str | None, bool]:
    """Option whose text occurs as a whole phrase in `text`: (letter, ambiguous).

    Exact equality of the whole text wins. Otherwise every option found (not right after "not") is a candidate; a
    candidate whose text is contained in a longer found candidate ("red" inside "dark red") is dropped. One left
    -> it; several -> ambiguous.
    """
    t = _norm_phrase(text)
    if not t:
        return None, False
    normed = {k: _norm_phrase(v) for k, v in options.items() if _norm_phrase(v)}
    exact = [k for k, v in normed.items() if v == t]
    if len(exact) == 1:
        return exact[0], False
    found = {}
    for k, v in normed.items():
        for m in re.finditer(r"(?<![a-z0-9])" + re.escape(v) + r"(?![a-z0-9])", t):
            if not re.search(r"\bnot\s+(?:the\s+)?$", t[: m.start()]):  # "blue, not red"
                found[k] = v
                break
    keep = [k for k, v in found.items() if not any(v != w and v in w for w in found.values())]
    if len(set(found[k] for k in keep)) == 1:
        return sorted(keep)[0], len(keep) > 1
    return None, len(keep) > 1


def _isolated_letters(text: str, letters: str) -> list[str]:
    """Distinct option letters standing alone in `text`: upper-case, or lower-case in brackets "(c)"; articles
    ("A dog") and negated letters ("not A") excluded."""
    seen = []
    for m in _LETTER_TOKEN.finditer(text):
        raw = m.group("l")
        bracketed = bool(m.group("open") and m.group("close"))
        if raw.upper() not in letters or (raw.islower() and not bracketed):
            continue
        if not bracketed and raw in "AI" and _ARTICLE_FOLLOW.match(text[m.end() :]):
            continue
        if re.search(r"\bnot\s+(?:(?:the\s+)?(?:option|choice)\s+)?$", text[: m.start()], re.IGNORECASE):
            continue  # "the answer is not A"
        if _NEGATED_AFTER.match(text, m.end()):
            continue  # "(A) is wrong"
        raw = raw.upper()
        if raw not in seen:
            seen.append(raw)
    return seen


_SHORT_WORDS = 40  # fallback rules read the whole response only when it is this short, else its last line

# spatial relation -> the phrases that express it (rule 6 of extract_choice)
_SPATIAL = {
    "left": r"left(?:most|\s*-?\s*hand)?",
    "right": r"right(?:most|\s*-?\s*hand)?(?!\s+(?:answer|option|choice))",
    "above": r"above|on\s+top|over|top(?:most)?|upper",
    "below": r"below|under(?:neath)?|beneath|bottom(?:most)?|lower",
    "center": r"middle|cent(?:er|re)|central|between",
    "front": r"in\s+front|front",
    "behind": r"behind|back(?:ground)?|rear",
    "next_to": r"next\s+to|beside|besides|adjacent",
}
_SPATIAL_RE = {k: re.compile(rf"(?<![a-z])(?:{v})(?![a-z])") for k, v in _SPATIAL.items()}


def _spatial_relations(text: str) -> frozenset[str]:
    """The spatial relations a phrase names ("to the top left" -> {above, left}); "not on the left" drops left."""
    t = _norm_phrase(text)
    found = set()
    for key, rx in _SPATIAL_RE.items():
        for m in rx.finditer(t):
            if not re.search(r"\bnot\s+(?:\w+\s+){0,3}$", t[: m.start()]):
                found.add(key)
    return frozenset(found)


def _match_spatial(text: str, options: Mapping[str, str]) -> tuple[str | None, bool]:
    """The one option naming exactly the spatial relations the response names: (letter, ambiguous)."""
    want = _spatial_relations(text)
    if not want:
        return None, False
    hits = [k for k, v in options.items() if _spatial_relations(v) == want]
    if len(hits) == 1:
        return hits[0], False
    return None, len(hits) > 1


def extract_choice(text: str, options: Mapping[str, str] | None = None, letters: str | None = None) -> Extraction:
    """Extract one option letter from a model output.

    `options` maps letters to option texts (may be empty); `letters` are the valid letters (default: the
    option keys, or A-E when there are no options). Rules, first hit wins:

    1. explicit: the LAST of ``\\boxed{X}`` / answer markers ("The answer is (C)", "Answer: c", "I choose B",
       "Therefore, D."), each read as a letter token or else as an option text ("answer is blue");
       "A or B" after a marker -> ambiguous -> None;
    2. leading letter: the response starts with "C", "(C)", "C.", "C)", "C: blue", "[C]" ("A dog is ..." is prose);
    3. the whole response equals one option's text ("blue");
    4. exactly one distinct letter stands alone (upper-case, or "(c)") in the response (when it has at most 40
       words) or else in its last line; "not A" does not count; two or more distinct letters -> ambiguous -> None;
    5. exactly one option text occurs in that same region (the longest wins when one contains another);
    6. the region names spatial relations (left / right / above / below / center / front / behind / next to, from
       phrases such as "to the top left", "underneath") and exactly one option names the same set ("It is on the
       left." -> "left of the car"); "not on the left" does not count.

    Letters in quotes ('B', "B", “B”) read as "(B)". A letter explicitly rejected right after it ("(A) is wrong",
    "A isn't correct", "C can be ruled out") is never the answer, so "(A) is wrong, (B) is right" is B. Two
    capital letters side by side ("B C") are ambiguous.

    A bare lower-case letter counts only when punctuation, a bracket or the end follows it ("c", "c.", "(b)"), so
    "a dog" is never A; "I think" is never I; "A dog is ..." at the start of a response or after "so" /
    "therefore" is prose, while "The answer is A because ..." is A.
    """
    options = dict(options or {})
    letters = "".join(sorted(letters or (options.keys() if options else "ABCDE"))).upper()
    text = _QUOTED_LETTER.sub(r"(\1)", strip_reasoning(text))  # 'B', "B", “B” read as (B)
    if not text:
        return Extraction(None, "empty")

    # 1. explicit answers, last first
    explicit = [(p, "boxed", c) for p, c in extract_all_boxed(text)]
    explicit += [(s, kind, e) for s, e, kind in _markers(text)]
    for pos, kind, payload in sorted(explicit, key=lambda x: x[0], reverse=True):
        if kind == "boxed":
            content = _unlatex(payload)
            letter, _, amb = _letter_at(content, 0, letters, strict=False)
            if amb:
                return Extraction(None, "ambiguous")
            if letter:
                return Extraction(letter, "boxed")
            if options:
                letter, amb = _match_option_text(content, options)
                if letter and not amb:
                    return Extraction(letter, "boxed_option_text")
            continue
        letter, end, amb = _letter_at(text, payload, letters, strict=(kind == "weak"))
        if amb:
            return Extraction(None, "ambiguous")
        if letter:
            return Extraction(letter, "answer_marker")
        if options and kind == "answer":
            letter, amb = _match_option_text(_segment(text, payload), options)
            if amb:
                return Extraction(None, "ambiguous")
            if letter:
                return Extraction(letter, "answer_marker_option_text")

    # 2. leading letter token
    letter, end, amb = _letter_at(text, 0, letters, strict=True)
    if amb:
        return Extraction(None, "ambiguous")
    if letter:
        return Extraction(letter, "leading_letter")

    # 3. the whole response is an option text
    if options:
        normed = _norm_phrase(text)
        exact = [k for k, v in options.items() if _norm_phrase(v) == normed]
        if len(exact) == 1:
            return Extraction(exact[0], "option_text")

    lines = [ln for ln in text.splitlines() if ln.strip()]
    regions = [text] if len(text.split()) <= _SHORT_WORDS else [lines[-1]] if lines else []

    # 4. a single isolated letter
    for region in regions:
        found = _isolated_letters(region, letters)
        if len(found) == 1:
            return Extraction(found[0], "single_letter")
        if len(found) > 1:
            return Extraction(None, "ambiguous")

    # 5. a single option text
    if options:
        for region in regions:
            letter, amb = _match_option_text(region, options)
            if amb:
                return Extraction(None, "ambiguous")
            if letter:
                return Extraction(letter, "option_text")

    # 6. a spatial phrase naming exactly one option's relation ("It is to the left." -> "on the left side")
    if options:
        for region in regions:
            letter, amb = _match_spatial(region, options)
            if amb:
                return Extraction(None, "ambiguous")
            if letter:
                return Extraction(letter, "spatial_phrase")
    return Extraction(None, "none")


# --------------------------------------------------------------------------------------------- numbers

_NUMBER = re.compile(
    r"(?<![\w.^])"  # not inside a word, version string or exponent
    r"(?P<sign>[-+−](?=\s?[$€£¥]?\s?\.?\d))?\s?"
    r"(?P<cur>[$€£¥])?\s?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?)(?!\d))?"
    r"(?:[eE](?P<exp>[-+]?\d+)(?![\w])|\s*(?:×|\\times|\\cdot|x|\*)\s*10\s*\^\s*\{?\s*(?P<exp2>[-+−]?\d+)\s*\}?)?"
    r"(?P<pct>\s*(?:%|percent\b|per\s+cent\b))?"
)
_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                      "ninety": 90, "hundred": 100, "none": 0})


class _Num(NamedTuple):
    value: float
    percent: bool
    start: int
    end: int


def _prep_numeric(text: str) -> str:
    """Rewrite LaTeX number forms (\\frac{a}{b}, 1{,}234, \\%, \\$, unicode minus) into plain text."""
    text = re.sub(r"\\[dt]?frac\s*\{\s*([-−]?[\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}", r"\1/\2", text)
    text = text.replace("{,}", ",").replace("\\%", "%").replace("\\$", "$").replace("−", "-")
    text = text.replace("\\!", "").replace("\\,", "")
    return text


def _numbers(text: str) -> list[_Num]:
    out = []
    for m in _NUMBER.finditer(text):
        try:
            value = float(m.group("num").replace(",", ""))
            if m.group("den") is not None:
                den = float(m.group("den"))
                if den == 0:
                    continue
                value /= den
            exp = m.group("exp") or m.group("exp2")
            if exp is not None:
                value *= 10.0 ** int(exp.replace("−", "-"))
        except (ValueError, OverflowError):
            continue
        if m.group("sign") in ("-", "−"):
            value = -value
        if math.isfinite(value):
            out.append(_Num(value, bool(m.group("pct")), m.start(), m.end()))
    return out


def _number_in_segment(seg: str) -> _Num | None:
    """The answer number of an explicit span: the first number after the last '=' (else the first number)."""
    seg = _prep_numeric(seg)
    tail = seg.rsplit("=", 1)[1] if "=" in seg else seg
    nums = _numbers(tail) or _numbers(seg)
    return nums[0] if nums else None


def _fmt(x: float) -> str:
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def parse_number(s: Any) -> float | None:
    """Parse a whole answer string as one number ("1,234", "12%", "$5", "3/4", "\\frac{3}{4}", "-2.5e3", "3.5 cm").

    Returns None unless the string is exactly one number, optionally with currency and a short unit after it.
    """
    if s is None:
        return None
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s) if math.isfinite(s) else None
    text = _prep_numeric(_unlatex(str(s)).strip())
    nums = _numbers(text)
    if len(nums) != 1:
        return None
    before, after = text[: nums[0].start].strip(), text[nums[0].end :].strip()
    if before not in ("", "~", "≈") or re.search(r"\d", after) or len(after) > 12 or len(after.split()) > 2:
        return None  # "Windows 10", "Route 66", "3:30" are text, "3.5 cm" and "45 degrees" are numbers
    return nums[0].value


def extract_number(text: str) -> Extraction:
    """Extract one number from a model output (value as a canonical string, e.g. "1234", "0.75", "-3").

    Rules, first hit wins: (1) the LAST explicit answer - ``\\boxed{}`` or an answer marker - that contains a
    number; inside it, the first number after the last "=" ("x = 5" -> 5, "2 + 3 = 5" -> 5); (2) the last number
    in the text; (3) the last number word ("three", "none" -> 0). Thousands commas ("1,234"), currency, units,
    percent, fractions ("3/4", ``\\frac{3}{4}``), negatives, "1.5e3" and "1.5 x 10^3" are understood; a percent
    sign is kept as a trailing "%" so that scoring can compare both 12 and 0.12. Decimal commas ("3,5") and
    symbolic values (``2\\sqrt{3}``, pi) are not evaluated.
    """
    text = strip_reasoning(text)
    if not text:
        return Extraction(None, "empty")
    explicit = [(p, "boxed", _unlatex(c)) for p, c in extract_all_boxed(text)]
    explicit += [(s, "answer_marker", _segment(text, e)) for s, e, kind in _markers(text) if kind != "weak"]
    for _, method, seg in sorted(explicit, key=lambda x: x[0], reverse=True):
        num = _number_in_segment(seg)
        if num is not None:
            return Extraction(_fmt(num.value) + ("%" if num.percent else ""), method)
    nums = _numbers(_prep_numeric(text))
    if nums:
        return Extraction(_fmt(nums[-1].value) + ("%" if nums[-1].percent else ""), "last_number")
    words = re.findall(r"[a-z]+", text.lower())
    for w in reversed(words):
        if w in _NUMBER_WORDS:
            return Extraction(str(_NUMBER_WORDS[w]), "number_word")
    return Extraction(None, "none")


def _decimals(gold: str) -> int | None:
    """Decimal places written in a plain decimal gold answer ("1.45" -> 2), else None."""
    m = re.fullmatch(r"\s*[-+]?\d[\d,]*\.(\d+)\s*%?\s*", str(gold))
    return len(m.group(1)) if m else None


def numbers_match(
    pred: float,
    gold: float,
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    decimals: int | None = None,
) -> bool:
    """|pred - gold| <= max(abs_tol, rel_tol*|gold|), or, when `decimals` is given, pred rounds to gold at that
    many decimal places (|pred - gold| <= 0.5 * 10**-decimals)."""
    diff = abs(pred - gold)
    if diff <= max(abs_tol, rel_tol * abs(gold)):
        return True
    return decimals is not None and diff <= 0.5 * 10.0 ** (-decimals) * (1 + 1e-9)


# --------------------------------------------------------------------------------------------- yes / no

_YES = {"yes", "true", "correct", "1"}
_NO = {"no", "false", "incorrect", "0"}


# informal answer words, read like "yes" / "no" wherever those are
_INFORMAL = {"yeah": "yes", "yep": "yes", "yup": "yes", "yea": "yes", "nope": "no", "nah": "no"}
# words that answer only when they stand alone at the start ("Correct.", "False,"), not in "correct answer is"
_FORMAL = {"correct": "yes", "true": "yes", "affirmative": "yes", "incorrect": "no", "false": "no", "negative": "no"}
_LEAD = re.compile(r"[\s(\[\"'“]*(?:(not\s+(?:really|at\s+all))\b|([A-Za-z]+))(?P<after>\s*[.,!;:)\]\"”]|\s*$)?",
                   re.IGNORECASE)


def _yesno_word(s: str) -> str | None:
    """yes / no from the first word of `s`: yes, no, yeah, nope, ...; "correct" / "false" ... only when
    punctuation or the end follows; "not really" / "not at all" -> no."""
    m = _LEAD.match(s)
    if not m:
        return None
    if m.group(1):
        return "no"
    w = m.group(2).lower()
    if w in ("yes", "no"):
        return w
    if w in _INFORMAL:
        return _INFORMAL[w]
    return _FORMAL.get(w) if m.group("after") is not None else None


def extract_yesno(text: str) -> Extraction:
    """Extract "yes" / "no". Rules: (1) the LAST explicit answer (``\\boxed{}``, "answer is", "Answer:") starting
    with a yes/no word; (2) the response starts with one ("No, there is no dog.", "Yeah, a dog.", "Nope.",
    "Correct.", "Not really."); (3) exactly one of yes / no occurs in the text (the informal words count as
    them); both -> ambiguous -> None. A leading answer contradicted right away ("No. Yes.", "Yes or no") is
    ambiguous. Words: yes, yeah, yep, yup, yea / no, nope, nah; at the start also correct, true, affirmative /
    incorrect, false, negative (followed by punctuation or the end) and "not really" / "not at all"."""
    text = strip_reasoning(text)
    if not text:
        return Extraction(None, "empty")
    explicit = [(p, "boxed", _unlatex(c)) for p, c in extract_all_boxed(text)]
    explicit += [(s, "answer_marker", text[e:]) for s, e, kind in _markers(text) if kind != "weak"]
    for _, method, seg in sorted(explicit, key=lambda x: x[0], reverse=True):
        word = _yesno_word(seg)
        if word:
            return Extraction(word, method)
    word = _yesno_word(text)
    if word:
        if re.match(r"[\s(\[\"']*[A-Za-z]+\s*(?:,|/|\bor\b|\band\b)\s*(?:yes|no)\b", text, re.IGNORECASE):
            return Extraction(None, "ambiguous")
        lead = _LEAD.match(text)
        nxt = re.match(r"\s*[.!;]?\s*([A-Za-z]+)\s*(?:[.!,;]|$)", text[lead.end():])
        if nxt and {"yes": "yes", "no": "no", **_INFORMAL}.get(nxt.group(1).lower(), word) != word:
            return Extraction(None, "ambiguous")  # "No. Yes."
        return Extraction(word, "leading_word")
    words = {_INFORMAL.get(w, w) for w in re.findall(r"[a-z]+", text.lower())}
    if ("yes" in words) != ("no" in words):
        return Extraction("yes" if "yes" in words else "no", "single_word")
    return Extraction(None, "ambiguous" if "yes" in words else "none")


def _gold_yesno(answer: str) -> str | None:
    a = str(answer).strip().lower().strip(".")
    return "yes" if a in _YES else "no" if a in _NO else None


# --------------------------------------------------------------------------------------------- text

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_text(s: Any) -> str:
    """Lower-case, NFKC, drop thousands commas, punctuation -> space, drop articles (a/an/the), collapse spaces."""
    s = unicodedata.normalize("NFKC", "" if s is None else str(s)).lower()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = "".join(" " if unicodedata.category(ch).startswith(("P", "S")) else ch for ch in s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def extract_text(text: str) -> Extraction:
    """The answer span of a free-text output: the LAST explicit answer (``\\boxed{}`` content or the rest of the
    line after an answer marker, trailing period dropped), else the whole response."""
    text = strip_reasoning(text)
    if not text:
        return Extraction(None, "empty")
    explicit = [(p, "boxed", _unlatex(c)) for p, c in extract_all_boxed(text)]
    explicit += [(s, "answer_marker", _segment(text, e)) for s, e, kind in _markers(text) if kind != "weak"]
    for _, method, seg in sorted(explicit, key=lambda x: x[0], reverse=True):
        seg = seg.strip().rstrip(".").strip()
        if seg:
            return Extraction(seg, method)
    return Extraction(text, "whole_response")


# --------------------------------------------------------------------------------------------- scoring


def _field(sample: Any, name: str, default: Any = None) -> Any:
    if isinstance(sample, Mapping):
        return sample.get(name, default)
    return getattr(sample, name, default)


def score(
    sample: Any,
    prediction: str,
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    use_gold_precision: bool = True,
    allow_percent: bool = True,
) -> ScoreResult:
    """Score one prediction against a `Sample` (or any object / mapping with `answer`, `answer_type`, `options`).

    Numbers: `numbers_match` with `rel_tol` / `abs_tol`; with `use_gold_precision` a gold written with k decimals
    ("1.45") also accepts predictions that round to it (MathVista convention), or `meta["precision"]` when the
    sample has one. With `allow_percent`, "12%" matches gold 12 or 0.12 (and gold "12%" matches 12 or 0.12).
    Choice: gold letter vs `extract_choice`. Yes/no: gold yes/true/1 vs no/false/0. Text: `normalize_text`
    equality, trying the explicit span, else the whole response, its first line and its last line.
    """
    answer = _field(sample, "answer")
    kind = _field(sample, "answer_type") or "text"
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        raise ValueError(f"sample {_field(sample, 'index', '?')!r} has no gold answer to score against")
    answer = str(answer).strip()
    prediction = "" if prediction is None else str(prediction)

    if kind == "choice":
        options = _field(sample, "options") or {}
        gold = answer.strip("()[]. ").upper()
        letters = "".join(options.keys()) if options else "ABCDE"
        if gold not in letters:
            letters += gold
        ext = extract_choice(prediction, options, letters)
        return ScoreResult(ext.value == gold, ext.value, ext.method)

    if kind == "number":
        gold_value = parse_number(answer)
        if gold_value is None:
            raise ValueError(f"sample {_field(sample, 'index', '?')!r}: gold answer {answer!r} is not a number")
        ext = extract_number(prediction)
        if ext.value is None:
            return ScoreResult(False, None, ext.method)
        pct = ext.value.endswith("%")
        value = float(ext.value.rstrip("%"))
        meta = _field(sample, "meta") or {}
        decimals = None
        if use_gold_precision:
            prec = meta.get("precision") if isinstance(meta, Mapping) else None
            try:
                decimals = int(float(prec)) if prec not in (None, "") else _decimals(answer)
            except (TypeError, ValueError):
                decimals = _decimals(answer)
        golds = [gold_value]
        preds = [value]
        if allow_percent:
            if pct:
                preds.append(value / 100.0)
            if "%" in answer or "percent" in answer.lower():
                golds.append(gold_value / 100.0)
        ok = any(
            numbers_match(p, g, rel_tol=rel_tol, abs_tol=abs_tol, decimals=decimals if (p == value and g == gold_value) else None)
            for p in preds
            for g in golds
        )
        return ScoreResult(ok, ext.value, ext.method)

    if kind == "yesno":
        gold = _gold_yesno(answer)
        if gold is None:
            raise ValueError(f"sample {_field(sample, 'index', '?')!r}: gold answer {answer!r} is not yes/no")
        ext = extract_yesno(prediction)
        return ScoreResult(ext.value == gold, ext.value, ext.method)

    if kind != "text":
        raise ValueError(f"unknown answer_type {kind!r} (expected choice, number, yesno or text)")
    gold = normalize_text(answer)
    ext = extract_text(prediction)
    if ext.value is None:
        return ScoreResult(False, None, ext.method)
    candidates = [ext.value]
    if ext.method == "whole_response":
        lines = [ln.strip() for ln in ext.value.splitlines() if ln.strip()]
        candidates += [lines[0].rstrip("."), lines[-1].rstrip(".")] if lines else []
    for cand in candidates:
        if normalize_text(cand) == gold:
            return ScoreResult(True, cand, ext.method)
    return ScoreResult(False, ext.value, ext.method)


def aggregate(records: Iterable[Any], by: Iterable[str] = ("category",)) -> dict[str, Any]:
    """Accuracy overall and per group.

    `records` are mappings (or objects) with a boolean ``correct``, optionally ``extracted`` and the `by` fields
    (default ``category``; a missing / empty value groups under "(none)"). Returns
    ``{"overall": stats, "by_category": {value: stats, ...}, ...}`` where stats is
    ``{"n", "correct", "accuracy", "extracted"?, "extraction_rate"?}``; accuracy is None when n == 0.
    Groups are sorted by name so the output is deterministic.
    """
    by = tuple(by)

    def new():
        return {"n": 0, "correct": 0, "extracted": 0, "has_extracted": False}

    overall = new()
    groups: dict[str, dict[str, dict]] = {key: {} for key in by}
    for rec in records:
        correct = _field(rec, "correct")
        if not isinstance(correct, bool):
            raise ValueError(f"record {rec!r} has no boolean 'correct'")
        has_ext = (isinstance(rec, Mapping) and "extracted" in rec) or hasattr(rec, "extracted")
        ext = _field(rec, "extracted") is not None
        targets = [overall]
        for key in by:
            value = _field(rec, key)
            name = "(none)" if value in (None, "") else str(value)
            targets.append(groups[key].setdefault(name, new()))
        for t in targets:
            t["n"] += 1
            t["correct"] += int(correct)
            t["extracted"] += int(ext)
            t["has_extracted"] |= has_ext

    def finish(t):
        out = {"n": t["n"], "correct": t["correct"], "accuracy": t["correct"] / t["n"] if t["n"] else None}
        if t["has_extracted"]:
            out["extracted"] = t["extracted"]
            out["extraction_rate"] = t["extracted"] / t["n"] if t["n"] else None
        return out

    result: dict[str, Any] = {"overall": finish(overall)}
    for key in by:
        result[f"by_{key}"] = {name: finish(t) for name, t in sorted(groups[key].items())}
    return result
