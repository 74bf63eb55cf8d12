"""The user-turn text of a benchmark sample: question + hint + lettered options + an instruction per answer type.

    build_prompt(sample)                                   # direct answers (defaults below)
    build_prompt(sample, instructions=COT_INSTRUCTIONS)    # reason, then \\boxed{} (what scoring reads first)
    build_prompt(sample, template="{question}\\n{options}{instruction}")

The runner passes this text, with the sample's images, to the processor's chat template.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_INSTRUCTIONS", "COT_INSTRUCTIONS", "DEFAULT_TEMPLATE", "build_prompt"]

DEFAULT_INSTRUCTIONS: dict[str, str] = {
    "choice": "Answer with the option's letter from the given choices directly.",
    "number": "Answer the question using a single number.",
    "yesno": "Answer the question using a single word: Yes or No.",
    "text": "Answer the question using a single word or phrase.",
}
COT_INSTRUCTIONS: dict[str, str] = {
    "choice": "Think step by step, then give the letter of the correct option as \\boxed{X}.",
    "number": "Think step by step, then give the final number as \\boxed{N}.",
    "yesno": "Think step by step, then answer \\boxed{Yes} or \\boxed{No}.",
    "text": "Think step by step, then give the final answer (a word or short phrase) in \\boxed{}.",
}
# Fields: {hint} ("Hint: ...\n" or ""), {question}, {options} ("Options:\nA. ...\n" or ""), {instruction},
# {hint_text} and {answer_type} (raw values).
DEFAULT_TEMPLATE = "{hint}{question}\n{options}{instruction}"


def _options_listed(question: str, options: Mapping[str, str]) -> bool:
    """True when the question text already lists every option (MMStar / MathVista embed them)."""
    q = question.lower()
    return bool(options) and all(
        re.search(rf"(?<![A-Za-z])[(\[]?{re.escape(k)}[)\].:]", question) and str(v).strip().lower() in q
        for k, v in options.items()
    )


def build_prompt(
    sample: Any,
    *,
    template: str | None = None,
    instructions: Mapping[str, str] | None = None,
    option_format: str = "{letter}. {text}",
    include_hint: bool = True,
    repeat_options: bool = False,
) -> str:
    """Prompt text for `sample` (a `Sample`, or anything with question / hint / options / answer_type).

    Options already spelled out in the question are not repeated unless `repeat_options`. `instructions` maps
    answer types to the last line (missing types fall back to `DEFAULT_INSTRUCTIONS`; "" drops the line).
    Placeholders such as MMMU's ``<image 1>`` are left in the question (and options): `generation.Request` puts
    image N at each of them.
    """
    get = (lambda k: sample.get(k)) if isinstance(sample, Mapping) else (lambda k: getattr(sample, k, None))
    question = str(get("question") or "").strip()
    hint = get("hint")
    options = dict(get("options") or {})
    kind = get("answer_type") or "text"
    table = {**DEFAULT_INSTRUCTIONS, **(instructions or {})}
    if kind not in table:
        raise ValueError(f"no instruction for answer_type {kind!r}; known: {sorted(table)}")
    instruction = table[kind]

    hint_block = f"Hint: {str(hint).strip()}\n" if include_hint and hint not in (None, "") else ""
    options_block = ""
    if options and (repeat_options or not _options_listed(question, options)):
        lines = [option_format.format(letter=k, text=v) for k, v in options.items()]
        options_block = "Options:\n" + "\n".join(lines) + "\n"
    fields = {
        "hint": hint_block,
        "question": question,
        "options": options_block,
        "instruction": instruction,
        "hint_text": "" if hint is None else str(hint),
        "answer_type": kind,
    }
    try:
        text = (template or DEFAULT_TEMPLATE).format(**fields)
    except KeyError as exc:
        raise ValueError(f"prompt template uses unknown field {exc}; fields are {sorted(fields)}") from None
    return text.rstrip()
