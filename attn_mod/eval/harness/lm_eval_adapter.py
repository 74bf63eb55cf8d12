"""lm-evaluation-harness on an in-process (patched) VLM through its `hf-multimodal` model class.

    handle = attn_mod.patch(model, processor, intervention=attn_mod.Intervention.avar(0.2, 0.5))
    res = run_lm_eval(model, processor, ["attn_mod_synthetic_vqa"], task_paths=["configs/lm_eval"], limit=8)
    handle.update(alpha=0.4)                 # no reload: the next run sees the new intervention
    res2 = run_lm_eval(model, processor, ...)

The model and processor are passed as objects (`HFMultimodalLM(pretrained=model)`), never reloaded by
path, so the patched attention is what lm-eval runs. Verified against lm-eval 0.4.13
(`lm_eval/models/hf_vlms.py`, `lm_eval/evaluator.py`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

#: The repository's example lm-eval tasks (present in a source checkout, not in an installed wheel).
EXAMPLE_TASKS_DIR = Path(__file__).resolve().parents[3] / "configs" / "lm_eval"


def make_lm(model, processor, *, batch_size: int = 1, max_length: int | None = None, **lm_kwargs):
    """An lm-eval `HFMultimodalLM` around an already-loaded `model` and `processor` object.

    lm-eval 0.4.13 cannot take a processor object itself: `HFMultimodalLM._create_tokenizer` returns a
    processor passed as `tokenizer=` without storing it (so `self.tokenizer` is never set) and
    otherwise reloads one with `AutoProcessor.from_pretrained(model.name_or_path)`. The subclass
    below stores the given processor instead; everything else is lm-eval's own code.
    lm_kwargs go to `HFMultimodalLM` (e.g. `max_images`, `interleave`, `image_max_side`, `image_token_id`).
    """
    from lm_eval.models.hf_vlms import HFMultimodalLM

    class _InProcessHFMultimodalLM(HFMultimodalLM):
        def _create_tokenizer(self, pretrained, tokenizer, **kwargs) -> None:
            self.processor = processor
            self.tokenizer = getattr(processor, "tokenizer", processor)

    return _InProcessHFMultimodalLM(pretrained=model, batch_size=batch_size, max_length=max_length, **lm_kwargs)


def _override_specs(tasks: Sequence[str], task_manager, task_overrides: Mapping[str, Mapping[str, Any]],
                    tmpdir: str) -> list[str]:
    """Task specs with overrides applied: a YAML that `include`s the task's own YAML (so its
    `!function` helpers still resolve next to it) and sets the overridden keys (local keys win)."""
    import yaml

    unknown = set(task_overrides) - set(tasks)
    if unknown:
        raise ValueError(f"task_overrides names task(s) {sorted(unknown)} that are not in tasks={list(tasks)}")
    specs = []
    for name in tasks:
        if name not in task_overrides:
            specs.append(name)
            continue
        entry = task_manager.task_index.get(name)
        if entry is None or entry.yaml_path is None:
            raise ValueError(f"cannot override task {name!r}: it is not a YAML task found in lm-eval's tasks or "
                             f"task_paths (add its folder to task_paths)")
        cfg = {"include": str(Path(entry.yaml_path).resolve()), "task": name, **dict(task_overrides[name])}
        path = Path(tmpdir) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        specs.append(str(path))
    return specs


def run_lm_eval(model, processor, tasks: Sequence[str], *, task_paths: Sequence[str | os.PathLike] | None = None,
                task_overrides: Mapping[str, Mapping[str, Any]] | None = None, limit: int | float | None = None,
                batch_size: int = 1, gen_kwargs: Mapping[str, Any] | str | None = None,
                output_path: str | os.PathLike | None = None, apply_chat_template: bool = True,
                system_instruction: str | None = None, num_fewshot: int | None = None,
                log_samples: bool = True, bootstrap_iters: int = 0, include_default_tasks: bool = True,
                lm_kwargs: Mapping[str, Any] | None = None, **evaluate_kwargs) -> dict:
    """Evaluate the in-process `model` on lm-eval `tasks`; returns lm-eval's results dict.

    task_paths: folders with extra YAML tasks (e.g. `EXAMPLE_TASKS_DIR`), indexed after lm-eval's own tasks.
    task_overrides: {task: {config key: value}} applied over a task's YAML, e.g. the local data file
        `{"dataset_kwargs": {"data_files": {"test": path}}}`.
    gen_kwargs: overrides of every generate_until task's `generation_kwargs` (dict or "k=v,k=v").
    output_path: also write lm-eval's results JSON (and per-sample JSONL when log_samples) there.
    apply_chat_template: render prompts with the processor's chat template (images where `<image>` is).
    bootstrap_iters: lm-eval's stderr bootstrap (0 = no stderr, fast).
    include_default_tasks: also index lm-eval's built-in tasks (False: only task_paths; much faster start).
    Other keyword arguments go to `lm_eval.simple_evaluate`; `lm_kwargs` to `HFMultimodalLM`.
    """
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [tasks]
    include = [str(Path(p)) for p in task_paths] if task_paths else None
    task_manager = TaskManager(include_path=include, include_defaults=include_default_tasks)
    if isinstance(gen_kwargs, Mapping):
        gen_kwargs = dict(gen_kwargs)
    lm = make_lm(model, processor, batch_size=batch_size, **dict(lm_kwargs or {}))
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path is not None else None
    with tempfile.TemporaryDirectory(prefix="attn_mod_lm_eval_") as tmpdir:
        specs = _override_specs(list(tasks), task_manager, task_overrides or {}, tmpdir)
        results = simple_evaluate(
            model=lm, tasks=specs, task_manager=task_manager, limit=limit, batch_size=batch_size,
            gen_kwargs=gen_kwargs, apply_chat_template=apply_chat_template, system_instruction=system_instruction,
            num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
            evaluation_tracker=tracker, **evaluate_kwargs)
    if results is None:  # lm-eval returns None on non-zero ranks
        return {}
    if tracker is not None:
        samples = results.get("samples") if log_samples else None
        tracker.save_results_aggregated(results={k: v for k, v in results.items() if k != "samples"},
                                        samples=samples)
        if samples:
            for task_name in results["configs"]:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return results
