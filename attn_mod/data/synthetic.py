"""Synthetic grounded VQA: seeded scenes of coloured shapes (or tiny bar charts) and questions whose answer
depends on one object, with that object's pixel box as the TARGET region.

    scene = make_scene(random.Random(0), n_objects=3)
    items = scene_items(scene, kinds=("colour", "shape"), form="choice", rng=rng)
    paths = build_dataset("runs/data", seed=0)     # curriculum1 / curriculum2 / qa JSONL + held-out JSONL and TSV

Geometry: a ``IMAGE`` x ``IMAGE`` (112 px) grey canvas cut into a ``GRID`` x ``GRID`` grid of ``CELL`` (28 px)
cells - exactly the merged visual-token cells of Qwen2.5-VL (patch 14, merge 2), so the tiny processor turns
an image into 4 x 4 = 16 merged visual tokens and each object sits inside one token. Objects are centred in
distinct cells; within a scene every object has a distinct shape and a distinct colour, so "the triangle" and
"the red object" name exactly one object.

Question kinds (multiple choice with options in a FIXED order, which is what lets a tiny model learn the
lookup; or free form):

* ``colour``  - "What colour is the triangle?"      A. red  B. green  C. blue  D. yellow     target: that object
* ``shape``   - "Which shape is red?"               A. circle  B. square  C. triangle  D. star
* ``count``   - "How many objects are there?"       A. 1  B. 2  C. 3  D. 4                   target: every object
* ``left_of`` - "Is the circle left of the square?" Yes / No (needs two objects in different columns)
* ``bar``     - bar-chart scenes: "What colour is the tallest bar?"  (colour options)        target: that bar

Alignment captions (`caption_item`, `make_split(caption=True)`; not in the default recipe, which learns the
lookup without them) name every object with its cell, in raster order: "row 1 col 2: red circle; row 3 col 4:
blue star" (target: every object). The user text of every item is `attn_mod.eval.prompts.build_prompt` of its
fields, so training prompts and evaluation prompts are identical.

Splits never share an image: `build_dataset` draws the held-out scenes first and rejects any training scene
with the same content signature (for one-object scenes, whose space is small, this removes the held-out ones).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..eval.prompts import build_prompt
from .samples import write_samples

__all__ = ["COLOURS", "SHAPES", "KINDS", "IMAGE", "CELL", "GRID", "Obj", "Scene", "Item", "make_scene",
           "make_bar_scene", "scene_items", "caption_item", "make_split", "write_jsonl", "write_tsv",
           "build_dataset", "task_corpus"]

IMAGE = 112  # canvas side, pixels
CELL = 28  # one merged visual token of Qwen2.5-VL (patch 14 x merge 2)
GRID = IMAGE // CELL
BACKGROUND = (128, 128, 128)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "green": (30, 200, 60), "blue": (30, 70, 235), "yellow": (250, 230, 30)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 14, "large": 22}  # object side in pixels (always inside its 28-px cell)
KINDS = ("colour", "shape", "count", "left_of", "bar")
FORMS = ("choice", "free")
CAPTION_QUESTION = "Describe the image: name every object with its row and column."


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour name, size name and grid cell (row, col), 0-based."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    height: int = 0  # bar charts: bar height in pixels (0 for shapes)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Pixel box [x0, y0, x1, y1) of the drawn object (x1 / y1 exclusive)."""
        if self.shape == "bar":
            x0 = self.col * CELL + (CELL - SIZES[self.size]) // 2
            return (x0, IMAGE - 2 - self.height, x0 + SIZES[self.size], IMAGE - 2)
        s = SIZES[self.size]
        x0, y0 = self.col * CELL + (CELL - s) // 2, self.row * CELL + (CELL - s) // 2
        return (x0, y0, x0 + s, y0 + s)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    chart: bool = False

    @property
    def signature(self) -> tuple:
        """Content key: two scenes with equal signatures render identical images."""
        return (self.chart, tuple(sorted((o.shape, o.colour, o.size, o.row, o.col, o.height) for o in self.objects)))

    def render(self) -> Image.Image:
        img = Image.new("RGB", (IMAGE, IMAGE), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for o in self.objects:
            _draw(draw, o)
        return img

    def caption(self) -> str:
        objs = sorted(self.objects, key=lambda o: (o.row, o.col))
        if self.chart:
            return "; ".join(f"col {o.col + 1}: {o.colour} bar {o.height // CELL + 1}" for o in
                             sorted(self.objects, key=lambda o: o.col))
        return "; ".join(f"row {o.row + 1} col {o.col + 1}: {o.name}" for o in objs)


@dataclass
class Item:
    """One question about a scene: the fields `build_prompt` and `load_benchmark` use, plus the target boxes."""

    scene: Scene
    question: str
    answer: str  # option letter for "choice", the word / number otherwise
    answer_type: str
    kind: str
    options: dict[str, str] = field(default_factory=dict)
    targets: tuple[int, ...] = ()  # indices into scene.objects

    @property
    def boxes(self) -> list[list[int]]:
        return [list(self.scene.objects[i].box) for i in self.targets]

    def prompt(self) -> str:
        return build_prompt({"question": self.question, "options": self.options, "answer_type": self.answer_type})

    def target_text(self) -> str:
        """The assistant turn: the option letter, or the free-form answer."""
        return self.answer


def _draw(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    x0, y0, x1, y1 = o.box
    colour = COLOURS[o.colour]
    if o.shape in ("square", "bar"):
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif o.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif o.shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=colour)
    elif o.shape == "star":
        import math

        cx, cy, r = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0 - 1) / 2
        pts = [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=colour)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")


def make_scene(rng: random.Random, n_objects: int, *, sizes: Sequence[str] = ("large",)) -> Scene:
    """`n_objects` (1..4) objects with distinct shapes, colours and cells; sizes drawn from `sizes`."""
    if not 1 <= n_objects <= min(len(SHAPES), len(COLOURS)):
        raise ValueError(f"n_objects must be in 1..{len(SHAPES)}, got {n_objects}")
    bad = set(sizes) - set(SIZES)
    if not sizes or bad:
        raise ValueError(f"sizes must be a non-empty subset of {sorted(SIZES)}, got {list(sizes)}")
    shapes = rng.sample(SHAPES, n_objects)
    colours = rng.sample(list(COLOURS), n_objects)
    cells = rng.sample(range(GRID * GRID), n_objects)
    return Scene(tuple(Obj(s, c, rng.choice(list(sizes)), *divmod(cell, GRID))
                       for s, c, cell in zip(shapes, colours, cells)))


def make_bar_scene(rng: random.Random) -> Scene:
    """A tiny bar chart: four bars (one per colour, one per grid column) with distinct heights of 1..4 cells."""
    colours = rng.sample(list(COLOURS), GRID)
    heights = rng.sample(range(1, GRID + 1), GRID)
    return Scene(tuple(Obj("bar", c, "large", GRID - h, col, h * CELL - 4)
                       for col, (c, h) in enumerate(zip(colours, heights))), chart=True)


def _letters(values: Sequence[str]) -> dict[str, str]:
    return {"ABCD"[k]: v for k, v in enumerate(values)}


def scene_items(scene: Scene, kinds: Iterable[str] = ("colour", "shape"), *, form: str = "choice",
                rng: random.Random | None = None, per_kind: int | None = None) -> list[Item]:
    """Questions about `scene` of the given kinds (every object once per kind, or `per_kind` drawn with `rng`).

    `form` "choice": options in the fixed order of `COLOURS` / `SHAPES` / 1..4, answer a letter; "free": no
    options, the answer is the word (colour / shape: answer_type "text"; count: "number"; left_of: "yesno").
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    kinds = list(kinds)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown question kind {k!r}; kinds are {KINDS}")
    choice = form == "choice"
    objs = scene.objects
    out: list[Item] = []
    for kind in kinds:
        cand: list[Item] = []
        if scene.chart != (kind == "bar"):
            continue
        if kind in ("colour", "shape"):
            for i, o in enumerate(objs):
                if kind == "colour":
                    q, values, value = f"What colour is the {o.shape}?", list(COLOURS), o.colour
                else:
                    q, values, value = f"Which shape is {o.colour}?", list(SHAPES), o.shape
                if choice:
                    cand.append(Item(scene, q, "ABCD"[values.index(value)], "choice", kind, _letters(values), (i,)))
                else:
                    cand.append(Item(scene, q, value, "text", kind, {}, (i,)))
        elif kind == "count":
            q, n = "How many objects are there?", len(objs)
            everything = tuple(range(n))
            cand.append(Item(scene, q, "ABCD"[n - 1], "choice", kind, _letters(["1", "2", "3", "4"]), everything)
                        if choice else Item(scene, q, str(n), "number", kind, {}, everything))
        elif kind == "left_of":
            for i, a in enumerate(objs):
                for j, b in enumerate(objs):
                    if i != j and a.col != b.col:
                        ans = "Yes" if a.col < b.col else "No"
                        q = f"Is the {a.shape} left of the {b.shape}?"
                        cand.append(Item(scene, q, "AB"[ans == "No"], "choice", kind, {"A": "Yes", "B": "No"}, (i, j))
                                    if choice else Item(scene, q, ans, "yesno", kind, {}, (i, j)))
        elif kind == "bar":
            i = max(range(len(objs)), key=lambda k: objs[k].height)
            q = "What colour is the tallest bar?"
            cand.append(Item(scene, q, "ABCD"[list(COLOURS).index(objs[i].colour)], "choice", kind,
                             _letters(list(COLOURS)), (i,)) if choice
                        else Item(scene, q, objs[i].colour, "text", kind, {}, (i,)))
        if per_kind is not None and len(cand) > per_kind:
            cand = (rng or random.Random(0)).sample(cand, per_kind)
        out.extend(cand)
    return out


def caption_item(scene: Scene) -> Item:
    """The dense alignment caption of `scene` as an item (free text; target: every object)."""
    return Item(scene, CAPTION_QUESTION, scene.caption(), "text", "caption", {}, tuple(range(len(scene.objects))))


def make_split(seed: int, n_images: int, *, objects: Sequence[int] = (3, 4), kinds: Sequence[str] = ("colour", "shape"),
               form: str | Sequence[str] = "choice", caption: bool = False, per_kind: int | None = None,
               sizes: Sequence[str] = ("large",), bar_fraction: float = 0.0, exclude: set | None = None,
               ) -> tuple[list[Item], set]:
    """Items of `n_images` distinct scenes (object count drawn from `objects`), none whose signature is in
    `exclude`. `form` may list several forms (one drawn per scene). Returns (items, signatures used)."""
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if not 0.0 <= bar_fraction <= 1.0:
        raise ValueError(f"bar_fraction must be in [0, 1], got {bar_fraction}")
    forms = [form] if isinstance(form, str) else list(form)
    rng = random.Random(seed)
    exclude = exclude or set()
    used: set = set()
    items: list[Item] = []
    tries = 0
    while len(used) < n_images:
        tries += 1
        if tries > 50 * n_images + 1000:
            raise ValueError(f"cannot draw {n_images} distinct scenes with objects={list(objects)} outside the "
                             f"excluded set ({len(used)} found); ask for fewer images or more objects")
        scene = make_bar_scene(rng) if rng.random() < bar_fraction else make_scene(rng, rng.choice(list(objects)),
                                                                                     sizes=sizes)
        sig = scene.signature
        if sig in exclude or sig in used:
            continue
        used.add(sig)
        if caption:
            items.append(caption_item(scene))
        else:
            items.extend(scene_items(scene, kinds, form=rng.choice(forms), rng=rng, per_kind=per_kind))
    return items, used


# ------------------------------------------------------------------------------------------------ writers


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def _image_names(items: Sequence[Item], prefix: str) -> dict[tuple, str]:
    names: dict[tuple, str] = {}
    for it in items:
        names.setdefault(it.scene.signature, f"{prefix}{len(names):06d}")
    return names


def write_jsonl(items: Sequence[Item], path: str | os.PathLike, *, prefix: str = "s", images_dir: str = "images",
                system: str | None = None) -> Path:
    """Training JSONL (`attn_mod.data.samples` format, with `boxes`); one PNG per scene under `images_dir`
    (relative to the JSONL file). Ids are ``<prefix><scene>_<question>``."""
    path = Path(path)
    img_dir = path.parent / images_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    names = _image_names(items, prefix)
    written: set[str] = set()
    rows = []
    counter: dict[str, int] = {}
    for it in items:
        name = names[it.scene.signature]
        if name not in written:
            (img_dir / f"{name}.png").write_bytes(_png(it.scene.render()))
            written.add(name)
        k = counter[name] = counter.get(name, -1) + 1
        user = [{"type": "image"}, {"type": "text", "text": it.prompt()}]
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": it.target_text()}]
        row: dict[str, Any] = {"id": f"{name}_{k}", "images": [f"{images_dir}/{name}.png"], "messages": msgs,
                               "answer": it.answer, "answer_type": it.answer_type, "category": it.kind}
        if it.options:
            row["options"] = it.options
        if it.targets:
            row["boxes"] = it.boxes
        rows.append(row)
    return write_samples(rows, path)


TSV_COLUMNS = ["index", "image", "question", "A", "B", "C", "D", "answer", "answer_type", "category", "bbox",
               "n_objects", "split"]


def write_tsv(items: Sequence[Item], path: str | os.PathLike, *, split: str = "heldout") -> Path:
    """VLMEvalKit-style TSV (base64 PNG in `image`; a repeated image holds the index of its first row; `bbox`
    a JSON list of target boxes) readable by `attn_mod.eval.datasets.load_benchmark`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first: dict[tuple, str] = {}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=TSV_COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for i, it in enumerate(items):
            sig = it.scene.signature
            image = first.get(sig)
            if image is None:
                image = base64.b64encode(_png(it.scene.render())).decode("ascii")
                first[sig] = str(i)
            row = {k: "" for k in TSV_COLUMNS}
            row.update(index=str(i), image=image, question=it.question, answer=it.answer,
                       answer_type=it.answer_type, category=it.kind, n_objects=len(it.scene.objects), split=split,
                       bbox=json.dumps(it.boxes) if it.targets else "")
            row.update(it.options)
            w.writerow(row)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def task_corpus() -> list[str]:
    """Sentences covering every prompt and answer word (for the offline tokenizer's BPE training)."""
    rng = random.Random(1)
    lines = [CAPTION_QUESTION]
    for n in (1, 2, 3, 4):
        scene = make_scene(rng, n)
        lines.append(scene.caption())
        for form in FORMS:
            lines += [it.prompt() + " " + it.answer for it in scene_items(scene, KINDS, form=form)]
    bars = make_bar_scene(rng)
    lines.append(bars.caption())
    lines += [it.prompt() for it in scene_items(bars, ["bar"])]
    return lines


# Default recipe data: {stage: [make_split kwargs, ...]} in training order; seeds differ per stage and the
# held-out split is drawn first. Multiple choice only, options in a fixed order: one object (the lookup is
# learnt here), then one to three, then the held-out distribution (three or four objects).
HELDOUT = dict(seed=10_000, n_images=150, objects=(3, 4), kinds=("colour", "shape"), form="choice", per_kind=1)
STAGES: dict[str, list[dict]] = {
    "curriculum1": [dict(seed=2, n_images=200, objects=(1,), kinds=("colour", "shape"), form="choice")],
    "curriculum2": [dict(seed=3, n_images=2500, objects=(1, 2, 3), kinds=("colour", "shape"), form="choice",
                         per_kind=1)],
    "qa": [dict(seed=4, n_images=4000, objects=(3, 4), kinds=("colour", "shape"), form="choice", per_kind=1)],
}
# The demo model: Qwen2.5-VL architecture, ~0.4 M parameters (build_tiny keyword arguments).
DEMO_MODEL = dict(layers=4, hidden=64, heads=4, kv_heads=2, vision_depth=1, vision_hidden=64, qk_scale=1.0)


def save_init_model(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """The untrained demo model (`DEMO_MODEL`, tokenizer with `task_corpus`) as a local HF directory: the
    starting point of the first training stage (`model.path`)."""
    from ..tiny import save_tiny

    return save_tiny("qwen2_5_vl", path, seed=seed, tokenizer_kwargs=dict(extra_corpus=task_corpus(), vocab_size=512),
                     **DEMO_MODEL)


def build_dataset(out_dir: str | os.PathLike, *, seed: int = 0, scale: float = 1.0, heldout_images: int | None = None,
                  stages: dict[str, list[dict]] | None = None) -> dict[str, Path]:
    """Write the recipe's data under `out_dir`: ``<stage>.jsonl`` per training stage (+ images/), and the
    held-out split as ``heldout.jsonl`` and ``heldout.tsv``. `scale` multiplies every training image count
    (``--quick`` runs), `seed` offsets every split seed. Returns {name: path}."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held = dict(HELDOUT, seed=HELDOUT["seed"] + seed)
    if heldout_images is not None:
        held["n_images"] = heldout_images
    held_items, held_sigs = make_split(**held)
    paths = {"heldout": write_jsonl(held_items, out / "heldout.jsonl", prefix="h"),
             "heldout_tsv": write_tsv(held_items, out / "heldout.tsv")}
    for name, parts in (stages or STAGES).items():
        items: list[Item] = []
        used: set = set()
        for part in parts:
            kw = dict(part, seed=part["seed"] + seed, n_images=max(1, round(part["n_images"] * scale)))
            # one-object scenes are few (16 cells x 4 shapes x 4 colours): cap so held-out exclusion still fits
            if tuple(kw.get("objects", ())) == (1,):
                kw["n_images"] = min(kw["n_images"], 200)
            got, sigs = make_split(**kw, exclude=held_sigs | used)
            items += got
            used |= sigs
        paths[name] = write_jsonl(items, out / f"{name}.jsonl", prefix=f"{name}_")
    (out / "manifest.json").write_text(json.dumps({"seed": seed, "scale": scale, "heldout": held,
                                                   "stages": stages or STAGES}, indent=1, default=list))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attn_mod.data.synthetic", description=build_dataset.__doc__)
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training split's image count")
    p.add_argument("--init-model", default=None, metavar="DIR", help="also write the untrained demo model here")
    a = p.parse_args(argv)
    if a.init_model:
        print(f"init model: {save_init_model(a.init_model, seed=a.seed)}")
    for name, path in build_dataset(a.out, seed=a.seed, scale=a.scale).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
