"""Attention metrics from captured masses (DESIGN.md, "Metrics"). The formulas live here and only here.

Inputs are the per-layer masses of `attn_mod.capture` (L, B, Hq, Q, C) and the categories of the
recorded query rows (B, Q) / key slots (B, K). "Image" mass is IMAGE + TARGET.

- VAS (AVAR):  mean over layers, heads and query rows i of  mass_img(i) / (mass_sys(i) + eps)  (ratio form,
  eps = 1e-6) or  mass_img / (mass_img + mass_sys + eps)  (share form). The rows are a named set (ROW_SETS,
  `select_rows`): "response" (default, the spec's: RESPONSE rows), "answer" (the rows that produce answer
  tokens: the last prompt row and every RESPONSE row), "after_image" (rows after the last visual token), "all".
- Target attention (SAYO):  a(i) = mean_h mass_TARGET(i) / n_TARGET(i),  v(i) = mean_h mass_img(i) / n_img(i),
  n_X(i) = number of keys of set X visible to row i;  R_a(i) = 0.5 * (1 + tanh(log((a + eps) / (v + eps)))),
  eps = 1e-8, last layer by default.
- Token entropy: H_t = -sum_v p log p with p = softmax(logits / temperature).
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .categories import IMAGE, PAD, RESPONSE, SYSTEM, TARGET, TokenCategory, category_name, prompt_end_index
from .kernels.spec import NUM_CATEGORIES

VAS_EPS = 1e-6
SAYO_EPS = 1e-8
ROW_SETS = ("response", "answer", "after_image", "all")
ROW_SET_MEANING = {
    "answer": "the rows that produce answer tokens (last prompt row + every response row)",
    "response": "the response-token rows; the last prompt row, which chose the first answer token, is excluded",
    "after_image": "every row after the last visual token",
    "all": "every non-pad row",
}


def image_mass(mass: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (...): IMAGE + TARGET mass."""
    return mass[..., IMAGE] + mass[..., TARGET]


def select_rows(query_cats: torch.Tensor, rows="response") -> torch.Tensor:
    """(B, Q) bool of the query rows a metric averages over.

    rows: "response" (default: RESPONSE rows), "answer" (the rows that produce answer tokens: the last prompt row, i.e. the row before the first
    RESPONSE row (or the last non-pad row when there is none), plus every RESPONSE row), "after_image" (non-pad rows after the last visual token), "all" (non-pad rows), or an explicit
    (B, Q) bool tensor.
    """
    if isinstance(rows, torch.Tensor):
        if rows.shape != query_cats.shape:
            raise ValueError(f"row mask has shape {tuple(rows.shape)}, expected (B, Q) = {tuple(query_cats.shape)}")
        return rows.bool()
    cats = query_cats.long()
    if rows == "response":
        return cats == RESPONSE
    if rows == "answer":
        end = prompt_end_index(cats)[:, None]  # (B, 1); -1 for an all-pad row
        pos = torch.arange(cats.shape[1], device=cats.device)[None, :]
        return (cats == RESPONSE) | ((pos == end) & (end >= 0))
    if rows == "all":
        return cats != PAD
    if rows == "after_image":
        pos = torch.arange(cats.shape[1], device=cats.device).expand_as(cats)
        visual = (cats == IMAGE) | (cats == TARGET)
        last_img = torch.where(visual, pos, torch.full_like(pos, -1)).amax(dim=1, keepdim=True)
        return (pos > last_img) & (last_img >= 0) & (cats != PAD)
    raise ValueError(f"rows must be one of {ROW_SETS} or a (B, Q) bool tensor, got {rows!r}")


@dataclass(repr=False)
class VASResult:
    """VAS per sample (B,), per layer (L, B) and per layer and head (L, Hq, B); NaN where a sample has no rows
    or, in the ratio form, no system mass (no system turn: the ratio is undefined, a warning says so)."""

    value: torch.Tensor
    per_layer: torch.Tensor
    per_head: torch.Tensor
    layers: tuple[int, ...]
    form: str
    rows: str
    eps: float

    def mean(self) -> float:
        """Mean over the samples that have rows."""
        return float(self.value.nanmean())

    def __repr__(self) -> str:
        return (f"VASResult({self.form} form, rows={self.rows}, layers={_ranges(self.layers)}, "
                f"B={self.value.shape[0]}, mean={self.mean():.4g})")

    def describe(self) -> str:
        formula = "mass_img/(mass_sys+eps)" if self.form == "ratio" else "mass_img/(mass_img+mass_sys+eps)"
        meaning = ROW_SET_MEANING.get(self.rows)
        rows = f"rows={self.rows}" + (f" ({meaning})" if meaning else "")
        return f"VAS ({self.form} form: {formula}, eps={self.eps:g}; {rows}; layers={_ranges(self.layers)})"


def _ranges(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (short layer lists in reports)."""
    out, run = [], []
    for x in list(layers) + [None]:
        if run and (x is None or x != run[-1] + 1):
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
            run = []
        if x is not None:
            run.append(x)
    return ",".join(out) or "none"


def vas_from_masses(masses: torch.Tensor, query_cats: torch.Tensor, *, layers: Sequence[int] | None = None,
                    rows="response", form: str = "ratio", eps: float = VAS_EPS) -> VASResult:
    """VAS from masses (L, B, Hq, Q, C) and query-row categories (B, Q)."""
    if form not in ("ratio", "share"):
        raise ValueError(f"VAS form must be 'ratio' or 'share', got {form!r}")
    if masses.dim() != 5 or masses.shape[-1] != NUM_CATEGORIES:
        raise ValueError(f"masses must be (L, B, Hq, Q, {NUM_CATEGORIES}), got {tuple(masses.shape)}")
    L, B, H, Q, _ = masses.shape
    if query_cats.shape != (B, Q):
        raise ValueError(f"query categories have shape {tuple(query_cats.shape)}, expected (B, Q) = {(B, Q)}")
    sel = select_rows(query_cats.to(masses.device), rows).float()  # (B, Q)
    m = masses.float()
    img, sys_ = image_mass(m), m[..., SYSTEM]
    score = img / (sys_ + eps) if form == "ratio" else img / (img + sys_ + eps)  # (L, B, H, Q)
    n = sel.sum(dim=1)  # (B,)
    per_head = (score * sel[None, :, None, :]).sum(-1) / n[None, :, None]  # (L, B, H); NaN if n == 0
    if form == "ratio":
        # No system mass at all (no system turn in the prompt): img / eps is not a ratio -> NaN.
        sys_total = (sys_ * sel[None, :, None, :]).sum(dim=(0, 2, 3))  # (B,)
        undefined = (sys_total == 0) & (n > 0)
        if bool(undefined.any()):
            warnings.warn(f"VAS (ratio form) is undefined for {int(undefined.sum())} of {B} sample(s): no attention "
                          "mass on system tokens (the prompt has no system turn; Qwen3-VL's chat template adds none) "
                          "-> reported as NaN. Give a system prompt (system: in a sweep config, --system on the "
                          "command line); without one AVAR's beta (system suppression) changes nothing.",
                          UserWarning, stacklevel=1)  # one call site: Python shows it once per process
            per_head = torch.where(undefined[None, :, None], torch.full_like(per_head, float("nan")), per_head)
    per_layer = per_head.mean(dim=2)
    value = per_layer.mean(dim=0)
    return VASResult(value, per_layer, per_head.permute(0, 2, 1), tuple(layers) if layers else tuple(range(L)), form,
                     rows if isinstance(rows, str) else "custom", eps)


def vas(rec, *, layers="all", rows="response", form: str = "ratio", eps: float = VAS_EPS, run: int = -1) -> VASResult:
    """VAS of a `Recording` (see `vas_from_masses`)."""
    chosen = rec.layers if layers == "all" else tuple(layers)
    masses = torch.stack([rec.mass(layer, run) for layer in chosen])
    return vas_from_masses(masses, rec.query_categories(run), layers=chosen, rows=rows, form=form, eps=eps)


def visible_counts(key_cats: torch.Tensor, num_rows: int, causal: bool = True, *, window: int | None = None,
                   block_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Q, C) number of keys of each category visible to each of the last `num_rows` rows (row i sits at key
    slot p = K - num_rows + i). Visibility is the operator's (kernels/spec.py): causal j <= p, OR the same
    non-zero image block (`block_ids` (B, K), Gemma3: block keys ahead of p too), AND p - j < `window` (a
    sliding-window layer; keys ahead are unaffected). causal=False: every key (cross-attention)."""
    oh = torch.nn.functional.one_hot(key_cats.long(), NUM_CATEGORIES).float()  # (B, K, C)
    B, K, C = oh.shape
    if not causal:
        return oh.sum(1, keepdim=True).expand(-1, num_rows, -1)
    cs = torch.cat([oh.new_zeros(B, 1, C), oh.cumsum(dim=1)], dim=1)  # cs[:, j] = keys 0..j-1
    p = torch.arange(K - num_rows, K, device=oh.device)
    behind = cs[:, p + 1]
    if window is not None:
        behind = behind - cs[:, (p + 1 - window).clamp(min=0)]
    if block_ids is None or not bool((block_ids != 0).any()):
        return behind
    ahead = torch.zeros_like(oh)  # (B, K, C): keys of p's own block after p
    blk = block_ids.to(oh.device).long()
    for b in range(B):
        ids = blk[b]
        change = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
        starts = torch.cat([ids.new_zeros(1), change])
        ends = torch.cat([change, ids.new_tensor([K])])
        for s, e in zip(starts.tolist(), ends.tolist()):
            if ids[s] != 0:  # a run of one block: keys after p within it, by a reversed cumulative sum
                run = oh[b, s:e]
                ahead[b, s:e] = run.flip(0).cumsum(0).flip(0) - run
    return behind + ahead[:, p]


@dataclass(repr=False)
class TargetAttention:
    """SAYO per-token scores: a, v, R_a of shape (L, B, Q) (L = chosen layers); NaN where undefined (no
    target / no image key visible). R_a is the one name of the SAYO quantity everywhere (per-token column
    "R_a", inspect "R_a_mean", sweep "target_R_a")."""

    a: torch.Tensor
    v: torch.Tensor
    R_a: torch.Tensor
    layers: tuple[int, ...]
    eps: float = SAYO_EPS

    @property
    def reward(self) -> torch.Tensor:
        """Deprecated alias of `R_a`."""
        return self.R_a

    def mean(self, name: str = "R_a") -> float:
        """Mean of `name` ("a", "v" or "R_a") over all layers, samples and rows where it is defined."""
        if name not in ("a", "v", "R_a"):
            raise ValueError(f"name must be 'a', 'v' or 'R_a', got {name!r}")
        return float(getattr(self, name).float().nanmean())

    def describe(self) -> str:
        return ("SAYO target attention (a = mean_h mass_target / n_target, v = mean_h mass_image / n_image, "
                f"R_a = 0.5*(1+tanh(log((a+eps)/(v+eps)))), eps={self.eps:g}; layers={_ranges(self.layers)})")

    def __repr__(self) -> str:
        L, B, Q = self.a.shape
        return (f"TargetAttention(layers={_ranges(self.layers)}, B={B}, rows={Q}, a={self.mean('a'):.4g}, "
                f"v={self.mean('v'):.4g}, R_a={self.mean('R_a'):.4g})")


def layer_visible_counts(key_cats: torch.Tensor, num_rows: int, num_layers: int, *, causal: bool = True,
                         windows: Sequence[int | None] | None = None,
                         block_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(L, B, Q, C) `visible_counts` of each of L layers: `windows` one per layer (None entries: full attention;
    `rec.windows()`), `block_ids` (B, K) shared (`rec.block_ids`); windows=None: every layer full."""
    windows = (None,) * num_layers if windows is None else tuple(windows)
    if len(windows) != num_layers:
        raise ValueError(f"windows has {len(windows)} entries for {num_layers} layers of masses; pass one per layer "
                         "(rec.windows(layers)) or None")
    cache = {w: visible_counts(key_cats, num_rows, causal, window=w, block_ids=block_ids) for w in set(windows)}
    return torch.stack([cache[w] for w in windows])


def target_attention_from_masses(masses: torch.Tensor, key_cats: torch.Tensor, *, layers: Sequence[int] | None = None,
                                 eps: float = SAYO_EPS, causal: bool = True,
                                 windows: Sequence[int | None] | None = None,
                                 block_ids: torch.Tensor | None = None) -> TargetAttention:
    """a(i), v(i), R_a(i) from masses (L, B, Hq, Q, C) and key-slot categories (B, K) (rows = last Q slots).
    causal=False: every key counts for every row (cross-attention masses: `rec.cross_masses()`,
    `rec.cross_categories`). windows / block_ids: the layers' sliding windows and the image blocks (Gemma3;
    `rec.windows(layers)`, `rec.block_ids`), so that n_X counts the keys each row really sees."""
    L, B, H, Q, _ = masses.shape
    counts = layer_visible_counts(key_cats.to(masses.device), Q, L, causal=causal, windows=windows,
                                  block_ids=block_ids)  # (L, B, Q, C)
    n_target = counts[..., TARGET]
    n_img = counts[..., IMAGE] + n_target
    m = masses.float().mean(dim=2)  # mean over heads: (L, B, Q, C)
    nan = torch.tensor(float("nan"), device=m.device)
    a = torch.where(n_target > 0, m[..., TARGET] / n_target.clamp_min(1), nan)
    v = torch.where(n_img > 0, image_mass(m) / n_img.clamp_min(1), nan)
    r_a = 0.5 * (1 + torch.tanh(torch.log((a + eps) / (v + eps))))
    return TargetAttention(a, v, r_a, tuple(layers) if layers else tuple(range(L)), eps)


def target_attention(rec, *, layers=(-1,), eps: float = SAYO_EPS, run: int = -1) -> TargetAttention:
    """SAYO a / v / R_a of a `Recording` at `layers` (default: the last layer)."""
    chosen = tuple(layer % rec.num_layers for layer in (rec.layers if layers == "all" else layers))
    masses = torch.stack([rec.mass(layer, run) for layer in chosen])
    return target_attention_from_masses(masses, rec.categories_of(run), layers=chosen, eps=eps,
                                        windows=rec.windows(chosen), block_ids=rec.block_ids_of(run))


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits -> (...) entropy in nats of softmax(logits / temperature)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# Per-token mass columns: mass_image is IMAGE + TARGET; its parts are mass_image_outside_target and mass_target.
MASS_COLUMNS = {f"mass_{category_name(c)}": int(c) for c in TokenCategory if c != TokenCategory.PAD}


def per_token_records(rec, *, layer: int = -1, run: int = -1, tokens: Sequence[Sequence[str]] | None = None,
                      entropy: torch.Tensor | None = None, rows="all") -> list[dict]:
    """A tidy table (list of dicts) with one row per (sample, query token): category, head-mean masses at
    `layer` (mass_image = IMAGE + TARGET, and per code: mass_system, mass_text, mass_image_outside_target,
    mass_target, mass_response), SAYO a / v / R_a, optional token text and entropy (B, Q)."""
    mass = rec.mass(layer, run).float().mean(dim=1)  # (B, Q, C)
    qcats = rec.query_categories(run)
    ta = target_attention(rec, layers=(layer,), run=run)
    sel = select_rows(qcats, rows)
    B, Q = qcats.shape
    K = rec.categories_of(run).shape[1]
    out = []
    for b in range(B):
        for i in sel[b].nonzero().flatten().tolist():
            row = {"sample": b, "position": K - Q + i, "category": category_name(int(qcats[b, i]))}
            if tokens is not None:
                row["token"] = tokens[b][i]
            row["mass_image"] = float(image_mass(mass[b, i]))
            for name, code in MASS_COLUMNS.items():
                row[name] = float(mass[b, i, code])
            row["a"], row["v"], row["R_a"] = (float(t[0, b, i]) for t in (ta.a, ta.v, ta.R_a))
            if entropy is not None:
                row["entropy"] = float(entropy[b, i])
            out.append(row)
    return out


def _clean(value):
    return None if isinstance(value, float) and value != value else value  # NaN -> null in JSON


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n")
    return path


def write_csv(records: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    fields = list(dict.fromkeys(k for r in records for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(records)
    return path


__all__ = ["ROW_SETS", "ROW_SET_MEANING", "TargetAttention", "VASResult", "image_mass", "per_token_records",
           "select_rows", "target_attention", "target_attention_from_masses", "token_entropy", "vas",
           "vas_from_masses", "visible_counts", "layer_visible_counts", "write_csv", "write_jsonl"]
