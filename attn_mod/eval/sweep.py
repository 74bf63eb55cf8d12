"""The sweep runner: patch the model once, retune it per cell (`handle.update`), generate and score every
sample of every dataset, append results per batch, resume where a previous run stopped.

    result = run_sweep(load_sweep_config("configs/sweeps/tiny_avar.yaml"))   # paths relative to the YAML
    result.paths["markdown"]   # results.md: cells x datasets, baseline and best highlighted

Output directory: manifest.json (what the results belong to), results.jsonl (one line per cell x dataset
x sample), summary.json / summary.csv / results.md (rewritten after every cell) and heatmap_<dataset>.png
(drawn once, at the end).
Batches are fixed chunks of each dataset, so a resumed run recomputes exactly the batch that was in flight.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..capture import capture
from ..categories import SYSTEM
from ..jsonl import quarantine_path, read_jsonl
from ..metrics import select_rows, target_attention, vas
from ..patch import patch
from .benchmark_metrics import metric_for, record_fields
from .datasets import Benchmark, DatasetError, load_benchmark
from .distributed import merge_shards, my_units, process_context, shard_files, shard_path
from .generation import Request, generate_batch
from .prompts import COT_INSTRUCTIONS, DEFAULT_INSTRUCTIONS, build_prompt
from .results import KEY_FIELDS, ResultStore, record_key
from .scoring import score
from .summary import summarize, write_summary
from .sweep_config import Cell, DatasetConfig, SweepConfig, check_model

MANIFEST_KEYS = ("model", "dtype", "generation", "datasets", "attention_metrics", "vas_rows", "system")
LEGACY_MANIFEST = {"vas_rows": "response", "system": None}  # what older manifests without these keys used


@dataclass
class SweepResult:
    summary: dict
    paths: dict
    new_records: int  # rows written by this run (all processes: counted by rank 0 at the merge)
    output_dir: Path
    is_main: bool = True  # False on the other processes of a distributed run (they write no summary)


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; the message says how many rows are saved and that rerunning resumes."""


def load_model_for(cfg: SweepConfig):
    """(model, processor): "tiny:<family>" builds the embedded random tiny model, anything else is a local path."""
    check_model(cfg)
    if cfg.model.startswith("tiny:"):
        from ..tiny import build_tiny

        model, processor = build_tiny(cfg.model.split(":", 1)[1])
        return model.to(cfg.device), processor
    from ..loading import load_model

    return load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)


def open_dataset(d: DatasetConfig, limit: int | None) -> Benchmark:
    lim = d.limit if limit is None else (limit if d.limit is None else min(limit, d.limit))
    return load_benchmark(d.path, name=d.name, format=d.format, columns=d.columns, image_root=d.image_root,
                          limit=lim, answer_type=d.answer_type)


def _manifest(cfg: SweepConfig) -> dict:
    full = dataclasses.asdict(cfg)
    return json.loads(json.dumps({k: full[k] for k in MANIFEST_KEYS}, default=str))


_RESCORABLE = ("limit", "metric")  # dataset settings that do not change stored rows


def _check_manifest(out: Path, cfg: SweepConfig) -> None:
    """Refuse to mix results of different sweeps in one folder (read-only; a folder without stored results,
    e.g. left by a run that failed before its first batch, never blocks)."""
    path, results = out / "manifest.json", out / "results.jsonl"
    if not path.exists() or not results.exists() or results.stat().st_size == 0:
        return
    old = json.loads(path.read_text())
    new = _manifest(cfg)
    for key in MANIFEST_KEYS:
        if key == "vas_rows" and not (old.get("attention_metrics") or new.get("attention_metrics")):
            continue  # no VAS recorded: the row set does not matter
        if old.get(key, LEGACY_MANIFEST.get(key)) != new.get(key) and key != "datasets":
            raise ValueError(f"{out} holds results of a different sweep ({key}: {old.get(key)!r} != "
                             f"{new.get(key)!r}); use another output folder, or --no-resume to start over")
    old_ds = {d.get("name") or d["path"]: d for d in old.get("datasets", [])}
    for d in new["datasets"]:
        prev = old_ds.get(d.get("name") or d["path"])
        if prev is not None and {k: v for k, v in prev.items() if k not in _RESCORABLE} != \
                {k: v for k, v in d.items() if k not in _RESCORABLE}:
            raise ValueError(f"{out}: dataset {d.get('name') or d['path']!r} settings changed since the "
                             "stored results; use another output folder, or --no-resume to start over")


def _batch_seed(seed: int, *parts) -> int:
    return (seed * 1_000_003 + zlib.crc32("|".join(map(str, parts)).encode())) % (2**31)


def _prompt_of(sample, d: DatasetConfig) -> str:
    instructions = COT_INSTRUCTIONS if d.instructions == "cot" else DEFAULT_INSTRUCTIONS
    return build_prompt(sample, template=d.template, instructions=instructions)


def _attention_metrics(rec, samples, rows: str) -> list[dict]:
    """Per-sample VAS (`rows`, all layers, ratio form) and, when a bbox is set, the mean over the same rows of
    SAYO target attention a / R_a (last layer): "target_a", "target_R_a"."""
    v = vas(rec, rows=rows)
    ta = target_attention(rec)
    chosen = select_rows(rec.query_categories(), rows)
    out = []
    for b, s in enumerate(samples):
        row = {"vas": _num(v.value[b]), "vas_rows": rows}
        if s.bbox:
            sel = chosen[b] & ~torch.isnan(ta.a[0, b])
            row["target_a"] = _num(ta.a[0, b][sel].mean()) if sel.any() else None
            row["target_R_a"] = _num(ta.R_a[0, b][sel].mean()) if sel.any() else None
        out.append(row)
    return out


def _check_bbox(sample, images, d: DatasetConfig) -> None:
    """A sample's target boxes must fit its first image; the error names the file, row and index."""
    from ..regions import box_to_pixels

    for box in sample.bbox or ():
        try:
            box_to_pixels(box, images[0])
        except (ValueError, IndexError) as e:
            raise DatasetError(f"{d.path} row {sample.row} (index {sample.index!r}): bbox {list(box)}: "
                               f"{e if images else 'the sample has no image'}") from None


def _num(t) -> float | None:
    x = float(t)
    return None if x != x else x


def run_sweep(cfg: SweepConfig, *, resume: bool = True, limit: int | None = None, progress: bool = True,
              model=None, processor=None) -> SweepResult:
    """Run (or resume) the sweep described by `cfg`. `model` / `processor` may be passed in-process.

    Everything is validated (model path / family, device, backend, datasets, an incompatible output folder)
    before the output folder is touched. Ctrl-C raises `SweepInterrupted` after the finished batches are saved.
    Launched in several processes (``accelerate launch``), the batches are shared out and merged at the end
    (`attn_mod.eval.distributed`); the merged files are those of a one-process run.
    """
    cfg.validate()
    ctx = process_context(cfg.device)
    if ctx.world > 1:
        cfg = dataclasses.replace(cfg, device=ctx.device_for(cfg.device))
    out = Path(cfg.output_dir)
    results_path = out / "results.jsonl"
    if model is None:
        check_model(cfg)
    cells = cfg.build_cells()
    datasets = [(d, open_dataset(d, limit)) for d in cfg.datasets]
    names = [bench.name for _, bench in datasets]
    scorers = {bench.name: metric_for(bench.name, d.metric) for d, bench in datasets}
    samples = {bench.name: list(bench) for _, bench in datasets}  # lazy images: nothing decoded yet
    if resume:
        _check_manifest(out, cfg)
    if model is None:
        model, processor = load_model_for(cfg)
    gen = cfg.generation
    # the one-process order: units (cell, dataset, batch start) and each row's place in it
    units = [(ci, di, start) for ci in range(len(cells)) for di, (_, bench) in enumerate(datasets)
             for start in range(0, len(samples[bench.name]), gen.batch_size)]
    place = {(cell.id, bench.name, s.sample_id): (ci, di, si) for ci, cell in enumerate(cells)
             for di, (_, bench) in enumerate(datasets) for si, s in enumerate(samples[bench.name])}
    ctx.barrier()  # every process has read the manifest before it is rewritten
    # Validated and loaded: from here on the folder is written.
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for stale in [results_path, quarantine_path(results_path), out / "manifest.json", *shard_files(out)]:
                stale.unlink(missing_ok=True)
        (out / "manifest.json").write_text(json.dumps(_manifest(cfg), indent=2))
        merge_shards(results_path)  # rows left by a killed multi-process run
    ctx.barrier()
    if ctx.world == 1:
        store = writer = ResultStore(results_path)
        done = store.done
    else:  # results.jsonl is read-only until the final merge; this process appends to its own shard
        done = {record_key(r) for r in read_jsonl(results_path, required=KEY_FIELDS, repair=False)}
        writer = ResultStore(shard_path(results_path, ctx.rank))

    def todo_of(unit):
        ci, di, start = unit
        name = datasets[di][1].name
        return [s for s in samples[name][start:start + gen.batch_size] if (cells[ci].id, name, s.sample_id) not in done]

    mine = my_units([u for u in units if todo_of(u)], ctx.rank, ctx.world)
    total = sum(len(v) for v in samples.values()) * len(cells) if ctx.world == 1 else sum(map(len, map(todo_of, mine)))
    todo = sum(len(todo_of(u)) for u in mine)
    # Gemma3 merges the system prompt into the first user turn: its labels need the prompt texts of this sweep
    system_texts = [t for t in [cfg.system, *(d.system for d, _ in datasets)] if t]
    handle = patch(model, processor, backend=cfg.backend, system_text=system_texts)
    bar = tqdm(total=total, initial=total - todo, disable=not progress or not ctx.is_main, unit="sample",
               dynamic_ncols=True)
    new_records = 0

    def tables():  # after each cell (one process): tables only; the heatmaps are drawn once, at the end
        write_summary(summarize(store.load(), cells, names, sample_ids=sample_ids, metrics=scorers), out,
                      pictures=False)

    sample_ids = {n: [s.sample_id for s in samples[n]] for n in names}
    try:
        current, cell_new = None, 0
        for unit in mine:
            ci, di, start = unit
            cell, (d, bench) = cells[ci], datasets[di]
            if cell.id != current:
                if cell_new and ctx.world == 1:
                    tables()
                handle.update(intervention=cell.intervention)  # patched once per process, retuned per cell
                bar.set_description(cell.name[:40])
                current, cell_new = cell.id, 0
            chunk = todo_of(unit)
            records = _run_batch(model, processor, handle, cfg, cell, d, bench.name, chunk,
                                 _batch_seed(gen.seed, cell.id, bench.name, start))
            writer.append(records)
            done.update(record_key(r) for r in records)
            new_records += len(records)
            cell_new += len(records)
            bar.update(len(records))
        if cell_new and ctx.world == 1:
            tables()
    except KeyboardInterrupt:
        saved = len(done) if ctx.world == 1 else f"{new_records} of this process's"
        raise SweepInterrupted(f"interrupted: {saved} result rows are saved in {writer.path} "
                               f"({new_records} from this run); rerun the same command to resume") from None
    finally:
        bar.close()
        handle.remove()
    if ctx.world > 1:
        ctx.barrier()  # every shard is complete
        if ctx.is_main:
            new_records = merge_shards(results_path, order=place.get)
        ctx.barrier()
        rows = read_jsonl(results_path, required=KEY_FIELDS, repair=False)
    else:
        rows = store.load()
    summary = summarize(rows, cells, names, sample_ids=sample_ids, metrics=scorers)
    paths = write_summary(summary, out) if ctx.is_main else {}
    paths["results"] = results_path
    return SweepResult(summary, paths, new_records, out, ctx.is_main)


def _run_batch(model, processor, handle, cfg: SweepConfig, cell: Cell, d: DatasetConfig, dataset: str, chunk,
               seed: int) -> list[dict]:
    gen = cfg.generation
    system = d.system if d.system is not None else cfg.system
    requests = [Request(_prompt_of(s, d), s.load_images(), system) for s in chunk]
    if cfg.attention_metrics:
        for s, r in zip(chunk, requests):
            _check_bbox(s, r.images, d)
    metrics = [{} for _ in chunk]
    t0 = time.perf_counter()
    kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, temperature=gen.temperature,
                  top_p=gen.top_p, seed=seed)
    if cfg.attention_metrics:
        # a sample's box is on its first image, wherever (and as often as) the prompt places it
        boxes = [[(j, box) for j, i in enumerate(r.layout()[1]) if i == 0 for box in s.bbox] if s.bbox else []
                 for s, r in zip(chunk, requests)]
        sizes = [(im.height, im.width) for r in requests for im in r.placed_images()]
        handle.set_target(boxes=boxes, images=sizes) if any(boxes) else handle.set_target(None)
        with capture(model) as rec:
            outs = generate_batch(model, processor, requests, **kwargs)
        metrics = _attention_metrics(rec, chunk, cfg.vas_rows)
        handle.set_target(None)
    else:
        outs = generate_batch(model, processor, requests, **kwargs)
    seconds = (time.perf_counter() - t0) / len(chunk)
    n_system = (handle.categories == SYSTEM).sum(dim=1).tolist()  # system-prompt slots of each sample
    records = []
    for s, o, m, ns in zip(chunk, outs, metrics, n_system):
        res = score(s, o.text)
        records.append({"cell": cell.id, "dataset": dataset, **s.to_record(), "prediction": o.text,
                        "extracted": res.extracted, "correct": res.correct, "method": res.method,
                        "n_tokens": len(o.token_ids), "n_system": int(ns), "seconds": round(seconds, 4), **m,
                        **({"meta": meta} if (meta := record_fields(s)) else {})})
    return records
