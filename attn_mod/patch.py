"""One-call patching of a Hugging Face VLM with category-aware attention.

    handle = attn_mod.patch(model, processor, intervention=Intervention.avar(alpha=0.2, beta=0.5))
    model.generate(**inputs)            # intervention active; KV cache and left padding handled
    handle.update(alpha=0.1, beta=0.3)  # live retune, no reload
    handle.remove()                     # the model is exactly as before

Mechanics (DESIGN.md, "Patching a model"): one attention function and a 2-D padding mask function are
registered with transformers' AttentionInterface / AttentionMaskInterface under the name "attn_mod" and
set on the text model only. Token categories live in library-owned state keyed by the model: a forward
pre-hook labels prefill tokens and appends RESPONSE slots for decode steps; the attention function looks
its module up, checks the labels against the key length and calls the operator (`kernels.function`).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from .categories import PAD, RESPONSE, LabelOptions, prompt_end_index, validate_categories
from .intervention import Intervention
from .kernels.function import category_attention, resolve_backend
from .kernels.spec import NUM_CATEGORIES
from .models import FamilyAdapter, get_adapter
from .regions import CONVENTIONS, SELECTION_RULES, resized_size_from_config, target_token_mask

ATTN_NAME = "attn_mod"  # no "flash", "sdpa", "flex" or "/" (each triggers special dispatch in transformers)

_STATES: weakref.WeakKeyDictionary[nn.Module, PatchState] = weakref.WeakKeyDictionary()
_BINDINGS: weakref.WeakKeyDictionary[nn.Module, tuple[PatchState, int]] = weakref.WeakKeyDictionary()


def _in_backward() -> bool:
    """True while autograd runs a backward pass (i.e. gradient-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


@dataclass(frozen=True)
class BoxTarget:
    """Pixel boxes to turn into a TARGET mask at the next prefill (see `attn_mod.regions.target_token_mask`)."""

    boxes: Sequence
    image_sizes: Sequence | None
    video_sizes: Sequence | None
    convention: str
    by: str

    def mask(self, input_ids: torch.Tensor, inputs: dict, config, geometry, processor) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("boxes need input_ids to find the visual tokens")
        grid = inputs.get("image_grid_thw")
        if grid is None and self.image_sizes:
            # generate() hands the model precomputed vision features, not image_grid_thw: re-derive the
            # grid exactly as the processor does (smart_resize of each original size).
            grid = torch.tensor([[1, *(d // geometry.patch_size for d in resized_size_from_config(processor, size))]
                                 for size in self.image_sizes])
        return target_token_mask(
            input_ids, getattr(config, "image_token_id", None), grid, self.boxes,
            self.image_sizes, merge_size=geometry.merge_size, patch_size=geometry.patch_size,
            convention=self.convention, by=self.by, mm_token_type_ids=inputs.get("mm_token_type_ids"),
            video_token_id=getattr(config, "video_token_id", None), video_grid_thw=inputs.get("video_grid_thw"),
            video_sizes=self.video_sizes)


class PatchState:
    """Everything the attention function needs for one patched model."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, labeler, options: LabelOptions,
                 intervention: Intervention, backend: str, processor=None):
        self.adapter = adapter
        self.processor = processor
        self.config = model.config
        self.labeler = labeler
        self.options = options
        self.attention_modules = adapter.attention_modules(model)
        self.num_layers = len(self.attention_modules)
        # decoder indices of cross-attention layers (keys = vision tokens; Mllama): `attend_cross`, `self.cross`
        self.cross_layers = adapter.cross_attention_layers(model)
        self.cross = None
        self.num_heads = adapter.num_query_heads(model)
        self.backend = backend
        self.labels: torch.Tensor | None = None  # (B, K) int8: one category per KV slot
        self.blocks: torch.Tensor | None = None  # (B, K) int32 bidirectional block ids per KV slot, or None
        self.prompt_end: torch.Tensor | None = None  # (B,)
        self.explicit: torch.Tensor | None = None
        self.target: torch.Tensor | BoxTarget | None = None
        self.forward_id = 0
        self.recorders: list = []
        # Callables fed the exact operator inputs of every (non-recomputed) attention call:
        # tap(layer, q, k, cats, transform=, scale=, causal=, row_enable=, head_enable=) (see attn_mod.attention_rows).
        self.taps: list = []
        self.mass_layers_last: set[int] = set()
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.set_intervention(intervention)

    # ------------------------------------------------------------------------------ intervention
    def set_intervention(self, intervention: Intervention) -> None:
        if not isinstance(intervention, Intervention):
            raise TypeError(f"intervention must be an attn_mod.Intervention, got {type(intervention).__name__}")
        layers = frozenset(intervention.layer_indices(self.num_layers))
        heads = intervention.head_mask(self.num_heads)
        self.intervention = intervention
        self.transform = intervention.transform()
        self.active_layers = frozenset() if self.transform.is_identity() else layers
        if not layers and not self.transform.is_identity():
            warnings.warn(f"intervention {intervention.describe()} resolves to no layer of this {self.num_layers}-layer "
                          f"model (layers={intervention.layers!r}): it changes nothing; pass layers within "
                          f"0..{self.num_layers - 1}", UserWarning, stacklevel=3)
        self.head_enable = None if bool(heads.all()) else heads
        self._transform_on: dict[torch.device, Any] = {}

    # ----------------------------------------------------------------------------------- labels
    def begin_forward(self, inputs: dict, past: int) -> None:
        """Label the slots this forward adds to the KV sequence (called by the model's pre-hook with the
        forward's keyword inputs; `past` = number of slots already in the KV cache)."""
        input_ids, attention_mask = inputs.get("input_ids"), inputs.get("attention_mask")
        inputs_embeds = inputs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("attn-mod needs input_ids or inputs_embeds to label tokens")
        B, S = ref.shape[:2]
        if past == 0:
            if self.explicit is not None:
                cats = validate_categories(self.explicit, (B, S))
            elif self.labeler is None:
                raise ValueError("this model was patched with categories='explicit': call "
                                 "handle.set_categories(cats) with a (B, S) tensor of codes before the forward")
            elif input_ids is None:
                raise ValueError("inputs_embeds without input_ids cannot be labelled from token ids: call "
                                 "handle.set_categories(cats) with a (B, S) tensor of codes before the forward")
            else:
                target = self.target
                if isinstance(target, BoxTarget):
                    target = self.adapter.box_mask(target, input_ids, inputs, self.config, self.processor)
                cats = self.labeler(input_ids, attention_mask=attention_mask,
                                    mm_token_type_ids=inputs.get("mm_token_type_ids"), labels=inputs.get("labels"),
                                    target_mask=target, options=self.options)
            self.labels = cats.to(torch.int8)
            self.prompt_end = prompt_end_index(self.labels)
            blocks = self.adapter.block_ids(inputs)
            self.blocks = None if blocks is None else blocks.to(device=self.labels.device, dtype=torch.int32)
            new_run = True
        else:
            if self.labels is None or self.labels.shape != (B, past):
                have = None if self.labels is None else tuple(self.labels.shape)
                raise RuntimeError(f"attn-mod labels cover {have} slots but the cache holds (B={B}, {past}); "
                                   "a cached continuation must follow a forward of this patched model")
            new = torch.full((B, S), RESPONSE, dtype=torch.int8, device=self.labels.device)
            if attention_mask is not None:
                new[attention_mask[:, -S:].to(new.device) == 0] = PAD
            self.labels = torch.cat([self.labels, new], dim=1)
            if self.blocks is not None:  # generated slots belong to no block
                self.blocks = torch.cat([self.blocks, self.blocks.new_zeros(B, S)], dim=1)
            new_run = False
        if self.cross_layers:
            self.cross = self.adapter.cross_inputs(self.cross, inputs, past, target=self.target, config=self.config,
                                                   processor=self.processor)
        self.forward_id += 1
        self._on_device = {}
        for rec in self.recorders:
            rec._begin(self, new_run)

    def geometry(self):
        """Patch geometry for pixel boxes, from the processor (checked against the family)."""
        return self.adapter.box_geometry(self.processor, self.config)

    def _labels_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if device not in self._on_device:
            self._on_device[device] = (self.labels.to(device), self.prompt_end.to(device),
                                       None if self.blocks is None else self.blocks.to(device))
        return self._on_device[device]

    # -------------------------------------------------------------------------------- attention
    def attend(self, layer: int, q, k, v, attention_mask, scaling, causal: bool,
               window: int | None = None) -> torch.Tensor:
        """Category attention of one layer: (B, Hq, Q, D) -> (B, Hq, Q, D); records masses if asked.
        window: the layer's sliding window (kernels/spec.py), None for full attention."""
        B, _, Q, _ = q.shape
        K = k.shape[2]
        if self.labels is None:
            raise RuntimeError("attn-mod has no token categories: the patched model's own forward must run "
                               "first (calling a submodule directly skips the labelling pre-hook)")
        cats, prompt_end, blocks = self._labels_on(k.device)
        offset = 0  # slots before the first key this layer sees (a sliding-window cache keeps only the last ones)
        if window is not None and cats.shape[0] == B and K < cats.shape[1]:
            # every dropped slot lies outside the window of every query row (bottom-right alignment), so only the
            # last K slots matter: their labels, blocks and absolute positions
            offset = cats.shape[1] - K
            cats = cats[:, offset:]
            blocks = None if blocks is None else blocks[:, offset:]
        if cats.shape != (B, K):
            raise RuntimeError(f"attn-mod holds categories for {tuple(cats.shape)} (B, K) slots but layer {layer} "
                               f"sees B={B}, K={K}; labels must cover every KV slot (static caches and packed "
                               "sequences are not supported)")
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attn-mod expects a 2-D padding mask, got shape {tuple(attention_mask.shape)}; "
                                 "custom 4-D masks are not supported")
            cats = torch.where(attention_mask[:, -K:].to(cats.device).bool(), cats, torch.zeros_like(cats))
        transform = row_enable = head_enable = None
        if layer in self.active_layers:
            if k.device not in self._transform_on:
                self._transform_on[k.device] = (self.transform.to(k.device),
                                                None if self.head_enable is None else self.head_enable.to(k.device))
            transform, head_enable = self._transform_on[k.device]
            row_pos = torch.arange(K - Q, K, device=k.device) + offset
            row_enable = self.intervention.row_enable(cats[:, K - Q:], row_pos, prompt_end)
        recomputing = _in_backward()
        if recomputing:  # gradient checkpointing: same ops as the original forward, nothing recorded
            want_mass = layer in self.mass_layers_last
        else:
            want_mass = any(rec._wants(layer) for rec in self.recorders)
            if layer == 0:
                self.mass_layers_last = set()
            if want_mass:
                self.mass_layers_last.add(layer)
        res = category_attention(q, k, v, cats, transform, scale=scaling, causal=causal, row_enable=row_enable,
                                 head_enable=head_enable, return_mass=want_mass, backend=self.backend,
                                 block=blocks if causal else None, window=window)
        if want_mass and not recomputing:
            for rec in self.recorders:
                if rec._wants(layer):
                    rec._record(layer, res.mass, window)
        if self.taps and not recomputing:
            extra = {} if blocks is None and window is None else dict(block=blocks if causal else None, window=window)
            if offset:  # the layer's keys are slots offset.. of the sequence (a sliding cache dropped the rest)
                extra["offset"] = offset
            for tap in self.taps:
                tap(layer, q, k, cats, transform=transform, scale=scaling, causal=causal, row_enable=row_enable,
                    head_enable=head_enable, **extra)
        return res.out

    def attend_cross(self, layer: int, q, k, v, scaling) -> torch.Tensor:
        """A cross-attention layer (keys = vision tokens, non-causal; see `attn_mod.models.mllama`): the operator
        once per group of query rows that see the same keys; fully masked rows get the identity over all keys and
        zero masses. (B, Hq, Q, D) -> (B, Hq, Q, D); records masses under `rec.cross_mass(layer)`."""
        B, Hq, Q, _ = q.shape
        if self.labels is None or self.cross is None:
            raise RuntimeError("attn-mod has no labels for this cross-attention layer: the patched model's own "
                               "forward must run first")
        cats_text, prompt_end, _ = self._labels_on(k.device)  # no image blocks in Mllama's text
        K_text = cats_text.shape[1]
        transform = row_enable = head_enable = None
        if layer in self.active_layers:
            if k.device not in self._transform_on:
                self._transform_on[k.device] = (self.transform.to(k.device),
                                                None if self.head_enable is None else self.head_enable.to(k.device))
            transform, head_enable = self._transform_on[k.device]
            row_pos = torch.arange(K_text - Q, K_text, device=k.device)  # query rows = the last Q text slots
            row_enable = self.intervention.row_enable(cats_text[:, K_text - Q:], row_pos, prompt_end)
        recomputing = _in_backward()
        want_mass = (layer in self.mass_layers_last if recomputing
                     else any(rec._wants(layer) for rec in self.recorders))
        if want_mass and not recomputing:
            self.mass_layers_last.add(layer)
        out = mass = None
        for cats, rows, attends in self.cross.row_groups(k.shape[2]):
            res = category_attention(q, k, v, cats.to(k.device), transform if attends else None, scale=scaling,
                                     causal=False, row_enable=row_enable if attends else None,
                                     head_enable=head_enable, return_mass=want_mass and attends, backend=self.backend)
            sel = rows.to(k.device)[:, None, :, None]
            out = res.out if out is None else torch.where(sel, res.out, out)
            if want_mass and attends:
                mass = torch.where(sel, res.mass, torch.zeros_like(res.mass) if mass is None else mass)
        if want_mass and not recomputing:
            if mass is None:  # no row of the batch sees an image
                mass = torch.zeros(B, Hq, Q, NUM_CATEGORIES, dtype=torch.float32, device=q.device)
            for rec in self.recorders:
                if rec._wants(layer):
                    rec._record_cross(layer, mass)
        return out


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: q (B,Hq,Q,D), k/v (B,Hkv,K,D) -> ((B,Q,Hq,D) contiguous, None)."""
    binding = _BINDINGS.get(module)
    if binding is None:
        raise RuntimeError(f"{type(module).__name__} uses attn_implementation={ATTN_NAME!r} but is not part of a "
                           "model patched by attn_mod.patch(); call attn_mod.patch(model, processor)")
    if dropout and module.training:
        raise NotImplementedError("attention dropout is not supported by attn-mod; set config.attention_dropout=0")
    window = kwargs.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise NotImplementedError(f"sliding_window={window!r} is not a window size attn-mod understands (an int >= 1)")
    state, layer = binding
    if layer in state.cross_layers:
        return state.attend_cross(layer, query, key, value, scaling).transpose(1, 2).contiguous(), None
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if window is not None and not causal:
        raise NotImplementedError("bidirectional sliding-window layers (|q - k| < window, e.g. Gemma3 with "
                                  "use_bidirectional_attention=True) are not supported: the operator's window limits "
                                  "only keys behind the query")
    out = state.attend(layer, query, key, value, attention_mask, scaling, bool(causal), window)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_NAME, attention_forward)
        # The FlashAttention mask builder yields None or a 2-D (B, K) padding mask: no N x N mask exists.
        AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)
        _registered = True


class PatchHandle:
    """Returned by `patch`: retune (`update`), label (`set_target`, `set_categories`) and undo (`remove`)."""

    def __init__(self, model: nn.Module, state: PatchState, original_impl: str, hook):
        self._model = weakref.ref(model)
        self.state = state
        self._original_impl = original_impl
        self._hook = hook
        self.removed = False

    @property
    def model(self) -> nn.Module:
        return self._model()

    def __repr__(self) -> str:
        model = self.model
        st = self.state
        target = ("boxes" if isinstance(st.target, BoxTarget) else "mask" if st.target is not None else
                  "explicit categories" if st.explicit is not None else "none")
        active = sorted(st.active_layers)
        from .metrics import _ranges

        return (f"PatchHandle({type(model).__name__ if model is not None else 'model gone'}, {st.adapter.name}, "
                f"{st.num_layers} layers, backend={st.backend}, {st.intervention!r} active on layers "
                f"{_ranges(active)}, target={target}{', REMOVED' if self.removed else ''})")

    @property
    def intervention(self) -> Intervention:
        return self.state.intervention

    @property
    def categories(self) -> torch.Tensor | None:
        """(B, K) categories of the KV slots of the last forward (generated slots included)."""
        return self.state.labels

    @property
    def backend(self) -> str:
        return self.state.backend

    @backend.setter
    def backend(self, name: str) -> None:
        resolve_backend(name, torch.device("cpu"))  # validates the name
        self.state.backend = name

    def update(self, intervention: Intervention | None = None, **params) -> PatchHandle:
        """Retune live: `update(alpha=0.1, beta=0.3)` (preset parameters) or `update(intervention=...)`."""
        self._check_alive()
        if intervention is not None and params:
            raise ValueError("pass either a new intervention or parameters to update, not both")
        new = intervention if intervention is not None else self.state.intervention.updated(**params)
        self.state.set_intervention(new)
        return self

    def set_target(self, mask: torch.Tensor | None = None, *, boxes: Sequence | None = None,
                   images: Sequence | None = None, videos: Sequence | None = None, convention: str = "pixel",
                   by: str = "overlap") -> PatchHandle:
        """TARGET labels for the following prefills: visual tokens where `mask` (B, S) is True, or inside
        pixel `boxes` (one list per batch sample, see `attn_mod.regions.target_token_mask`).

        images / videos: the original images (PIL) or their (H, W) sizes, in the order the processor
        received them (sample by sample). convention: "pixel" | "normalized" | "qwen1000" | "resized";
        by: "overlap" | "center". `set_target(None)` clears the target.
        """
        self._check_alive()
        if mask is not None and boxes is not None:
            raise ValueError("pass either a token mask or pixel boxes, not both")
        if boxes is not None:
            if self.state.labeler is None or self.state.processor is None:
                raise ValueError("pixel boxes need a supported family patched with its processor; with "
                                 "categories='explicit' pass TARGET codes in set_categories instead")
            if images is None and videos is None:
                raise ValueError("boxes need images= (the original images or their (H, W) sizes) to map pixels "
                                 "to visual tokens")
            if convention not in CONVENTIONS:
                raise ValueError(f"unknown box convention {convention!r}; choose one of {CONVENTIONS}")
            if by not in SELECTION_RULES:
                raise ValueError(f"unknown selection rule {by!r}; choose one of {SELECTION_RULES}")
            self.state.geometry()  # fail now, not at the next forward, if the processor does not fit
            _check_boxes(boxes, images, convention)
            self.state.target = BoxTarget(list(boxes), None if images is None else list(images),
                                          None if videos is None else list(videos), convention, by)
            return self
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError("target mask must be a (B, S) bool tensor aligned with input_ids")
        self.state.target = None if mask is None else mask.bool()
        return self

    def set_categories(self, cats: torch.Tensor | None, *, inputs=None) -> PatchHandle:
        """Explicit (B, S) category codes for the following prefills (None returns to automatic labels).

        inputs: the batch the codes are for (its `input_ids` tensor, or the processor's dict); when given, the
        shape (and PAD = attention_mask 0) is checked now rather than at the next forward."""
        self._check_alive()
        if cats is None:
            self.state.explicit = None
            return self
        ids = inputs.get("input_ids", inputs.get("inputs_embeds")) if isinstance(inputs, dict) else inputs
        shape = None if ids is None else tuple(ids.shape[:2])
        cats = validate_categories(cats, shape)
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if mask is not None and bool(((cats == PAD) != (mask.to(cats.device) == 0)).any()):
            b, s = ((cats == PAD) != (mask.to(cats.device) == 0)).nonzero()[0].tolist()
            raise ValueError(f"categories disagree with attention_mask at (sample {b}, position {s}): PAD (0) must "
                             "mark exactly the padded positions (attention_mask == 0)")
        self.state.explicit = cats
        return self

    def remove(self) -> None:
        """Undo everything: attention implementation, hook, library state."""
        if self.removed:
            return
        model = self.model
        if model is not None:
            self.state.adapter.set_attn_implementation(model, self._original_impl)
            _STATES.pop(model, None)
        self._hook.remove()
        for module in self.state.attention_modules:
            _BINDINGS.pop(module, None)
        self.state.recorders.clear()
        self.state.taps.clear()
        self.removed = True

    def _check_alive(self) -> None:
        if self.removed:
            raise RuntimeError("this patch handle was removed; call attn_mod.patch(model, ...) again")

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _check_boxes(boxes, images, convention: str) -> None:
    """Validate pixel boxes at `set_target` (one list per sample): numbers, corner order and, when each sample
    has exactly one image, that the box fits that image (the error names the part outside)."""
    from .regions import _is_box, _parse_entry, box_to_pixels

    if not isinstance(boxes, (list, tuple)):
        raise ValueError("boxes must be a list with one entry per batch sample (None or [] for no target)")
    one_each = images is not None and len(images) == len(boxes)
    for b, sample_boxes in enumerate(boxes):
        if sample_boxes is None:
            continue
        entries = [sample_boxes] if _is_box(sample_boxes) else list(sample_boxes)
        for entry in entries:
            kind, k, box, _ = _parse_entry(entry, b)
            size = images[b] if one_each and kind == "image" and k in (-1, 0) else None
            if convention == "resized":
                size = None  # needs the processor's resized size: checked at the forward
            try:  # unknown size: a huge canvas still catches bad numbers, inverted corners, negative pixels
                box_to_pixels(box, size if size is not None else (10**9, 10**9), convention)
            except ValueError as e:
                raise ValueError(f"boxes[{b}]: {e}") from None


def _pre_hook(state: PatchState):
    def hook(module, args, kwargs):
        if kwargs.get("output_attentions") or getattr(state.config, "output_attentions", False):
            raise ValueError("a model patched by attn-mod returns no attention matrices (output_attentions=True "
                             "would give empty tuples); use attn_mod.capture(model) for per-category attention "
                             "masses, or attn_mod.attention_rows.record_rows(model) for per-key rows")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        state.begin_forward({**kwargs, "input_ids": input_ids}, past)
        return None

    return hook


def patch(model: nn.Module, processor=None, *, intervention: Intervention | None = None, backend: str = "auto",
          categories: str = "auto", sink_category: int | None = None,
          system_text: str | Sequence[str] | None = None) -> PatchHandle:
    """Patch `model` (a loaded HF VLM) in place with category-aware attention; returns a `PatchHandle`.

    processor: the model's processor or tokenizer (chat-template role markers); not needed with
        categories="explicit", where `handle.set_categories(cats)` supplies (B, S) codes per prefill.
    intervention: an `Intervention` (default identity: attention unchanged, masses available to `capture`).
    backend: "auto" | "torch" | "triton" | "flex" (see `attn_mod.kernels.function`).
    sink_category: code for the first non-pad token (the attention sink) instead of its natural label.
    system_text: the system prompt, or the list of those a run uses, for templates that merge it into a user turn
        (Gemma3: SYSTEM = its tokens, found by token ids; `LabelOptions.system_text`). `attn-mod train`, `sweep`
        and `inspect` pass their data's system prompts; other families ignore it.
    """
    if categories not in ("auto", "explicit"):
        raise ValueError(f"categories must be 'auto' or 'explicit', got {categories!r}")
    if model in _STATES:
        raise RuntimeError("this model is already patched by attn-mod; use handle.update(...) to retune "
                           "or handle.remove() before patching again")
    resolve_backend(backend, torch.device("cpu"))
    adapter = get_adapter(model, explicit=categories == "explicit")
    labeler = adapter.labeler(model, processor) if categories == "auto" else None
    state = PatchState(model, adapter, labeler, LabelOptions(sink_category=sink_category, system_text=system_text),
                       intervention or Intervention.identity(), backend, processor)
    _register()
    original = adapter.attn_implementation(model)
    adapter.set_attn_implementation(model, ATTN_NAME)
    for layer, module in enumerate(state.attention_modules):
        _BINDINGS[module] = (state, layer)
    hook = model.register_forward_pre_hook(_pre_hook(state), with_kwargs=True)
    _STATES[model] = state
    return PatchHandle(model, state, original, hook)


def patch_state(model: nn.Module) -> PatchState | None:
    """The live state of a patched model (None if not patched)."""
    return _STATES.get(model)
