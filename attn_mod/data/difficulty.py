"""Difficulty filter (AVAR appendix C, after DAPO): G sampled rollouts per prompt, keep prompts whose accuracy
lies in [low, high] (defaults G = 8, [0.25, 0.75]).

    result = run_filter(load_config(FilterConfig, "configs/data/difficulty_filter.yaml"))
    # or: attn-mod data filter CONFIG.yaml

accuracy(prompt) = (1/G) * sum_{g=1..G} 1[score(sample, rollout_g).correct]   (`attn_mod.eval.scoring.score`)
kept  <=>  low <= accuracy <= high   (both ends inclusive)

Input: a training JSONL (`attn_mod.data.samples`) with `answer` / `answer_type` per sample; the prompt is the
sample without its last assistant turn (one user turn, optional system turn; images go first, as in
`attn_mod.eval.generation`). The model is a local checkpoint or "tiny:<family>"; with `intervention` set it is
patched (`attn_mod.patch`) and, with `use_boxes`, the sample's boxes become TARGET tokens.

Outputs in OUTPUT_DIR: accuracies.jsonl (one fsynced row per prompt: id, accuracy, correct, rollouts, kept,
the completions and extracted answers; resumable by id), kept.jsonl (the kept samples in input order, image
paths rebased to OUTPUT_DIR), report.json (counts). Rollouts of prompt chunk c use the seed
f(seed, first id of the chunk), so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from ..eval.generation import Request, generate_batch
from ..eval.scoring import score
from ..eval.sweep_config import CellConfig
from .jsonl_log import JsonlLog
from .samples import TrainSample, read_samples, sample_to_json, write_samples

__all__ = ["FilterConfig", "FilterResult", "in_band", "run_filter", "summary_table"]


@dataclass
class FilterConfig:
    model: str = "tiny:qwen2_5_vl"  # local Hugging Face directory or "tiny:<family>"
    data: str = ""  # training JSONL to filter
    output_dir: str = "runs/difficulty_filter"
    device: str = "cpu"
    dtype: str = "auto"
    backend: Literal["auto", "torch", "triton", "flex"] = "auto"
    intervention: CellConfig | None = None  # e.g. {preset: avar, params: {alpha: 0.2, beta: 0.5}}; None: unpatched
    use_boxes: bool = True
    rollouts: int = 8  # G
    low: float = 0.25
    high: float = 0.75
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    prompts_per_batch: int = 1  # one generate() call holds prompts_per_batch * rollouts sequences

    def validate(self):
        if not self.data:
            raise ValueError("data: give the training JSONL to filter")
        if self.rollouts < 1:
            raise ValueError(f"rollouts must be >= 1, got {self.rollouts}")
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")
        if self.max_new_tokens < 1 or self.prompts_per_batch < 1:
            raise ValueError("max_new_tokens and prompts_per_batch must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (rollouts are sampled), got {self.temperature}")


@dataclass
class FilterResult:
    report: dict
    paths: dict[str, Path] = field(default_factory=dict)
    new_rows: int = 0


def in_band(accuracy: float, low: float, high: float) -> bool:
    return low <= accuracy <= high


def _prompt_parts(s: TrainSample) -> tuple[str | None, str]:
    """(system text or None, user text) of a single-turn prompt."""
    msgs = s.prompt_messages()
    system = None
    if msgs[0]["role"] == "system":
        system = "".join(p["text"] for p in msgs[0]["content"] if p["type"] == "text")
        msgs = msgs[1:]
    if len(msgs) != 1 or msgs[0]["role"] != "user":
        raise ValueError(f"{s.where}: the filter needs a single-turn prompt (optional system + one user turn), "
                         f"got roles {[m['role'] for m in msgs]}")
    return system, "".join(p["text"] for p in msgs[0]["content"] if p["type"] == "text")


def _request(s: TrainSample) -> Request:
    system, text = _prompt_parts(s)
    return Request(text, s.load_images(), system)


def _chunk_seed(seed: int, first_id: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(first_id.encode())) % (2**31)


def _rebased(s: TrainSample, out_dir: Path) -> dict:
    obj = sample_to_json(s)
    refs = []
    for ref in obj["images"]:
        if ref.startswith("data:") or Path(ref).is_absolute():
            refs.append(ref)
        else:
            refs.append(os.path.relpath((Path(s.base_dir) / ref).resolve(), out_dir.resolve()))
    obj["images"] = refs
    return obj


def run_filter(cfg: FilterConfig, *, limit: int | None = None, progress: bool = True, model=None,
               processor=None) -> FilterResult:
    """Run (or resume) the filter; `model` / `processor` may be passed in-process (then `cfg.model` is unused)."""
    cfg.validate()
    samples = read_samples(cfg.data, limit=limit)
    for s in samples:  # validate everything before loading a model or writing a file
        if s.answer is None:
            raise ValueError(f"{s.where}: sample {s.id!r} has no 'answer'; the filter scores rollouts against it")
        _prompt_parts(s)
    cell = None
    if cfg.intervention is not None:
        from ..eval.sweep_config import Cell

        cell = Cell.make(cfg.intervention.preset, cfg.intervention.params, name=cfg.intervention.name)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(out / "accuracies.jsonl")
    todo = [s for s in samples if s.id not in log]
    if todo and model is None:
        from ..eval.sweep import load_model_for

        model, processor = load_model_for(cfg)
    handle = None
    if todo and cell is not None:
        from ..patch import patch

        handle = patch(model, processor, intervention=cell.intervention, backend=cfg.backend)
    g = cfg.rollouts
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="rollouts", unit="prompt",
               disable=not progress)
    new = 0
    try:
        index = {s.id: i for i, s in enumerate(samples)}
        chunks: dict[int, list[TrainSample]] = {}
        for s in todo:  # fixed chunks of the input order: a resumed run regenerates exactly the missing chunks
            chunks.setdefault(index[s.id] // cfg.prompts_per_batch, []).append(s)
        for c, chunk in sorted(chunks.items()):
            first = samples[c * cfg.prompts_per_batch].id
            requests = [_request(s) for s in chunk for _ in range(g)]
            if handle is not None:
                boxes = [s.region_boxes() if cfg.use_boxes else [] for s in chunk for _ in range(g)]
                images = [(im.height, im.width) for r in requests for im in r.images]
                handle.set_target(boxes=boxes, images=images) if any(boxes) else handle.set_target(None)
            seed = _chunk_seed(cfg.seed, first)
            outs = generate_batch(model, processor, requests, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                                  temperature=cfg.temperature, top_p=cfg.top_p, seed=seed)
            for k, s in enumerate(chunk):
                texts = [o.text for o in outs[k * g:(k + 1) * g]]
                results = [score(s, t) for t in texts]
                correct = sum(r.correct for r in results)
                acc = correct / g
                log.append({"id": s.id, "accuracy": acc, "correct": correct, "rollouts": g,
                            "kept": in_band(acc, cfg.low, cfg.high), "seed": seed,
                            "extracted": [r.extracted for r in results], "completions": texts})
                new += 1
                bar.update(1)
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
    rows = [log.get(s.id) for s in samples]
    kept = [s for s, r in zip(samples, rows) if in_band(r["accuracy"], cfg.low, cfg.high)]
    too_hard = sum(r["accuracy"] < cfg.low for r in rows)
    too_easy = sum(r["accuracy"] > cfg.high for r in rows)
    hist: dict[str, int] = {}
    for r in rows:
        hist[f"{r['correct']}/{r['rollouts']}"] = hist.get(f"{r['correct']}/{r['rollouts']}", 0) + 1
    report: dict[str, Any] = {"prompts": len(samples), "kept": len(kept), "too_hard": too_hard, "too_easy": too_easy,
                              "rollouts": g, "band": [cfg.low, cfg.high],
                              "correct_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0].split("/")[0])))}
    paths = {"accuracies": log.path, "kept": out / "kept.jsonl", "report": out / "report.json"}
    write_samples([_rebased(s, out) for s in kept], paths["kept"])
    tmp = paths["report"].with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, paths["report"])
    return FilterResult(report, paths, new)


def summary_table(result: FilterResult) -> str:
    r = result.report
    lines = ["| difficulty filter | count |", "|---|---:|", f"| prompts | {r['prompts']} |",
             f"| kept (accuracy in [{r['band'][0]}, {r['band'][1]}]) | {r['kept']} |",
             f"| too hard (below) | {r['too_hard']} |", f"| too easy (above) | {r['too_easy']} |",
             f"| new rows this run | {result.new_rows} |"]
    lines += [f"| correct {k} | {v} |" for k, v in r["correct_histogram"].items()]
    lines.append(f"kept: {result.paths['kept']}  accuracies: {result.paths['accuracies']}")
    return "\n".join(lines)
