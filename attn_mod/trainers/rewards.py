"""Sequence-level rewards for GRPO: SAYO target attention, AVAR visual anchoring, format, accuracy.

The formulas live here and only here (a(i), v(i) and token entropy come from `attn_mod.metrics`). Every
reward is ONE scalar per sequence (never broadcast over tokens); `defined` marks the samples where it exists.

Teacher-forced layout: a prompt + completion sequence of S slots; completion token t sits at position p_t;
row r of the logits predicts token r + 1, so its *decision row* is p_t - 1 and its *emitted row* is p_t.

- Valid completion tokens (`completion_mask`): up to and including the first EOS, never padding; L_valid = count.
- High-entropy rows (`select_high_entropy`): H_t = entropy(softmax(logits[p_t - 1] / T)); per sequence the
  top k = max(1, floor(top_frac * L_valid)) valid tokens by H_t (ties: earlier position first), top_frac 0.3.
- SAYO (`sayo_attention_reward`), last layer: a(i) = mean_h mass_TARGET(i) / n_TARGET(i),
  v(i) = mean_h mass_img(i) / n_img(i) (n_X visible keys); attention row i = p_t - 1 (rows="decision", default)
  or p_t (rows="emitted", the released SAYO code); a_q, v_q = means of a, v over Q_high;
  r_v = tanh(log((a_q + eps) / (v_q + eps))), eps = 1e-8. No TARGET key in a sample => 0, defined=False.
- AVAR (`avar_visual_reward`): r_vis = mean_{l,h,i in Q} mass_img / (mean_{l,h,i in Q} mass_sys + eps),
  eps = 1e-6, Q = rows whose tokens carry loss (completion tokens). No system key => 0, defined=False.
- Format (`format_reward`): 1 if the completion fully matches the recipe's regex (default
  `\\s*<think>.*?</think>\\s*<answer>.*?</answer>\\s*`, DOTALL) else 0; optional length shaping (off by default):
  r_fmt + r_len with the soft over-length penalty r_len(L) = 0 for L <= L_max - L_buf,
  (L_max - L_buf - L) / L_buf for L_max - L_buf < L <= L_max, -1 beyond (L in completion tokens).
- Accuracy (`accuracy_reward`): 1 / 0 through `attn_mod.eval.scoring.score` (choice / number / yesno / text).
- Total (`combine_rewards`): r = sum_k w_k r_k; with gate_on="accuracy" the attention components
  (`ATTENTION_REWARDS`) count only where accuracy == 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..categories import IMAGE, SYSTEM, TARGET
from ..metrics import image_mass, target_attention_from_masses
from .losses import _check_masses, _head_mask

SAYO_EPS = 1e-8
AVAR_EPS = 1e-6
TOP_FRAC = 0.3
ROW_CHOICES = ("decision", "emitted")
DEFAULT_FORMAT = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"
ATTENTION_REWARDS = ("sayo", "r_v", "avar_visual", "r_vis", "visual")


@dataclass(frozen=True)
class RewardResult:
    """values (B,) float32 (0.0 where undefined), defined (B,) bool, per-sample diagnostics."""

    values: torch.Tensor
    defined: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | Sequence[int],
                    pad_token_id: int | None = None) -> torch.Tensor:
    """(B, T) bool: completion tokens up to and including the first EOS; padding (pad_token_id, when it is not
    an EOS id) is never valid. A completion without EOS is valid up to its last non-pad token."""
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be (B, T), got shape {tuple(completion_ids.shape)}")
    eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
    if not eos:
        raise ValueError("eos_token_id must name at least one token id")
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    before_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0  # no EOS strictly before this position
    valid = before_eos
    if pad_token_id is not None and int(pad_token_id) not in eos:
        valid = valid & (completion_ids != int(pad_token_id))
    return valid


def _top_k(length: torch.Tensor, top_frac: float) -> torch.Tensor:
    # 1e-9 guards floor against binary rounding (0.57 * 100 = 56.999...)
    k = torch.floor(length.double() * top_frac + 1e-9).long().clamp_min(1)
    return torch.where(length > 0, k, torch.zeros_like(k))


def select_high_entropy(entropy: torch.Tensor, valid: torch.Tensor, top_frac: float = TOP_FRAC) -> torch.Tensor:
    """(B, T) bool: per row the top k = max(1, floor(top_frac * L_valid)) valid positions by entropy
    (ties: earlier position first); rows without valid positions select nothing."""
    if entropy.shape != valid.shape or entropy.dim() != 2:
        raise ValueError(f"entropy {tuple(entropy.shape)} and valid {tuple(valid.shape)} must both be (B, T)")
    if not 0 < top_frac <= 1:
        raise ValueError(f"top_frac must lie in (0, 1], got {top_frac}")
    valid = valid.bool()
    if torch.isnan(entropy[valid]).any():
        raise ValueError("entropy is NaN at a valid completion position")
    key = torch.where(valid, entropy.double(), torch.full_like(entropy, -math.inf, dtype=torch.float64))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # stable: equal keys keep position order
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    k = _top_k(valid.sum(dim=1), top_frac)
    return (rank < k[:, None]) & valid


def sayo_attention_reward(last_mass: torch.Tensor, key_cats: torch.Tensor, row_entropy: torch.Tensor,
                          completion_positions: torch.Tensor, *, rows: str = "decision", top_frac: float = TOP_FRAC,
                          eps: float = SAYO_EPS, window: int | None = None,
                          block_ids: torch.Tensor | None = None) -> RewardResult:
    """SAYO r_v per sequence (module docstring).

    last_mass (B, Hq, S, C): last-layer masses (rows = the last S key slots); key_cats (B, K);
    window / block_ids: that layer's sliding window and the image blocks (Gemma3; `rec.windows()`,
    `rec.block_ids`) for the visible-key counts n_X;
    row_entropy (B, S): entropy of row r's next-token distribution (it chose token r + 1);
    completion_positions (B, S) bool: True at the positions p_t of valid completion tokens.
    extras: a_q, v_q (NaN where undefined), selected (B, S) bool attention rows used.
    """
    if last_mass.dim() != 4:
        raise ValueError(f"last_mass must be (B, Hq, S, C) (one layer of rec.masses()), got {tuple(last_mass.shape)}")
    if rows not in ROW_CHOICES:
        raise ValueError(f"rows must be one of {ROW_CHOICES}, got {rows!r}")
    B, _, S, _ = last_mass.shape
    pos = completion_positions.to(last_mass.device).bool()
    _check_masses(last_mass[None], pos, key_cats)
    if row_entropy.shape != (B, S):
        raise ValueError(f"row_entropy has shape {tuple(row_entropy.shape)}, expected (B, S) = {(B, S)}")
    if pos[:, 0].any():
        raise ValueError("a completion token cannot sit at position 0 (it needs a decision row before it)")
    ent = row_entropy.to(last_mass.device)
    h_tok = torch.cat([torch.zeros_like(ent[:, :1]), ent[:, :-1]], dim=1)  # h_tok[p] = row_entropy[p - 1]
    chosen = select_high_entropy(h_tok, pos, top_frac)  # at token positions p_t
    if rows == "decision":
        chosen = torch.cat([chosen[:, 1:], torch.zeros_like(chosen[:, :1])], dim=1)  # p_t -> p_t - 1
    ta = target_attention_from_masses(last_mass[None], key_cats.to(last_mass.device), eps=eps, windows=(window,),
                                      block_ids=block_ids)
    a, v = ta.a[0].double(), ta.v[0].double()  # (B, S), NaN where no key of the set is visible
    n = chosen.sum(dim=1)
    has_target = (key_cats.to(last_mass.device).long() == TARGET).any(dim=1)
    w = chosen.double()
    a_q = (torch.nan_to_num(a) * w).sum(1) / n.clamp_min(1)
    v_q = (torch.nan_to_num(v) * w).sum(1) / n.clamp_min(1)
    defined = has_target & (n > 0) & ~(torch.isnan(a) & chosen).any(1) & ~(torch.isnan(v) & chosen).any(1)
    r = torch.tanh(torch.log((a_q + eps) / (v_q + eps)))
    nan = torch.full_like(a_q, math.nan)
    return RewardResult(torch.where(defined, r, torch.zeros_like(r)).float(), defined,
                        {"a_q": torch.where(defined, a_q, nan).float(), "v_q": torch.where(defined, v_q, nan).float(),
                         "selected": chosen})


def avar_visual_reward(masses: torch.Tensor, rows: torch.Tensor, *, heads=None, eps: float = AVAR_EPS,
                       key_cats: torch.Tensor | None = None) -> RewardResult:
    """AVAR r_vis per sequence from masses (L, B, Hq, S, C) and rows Q (B, S) bool (module docstring).

    A sample has no system turn when key_cats (B, K) holds no SYSTEM slot (without key_cats: when its
    system mass over Q is exactly 0). extras: img, sys = the two means (NaN where undefined). Computed on
    detached float64 masses: a reward, not a loss."""
    _check_masses(masses, rows, key_cats)
    m = masses.detach().double()
    m = m[:, :, _head_mask(heads, m.shape[2], m.device)]
    q = rows.to(m.device).bool()
    n = q.sum(dim=1)  # (B,)
    per = (q.double()[None, :, None, :])
    denom = (n * m.shape[0] * m.shape[2]).clamp_min(1).double()
    img = (image_mass(m) * per).sum(dim=(0, 2, 3)) / denom
    sys_ = (m[..., SYSTEM] * per).sum(dim=(0, 2, 3)) / denom
    if key_cats is not None:
        has_sys = (key_cats.to(m.device).long() == SYSTEM).any(dim=1)
    else:
        has_sys = sys_ > 0
    defined = has_sys & (n > 0)
    r = img / (sys_ + eps)
    nan = torch.full_like(r, math.nan)
    return RewardResult(torch.where(defined, r, torch.zeros_like(r)).float(), defined,
                        {"img": torch.where(defined, img, nan).float(), "sys": torch.where(defined, sys_, nan).float()})


def length_penalty(lengths: Sequence[int], max_length: int, buffer: int) -> list[float]:
    """Soft over-length penalty: 0 up to max_length - buffer, then linear down to -1 at max_length, -1 beyond."""
    if max_length <= 0 or not 0 < buffer <= max_length:
        raise ValueError(f"length shaping needs max_length > 0 and 0 < buffer <= max_length, got {max_length}, {buffer}")
    soft = max_length - buffer
    out = []
    for n in lengths:
        out.append(0.0 if n <= soft else (-1.0 if n > max_length else (soft - n) / buffer))
    return out


def format_reward(completions: Sequence[str], *, pattern: str | None = None, lengths: Sequence[int] | None = None,
                  max_length: int | None = None, length_buffer: int | None = None) -> list[float]:
    """1.0 if a completion fully matches `pattern` (default <think>...</think><answer>...</answer>) else 0.0.

    Length shaping (off unless max_length is given): adds `length_penalty(lengths, max_length, length_buffer)`
    (length_buffer defaults to max_length // 4); lengths = completion token counts.
    """
    try:
        rx = re.compile(DEFAULT_FORMAT if pattern is None else pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"format pattern {pattern!r} is not a valid regular expression: {e}") from None
    out = [1.0 if rx.fullmatch(c or "") else 0.0 for c in completions]
    if max_length is not None:
        if lengths is None or len(lengths) != len(out):
            raise ValueError("length shaping needs lengths= (completion token counts), one per completion")
        buffer = length_buffer if length_buffer is not None else max(1, max_length // 4)
        out = [f + p for f, p in zip(out, length_penalty(lengths, max_length, buffer))]
    return out


def accuracy_reward(completions: Sequence[str], answers: Sequence, answer_types: Sequence, options=None) -> list[float]:
    """1.0 / 0.0 per completion through `attn_mod.eval.scoring.score`; options: one mapping (or None) per sample."""
    from ..eval.scoring import score

    n = len(completions)
    if len(answers) != n or len(answer_types) != n or (options is not None and len(options) != n):
        raise ValueError(f"accuracy_reward needs one answer / answer_type (/ options) per completion ({n})")
    out = []
    for i, text in enumerate(completions):
        sample = {"index": i, "answer": answers[i], "answer_type": answer_types[i],
                  "options": None if options is None else options[i]}
        out.append(1.0 if score(sample, text).correct else 0.0)
    return out


def combine_rewards(components: Mapping[str, torch.Tensor], weights: Mapping[str, float], *,
                    gate_on: str | None = None, attention: Sequence[str] = ATTENTION_REWARDS) -> torch.Tensor:
    """(B,) r = sum_k weights[k] * components[k]; with gate_on (e.g. "accuracy") the components named in
    `attention` count only where components[gate_on] == 1."""
    missing = [k for k in weights if k not in components]
    if missing:
        raise ValueError(f"reward weights name {missing} but the components are {sorted(components)}")
    if not weights:
        raise ValueError("combine_rewards needs at least one weighted component")
    if gate_on is not None and gate_on not in components:
        raise ValueError(f"gate_on={gate_on!r} is not a reward component; components: {sorted(components)}")
    vals = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in components.items()}
    shapes = {tuple(v.shape) for v in vals.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"reward components must all be (B,) tensors of one length, got shapes {shapes}")
    gate = None if gate_on is None else (vals[gate_on] == 1).float()
    total = torch.zeros_like(next(iter(vals.values())))
    for name, w in weights.items():
        r = vals[name]
        if gate is not None and name in attention and name != gate_on:
            r = r * gate
        total = total + float(w) * r
    return total


__all__ = ["ATTENTION_REWARDS", "AVAR_EPS", "DEFAULT_FORMAT", "ROW_CHOICES", "RewardResult", "SAYO_EPS", "TOP_FRAC",
           "accuracy_reward", "avar_visual_reward", "combine_rewards", "completion_mask", "format_reward",
           "length_penalty", "select_high_entropy", "sayo_attention_reward"]
