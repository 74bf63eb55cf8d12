"""attn-mod: category-aware attention for vision-language models.

    import attn_mod
    handle = attn_mod.patch(model, processor, intervention=attn_mod.Intervention.avar(alpha=0.2, beta=0.5))
    with attn_mod.capture(model) as rec:
        model(**inputs)
    rec.mass(-1)[..., attn_mod.TokenCategory.IMAGE]
"""

from . import metrics
from .capture import Recording, capture
from .categories import TokenCategory, label_tokens
from .intervention import Intervention
from .kernels.function import category_attention
from .kernels.spec import NUM_CATEGORIES, CategoryTransform
from .models import SUPPORTED_FAMILIES, UnsupportedModelError
from .patch import PatchHandle, patch

__version__ = "0.1.0"

__all__ = [
    "NUM_CATEGORIES",
    "SUPPORTED_FAMILIES",
    "CategoryTransform",
    "Intervention",
    "PatchHandle",
    "Recording",
    "TokenCategory",
    "UnsupportedModelError",
    "capture",
    "category_attention",
    "label_tokens",
    "metrics",
    "patch",
]
