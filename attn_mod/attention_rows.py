"""Per-key attention P'_ij of selected query rows, recorded while a patched model runs.

    with attn_mod.capture(model) as rec, record_rows(model, layers="all") as rows:
        model.generate(**inputs, max_new_tokens=16)
    rows.attention(layer=-1)        # (B, K) fp32: P'_ij averaged over the recorded rows and heads
    rows.rows(layer)                # (B, H, R, K) fp32, H = 1 with heads="mean"

`capture` keeps only per-category sums (O(N)); a picture of *where in the image* a row looks needs
the per-key values. The patched attention hands the exact operator inputs of every call (q, k, key
categories after padding, transform, row/head enables) to its taps; this module's tap runs
`kernels.reference.category_attention_rows` on the chosen rows only: O(rows * K) memory, no extra
forward, and the operator's own code path, so summing a recorded row by key category gives the
captured mass of that row (tested).

Rows: "last" (default) = the last query row of every forward. In `generate()` these are the prefill's
last prompt row and each decode step's row: exactly the rows whose outputs chose the generated
tokens, one per generated token, in order. "all" records every row (O(Q * K) for a prefill: only
for short inputs). An iterable of KV-slot positions records those slots' rows.

Sliding-window layers (Gemma3) whose cache keeps only the last window of slots in decode steps: a row is
still stored over every slot of the sequence, 0 on the dropped slots (outside every row's window), so rows
of all layers share one slot index.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from .capture import select_run
from .intervention import _resolve_indices
from .kernels.reference import category_attention_rows
from .patch import patch_state

ROW_CHOICES = ("last", "all")


class RowRecording:
    """Per-key attention rows recorded by `record_rows`: per run, per layer, chunks of (positions, P')."""

    def __init__(self, layers: tuple[int, ...], num_layers: int, rows, heads: str):
        self.layers = layers
        self.num_layers = num_layers
        self.heads = heads
        self._layer_set = frozenset(layers)
        self._rows = rows
        self._runs: list[dict[int, list[tuple[torch.Tensor, torch.Tensor]]]] = []
        self._cats: list[torch.Tensor] = []
        self._forward_id = None

    # called by the patched attention ----------------------------------------------------------
    def _tap(self, state, layer: int, q, k, cats, *, transform, scale, causal, row_enable, head_enable, block=None,
             window=None, offset: int = 0) -> None:
        """offset: slots before this layer's first key (a sliding-window cache keeps only the last K slots, every
        dropped one outside every row's window): rows are stored over all offset + K slots, 0 on the dropped ones."""
        if layer not in self._layer_set:
            return
        Q, K = q.shape[2], k.shape[2]
        if state.forward_id != self._forward_id:
            self._forward_id = state.forward_id
            if K == Q or not self._runs:  # a prefill without cache starts a new run
                self._runs.append({})
                self._cats.append(cats.detach().cpu())
            elif cats.shape[1] > self._cats[-1].shape[1]:
                self._cats[-1] = cats.detach().cpu()
        if self._rows == "last":
            idx = torch.tensor([Q - 1])
        elif self._rows == "all":
            idx = torch.arange(Q)
        else:
            pos = self._rows
            first = K - Q + offset  # absolute slot of this call's first query row
            idx = pos[(pos >= first) & (pos < K + offset)] - first
            if idx.numel() == 0:
                return
        with torch.no_grad():
            p = category_attention_rows(q, k, cats, transform, rows=idx, scale=scale, causal=causal,
                                        row_enable=row_enable, head_enable=head_enable, block=block, window=window)
        if self.heads == "mean":
            p = p.mean(dim=1, keepdim=True)
        if offset:
            p = torch.nn.functional.pad(p, (offset, 0))
        self._runs[-1].setdefault(layer, []).append((idx + (K - Q) + offset, p.float().cpu()))

    # public -------------------------------------------------------------------------------------
    @property
    def num_runs(self) -> int:
        return len(self._runs)

    def _run(self, run: int):
        return select_run(self._runs, run,
                          "no attention rows were recorded: run the patched model inside the record_rows block")

    def _layer(self, layer: int) -> int:
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is out of range for a model with {self.num_layers} layers")
        layer %= self.num_layers
        if layer not in self._layer_set:
            raise KeyError(f"layer {layer} was not recorded; recorded layers: {list(self.layers)}")
        return layer

    def categories(self, run: int = -1) -> torch.Tensor:
        """(B, K) key-slot categories seen by the last recorded row (PAD where padded)."""
        self._run(run)
        return self._cats[run]

    def positions(self, run: int = -1) -> torch.Tensor:
        """(R,) KV-slot positions of the recorded rows, in recording order."""
        chunks = next(iter(self._run(run).values()), [])
        return torch.cat([pos for pos, _ in chunks]) if chunks else torch.zeros(0, dtype=torch.long)

    def rows(self, layer: int, run: int = -1) -> torch.Tensor:
        """(B, H, R, K) fp32 P'_ij of `layer` (H = 1 with heads="mean"); keys past a row's step are 0."""
        layer = self._layer(layer)
        chunks = self._run(run).get(layer)
        if not chunks:
            raise RuntimeError(f"layer {layer} recorded no rows in run {run}")
        K = max(p.shape[-1] for _, p in chunks)
        return torch.cat([torch.nn.functional.pad(p, (0, K - p.shape[-1])) for _, p in chunks], dim=2)

    def attention(self, layer=-1, *, positions: Iterable[int] | None = None, run: int = -1) -> torch.Tensor:
        """(B, K) P' averaged over heads, the recorded rows at `positions` (default: all recorded rows)
        and `layer` (an index, a list of indices, or "all" for the mean over recorded layers)."""
        layers = self.layers if layer == "all" else [layer] if isinstance(layer, int) else list(layer)
        have = self.positions(run)
        if positions is None:
            sel = torch.ones(have.numel(), dtype=torch.bool)
        else:
            want = torch.as_tensor(list(positions), dtype=torch.long)
            missing = want[~torch.isin(want, have)]
            if missing.numel():
                raise ValueError(f"rows at positions {missing.tolist()} were not recorded; recorded: {have.tolist()}")
            sel = torch.isin(have, want)
        if not bool(sel.any()):
            raise ValueError("no rows selected")
        return torch.stack([self.rows(layer, run)[:, :, sel].mean(dim=(1, 2)) for layer in layers]).mean(0)


@contextmanager
def record_rows(model, layers=(-1,), rows="last", *, heads: str = "mean") -> Iterator[RowRecording]:
    """Record per-key attention rows of `layers` during the forwards run inside the block.

    model: patched with `attn_mod.patch`. layers: "all", an index or indices (negative from the end); cross-attention
        layers (Mllama) are not recorded: "all" skips them, naming one raises NotImplementedError.
    rows: "last" | "all" | iterable of KV-slot positions (see the module doc).
    heads: "mean" (store the mean over query heads, (B, 1, R, K)) or "all" ((B, Hq, R, K)).
    """
    state = patch_state(model)
    if state is None:
        raise ValueError("record_rows() needs a model patched with attn_mod.patch(model, processor)")
    if heads not in ("mean", "all"):
        raise ValueError(f"heads must be 'mean' or 'all', got {heads!r}")
    if isinstance(rows, str):
        if rows not in ROW_CHOICES:
            raise ValueError(f"rows must be one of {ROW_CHOICES} or KV-slot positions, got {rows!r}")
    else:
        rows = torch.as_tensor(list(rows), dtype=torch.long).reshape(-1)
    chosen = _resolve_indices(layers, state.num_layers, "layer", "decoder layers")
    cross = sorted(set(chosen) & set(getattr(state, "cross_layers", ())))
    if cross and layers == "all":  # "all" = every self-attention layer, as `Recording.layers`
        chosen, cross = tuple(i for i in chosen if i not in cross), []
    if cross:
        raise NotImplementedError(f"layers {cross} are cross-attention layers (keys = vision tokens), whose per-key "
                                  "rows are not recorded; choose self-attention layers (state.cross_layers lists "
                                  "the others), or use attn_mod.capture's rec.cross_mass for their masses")
    rec = RowRecording(chosen, state.num_layers, rows, heads)

    def tap(layer, q, k, cats, **kwargs):
        rec._tap(state, layer, q, k, cats, **kwargs)

    state.taps.append(tap)
    try:
        yield rec
    finally:
        if tap in state.taps:
            state.taps.remove(tap)


__all__ = ["RowRecording", "record_rows"]
