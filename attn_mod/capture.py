"""Recording per-layer attention masses from a patched model, in O(N) memory.

    with attn_mod.capture(model, layers="all") as rec:
        model(**inputs)                 # or model.generate(**inputs)
    rec.mass(layer)                     # (B, Hq, Q, C) float32; for generate: steps concatenated along Q
    rec.categories                      # (B, K) categories of the KV slots used

mass[b, h, i, c] is the attention mass that query row i of head h puts on key slots of category c
(after any active intervention). Rows are KV slots: for a plain forward, row i is token i; for
generate, the prompt rows come first, then one row per generated step. Each fresh prefill inside
one capture starts a new *run* (`rec.mass(layer, run=k)`); the default is the last run.

Models with cross-attention layers (Mllama): layers are decoder indices; `rec.layers` / `rec.mass` / `rec.masses`
hold the self-attention layers (keys = `rec.categories`), `rec.cross_layers` / `rec.cross_mass` /
`rec.cross_masses` the cross-attention layers (same query rows, keys = the vision tokens `rec.cross_categories`;
rows that see no image have zero masses). See `attn_mod.models.mllama` for what the masses mean there.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from .intervention import _resolve_indices
from .patch import PatchState, patch, patch_state


def select_run(runs: list, run: int, empty_message: str):
    """runs[run] with clear errors for an empty recording or a missing run index."""
    if not runs:
        raise RuntimeError(empty_message)
    try:
        return runs[run]
    except IndexError:
        raise IndexError(f"run {run} does not exist; {len(runs)} run(s) recorded") from None


class Recording:
    """Masses recorded by `capture`: per run, per layer, a list of (B, Hq, q, C) chunks (one per forward)."""

    def __init__(self, layers: tuple[int, ...], num_layers: int, detach: bool, cross_layers=frozenset()):
        self.layers = tuple(layer for layer in layers if layer not in cross_layers)
        self.cross_layers = tuple(layer for layer in layers if layer in cross_layers)
        self.num_layers = num_layers
        self.detach = detach
        self._layer_set = frozenset(layers)
        self._all_cross = frozenset(cross_layers)
        self._runs: list[dict[int, list[torch.Tensor]]] = []
        self._cats: list[torch.Tensor] = []
        self._cross_runs: list[dict[int, list[torch.Tensor]]] = []
        self._cross_cats: list[torch.Tensor | None] = []
        self._blocks: list[torch.Tensor | None] = []
        self._windows: dict[int, int | None] = {}  # sliding window of each recorded layer (None: full attention)
        self._state: PatchState | None = None

    # called by the patch state --------------------------------------------------------------
    def _begin(self, state: PatchState, new_run: bool) -> None:
        self._state = state
        cross = getattr(state, "cross", None)
        if new_run or not self._runs:
            self._runs.append({})
            self._cats.append(state.labels)
            self._blocks.append(state.blocks)
            self._cross_runs.append({})
            self._cross_cats.append(None if cross is None else cross.key_cats)
        else:
            self._cats[-1] = state.labels
            self._blocks[-1] = state.blocks

    def _wants(self, layer: int) -> bool:
        return layer in self._layer_set

    def _record(self, layer: int, mass: torch.Tensor, window: int | None = None) -> None:
        self._runs[-1].setdefault(layer, []).append(mass.detach() if self.detach else mass)
        self._windows[layer] = window

    def _record_cross(self, layer: int, mass: torch.Tensor) -> None:
        self._cross_runs[-1].setdefault(layer, []).append(mass.detach() if self.detach else mass)

    def __repr__(self) -> str:
        from .metrics import _ranges

        shape = ""
        if self._runs and self._runs[-1]:
            cats = self._cats[-1]
            shape = f", B={cats.shape[0]}, rows={self.query_categories().shape[1]}, keys={cats.shape[1]}"
        return (f"Recording(layers={_ranges(self.layers)} of {self.num_layers}, runs={self.num_runs}{shape}"
                f"{'' if self.detach else ', with grad'})")

    # public -----------------------------------------------------------------------------------
    @property
    def num_runs(self) -> int:
        return len(self._runs)

    def _run(self, run: int) -> dict[int, list[torch.Tensor]]:
        return select_run(self._runs, run, "nothing was recorded: run the patched model inside the capture block")

    def mass(self, layer: int, run: int = -1) -> torch.Tensor:
        """(B, Hq, Q, C) float32 masses of `layer` (negative indices count from the last layer)."""
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is out of range for a model with {self.num_layers} layers")
        given, layer = layer, layer % self.num_layers
        if layer in self._all_cross:
            raise KeyError(f"layer {layer} is a cross-attention layer (keys = vision tokens): use "
                           f"rec.cross_mass({layer}); rec.mass / rec.masses hold the self-attention layers")
        if layer not in self._layer_set:
            how = (f"layer {given} is model layer {layer} (negative indices count from the model's last layer, "
                   f"not from the captured ones)" if given < 0 else f"layer {layer}")
            raise KeyError(f"{how} was not captured; captured layers: {list(self.layers)}; use one of those, "
                           f"rec.masses() for all of them, or capture(model, layers=...) to record it")
        chunks = self._run(run).get(layer)
        if not chunks:
            raise RuntimeError(f"layer {layer} recorded nothing in run {run}")
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)

    def masses(self, run: int = -1) -> torch.Tensor:
        """(L, B, Hq, Q, C) masses of all captured layers, in the order of `self.layers`."""
        return torch.stack([self.mass(layer, run) for layer in self.layers])

    def cross_mass(self, layer: int, run: int = -1) -> torch.Tensor:
        """(B, Hq, Q, C) float32 masses of cross-attention `layer` (a decoder index) over the vision keys
        (`cross_categories_of(run)`); rows as in `mass`, zero for rows that see no image."""
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is out of range for a model with {self.num_layers} layers")
        layer = layer % self.num_layers
        if layer not in self.cross_layers:
            raise KeyError(f"layer {layer} is not a captured cross-attention layer; captured cross-attention "
                           f"layers: {list(self.cross_layers)} (of {sorted(self._all_cross)})")
        chunks = select_run(self._cross_runs, run, "nothing was recorded: run the patched model inside the capture "
                                                   "block").get(layer)
        if not chunks:
            raise RuntimeError(f"cross-attention layer {layer} recorded nothing in run {run} (a forward without "
                               "images skips the cross-attention layers)")
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)

    def cross_masses(self, run: int = -1) -> torch.Tensor:
        """(Lc, B, Hq, Q, C) masses of all captured cross-attention layers, in the order of `self.cross_layers`."""
        return torch.stack([self.cross_mass(layer, run) for layer in self.cross_layers])

    def cross_categories_of(self, run: int = -1) -> torch.Tensor:
        """(B, Kv) categories of the vision keys of the cross-attention layers in `run`."""
        cats = select_run(self._cross_cats, run, "nothing was recorded: run the patched model inside the capture block")
        if cats is None:
            raise RuntimeError("this run had no cross-attention keys (no images, or a model without "
                               "cross-attention layers)")
        return cats

    @property
    def cross_categories(self) -> torch.Tensor:
        return self.cross_categories_of(-1)

    def windows(self, layers: Sequence[int] | None = None) -> tuple[int | None, ...]:
        """Sliding window of each of `layers` (default: `self.layers`, the order of `masses()`) as the layer
        attended (None = full attention): key j is visible from the row at slot p iff p - j < window."""
        return tuple(self._windows.get(layer % self.num_layers) for layer in (self.layers if layers is None else layers))

    def block_ids_of(self, run: int = -1) -> torch.Tensor | None:
        """(B, K) int ids of the bidirectional image blocks of `run` (Gemma3; 0 = no block), or None (causal)."""
        self._run(run)
        return self._blocks[run]

    @property
    def block_ids(self) -> torch.Tensor | None:
        return self.block_ids_of(-1)

    def categories_of(self, run: int = -1) -> torch.Tensor:
        self._run(run)
        return self._cats[run]

    @property
    def categories(self) -> torch.Tensor:
        """(B, K) key-slot categories of the last run (generated slots included)."""
        return self.categories_of(-1)

    def query_categories(self, run: int = -1) -> torch.Tensor:
        """(B, Q) categories of the recorded query rows (the last Q slots of the run)."""
        cats = self.categories_of(run)
        first = next(iter(self._run(run).values()), None) or next(iter(self._cross_runs[run].values()))
        q = sum(c.shape[2] for c in first)
        return cats[:, cats.shape[1] - q:]


@contextmanager
def capture(model, layers="all", *, processor=None, detach: bool = True) -> Iterator[Recording]:
    """Record attention masses of `layers` during the forwards run inside the block.

    The model should be patched (`attn_mod.patch`); an unpatched model is patched with the identity
    intervention for the duration of the block, which needs `processor`. `detach=False` keeps the
    autograd graph so losses on masses can be back-propagated (training).
    """
    state = patch_state(model)
    temporary = None
    if state is None:
        if processor is None:
            raise ValueError("capture() needs a patched model (attn_mod.patch(model, processor)) or processor=... "
                             "to patch it with the identity intervention for the duration of the block")
        temporary = patch(model, processor)
        state = temporary.state
    rec = Recording(_resolve_indices(layers, state.num_layers, "layer", "decoder layers"), state.num_layers, detach,
                    cross_layers=getattr(state, "cross_layers", frozenset()))
    state.recorders.append(rec)
    try:
        yield rec
    finally:
        if rec in state.recorders:
            state.recorders.remove(rec)
        if temporary is not None:
            temporary.remove()
