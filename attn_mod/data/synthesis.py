"""AVAR visual-anchored reflection data synthesis: describe -> reason -> anchor -> training JSONL.

    cfg = load_config(SynthesisConfig, "configs/data/avar_synthesis.yaml")
    result = run_synthesis(cfg)          # or: attn-mod data synthesize CONFIG.yaml
    result.report["accepted"], result.paths["train"]

Stages (AVAR section 5.1 / appendix G; prompts are files in configs/prompts/avar/, `{{field}}` fields):

(a) describe  - a vision model gets the image(s) as data URIs + the question and writes a high-fidelity
                description (it must not solve the question).
(b) reason    - a text reasoning model gets question + description and writes a self-reflective reasoning
                chain ending in ``Final answer: \\boxed{...}``, with ``<anchor: what to check>`` placeholders
                (``<anchor>`` also accepted) where the reasoning should go back to the image.
(c) anchor    - a smaller text model rewrites placeholder k (shown as ``[ANCHOR k: ...]``) into a natural
                look-back statement; it answers one ``k: sentence`` line per placeholder, which replace them.
(d) assemble  - system / user (image(s) + question) / assistant = ``assembly.answer_format`` filled with the
                anchored reasoning and the source answer; provenance (source, stage models, prompt hashes)
                goes into extra keys (-> `TrainSample.meta`). Source boxes, if any, are kept.

Quality gates (each rejection is counted in report.json and written to rejected.jsonl with its reason):
``source_unreadable``, ``request_rejected``, ``truncated`` (finish_reason "length"), ``description_empty``,
``description_too_long``, ``reasoning_too_long``, ``answer_mismatch`` (the reasoning's final answer does not
score as the source answer under `attn_mod.eval.scoring.score`; checked after (b) and again on the anchored
text after (c)), ``no_anchor`` (fewer than `gates.min_anchors` placeholders), ``too_many_anchors``,
``placeholder_not_rewritten`` (a placeholder without exactly one non-empty rewrite line, or a rewrite that
itself contains a placeholder), ``anchor_too_long``, ``output_too_long``.

Storage: each stage appends its rows (accepted or rejected) to OUTPUT_DIR/<stage>.jsonl in source order, one
fsynced line per item (`JsonlLog`), and a rerun skips ids already there; every successful HTTP answer is first
stored in the content-hash cache (OUTPUT_DIR/cache.jsonl unless `cache_path`), so a crash between the answer
and the stage row costs nothing on the rerun. Items whose retries ran out are left out (``pending``) and retried
on the next run. train.jsonl, rejected.jsonl and report.json are rewritten atomically at the end, in source
order, and depend only on the stage rows: an interrupted run plus a rerun gives the same files as one run.
Per-invocation request counts go to runs.jsonl and the printed summary. OUTPUT_DIR/manifest.json records what the
stage rows depend on (source, models, prompt hashes, sampling parameters, gates); a rerun with a different one
is refused (use another output_dir; a shared `cache_path` keeps unchanged requests free).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import re
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm.auto import tqdm

from ..eval.datasets import DatasetError, Sample
from ..eval.prompts import COT_INSTRUCTIONS, DEFAULT_INSTRUCTIONS, build_prompt
from ..eval.scoring import score
from ..eval.sweep_config import DatasetConfig
from .chat_client import (ChatClient, EndpointConfig, EndpointError, RequestRejected, ResponseCache,
                          TransientError)
from .jsonl_log import JsonlLog
from .samples import parse_sample, write_samples

__all__ = ["AssemblyConfig", "GateConfig", "PromptTemplate", "StageConfig", "SynthesisConfig", "SynthesisResult",
           "PLACEHOLDER", "DEFAULT_PROMPTS_DIR", "run_synthesis", "find_placeholders", "fill_anchors",
           "parse_rewrites"]

DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parents[2] / "configs" / "prompts" / "avar"
STAGES = ("describe", "reason", "anchor")
PLACEHOLDER = re.compile(r"<anchor(?:\s*:\s*([^<>]*?))?\s*>", re.IGNORECASE)
_ANY_PLACEHOLDER = re.compile(r"<anchor\b|\[ANCHOR\s*\d+", re.IGNORECASE)
_REWRITE_LINE = re.compile(r"^\s*(?:\[?ANCHOR\s*)?(\d+)\s*\]?\s*[:.)\]-]\s*(.*?)\s*$", re.IGNORECASE)
STAGE_FIELDS = {
    "describe": ("question",),
    "reason": ("question", "description", "answer_hint"),
    "anchor": ("question", "description", "reasoning", "n_anchors", "anchor_list"),
}
ANSWER_HINTS = {
    "choice": "ANSWER is the letter of the correct option.",
    "number": "ANSWER is a single number.",
    "yesno": "ANSWER is Yes or No.",
    "text": "ANSWER is a single word or short phrase.",
}
DEFAULT_SYSTEM = ("You are a careful visual reasoner. Think step by step, look back at the image whenever a step "
                  "depends on it, and give the final answer in \\boxed{}.")


# ------------------------------------------------------------------------------------------------ config


@dataclass
class StageConfig:
    """One stage's model. `model` falls back to $`model_env`; `base_url` overrides endpoint.base_url."""

    model: str | None = None
    model_env: str = ""
    base_url: str | None = None
    prompt: str = ""  # a file name in prompts_dir (default "<stage>.txt") or a path containing "/"
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    extra_body: dict[str, Any] | None = None  # passed through (e.g. vLLM's {"top_k": 20})

    def resolved_model(self, stage: str) -> str:
        model = self.model or (os.environ.get(self.model_env) if self.model_env else None)
        if not model:
            env = f" or ${self.model_env}" if self.model_env else ""
            raise ValueError(f"stage {stage!r} has no model: set {stage}.model in the config{env}")
        return model

    def params(self) -> dict:
        out = {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p),
                                 ("max_tokens", self.max_tokens)) if v is not None}
        if self.extra_body:
            out["extra_body"] = dict(self.extra_body)
        return out


@dataclass
class GateConfig:
    """Length limits are in characters."""

    min_description_chars: int = 20
    max_description_chars: int = 8000
    max_reasoning_chars: int = 24000
    min_anchors: int = 1
    max_anchors: int = 16
    max_anchor_chars: int = 400
    max_output_chars: int = 32000
    reject_truncated: bool = True  # finish_reason == "length" means the text was cut off

    def validate(self):
        if self.min_anchors < 1:
            raise ValueError("gates.min_anchors must be >= 1 (AVAR data needs at least one visual anchor)")
        if self.max_anchors < self.min_anchors:
            raise ValueError("gates.max_anchors must be >= gates.min_anchors")
        for name in ("min_description_chars", "max_description_chars", "max_reasoning_chars", "max_anchor_chars",
                     "max_output_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"gates.{name} must be >= 0")


@dataclass
class AssemblyConfig:
    """The training sample. `answer_format` is a str.format template with {reasoning} and {answer}."""

    system: str | None = DEFAULT_SYSTEM
    answer_format: str = "<think>\n{reasoning}\n</think>\n\n\\boxed{{{answer}}}"
    strip_final_line: bool = True  # drop the reasoning's own "Final answer: ..." line (answer_format has it)

    def validate(self):
        try:
            self.answer_format.format(reasoning="r", answer="a")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"assembly.answer_format must use only {{reasoning}} and {{answer}} (write literal "
                             f"braces as {{{{ }}}}): {e!r}") from None


@dataclass
class SynthesisConfig:
    """`attn-mod data synthesize CONFIG.yaml`. `source` is read with `attn_mod.eval.datasets` (JSONL / TSV / ...)."""

    source: DatasetConfig = field(default_factory=DatasetConfig)
    output_dir: str = "runs/avar_synthesis"
    prompts_dir: str | None = None  # default: the repository's configs/prompts/avar
    cache_path: str | None = None  # default: OUTPUT_DIR/cache.jsonl (share it across runs to never pay twice)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    describe: StageConfig = field(default_factory=lambda: StageConfig(model_env="AVAR_DESCRIBE_MODEL"))
    reason: StageConfig = field(default_factory=lambda: StageConfig(model_env="AVAR_REASON_MODEL"))
    anchor: StageConfig = field(default_factory=lambda: StageConfig(model_env="AVAR_ANCHOR_MODEL"))
    gates: GateConfig = field(default_factory=GateConfig)
    assembly: AssemblyConfig = field(default_factory=AssemblyConfig)
    image_format: str = "PNG"  # how images are encoded into the vision model's data URIs

    def validate(self):
        self.source.validate()
        if self.source.system is not None:
            raise ValueError("source.system is not used by the synthesis; set assembly.system (the training "
                             "samples' system prompt) instead")
        self.endpoint.validate()
        self.gates.validate()
        self.assembly.validate()
        if self.image_format.upper() not in ("PNG", "JPEG", "WEBP"):
            raise ValueError(f"image_format must be PNG, JPEG or WEBP, got {self.image_format!r}")

    def stage(self, name: str) -> StageConfig:
        return getattr(self, name)


# ------------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt file: ``[system]`` and ``[user]`` sections, ``{{field}}`` placeholders. sha256 = of the file."""

    path: str
    system: str | None
    user: str
    sha256: str

    @classmethod
    def load(cls, path: str | os.PathLike, fields: Iterable[str]) -> PromptTemplate:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} not found")
        text = path.read_text(encoding="utf-8")
        sections: dict[str, list[str]] = {}
        current = None
        for line in text.splitlines():
            m = re.fullmatch(r"\[(system|user)\]\s*", line.strip())
            if m:
                current = m.group(1)
                if current in sections:
                    raise ValueError(f"{path}: section [{current}] appears twice")
                sections[current] = []
            elif current is not None:
                sections[current].append(line)
            elif line.strip():
                raise ValueError(f"{path}: text before the first [system] / [user] section header")
        if "user" not in sections:
            raise ValueError(f"{path}: needs a [user] section (and optionally [system])")
        allowed = set(fields)
        used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))
        unknown = used - allowed
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}; this stage offers {sorted(allowed)}")
        system = "\n".join(sections["system"]).strip() if "system" in sections else None
        return cls(str(path), system or None, "\n".join(sections["user"]).strip(),
                   hashlib.sha256(text.encode("utf-8")).hexdigest())

    def render(self, **values: Any) -> tuple[str | None, str]:
        def fill(s: str) -> str:
            return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(values[m.group(1)]), s)

        return (fill(self.system) if self.system else None), fill(self.user)


def load_prompts(cfg: SynthesisConfig) -> dict[str, PromptTemplate]:
    base = Path(cfg.prompts_dir) if cfg.prompts_dir else DEFAULT_PROMPTS_DIR
    out = {}
    for stage in STAGES:
        name = cfg.stage(stage).prompt or f"{stage}.txt"
        path = Path(name) if Path(name).is_absolute() or "/" in name else base / name
        out[stage] = PromptTemplate.load(path, STAGE_FIELDS[stage])
    return out


# ------------------------------------------------------------------------------------------------ text helpers


def find_placeholders(text: str) -> list[str]:
    """The hints of the ``<anchor: hint>`` placeholders of `text`, in order ("" for a bare ``<anchor>``)."""
    return [(m.group(1) or "").strip() for m in PLACEHOLDER.finditer(text)]


def number_placeholders(text: str) -> str:
    """``<anchor: hint>`` -> ``[ANCHOR k: hint]`` (k from 1), the form stage (c) sees."""
    counter = iter(range(1, 10**9))

    def sub(m):
        k = next(counter)
        hint = (m.group(1) or "").strip()
        return f"[ANCHOR {k}: {hint}]" if hint else f"[ANCHOR {k}]"

    return PLACEHOLDER.sub(sub, text)


def parse_rewrites(text: str, n: int) -> tuple[dict[int, str] | None, str]:
    """Stage (c)'s answer -> {k: sentence} for k = 1..n, or (None, why) when not exactly one non-empty line each."""
    found: dict[int, str] = {}
    for line in text.strip().splitlines():
        m = _REWRITE_LINE.match(line)
        if not m:
            continue
        k, sentence = int(m.group(1)), m.group(2).strip()
        if k in found:
            return None, f"placeholder {k} rewritten twice"
        found[k] = sentence
    missing = [k for k in range(1, n + 1) if not found.get(k)]
    if missing:
        return None, f"no rewrite for placeholder(s) {missing} of {n}"
    extra = sorted(set(found) - set(range(1, n + 1)))
    if extra:
        return None, f"rewrites for placeholder(s) {extra} that do not exist (there are {n})"
    bad = [k for k, s in found.items() if _ANY_PLACEHOLDER.search(s)]
    if bad:
        return None, f"rewrite(s) {bad} still contain a placeholder"
    return found, ""


def fill_anchors(reasoning: str, rewrites: dict[int, str]) -> str:
    """Replace placeholder k of `reasoning` by rewrites[k]."""
    counter = iter(range(1, 10**9))
    return PLACEHOLDER.sub(lambda m: rewrites[next(counter)], reasoning)


def strip_final_answer_line(text: str) -> str:
    """Drop a trailing "Final answer: ..." line (the assembled answer format states the answer itself)."""
    lines = text.rstrip().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if lines and re.match(r"^\W*final answer\b", lines[-1].strip(), re.IGNORECASE):
        lines.pop()
    return "\n".join(lines).rstrip()


def image_data_uri(src, image_format: str = "PNG") -> str:
    """An `ImageSource` as a data URI (decoded, RGB, re-encoded: identical bytes for identical pixels)."""
    buf = io.BytesIO()
    fmt = image_format.upper()
    src.load().save(buf, format=fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------------ running


def ordered_map(fn: Callable, items: list, workers: int) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """(item, result, error) in input order, with up to `workers` calls in flight (window 2 * workers)."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        pending: deque = deque()
        it = iter(items)
        try:
            for item in it:
                pending.append((item, ex.submit(fn, item)))
                while len(pending) >= 2 * workers:
                    yield _result(*pending.popleft())
            while pending:
                yield _result(*pending.popleft())
        finally:
            for _, fut in pending:
                fut.cancel()


def _result(item, fut):
    try:
        return item, fut.result(), None
    except (TransientError, RequestRejected, DatasetError, OSError) as e:
        return item, None, e


@dataclass
class SynthesisResult:
    report: dict
    run_stats: dict
    paths: dict[str, Path]


class _Pipeline:
    def __init__(self, cfg: SynthesisConfig, progress: bool):
        self.cfg = cfg
        self.progress = progress
        self.prompts = load_prompts(cfg)
        self.models = {s: cfg.stage(s).resolved_model(s) for s in STAGES}
        for s in STAGES:  # endpoint problems surface before any file is written
            cfg.endpoint.resolved(cfg.stage(s).base_url)
        self.out = Path(cfg.output_dir)
        self._check_manifest()
        self.cache = ResponseCache(Path(cfg.cache_path) if cfg.cache_path else self.out / "cache.jsonl")
        self.clients = {s: ChatClient(cfg.endpoint, self.cache, base_url=cfg.stage(s).base_url) for s in STAGES}
        self.logs = {s: JsonlLog(self.out / f"{s}.jsonl") for s in STAGES}
        self.pending: Counter = Counter()
        self.instructions = COT_INSTRUCTIONS if cfg.source.instructions == "cot" else DEFAULT_INSTRUCTIONS

    def manifest(self) -> dict:
        """What the stage rows depend on; a rerun into the same output_dir must match it."""
        src = self.cfg.source
        return {"source": {"path": str(Path(src.path).resolve()), "instructions": src.instructions,
                           "template": src.template, "columns": src.columns, "answer_type": src.answer_type},
                "stages": {s: {"model": self.models[s], "prompt_sha256": self.prompts[s].sha256,
                               "params": self.cfg.stage(s).params()} for s in STAGES},
                "gates": dataclasses.asdict(self.cfg.gates), "image_format": self.cfg.image_format.upper()}

    def _check_manifest(self) -> None:
        path = self.out / "manifest.json"
        new = json.loads(json.dumps(self.manifest()))
        if path.exists():
            old = json.loads(path.read_text())
            for key in new:
                if old.get(key) != new[key]:
                    raise ValueError(f"{self.out} holds stage rows made with a different {key} ({old.get(key)!r} != "
                                     f"{new[key]!r}); use another output_dir (keep cache_path: unchanged requests "
                                     "are still free)")
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    # ------------------------------------------------------------------ per-stage requests
    def question(self, s: Sample) -> str:
        return build_prompt(s, template=self.cfg.source.template, instructions=self.instructions)

    def messages(self, stage: str, s: Sample) -> list[dict]:
        values: dict[str, Any] = {"question": self.question(s)}
        if stage in ("reason", "anchor"):
            values["description"] = self.logs["describe"].get(s.index)["text"]
            values["answer_hint"] = ANSWER_HINTS.get(s.answer_type, "")
        if stage == "anchor":
            reasoning = self.logs["reason"].get(s.index)["text"]
            hints = find_placeholders(reasoning)
            values.update(reasoning=number_placeholders(reasoning), n_anchors=len(hints),
                          anchor_list="\n".join(f"[ANCHOR {k}]: {h or '(look back at the image)'}"
                                                for k, h in enumerate(hints, 1)))
        system, user = self.prompts[stage].render(**values)
        msgs = [{"role": "system", "content": system}] if system else []
        if stage == "describe":
            parts: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_uri(im, self.cfg.image_format)}}
                                 for im in s.images]
            msgs.append({"role": "user", "content": parts + [{"type": "text", "text": user}]})
        else:
            msgs.append({"role": "user", "content": user})
        return msgs

    def call(self, stage: str, s: Sample):
        return self.clients[stage].complete(self.models[stage], self.messages(stage, s), self.cfg.stage(stage).params())

    # ------------------------------------------------------------------ gates
    def gate(self, stage: str, s: Sample, text: str, finish: str | None) -> tuple[dict, str | None, str]:
        """(extra row fields, rejection reason or None, detail)."""
        g = self.cfg.gates
        if g.reject_truncated and finish == "length":
            return {}, "truncated", f"{stage} output hit max_tokens (finish_reason 'length')"
        if stage == "describe":
            n = len(text.strip())
            if n < g.min_description_chars:
                return {}, "description_empty", f"description has {n} characters (< {g.min_description_chars})"
            if n > g.max_description_chars:
                return {}, "description_too_long", f"description has {n} characters (> {g.max_description_chars})"
            return {}, None, ""
        if stage == "reason":
            extra = {"n_anchors": len(find_placeholders(text))}
            if len(text) > g.max_reasoning_chars:
                return extra, "reasoning_too_long", f"{len(text)} characters (> {g.max_reasoning_chars})"
            res = score(s, text)
            extra["extracted"] = res.extracted
            if not res.correct:
                return extra, "answer_mismatch", f"reasoning answers {res.extracted!r}, source answer {s.answer!r}"
            if extra["n_anchors"] < g.min_anchors:
                return extra, "no_anchor", f"{extra['n_anchors']} <anchor> placeholder(s) (< {g.min_anchors})"
            if extra["n_anchors"] > g.max_anchors:
                return extra, "too_many_anchors", f"{extra['n_anchors']} placeholders (> {g.max_anchors})"
            return extra, None, ""
        reasoning = self.logs["reason"].get(s.index)["text"]
        n = len(find_placeholders(reasoning))
        rewrites, why = parse_rewrites(text, n)
        if rewrites is None:
            return {}, "placeholder_not_rewritten", why
        long = [k for k, v in rewrites.items() if len(v) > g.max_anchor_chars]
        if long:
            return {}, "anchor_too_long", f"rewrite(s) {long} longer than {g.max_anchor_chars} characters"
        anchored = fill_anchors(reasoning, rewrites)
        if _ANY_PLACEHOLDER.search(anchored):
            return {}, "placeholder_not_rewritten", "the anchored reasoning still contains a placeholder"
        res = score(s, anchored)
        if not res.correct:
            return {}, "answer_mismatch", f"anchored reasoning answers {res.extracted!r}, source answer {s.answer!r}"
        return {"anchored": anchored, "anchors": [rewrites[k] for k in range(1, n + 1)]}, None, ""

    # ------------------------------------------------------------------ stages
    def eligible(self, stage: str, samples: list[Sample]) -> list[Sample]:
        prev = STAGES[STAGES.index(stage) - 1] if stage != "describe" else None
        out = []
        for s in samples:
            if s.index in self.logs[stage]:
                continue
            if prev is not None:
                row = self.logs[prev].get(s.index)
                if row is None or row["status"] != "ok":
                    continue
            out.append(s)
        return out

    def run_stage(self, stage: str, samples: list[Sample]) -> None:
        todo = self.eligible(stage, samples)
        log = self.logs[stage]
        bar = tqdm(total=len(todo), desc=f"{stage} ({self.models[stage]})", unit="item", disable=not self.progress)
        base = {"stage": stage, "model": self.models[stage], "prompt_sha256": self.prompts[stage].sha256}
        try:
            for s, reply, err in ordered_map(lambda x: self.call(stage, x), todo, self.cfg.endpoint.concurrency):
                bar.update(1)
                if isinstance(err, TransientError):
                    self.pending[stage] += 1
                    bar.set_postfix(pending=self.pending[stage])
                    continue
                if err is not None:
                    reason = "request_rejected" if isinstance(err, RequestRejected) else "source_unreadable"
                    log.append({"id": s.index, "status": "rejected", "reason": reason, "detail": str(err), **base})
                    continue
                extra, reason, detail = self.gate(stage, s, reply.text, reply.finish_reason)
                row = {"id": s.index, "status": "ok" if reason is None else "rejected", **base,
                       "request_sha256": reply.request_sha256, "finish_reason": reply.finish_reason,
                       "text": reply.text, **extra}
                if reason is not None:
                    row.update(reason=reason, detail=detail)
                log.append(row)
        finally:
            bar.close()

    # ------------------------------------------------------------------ assembly
    def image_refs(self, s: Sample) -> list[str]:
        refs = []
        for k, src in enumerate(s.images):
            if src.path is not None:
                refs.append(os.path.relpath(Path(src.path).resolve(), self.out.resolve()))
                continue
            rel = Path("images") / f"{_safe(s.index)}_{k}.png"
            dst = self.out / rel
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_suffix(".tmp")
                src.load().save(tmp, format="PNG")
                os.replace(tmp, dst)
            refs.append(rel.as_posix())
        return refs

    def assemble(self, s: Sample, rows: dict[str, dict]) -> dict:
        cfg = self.cfg
        reasoning = rows["anchor"]["anchored"]
        if cfg.assembly.strip_final_line:
            reasoning = strip_final_answer_line(reasoning)
        assistant = cfg.assembly.answer_format.format(reasoning=reasoning, answer=s.answer)
        user = [{"type": "image"} for _ in s.images] + [{"type": "text", "text": self.question(s)}]
        messages = ([{"role": "system", "content": cfg.assembly.system}] if cfg.assembly.system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        obj: dict[str, Any] = {"id": s.index, "images": self.image_refs(s), "messages": messages,
                               "answer": s.answer, "answer_type": s.answer_type}
        if s.options:
            obj["options"] = dict(s.options)
        if s.bbox and len(s.images) == 1:
            obj["boxes"] = [list(b) for b in s.bbox]
        obj["source"] = {"dataset": s.source, "index": s.index, "row": s.row}
        obj["provenance"] = {"pipeline": "avar-synthesis", "n_anchors": len(rows["anchor"]["anchors"]),
                             **{st: {"model": rows[st]["model"], "prompt_sha256": rows[st]["prompt_sha256"],
                                     "request_sha256": rows[st]["request_sha256"]} for st in STAGES}}
        parse_sample(obj, where=f"assembled sample {s.index!r}", base_dir=self.out, require_assistant=True)
        return obj

    def finish(self, samples: list[Sample]) -> tuple[dict, list[dict], list[dict]]:
        train, rejected = [], []
        reasons: Counter = Counter()
        per_stage = {st: Counter() for st in STAGES}
        g = self.cfg.gates
        pending = 0
        for s in samples:
            rows = {}
            for st in STAGES:
                row = self.logs[st].get(s.index)
                if row is None:
                    break
                rows[st] = row
                per_stage[st][row["status"]] += 1
                if row["status"] != "ok":
                    break
            last = rows[STAGES[len(rows) - 1]] if rows else None
            if last is not None and last["status"] == "rejected":
                reasons[last["reason"]] += 1
                rejected.append({"id": s.index, "stage": last["stage"], "reason": last["reason"],
                                 "detail": last.get("detail", ""), "source": {"dataset": s.source, "row": s.row}})
                continue
            if len(rows) < len(STAGES):
                pending += 1
                continue
            obj = self.assemble(s, rows)
            if len(obj["messages"][-1]["content"]) > g.max_output_chars:
                reasons["output_too_long"] += 1
                rejected.append({"id": s.index, "stage": "assemble", "reason": "output_too_long",
                                 "detail": f"assistant turn over {g.max_output_chars} characters",
                                 "source": {"dataset": s.source, "row": s.row}})
                continue
            train.append(obj)
        report = {"source_items": len(samples), "accepted": len(train), "rejected": len(rejected),
                  "pending": pending, "rejections_by_reason": dict(sorted(reasons.items())),
                  "stages": {st: {"ok": per_stage[st]["ok"], "rejected": per_stage[st]["rejected"]} for st in STAGES},
                  "models": dict(self.models), "prompt_sha256": {st: self.prompts[st].sha256 for st in STAGES}}
        return report, train, rejected


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "item"


def _load_source(cfg: SynthesisConfig, limit: int | None) -> list[Sample]:
    from ..eval.sweep import open_dataset

    samples = list(open_dataset(cfg.source, limit))
    if not samples:
        raise ValueError(f"source {cfg.source.path} holds no samples")
    for s in samples:
        if not s.images:
            raise DatasetError(f"{cfg.source.path} row {s.row}: sample {s.index!r} has no image; AVAR synthesis "
                               "needs an image per question")
    return samples


def run_synthesis(cfg: SynthesisConfig, *, progress: bool = True, limit: int | None = None,
                  stop_after: str | None = None) -> SynthesisResult:
    """Run (or resume) the three stages and assemble OUTPUT_DIR/train.jsonl; see the module doc.

    `stop_after`: "describe" | "reason" runs the stages up to that one only (no assembly)."""
    cfg.validate()
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    samples = _load_source(cfg, limit)  # validates the source before any file is written
    t0 = time.time()
    pipe = _Pipeline(cfg, progress)
    for stage in STAGES:
        pipe.run_stage(stage, samples)
        if stage == stop_after:
            break
    report, train, rejected = pipe.finish(samples)
    out = pipe.out
    paths = {"train": out / "train.jsonl", "rejected": out / "rejected.jsonl", "report": out / "report.json",
             "runs": out / "runs.jsonl", **{st: out / f"{st}.jsonl" for st in STAGES}}
    write_samples(train, paths["train"])
    write_samples(rejected, paths["rejected"])  # plain JSON rows (id, stage, reason, detail), atomic
    tmp = paths["report"].with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, paths["report"])
    stats = Counter()
    for c in pipe.clients.values():
        stats.update(c.stats)
    run_stats = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 3),
                 "requests": stats["requests"], "retries": stats["retries"], "cache_hits": stats["cache_hits"],
                 "errors": {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("error:")},
                 "pending_by_stage": dict(pipe.pending),
                 "quarantined_lines": {st: pipe.logs[st].quarantined for st in STAGES if pipe.logs[st].quarantined}}
    with paths["runs"].open("a") as f:
        f.write(json.dumps(run_stats, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return SynthesisResult(report, run_stats, paths)


def summary_table(result: SynthesisResult) -> str:
    """The end-of-run summary: per-stage counts, rejections by reason, this run's requests."""
    r, st = result.report, result.run_stats
    lines = ["| stage | ok | rejected |", "|---|---:|---:|"]
    lines += [f"| {s} | {r['stages'][s]['ok']} | {r['stages'][s]['rejected']} |" for s in STAGES]
    lines += ["", "| result | count |", "|---|---:|", f"| source items | {r['source_items']} |",
              f"| accepted (train.jsonl) | {r['accepted']} |", f"| rejected (rejected.jsonl) | {r['rejected']} |",
              f"| pending (retry later) | {r['pending']} |"]
    lines += [f"| rejected: {k} | {v} |" for k, v in r["rejections_by_reason"].items()]
    lines += ["", "| this run | count |", "|---|---:|", f"| HTTP requests | {st['requests']} |",
              f"| retries | {st['retries']} |", f"| cache hits | {st['cache_hits']} |"]
    lines += [f"| errors: {k} | {v} |" for k, v in sorted(st["errors"].items())]
    return "\n".join(lines)

