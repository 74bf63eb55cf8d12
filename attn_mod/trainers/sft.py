"""AVAR attention-guided SFT: LM loss on the assistant tokens + attention losses from the SAME forward.

    L = L_LM + lambda_img * L_img + lambda_sys * L_sys        (objective.lambda_lm scales L_LM, default 1)

L_LM: mean token cross-entropy over the trained tokens (the last assistant turn with its end-of-turn token;
`attn_mod.trainers.data`). L_img / L_sys (AGTO, `attn_mod.trainers.losses.agto_losses`): from the masses that
`attn_mod.capture(..., detach=False)` records during the forward that also gives the logits, so there is no
second pass and no N x N attention matrix. Query rows: the trained tokens' rows (`objective.query: response`)
or the released code's prompt span (`prompt`). With both lambdas 0 no masses are recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F

from ..capture import capture
from .data import IGNORE, Batch
from .loop import Recipe, StepOutput


@dataclass
class SFTObjective:
    lambda_img: float = 0.15       # AVAR released code
    lambda_sys: float = 0.15
    layers: Union[str, list[int]] = "all"   # "all" or layer indices (negative: from the last)
    heads: Optional[list[int]] = None       # query heads averaged over (None: all)
    query: Literal["response", "prompt"] = "response"
    eps: float = 1e-6
    lambda_lm: float = 1.0         # weight of L_LM (0: attention losses only, for ablations / direction checks)

    def validate(self):
        if isinstance(self.layers, str) and self.layers != "all":
            raise ValueError(f"objective.layers must be 'all' or a list of layer indices, got {self.layers!r}")
        if min(self.lambda_img, self.lambda_sys, self.lambda_lm) < 0:
            raise ValueError("objective.lambda_img, lambda_sys and lambda_lm must be >= 0")
        if self.eps <= 0:
            raise ValueError(f"objective.eps must be > 0, got {self.eps}")


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the trained tokens. logits (N, V) for the rows where `keep` (B, S) is True; row
    p predicts token p + 1, so keep[b, p] = labels[b, p + 1] != IGNORE."""
    targets = labels[:, 1:][keep[:, :-1]]
    return F.cross_entropy(logits.float(), targets, reduction="mean")


class SFTRecipe(Recipe):
    name = "sft"
    objective_config = SFTObjective
    metric_keys = ("loss", "loss_lm", "loss_img", "loss_sys", "lr", "tokens", "samples_img", "samples_sys")
    sum_metrics = frozenset({"tokens", "samples_img", "samples_sys"})
    progress_keys = ("loss", "loss_lm")

    def setup_objective(self) -> None:
        from . import losses  # written by the objectives session (OBJECTIVES_API.md)

        self.losses = losses
        obj = self.cfg.objective
        self.use_attention = bool(obj.lambda_img or obj.lambda_sys)

    def forward(self, batch: Batch):
        """One forward: (logits of the trained rows (N, V), keep mask (B, S), AGTO result or None)."""
        obj = self.cfg.objective
        keep = torch.zeros_like(batch.labels, dtype=torch.bool)
        keep[:, :-1] = batch.labels[:, 1:] != IGNORE
        self.handle.set_target(batch.target_mask)
        if not self.use_attention:
            return self.module(**batch.model_inputs, use_cache=False, logits_to_keep=keep).logits, keep, None
        with capture(self.model, layers=obj.layers, detach=False) as rec:
            logits = self.module(**batch.model_inputs, use_cache=False, logits_to_keep=keep).logits
        rows = self.losses.agto_rows(rec.query_categories(), batch.labels, query=obj.query)
        agto = self.losses.agto_losses(rec.masses(), rec.categories, rows, heads=obj.heads, eps=obj.eps,
                                       windows=rec.windows(), block_ids=rec.block_ids)
        return logits, keep, agto

    def train_step(self, batch: Batch) -> StepOutput:
        obj = self.cfg.objective
        logits, keep, agto = self.forward(batch)
        loss_lm = lm_loss(logits, batch.labels, keep)
        weighted_lm = loss_lm if obj.lambda_lm == 1 else obj.lambda_lm * loss_lm
        if agto is None:
            zero = loss_lm.new_zeros(())
            loss, loss_img, loss_sys, n_img, n_sys = weighted_lm, zero, zero, 0, 0
        else:
            loss = self.losses.sft_objective(weighted_lm, agto, lambda_img=obj.lambda_img, lambda_sys=obj.lambda_sys)
            loss_img, loss_sys, n_img, n_sys = agto.loss_img, agto.loss_sys, agto.samples_img, agto.samples_sys
        components = {"loss_lm": loss_lm, "loss_img": loss_img, "loss_sys": loss_sys}
        metrics = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in components.items()},
                   "tokens": float(batch.num_tokens), "samples_img": float(n_img), "samples_sys": float(n_sys)}
        return StepOutput(loss, components, metrics)

    def reduce_metrics(self, parts):
        row = super().reduce_metrics(parts)
        for k in self.sum_metrics:
            row[k] = int(row[k])
        return row
