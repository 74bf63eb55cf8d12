"""lmms-eval model class around a patched in-process VLM.

    handle = attn_mod.patch(model, processor, intervention=attn_mod.Intervention.avar(0.2, 0.5))
    lm = AttnModLMMs(model, processor, handle=handle, batch_size=4)
    lmms_eval.evaluator.simple_evaluate(model=lm, tasks=["mme"], ...)     # an lmms instance is used as is
    lm.update(alpha=0.4)                                                  # live retune, no reload

    register_with_lmms_eval()   # `--model attn_mod --model_args pretrained=DIR,intervention=avar,alpha=0.2`

A "simple" lmms model: requests carry `Instance.args = (context, gen_kwargs, doc_to_visual, doc_id, task,
split)` and the documents are looked up in `self.task_dict[task][split][doc_id]`, which lmms-eval's
evaluator fills (`lm.task_dict[task_name] = task_obj.dataset`). Subclasses `lmms_eval.api.model.lmms`
when importable, otherwise `lmms` below, a stand-in mirroring EvolvingLMMs-Lab/lmms-eval
`lmms_eval/api/model.py` @ 06fd786e055427f8840abc54fff9e82d8e930c85 (request layout as used by
`lmms_eval/models/simple/qwen2_5_vl.py` @ 0229ae508e643d79164e17b4a9d523c6bbfcf5a1, registration as in
`lmms_eval/api/registry.py` @ 059d63b63cfbdc0256b82bde5d85609da8c40437). lmms-eval is not installed here.
"""

from __future__ import annotations

import abc
import re
from typing import Any, Mapping, Sequence

from ..generation import Request, generate_batch
from ._media import load_image

_PLACEHOLDER = re.compile(r"<image(?: \d+)?>")  # lmms-eval prompts mark images as <image> or <image N>
_HANDLED_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams"}


class _CacheHookStandIn:
    def __init__(self, cachinglm) -> None:
        self.dbdict = None if cachinglm is None else cachinglm.dbdict

    def add_partial(self, attr, req, res) -> None:
        if self.dbdict is not None:
            self.dbdict[repr((attr, req))] = res


class _LMMsStandIn(abc.ABC):
    """Local mirror of lmms-eval's `lmms` base class (state, abstract methods, rank/world size)."""

    is_simple: bool = True

    def __init__(self) -> None:
        self._rank = 0
        self._world_size = 1
        self.cache_hook = _CacheHookStandIn(None)
        self.task_dict = {}

    @abc.abstractmethod
    def loglikelihood(self, requests):
        ...

    @abc.abstractmethod
    def generate_until(self, requests):
        ...

    @abc.abstractmethod
    def generate_until_multi_round(self, requests):
        ...

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    def set_cache_hook(self, cache_hook) -> None:
        self.cache_hook = cache_hook


try:  # the real base class when lmms-eval is installed
    from lmms_eval.api.model import lmms  # type: ignore[import-not-found]

    HAVE_LMMS_EVAL = True
except ImportError:
    lmms = _LMMsStandIn
    HAVE_LMMS_EVAL = False


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_arg_string(arg_string: str) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} (numbers, true/false and none converted)."""
    out = {}
    for part in filter(None, (p.strip() for p in (arg_string or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"model argument {part!r} is not key=value")
        out[key.strip()] = _parse_value(value.strip())
    return out


class AttnModLMMs(lmms):
    """lmms-eval model: batched `generate_until` through `attn_mod.eval.generation.generate_batch`.

    Images of a request come first, then the context with its `<image>` / `<image N>` placeholders
    removed (as lmms-eval's own qwen2_5_vl model does). gen_kwargs used: until, max_new_tokens
    (default `max_new_tokens`), temperature (> 0 samples), top_p, do_sample; num_beams must be 1;
    other keys are ignored. Requests are batched `batch_size` at a time among those with equal gen_kwargs.
    """

    def __init__(self, model, processor, handle=None, *, batch_size: int = 1, max_new_tokens: int = 256,
                 system_prompt: str | None = None, seed: int | None = None):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._model = model
        self.processor = processor
        self.handle = handle
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = system_prompt
        self.seed = seed

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, pretrained: str, *, intervention: str = "identity", backend: str = "auto",
                        device: str = "cpu", dtype: str = "auto", **kwargs) -> AttnModLMMs:
        """Load a local checkpoint (`attn_mod.loading.load_model`) and patch it with a preset intervention.

        kwargs: the preset's parameters (alpha, beta, ...) and this class's keyword arguments.
        """
        import inspect

        from ...intervention import Intervention
        from ...loading import load_model
        from ...patch import patch

        own = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "processor", "handle"}
        lm_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        intervention_obj = Intervention.from_preset(intervention, **kwargs)
        model, processor = load_model(pretrained, device=device, dtype=dtype)
        handle = patch(model, processor, intervention=intervention_obj, backend=backend)
        return cls(model, processor, handle, **lm_kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Mapping[str, Any] | None = None):
        """lmms-eval's CLI constructor: 'pretrained=DIR,intervention=avar,alpha=0.2,beta=0.5,batch_size=2'."""
        args = parse_arg_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        extra.pop("max_batch_size", None)  # no automatic batch sizing
        args.update(extra)
        if "pretrained" not in args:
            raise ValueError("model_args need pretrained=<local checkpoint dir>; to evaluate an in-process model "
                             "pass AttnModLMMs(model, processor, handle) to simple_evaluate(model=...)")
        return cls.from_pretrained(args.pop("pretrained"), **args)

    # -------------------------------------------------------------------------------- properties
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def config(self):
        return self._model.config

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return next(self._model.parameters()).device

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    def update(self, intervention=None, **params):
        """Retune the patched model live (`handle.update`): e.g. `update(alpha=0.1, beta=0.3)`."""
        if self.handle is None:
            raise RuntimeError("no patch handle: pass handle=attn_mod.patch(model, processor, ...) to AttnModLMMs")
        self.handle.update(intervention, **params)
        return self

    # ---------------------------------------------------------------------------------- requests
    def loglikelihood(self, requests):
        raise NotImplementedError(
            "AttnModLMMs.loglikelihood: attn-mod's evaluation path (attn_mod.eval.generation) only generates; "
            "scoring a continuation given images needs a teacher-forced multimodal forward that is not "
            "implemented. Use generate_until tasks.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(
            "AttnModLMMs.generate_until_multi_round: multi-round tasks re-prompt with earlier answers through "
            "task-specific doc_to_text callbacks; attn-mod's generation path renders one user turn per request.")

    def _request(self, req) -> tuple[Request, dict, list[str]]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
        gen_kwargs = dict(gen_kwargs or {})
        try:
            doc = self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as e:
            raise KeyError(f"document {doc_id!r} of task {task!r} split {split!r} is not in task_dict (lmms-eval's "
                           "evaluator sets lm.task_dict[task] = task.dataset)") from e
        visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        visuals = [] if visuals is None else (list(visuals) if isinstance(visuals, (list, tuple)) else [visuals])
        images = [load_image(v) for v in visuals]
        question = _PLACEHOLDER.sub("", context).strip()
        until = gen_kwargs.get("until")
        until = [until] if isinstance(until, str) else list(until or [])
        if int(gen_kwargs.get("num_beams") or 1) != 1:
            raise NotImplementedError("num_beams > 1: attn_mod.eval.generation does greedy or sampled decoding only")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = gen_kwargs.get("do_sample")
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        gen = dict(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), do_sample=do_sample)
        if do_sample:
            gen.update(temperature=temperature if temperature > 0 else 1.0, top_p=float(gen_kwargs.get("top_p") or 1.0),
                       seed=self.seed)
        return Request(question, images, self.system_prompt), gen, [u for u in until if u]

    def generate_until(self, requests) -> list[str]:
        parsed = [self._request(req) for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen, _) in enumerate(parsed):
            groups.setdefault(repr(sorted(gen.items())), []).append(i)
        results: list[str | None] = [None] * len(requests)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                outs = generate_batch(self._model, self.processor, [parsed[i][0] for i in chunk], **parsed[chunk[0]][1])
                for i, out in zip(chunk, outs):
                    text = out.text
                    for stop in parsed[i][2]:
                        text = text.split(stop)[0]
                    results[i] = text
                    context, gen_kwargs = requests[i].args[:2]
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results


def register_with_lmms_eval(name: str = "attn_mod") -> type[AttnModLMMs]:
    """Register `AttnModLMMs` in lmms-eval's model registry under `name` (needs lmms-eval installed)."""
    try:
        from lmms_eval.api.model import lmms as upstream_lmms  # type: ignore[import-not-found]
        from lmms_eval.api.registry import register_model  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError("register_with_lmms_eval needs lmms-eval (pip install lmms-eval, in a GPU environment: "
                          "it pulls torchvision)") from e
    if not issubclass(AttnModLMMs, upstream_lmms):
        raise RuntimeError("AttnModLMMs does not subclass lmms_eval's lmms (lmms-eval became importable after "
                           "attn_mod.eval.harness.lmms_eval_adapter was imported); restart the interpreter")
    return register_model(name)(AttnModLMMs)
