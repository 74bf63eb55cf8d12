"""TRL plugin: attn-mod's attention rewards for `trl.GRPOTrainer` and attention losses for `trl.SFTTrainer`.

    handle = attn_mod.patch(model, processor)                       # once; any intervention
    trainer = GRPOTrainer(model=model, processing_class=processor, args=GRPOConfig(...), train_dataset=ds,
                          reward_funcs=[SayoAttentionReward(model, processor), accuracy])
    trainer = AttentionSFTTrainer(model=model, processing_class=processor, args=SFTConfig(...), train_dataset=ds)

Rewards (TRL calls `f(prompts=, completions=, completion_ids=, **dataset_columns, trainer_state=, log_extra=,
log_metric=)` and wants one float per completion; it hands over no model and no tensors):
`SayoAttentionReward` / `AvarVisualReward` rebuild prompt + completion as ONE teacher-forced sequence per
completion (the prompt rendered by the processor's chat template with its images, then the generated
`completion_ids`), run one no-grad forward of the patched policy per micro-batch with attention capture
(O(N) memory: masses, never attention matrices), and return the value of `attn_mod.trainers.rewards`
(`sayo_attention_reward` / `avar_visual_reward`; the formulas live there). TARGET tokens come from the
`boxes` column (pixels of the original image: one box, a list of boxes of the only image, or one list per
image). Completions without a box (SAYO) or a system turn (AVAR) get 0 and are counted
(`<name>/undefined` through `log_metric`), as are `<name>/vas` and `<name>/target_attention`.

`AttentionSFTTrainer` (a `trl.SFTTrainer`) adds `lambda_img L_img + lambda_sys L_sys`
(`attn_mod.trainers.losses.agto_losses` / `sft_objective`) from the masses of TRL's own loss forward
(capture around `super().compute_loss`), logs both terms (`attn/loss_img`, `attn/loss_sys`), and refuses
settings that cannot give masses (packing / padding-free, unpatched model, reentrant checkpointing,
a loss on the whole sequence instead of the answer).

trl is optional: importing this module without trl works; only `AttentionSFTTrainer` needs it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Sequence

import torch
from torch import nn

from ..capture import capture
from ..categories import SYSTEM, validate_categories
from ..data.samples import SampleFormatError, parse_boxes
from ..metrics import target_attention_from_masses, token_entropy, vas_from_masses
from ..models import SUPPORTED_FAMILIES, UnsupportedModelError, get_adapter
from ..patch import BoxTarget, patch, patch_state
from ..regions import CONVENTIONS, SELECTION_RULES
from .losses import AGTO_EPS, AGTO_LAMBDA, QUERY_SETS, agto_losses, agto_rows, sft_objective
from .rewards import (AVAR_EPS, ROW_CHOICES, SAYO_EPS, TOP_FRAC, accuracy_reward, avar_visual_reward,
                      completion_mask, sayo_attention_reward)

try:  # optional dependency: only AttentionSFTTrainer needs it
    from trl import SFTTrainer as _SFTTrainer
except ImportError as _exc:  # pragma: no cover - exercised by a subprocess test
    _SFTTrainer = None
    _TRL_IMPORT_ERROR: ImportError | None = _exc
else:
    _TRL_IMPORT_ERROR = None

logger = logging.getLogger(__name__)

__all__ = ["AttentionSFTTrainer", "AvarVisualReward", "SayoAttentionReward", "accuracy", "build_completion_batch",
           "policy_module"]


# ------------------------------------------------------------------------------------------------ the policy


def _wrapped_chain(model: nn.Module) -> list[nn.Module]:
    """model, then what it wraps: DDP / FSDP / DataParallel `.module`, torch.compile `._orig_mod`, PEFT base."""
    chain = [model]
    m = model
    for _ in range(8):
        inner = None
        if hasattr(m, "get_base_model") and callable(m.get_base_model):  # peft.PeftModel
            inner = m.get_base_model()
        elif isinstance(getattr(m, "_orig_mod", None), nn.Module):  # torch.compile
            inner = m._orig_mod
        elif isinstance(getattr(m, "module", None), nn.Module):  # DDP / FSDP / DataParallel / DeepSpeed engine
            inner = m.module
        if inner is None or inner is m:
            break
        chain.append(inner)
        m = inner
    return chain


def policy_module(model: nn.Module) -> nn.Module:
    """The module attn-mod patches / captures for `model`, through accelerate / DDP / compile / PEFT wrappers:
    the first patched module of the chain, else the innermost one (the plain transformers model)."""
    chain = _wrapped_chain(model)
    for m in chain:
        if patch_state(m) is not None:
            return m
    return chain[-1]


def _refuse_sharded(module: nn.Module, who: str) -> None:
    """The reward's forward runs the local module: parameters sharded by DeepSpeed ZeRO-3 or FSDP2 are not whole."""
    p = next(module.parameters(), None)
    sharded = p is not None and (hasattr(p, "ds_id") or type(p.data).__name__ == "DTensor"
                                 or type(p).__name__ == "DTensor")
    if sharded:
        raise NotImplementedError(f"{who} runs a forward of the local policy, whose parameters are sharded "
                                  "(DeepSpeed ZeRO-3 / FSDP); use DDP or ZeRO-1/2 for attention rewards")


def _check_patchable(module: nn.Module, processor, who: str) -> None:
    """Raise before any training step if attn-mod cannot label this model's tokens automatically."""
    state = patch_state(module)
    if state is not None:
        if state.labeler is None:
            raise ValueError(f"{who} needs automatic token categories, but the model was patched with "
                             "categories='explicit'; patch it with attn_mod.patch(model, processor) instead")
        return
    try:
        adapter = get_adapter(module)
    except UnsupportedModelError as e:
        model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
        raise UnsupportedModelError(
            f"{who}: attn-mod cannot patch model type {model_type!r}; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}. Use a model of a supported family (the attention objectives need "
            "automatic system / image / response labels)") from e
    if processor is None:
        raise ValueError(f"{who} needs the model's processor (chat-template role markers, image geometry)")
    adapter.labeler(module, processor)  # raises if the processor lacks the role markers


# ------------------------------------------------------------------------------------------------ batches


def _is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def _prompt_images(prompt, column_images) -> list:
    """The images of one prompt, in order: the payloads of its image parts (what TRL generated from), else the
    `image` / `images` column."""
    if not _is_conversational(prompt):
        return list(column_images or [])
    parts = [p for m in prompt if isinstance(m.get("content"), list) for p in m["content"]
             if isinstance(p, dict) and p.get("type") == "image"]
    payloads = [p["image"] for p in parts if p.get("image") is not None]
    if payloads:
        return payloads
    column = list(column_images or [])
    if column and len(column) != len(parts):
        raise ValueError(f"the prompt has {len(parts)} image part(s) but the image column holds {len(column)} "
                         'image(s); give one {"type": "image"} part per image (TRL does this for you)')
    return column


def _column_images(kwargs: dict, n: int) -> list:
    if kwargs.get("images") is not None:
        return [imgs if isinstance(imgs, (list, tuple)) else ([] if imgs is None else [imgs])
                for imgs in kwargs["images"]]
    if kwargs.get("image") is not None:
        return [[] if im is None else [im] for im in kwargs["image"]]
    return [[] for _ in range(n)]


def _image_hw(image) -> tuple[int, int]:
    if hasattr(image, "height") and hasattr(image, "width"):
        return int(image.height), int(image.width)
    raise ValueError(f"images must be PIL images to map boxes to visual tokens, got {type(image).__name__}")


def build_completion_batch(processor, prompts: Sequence, completion_ids: Sequence[Sequence[int]],
                           images: Sequence[Sequence] | None = None, *, pad_token_id: int,
                           eos_token_id: int | Sequence[int] | None = None,
                           chat_template_kwargs: dict | None = None) -> dict[str, Any]:
    """One teacher-forced batch: [left-padded prompt | right-padded completion] per row (TRL's own layout).

    prompts: conversational (list of messages; image parts may carry their PIL image) or plain strings;
    completion_ids: the generated token ids (TRL stops them after the first EOS); images: per prompt, used when
    the prompt's image parts carry no payload. Returns the processor's model inputs (input_ids, attention_mask,
    pixel_values, image_grid_thw, mm_token_type_ids extended with zeros over the completion) plus
    `completion_positions` (B, S) bool (valid completion tokens, `rewards.completion_mask`), `prompt_length` P
    (completion token t of every row sits at P + t) and `images` (flat list, processor order).
    """
    n = len(prompts)
    if len(completion_ids) != n:
        raise ValueError(f"{n} prompts but {len(completion_ids)} completions; pass one completion per prompt")
    per_prompt = [_prompt_images(p, None if images is None else images[i]) for i, p in enumerate(prompts)]
    texts = [processor.apply_chat_template(p, add_generation_prompt=True, tokenize=False,
                                           **(chat_template_kwargs or {})) if _is_conversational(p) else str(p)
             for p in prompts]
    flat = [im for ims in per_prompt for im in ims]
    tok = getattr(processor, "tokenizer", processor)
    kwargs = dict(text=texts, return_tensors="pt", padding=True, add_special_tokens=False)
    if flat:  # Gemma3 / Mllama / Idefics3 / SmolVLM processors take the images nested per prompt
        from ..eval.generation import processor_nests_images

        kwargs["images"] = per_prompt if processor_nests_images(processor) else flat
    side = getattr(tok, "padding_side", "left")
    tok.padding_side = "left"
    try:
        enc = dict(processor(**kwargs))
    finally:
        tok.padding_side = side
    prompt_ids, prompt_mask = enc.pop("input_ids"), enc.pop("attention_mask")
    B, P = prompt_ids.shape
    T = max((len(c) for c in completion_ids), default=0)
    comp = torch.full((B, T), int(pad_token_id), dtype=prompt_ids.dtype)
    comp_mask = torch.zeros((B, T), dtype=prompt_mask.dtype)
    for b, ids in enumerate(completion_ids):
        ids = [int(t) for t in ids]
        comp[b, :len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
        comp_mask[b, :len(ids)] = 1
    valid = comp_mask.bool()
    if eos_token_id is not None and T:
        valid &= completion_mask(comp, eos_token_id)
    out = {"input_ids": torch.cat([prompt_ids, comp], dim=1), "attention_mask": torch.cat([prompt_mask, comp_mask], 1)}
    for key, val in enc.items():
        if key in ("mm_token_type_ids", "token_type_ids") and isinstance(val, torch.Tensor):
            val = torch.cat([val, val.new_zeros((B, T))], dim=1)
        out[key] = val
    out["completion_positions"] = torch.cat([torch.zeros((B, P), dtype=torch.bool), valid], dim=1)
    out["prompt_length"] = P
    out["images"] = flat
    out["images_per_prompt"] = [len(ims) for ims in per_prompt]
    return out


def region_entries(raw, n_images: int, where: str) -> list:
    """A `boxes` column value -> entries for `attn_mod.regions.target_token_mask` ([] = no target); the value
    follows the training-data format (`attn_mod.data.samples`): None / [] / one box / boxes of the only image /
    one list of boxes per image, pixels of the original image."""
    if raw is None:
        return []
    raw = _lists(raw)
    if isinstance(raw, list) and len(raw) == 4 and all(isinstance(v, (int, float)) for v in raw):
        raw = [raw]  # a single box
    try:
        boxes = parse_boxes(raw, n_images, where)
    except SampleFormatError as e:
        raise ValueError(str(e)) from None
    return [] if not boxes else [(k, box) for k, per_image in enumerate(boxes) for box in per_image]


def _lists(x):
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


@contextmanager
def _explicit_categories(state, cats: torch.Tensor):
    """Use `cats` (B, S) as the categories of the next prefill(s) of the patched model, then restore."""
    previous = state.explicit
    state.explicit = validate_categories(cats)
    try:
        yield
    finally:
        state.explicit = previous


# ------------------------------------------------------------------------------------------------ rewards


class _AttentionReward:
    """Shared machinery of the TRL attention rewards (see the module docstring)."""

    default_name = "attention_reward"
    needs_boxes = False

    def __init__(self, model: nn.Module, processor, *, micro_batch_size: int = 4, temperature: float = 1.0,
                 name: str | None = None, boxes_column: str = "boxes",
                 box_convention: str = "pixel", box_by: str = "overlap", chat_template_kwargs: dict | None = None,
                 eos_token_id: int | Sequence[int] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs the policy model object (the one given to the trainer), "
                            f"got {type(model).__name__}; load the model yourself and pass it to both")
        if int(micro_batch_size) < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (use the trainer's GRPOConfig.temperature), got {temperature}")
        if box_convention not in CONVENTIONS:
            raise ValueError(f"unknown box convention {box_convention!r}; choose one of {CONVENTIONS}")
        if box_by not in SELECTION_RULES:
            raise ValueError(f"unknown box selection rule {box_by!r}; choose one of {SELECTION_RULES}")
        self.__name__ = name or self.default_name  # TRL logs rewards/<__name__>/mean
        self.model = model
        self.processor = processor
        self.micro_batch_size = int(micro_batch_size)
        self.temperature = float(temperature)
        self.boxes_column = boxes_column
        self.box_convention = box_convention
        self.box_by = box_by
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        module = policy_module(model)
        _check_patchable(module, processor, type(self).__name__)
        if self.needs_boxes:
            from ..regions import geometry_for

            state = patch_state(module)
            family = state.adapter.name if state is not None else get_adapter(module).name
            geometry_for(processor, family=family if family != "generic" else None)  # fail now, not at step 1
        tok = getattr(processor, "tokenizer", processor)
        if eos_token_id is None:
            ids = [getattr(tok, "eos_token_id", None)]
            gen = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
            ids += list(gen) if isinstance(gen, (list, tuple)) else [gen]
            eos_token_id = sorted({int(i) for i in ids if i is not None})
        self.eos_token_id = eos_token_id
        pad = getattr(tok, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (eos_token_id[0] if isinstance(eos_token_id, list)
                                                             else eos_token_id))
        self._patched_here = None

    # the patched policy ------------------------------------------------------------------------------
    def _policy(self):
        module = policy_module(self.model)
        _refuse_sharded(module, self.__name__)
        state = patch_state(module)
        if state is None:
            self._patched_here = patch(module, self.processor)
            state = self._patched_here.state
            logger.warning("%s: the policy was not patched by attn-mod; patched it now with the identity "
                           "intervention (attention unchanged) to capture masses. Call attn_mod.patch(model, "
                           "processor, ...) before training to choose the intervention / backend.", self.__name__)
        if state.labeler is None:
            raise ValueError(f"{self.__name__} needs automatic token categories; patch the model with "
                             "attn_mod.patch(model, processor) (not categories='explicit')")
        return module, state

    def _categories(self, state, batch: dict, boxes: list | None) -> torch.Tensor:
        """(B, S) categories: the patch's labels, RESPONSE exactly on the completion tokens, TARGET from boxes."""
        ids, am = batch["input_ids"], batch["attention_mask"]
        target = None
        if boxes is not None and any(boxes):
            sizes = [_image_hw(im) for im in batch["images"]]
            target = BoxTarget(boxes, sizes, None, self.box_convention, self.box_by).mask(
                ids, batch, state.config, state.geometry(), state.processor)
        labels = torch.where(batch["completion_positions"], ids, torch.full_like(ids, -100))
        return state.labeler(ids, attention_mask=am, mm_token_type_ids=batch.get("mm_token_type_ids"),
                             labels=labels, target_mask=target, options=state.options)

    def _forward(self, module, state, batch: dict, cats: torch.Tensor):
        """One no-grad teacher-forced pass: (Recording of all layers (the VAS diagnostic needs them),
        row_entropy (B, S) on the completion's decision rows)."""
        device = next(module.parameters()).device
        skip = {"completion_positions", "prompt_length", "images", "images_per_prompt"}
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k not in skip}
        S = inputs["input_ids"].shape[1]
        P = batch["prompt_length"]
        keep = S - P + 1  # logits of rows P-1 .. S-1: the decision rows of every completion token
        with torch.no_grad(), _explicit_categories(state, cats), capture(module, layers="all") as rec:
            out = module(**inputs, use_cache=False, logits_to_keep=keep)
        logits = out.logits[:, -keep:]
        row_entropy = torch.zeros((cats.shape[0], S), dtype=torch.float32, device=logits.device)
        row_entropy[:, S - keep:] = token_entropy(logits, self.temperature)
        return rec, row_entropy

    # TRL entry point ---------------------------------------------------------------------------------
    def __call__(self, prompts, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError(f"{self.__name__} needs completion_ids (TRL passes them); the teacher-forced pass "
                             "uses the generated token ids, not the decoded text")
        n = len(prompts)
        module, state = self._policy()
        column_images = _column_images(kwargs, n)
        raw_boxes = kwargs.get(self.boxes_column)
        if raw_boxes is not None and len(raw_boxes) != n:
            raise ValueError(f"column {self.boxes_column!r} has {len(raw_boxes)} entries for {n} completions")
        values: list[float] = []
        stats = {"undefined": 0, "vas": [], "target_attention": []}
        for start in range(0, n, self.micro_batch_size):
            idx = range(start, min(n, start + self.micro_batch_size))
            batch = build_completion_batch(
                self.processor, [prompts[i] for i in idx], [completion_ids[i] for i in idx],
                [column_images[i] for i in idx], pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
                chat_template_kwargs=self.chat_template_kwargs)
            boxes = None
            if raw_boxes is not None:
                boxes = [region_entries(raw_boxes[i], k, f"column {self.boxes_column!r}, completion {i}")
                         for i, k in zip(idx, batch["images_per_prompt"])]
            cats = self._categories(state, batch, boxes)
            rec, row_entropy = self._forward(module, state, batch, cats)
            result = self._reward(rec, row_entropy, batch["completion_positions"].to(row_entropy.device))
            values.extend(float(v) for v in result.values.tolist())
            stats["undefined"] += int((~result.defined).sum())
            self._diagnostics(rec, batch["completion_positions"], stats)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"{self.__name__}/undefined", float(stats["undefined"]))
            for key in ("vas", "target_attention"):
                vals = [v for v in stats[key] if v == v]  # drop NaN (samples without the needed keys)
                if vals:
                    log_metric(f"{self.__name__}/{key}", sum(vals) / len(vals))
        return values

    @staticmethod
    def _diagnostics(rec, positions: torch.Tensor, stats: dict) -> None:
        """Per-sample VAS (all captured layers, completion rows) and mean target attention a(i) (last layer)."""
        masses = rec.masses()
        rows = positions.to(masses.device)
        vas = vas_from_masses(masses, rec.query_categories(), rows=rows).value
        has_sys = (rec.categories.to(masses.device).long() == SYSTEM).any(1)  # no system turn: VAS undefined
        stats["vas"].extend(torch.where(has_sys, vas, torch.full_like(vas, float("nan"))).tolist())
        a = target_attention_from_masses(masses[-1:], rec.categories, windows=rec.windows(rec.layers[-1:]),
                                         block_ids=rec.block_ids).a[0]  # (B, S), NaN without TARGET keys
        ok = rows & ~torch.isnan(a)
        per = torch.where(ok, a, torch.zeros_like(a)).sum(1) / ok.sum(1).clamp_min(1)
        stats["target_attention"].extend(torch.where(ok.any(1), per, torch.full_like(per, float("nan"))).tolist())

    def _reward(self, rec, row_entropy, positions):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r})"


class SayoAttentionReward(_AttentionReward):
    """SAYO r_v per completion (`attn_mod.trainers.rewards.sayo_attention_reward`) at the last layer.

    Options: rows "decision" (default) | "emitted"; top_frac 0.3; eps 1e-8; temperature (use GRPOConfig's);
    micro_batch_size; boxes_column "boxes"; box_convention "pixel"; box_by "overlap"; name "sayo_attention".
    """

    default_name = "sayo_attention"
    needs_boxes = True

    def __init__(self, model, processor, *, rows: str = "decision", top_frac: float = TOP_FRAC,
                 eps: float = SAYO_EPS, **options):
        if rows not in ROW_CHOICES:
            raise ValueError(f"rows must be one of {ROW_CHOICES}, got {rows!r}")
        if not 0 < top_frac <= 1:
            raise ValueError(f"top_frac must lie in (0, 1], got {top_frac}")
        super().__init__(model, processor, **options)
        self.rows, self.top_frac, self.eps = rows, float(top_frac), float(eps)

    def _reward(self, rec, row_entropy, positions):
        return sayo_attention_reward(rec.mass(-1), rec.categories, row_entropy, positions, rows=self.rows,
                                     window=rec.windows((-1,))[0], block_ids=rec.block_ids,
                                     top_frac=self.top_frac, eps=self.eps)


class AvarVisualReward(_AttentionReward):
    """AVAR r_vis per completion (`attn_mod.trainers.rewards.avar_visual_reward`) over `layers` (default all;
    the AVAR recipe uses 0..7), `heads` and the completion rows. Options as `SayoAttentionReward`, plus eps 1e-6;
    name "avar_visual". Weight it in GRPOConfig.reward_weights (the recipe: 0.3)."""

    default_name = "avar_visual"

    def __init__(self, model, processor, *, layers="all", heads=None, eps: float = AVAR_EPS, **options):
        super().__init__(model, processor, **options)
        from ..intervention import _resolve_indices

        module = policy_module(model)
        state = patch_state(module)
        adapter = state.adapter if state is not None else get_adapter(module)
        num_layers = len(adapter.attention_modules(module))
        cross = adapter.cross_attention_layers(module)  # Mllama: keys are vision tokens only, no r_vis there
        if layers == "all":
            self.layer_indices = [i for i in range(num_layers) if i not in cross]
        else:
            self.layer_indices = _resolve_indices(layers, num_layers, "layer", "decoder layers")  # fail now
            bad = sorted(set(self.layer_indices) & cross)
            if bad:
                raise ValueError(f"layers {bad} are cross-attention layers (keys = vision tokens only); r_vis is "
                                 f"defined on self-attention layers: choose among "
                                 f"{[i for i in range(num_layers) if i not in cross]}")
        self.heads, self.eps = heads, float(eps)

    def _reward(self, rec, row_entropy, positions):
        masses = torch.stack([rec.mass(layer) for layer in self.layer_indices])
        return avar_visual_reward(masses, positions, heads=self.heads, eps=self.eps, key_cats=rec.categories)


def _completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        out = []
        for m in completion:
            c = m.get("content") if isinstance(m, dict) else m
            out.append(c if isinstance(c, str) else "".join(p.get("text", "") for p in c or [] if isinstance(p, dict)))
        return "".join(out)
    raise ValueError(f"cannot read a completion of type {type(completion).__name__}")


def accuracy(prompts=None, completions=None, answer=None, answer_type=None, options=None, **kwargs) -> list[float]:
    """TRL reward: 1.0 / 0.0 per completion (`attn_mod.trainers.rewards.accuracy_reward`) from the dataset's
    `answer` column (and optional `answer_type`, default "text", and `options` columns)."""
    if answer is None:
        raise ValueError("the accuracy reward needs an 'answer' column in the training dataset")
    n = len(completions)
    types = list(answer_type) if answer_type is not None else ["text"] * n
    return accuracy_reward([_completion_text(c) for c in completions], list(answer), types,
                           None if options is None else list(options))


# ------------------------------------------------------------------------------------------------ SFT


def _check_sft_args(args, kwargs: dict) -> None:
    """Settings that cannot give per-sequence masses, refused before TRL builds anything."""
    if args is None:
        return
    if getattr(args, "packing", False) or getattr(args, "eval_packing", False):
        raise ValueError("AttentionSFTTrainer needs one padded sequence per row (token categories are per sequence): "
                         "set packing=False (and eval_packing=False) in SFTConfig")
    if getattr(args, "padding_free", False):
        raise ValueError("AttentionSFTTrainer needs padded batches with an attention mask: set padding_free=False "
                         "in SFTConfig")
    _check_reentrant(args)
    if kwargs.get("compute_loss_func") is not None or getattr(args, "label_smoothing_factor", 0) > 0:
        raise ValueError("AttentionSFTTrainer adds its terms to TRL's fused LM loss; drop compute_loss_func / "
                         "label_smoothing_factor (they run a second forward whose masses would not match)")


def _check_reentrant(args) -> None:
    gc_kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if getattr(args, "gradient_checkpointing", False) and gc_kwargs.get("use_reentrant"):
        raise ValueError("reentrant gradient checkpointing runs the forward without autograd, so the attention "
                         "losses would get no gradient: set gradient_checkpointing_kwargs={'use_reentrant': False} "
                         "(or gradient_checkpointing=False) in SFTConfig")


if _SFTTrainer is not None:

    class AttentionSFTTrainer(_SFTTrainer):
        """`trl.SFTTrainer` whose loss is L = L_LM + lambda_img L_img + lambda_sys L_sys (AVAR AGTO).

        The model must be patched by attn-mod (`attn_mod.patch(model, processor)`) before the trainer is built.
        Options: lambda_img, lambda_sys (0.15), layers ("all"), heads (None = all), query ("response": the
        rows of tokens that carry LM loss; "prompt": the released code's prompt span), eps (1e-6).
        L_LM is TRL's own loss; `attn/loss_img` and `attn/loss_sys` are logged.
        """

        def __init__(self, model, args=None, *, lambda_img: float = AGTO_LAMBDA, lambda_sys: float = AGTO_LAMBDA,
                     layers="all", heads=None, query: str = "response", eps: float = AGTO_EPS, **kwargs):
            if query not in QUERY_SETS:
                raise ValueError(f"query must be one of {QUERY_SETS}, got {query!r}")
            for name, lam in (("lambda_img", lambda_img), ("lambda_sys", lambda_sys)):
                if not lam >= 0:
                    raise ValueError(f"{name} must be >= 0, got {lam}")
            if not isinstance(model, nn.Module):
                raise TypeError("AttentionSFTTrainer needs the model object, patched by attn-mod: load it, call "
                                "attn_mod.patch(model, processor), then pass it (a model name cannot be patched)")
            _check_sft_args(args, kwargs)
            module = policy_module(model)
            _check_patchable(module, kwargs.get("processing_class"), "AttentionSFTTrainer")
            if patch_state(module) is None:
                raise ValueError("AttentionSFTTrainer needs a model patched by attn-mod: call "
                                 "attn_mod.patch(model, processor) before building the trainer")
            dataset = kwargs.get("train_dataset")
            if args is not None and dataset is not None and not getattr(args, "assistant_only_loss", False):
                sample = next(iter(dataset))
                completion_only = getattr(args, "completion_only_loss", None)
                if completion_only is None:
                    completion_only = "prompt" in sample and "completion" in sample
                if not completion_only:
                    raise ValueError("AttentionSFTTrainer needs the LM loss on the answer only (the tokens with "
                                     "labels are the RESPONSE rows; the rest keeps its system / text labels): use a "
                                     "prompt-completion dataset (completion_only_loss) or assistant_only_loss=True")
            self.attn_lambda_img, self.attn_lambda_sys = float(lambda_img), float(lambda_sys)
            self.attn_layers, self.attn_heads, self.attn_query, self.attn_eps = layers, heads, query, float(eps)
            self._attn_module = module
            super().__init__(model, args, **kwargs)
            _check_reentrant(self.args)  # TRL may force reentrant checkpointing (PEFT + ZeRO-3)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels")
            if labels is None:
                raise ValueError("AttentionSFTTrainer needs 'labels' in the batch (TRL's collators add them)")
            with capture(self._attn_module, layers=self.attn_layers, detach=False) as rec:
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            loss, outputs = out if return_outputs else (out, None)
            run = 0  # TRL's loss forward; an eval forward for logits (return_outputs) comes after it
            rows = agto_rows(rec.query_categories(run), labels, query=self.attn_query)
            agto = agto_losses(rec.masses(run), rec.categories_of(run), rows, heads=self.attn_heads,
                               eps=self.attn_eps, windows=rec.windows(), block_ids=rec.block_ids_of(run))
            # When TRL's loss is normalised by the tokens of the whole accumulated batch (Trainer then does not
            # divide by the accumulation steps), the per-micro-batch AGTO means are averaged over the steps here,
            # as TRL does for its MoE aux loss; otherwise Trainer divides the total.
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                    self.compute_loss_func is not None
            steps = self.current_gradient_accumulation_steps if scaled and model.training else 1
            total = sft_objective(loss * steps, agto, lambda_img=self.attn_lambda_img,
                                  lambda_sys=self.attn_lambda_sys) / steps
            mode = "train" if self.model.training else "eval"
            for key, val in (("loss_img", agto.loss_img), ("loss_sys", agto.loss_sys)):
                val = self.accelerator.gather_for_metrics(val.detach().float().reshape(1)).mean().item()
                self._metrics[mode][f"attn/{key}"].append(val)
            return (total, outputs) if return_outputs else total

else:  # pragma: no cover - exercised by a subprocess test

    class AttentionSFTTrainer:  # type: ignore[no-redef]
        """Placeholder: trl is not installed."""

        def __init__(self, *args, **kwargs):
            raise ImportError("AttentionSFTTrainer needs trl: pip install 'attn-mod[train]' (trl>=1.16,<2)") \
                from _TRL_IMPORT_ERROR
