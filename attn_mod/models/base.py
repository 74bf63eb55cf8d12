"""What attn-mod needs to know about a model family: where the text decoder's attention modules are,
how to switch its attention implementation, and how to label tokens into categories."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..categories import LabelOptions, RoleMarkers, label_tokens
from ..regions import FAMILY_GEOMETRY, geometry_for

# labeler(input_ids, attention_mask=, mm_token_type_ids=, labels=, target_mask=, options=) -> (B, S) int8
Labeler = Callable[..., torch.Tensor]


def marker_labeler(markers, *, mm_token_types: bool = True) -> Labeler:
    """The labeler of a family whose categories follow from its role markers (`categories.label_tokens`).
    `mm_token_types=False` ignores the processor's `mm_token_type_ids` (families whose mm ids also mark
    template tokens, or that have none)."""

    def label(input_ids, *, attention_mask=None, mm_token_type_ids=None, labels=None, target_mask=None,
              options: LabelOptions = LabelOptions()):
        return label_tokens(input_ids, markers, attention_mask=attention_mask,
                            mm_token_type_ids=mm_token_type_ids if mm_token_types else None, labels=labels,
                            target_mask=target_mask, options=options)

    label.markers = markers
    return label


class FamilyAdapter:
    """Base adapter: a decoder reachable with `model.get_decoder()` whose layers have `.self_attn`."""

    name = "generic"
    model_types: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    def text_config(self, model: nn.Module):
        return getattr(model.config, "text_config", None) or model.config

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The text decoder's self-attention modules, in layer order."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
            raise ValueError(f"cannot find the text decoder layers of {type(model).__name__} "
                             "(expected model.get_decoder().layers[i].self_attn)")
        return [layer.self_attn for layer in layers]

    def cross_attention_layers(self, model: nn.Module) -> frozenset[int]:
        """Decoder indices of layers whose attention keys are not the text sequence (Mllama's cross-attention)."""
        return frozenset()

    def num_query_heads(self, model: nn.Module) -> int:
        return int(self.text_config(model).num_attention_heads)

    def attn_implementation(self, model: nn.Module) -> str:
        return self.text_config(model)._attn_implementation

    def set_attn_implementation(self, model: nn.Module, name: str) -> None:
        """Set `name` on the text model only; vision towers keep their implementation."""
        if getattr(model.config, "text_config", None) is not None:
            model.set_attn_implementation({"text_config": name})
        else:
            model.set_attn_implementation(name)

    def labeler(self, model: nn.Module, processor) -> Labeler | None:
        """A labeler for this family, or None when categories must be passed explicitly."""
        return None

    def block_ids(self, inputs: dict) -> torch.Tensor | None:
        """(B, S) int32 bidirectional block ids of a prefill's tokens (kernels/spec.py; 0 = none) from the forward's
        keyword inputs, or None for a causal-only family (the default)."""
        return None

    def box_geometry(self, processor, config=None):
        """The geometry pixel boxes need, validated now (raises when boxes cannot work for this processor).
        Default: a Qwen-style merged patch grid (`attn_mod.regions.geometry_for`)."""
        return geometry_for(processor, family=self.name if self.name in FAMILY_GEOMETRY else None)

    def box_mask(self, target, input_ids: torch.Tensor, inputs: dict, config, processor) -> torch.Tensor:
        """(B, S) TARGET mask of a `patch.BoxTarget` at a prefill with model inputs `inputs`."""
        return target.mask(input_ids, inputs, config, self.box_geometry(processor, config), processor)


class ChatMLAdapter(FamilyAdapter):
    """Families with `<|im_start|>role\\n ... <|im_end|>` templates and image/video placeholder ids."""

    def labeler(self, model: nn.Module, processor) -> Labeler:
        if processor is None:
            raise ValueError(f"{self.name} needs its processor or tokenizer to find the chat-template role markers: "
                             "attn_mod.patch(model, processor, ...), or pass categories='explicit' and "
                             "handle.set_categories(cats)")
        tokenizer = getattr(processor, "tokenizer", processor)
        cfg = model.config
        visual = tuple(int(i) for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
                       if i is not None)
        base = RoleMarkers.from_tokenizer(tokenizer, **({"visual_tokens": ()} if visual else {}))
        markers = RoleMarkers(base.turn_start, base.turn_end, base.system_header, base.assistant_header,
                              visual or base.visual_token_ids)
        return marker_labeler(markers)
