"""`attn-mod inspect` beyond Qwen grids: Gemma3, LLaVA, InternVL (and Qwen2.5-VL's heatmap.json) end to end on tiny
checkpoints; the painted values checked against an independent float64 eager forward of the same tokens."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from attn_mod import viz
from attn_mod.cli import main
from attn_mod.tiny import save_tiny

FILES = ("answer.txt", "metrics.json", "tokens.jsonl", "heatmap.png", "heatmap_layers.png", "heatmap.json",
         "tokens.png", "tokens.html", "layers.png", "entropy.png")
QUESTION = "What color is the square?"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("inspect_families")


@pytest.fixture(scope="module")
def models(root):
    made = {}

    def get(family):
        if family not in made:
            made[family] = save_tiny(family, root / family)
        return made[family]

    return get


def _fresh_image(path, rng):
    h, w = int(rng.integers(120, 200)), int(rng.integers(160, 260))
    Image.fromarray(rng.integers(1, 255, (h, w, 3), dtype=np.uint8)).save(path)  # no zeros
    return Image.open(path).convert("RGB")


def _random_box(rng, image):
    w, h = image.size
    x0, y0 = float(rng.integers(0, w // 2)), float(rng.integers(0, h // 2))
    return [x0, y0, x0 + float(rng.integers(30, w // 2)), y0 + float(rng.integers(30, h // 2))]


def _run_inspect(model_dir, image_path, out, box=None, convention="pixel"):
    argv = ["inspect", str(model_dir), "--image", str(image_path), "--question", QUESTION, "--max-new-tokens", "2",
            "--out", str(out)]
    if box is not None:
        argv += ["--box", *map(str, box), "--box-convention", convention]
    assert main(argv) == 0
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("heatmap.png", "heatmap_layers.png"):
        pixels = np.asarray(Image.open(out / name).convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 20, f"{name} is flat"
    m = json.loads((out / "metrics.json").read_text())
    recs = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    return m, recs, json.loads((out / "heatmap.json").read_text())


def _reference(model_dir, image, gen_ids):
    """Independent answer-row attention: the checkpoint in float64 with transformers' eager attention on prompt +
    generated tokens (teacher forced) -> (prompt inputs, S, [(H, Q, K) probabilities per layer])."""
    from attn_mod.eval.generation import Request, encode_batch
    from attn_mod.loading import load_model

    model, processor = load_model(model_dir)
    model.set_attn_implementation("eager")
    model = model.double()
    inputs = encode_batch(processor, [Request(QUESTION, [image], None)], "cpu")
    S = inputs["input_ids"].shape[1]
    new = torch.tensor([gen_ids[:-1]], dtype=torch.long)  # the last token is never fed back
    full = {}
    for k, v in inputs.items():
        if torch.is_tensor(v) and v.dim() == 2 and tuple(v.shape) == (1, S):
            fill = new if k == "input_ids" else torch.ones_like(new) if k == "attention_mask" else torch.zeros_like(new)
            full[k] = torch.cat([v, fill.to(v.dtype)], 1)
        else:
            full[k] = v.double() if torch.is_tensor(v) and v.is_floating_point() else v
    with torch.no_grad():
        out = model(**full, output_attentions=True)
    return model, processor, inputs, S, [a[0].double() for a in out.attentions]


def _check_against_reference(family, model_dir, image, m, recs, hm, box, convention="pixel"):
    from attn_mod.models import get_adapter
    from attn_mod.patch import BoxTarget

    n = len(recs)
    model, processor, inputs, S, attn = _reference(model_dir, image, [r["token_id"] for r in recs])
    assert m["tokens"]["prompt"] == S and m["tokens"]["generated"] == n and 0 < n <= 2
    L = len(attn)
    assert hm["layer"] == L - 1 and hm["layers"] == [f"layer {i}" for i in range(L)]
    ids = inputs["input_ids"][0]
    image_slots = torch.nonzero(ids == model.config.image_token_id).flatten()
    tokens = hm["tokens"]
    positions = torch.tensor([t["position"] for t in tokens])
    # one image: every image placeholder of the prompt is drawn, in order; image_tokens counts them
    assert torch.equal(positions, image_slots) and m["box"]["image_tokens"] == len(tokens)
    # the painted values: P' of the answer rows S-1 .. S+n-2, mean over heads and rows, per layer
    for layer in range(L):
        ref = attn[layer][:, S - 1:S - 1 + n, :].mean(dim=(0, 1))[positions]
        got = torch.tensor([t["per_layer"][layer] for t in tokens], dtype=torch.float64)
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-4, msg=f"{family} layer {layer}")
    last = torch.tensor([t["value"] for t in tokens], dtype=torch.float64)
    torch.testing.assert_close(last, torch.tensor([t["per_layer"][L - 1] for t in tokens], dtype=torch.float64))
    assert bool((last > 0).all()) and float(last.sum()) <= 1 + 1e-6
    for view in hm["views"]:
        assert view["value_sum"] == pytest.approx(float(last[view["start"]:view["stop"]].sum()), abs=1e-9)
    covered = sorted(i for v in hm["views"] for i in range(v["start"], v["stop"]))
    assert covered == list(range(len(tokens)))  # views partition the image's tokens
    # target tokens: exactly what the adapter's box_mask selects
    target = torch.tensor([t["target"] for t in tokens])
    if box is None:
        assert m["box"]["target_tokens"] == 0 and not bool(target.any())
        return
    target_spec = BoxTarget([[box]], [image], None, convention, "overlap")
    mask = get_adapter(model).box_mask(target_spec, inputs["input_ids"], inputs, model.config, processor)[0]
    assert 0 < int(mask.sum()) < len(tokens)
    assert m["box"]["target_tokens"] == int(mask.sum())
    assert torch.equal(target, mask[positions])
    assert not bool(mask[torch.ones_like(mask).index_fill_(0, positions, False)].any())  # no text token is TARGET
    ta = m["target_attention"]
    assert ta["defined"] and all(math.isfinite(r["a"]) and math.isfinite(r["v"]) for r in recs)


@pytest.mark.parametrize("family", ["gemma3", "llava", "internvl", "idefics3", "llava_onevision", "qwen2_5_vl"])
def test_inspect_family_with_box_paints_the_answer_rows(family, models, root):
    rng = np.random.default_rng()
    image = _fresh_image(root / f"{family}_box.png", rng)
    box = _random_box(rng, image)
    m, recs, hm = _run_inspect(models(family), root / f"{family}_box.png", root / f"out_{family}_box", box)
    assert m["box"]["pixels"] == [box]
    assert m["heatmap"]["drawn"] == ("qwen_grid" if family == "qwen2_5_vl" else "cells")
    assert m["heatmap"]["views"] == hm["views"]
    for key in ("vas_share",):
        assert math.isfinite(m[key]["value"]) and 0 <= m[key]["value"] <= 1
    shares = m["mass_shares"]
    assert sum(shares[c] for c in ("image", "system", "text", "response")) == pytest.approx(1, abs=1e-5)
    assert shares["target"] <= shares["image"] + 1e-9
    _check_against_reference(family, models(family), image, m, recs, hm, box)


@pytest.mark.parametrize("family", ["gemma3", "llava", "internvl"])
def test_inspect_family_without_box(family, models, root):
    rng = np.random.default_rng()
    image = _fresh_image(root / f"{family}_plain.png", rng)
    m, recs, hm = _run_inspect(models(family), root / f"{family}_plain.png", root / f"out_{family}_plain")
    assert m["target_attention"]["defined"] is False and all(r["a"] is None for r in recs)
    assert all(math.isfinite(r["v"]) and math.isfinite(r["mass_image"]) for r in recs)
    _check_against_reference(family, models(family), image, m, recs, hm, None)


def test_internvl_views_are_tiles_then_thumbnail(models, root):
    """A wide image gets several InternVL tiles + the thumbnail: two views, each tiling the image once."""
    from attn_mod.loading import load_model
    from attn_mod.models import get_adapter

    rng = np.random.default_rng()
    path = root / "wide.png"
    Image.fromarray(rng.integers(1, 255, (100, 300, 3), dtype=np.uint8)).save(path)
    m, _, hm = _run_inspect(models("internvl"), path, root / "out_wide")
    model, processor = load_model(models("internvl"))
    geo = get_adapter(model).box_geometry(processor, model.config)
    cols, rows = geo.grid(100, 300)
    per = (geo.tile // geo.cell) ** 2
    assert cols * rows > 1
    assert [(v["start"], v["stop"]) for v in hm["views"]] == [(0, cols * rows * per), (cols * rows * per,
                                                                                      (cols * rows + 1) * per)]
    assert "thumbnail" in hm["views"][1]["label"]
    for v in hm["views"]:  # each view's cells cover the image exactly once (areas add up to H * W)
        cells = [t["cell"] for t in hm["tokens"][v["start"]:v["stop"]]]
        area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in cells)
        assert area == pytest.approx(100 * 300)


def test_cell_raster_paints_each_cells_value():
    rng = np.random.default_rng()
    h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
    xs = np.sort(rng.choice(np.arange(1, w), 3, replace=False)).tolist()
    ys = np.sort(rng.choice(np.arange(1, h), 2, replace=False)).tolist()
    xe, ye = [0.0, *map(float, xs), float(w)], [0.0, *map(float, ys), float(h)]
    cells = [(xe[c], ye[r], xe[c + 1], ye[r + 1]) for r in range(3) for c in range(4)]
    cells.append(None)  # a token with no cell (newline / CLS)
    cells.append((w - 5.5, h - 4.0, w + 10.0, h + 10.0))  # overlaps the last grid cell and reaches outside
    values = rng.uniform(0.1, 1.0, len(cells))
    raster = viz.cell_raster(values, cells, (h, w), max_side=1000)
    assert raster.shape == (h, w)
    for i in range(h):
        for j in range(w):
            cx, cy = j + 0.5, i + 0.5
            want = sum(v for v, c in zip(values, cells) if c is not None and c[0] <= cx < c[2] and c[1] <= cy < c[3])
            assert raster[i, j] == pytest.approx(want, abs=1e-12)
    part = viz.cell_raster(values[:1], cells[:1], (h, w), max_side=1000)  # one cell: NaN elsewhere
    assert np.isnan(part).sum() == h * w - int(np.ceil(xs[0] - 0.5)) * int(np.ceil(ys[0] - 0.5))
    with pytest.raises(ValueError, match="values but"):
        viz.cell_raster(values[:3], cells, (h, w))


def test_inspect_refuses_mllama_with_the_reason(models, root, tmp_path, capsys):
    """One line on stderr naming the reason (no traceback), exit status 2, nothing written."""
    import re

    rng = np.random.default_rng()
    _fresh_image(tmp_path / "img.png", rng)
    assert main(["inspect", str(models("mllama")), "--image", str(tmp_path / "img.png"), "--question", QUESTION,
                 "--max-new-tokens", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"attn-mod inspect: not supported: .*cross-attention layers.*attention_rows", err)
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_image_tokens_refuses_placeholders_that_do_not_match_the_geometry():
    """One image whose placeholders the geometry accounts for exactly; any other count (a second image, another
    processor) is refused before anything is drawn."""
    from attn_mod.inspect import image_tokens
    from attn_mod.models.gemma3 import Gemma3Geometry

    geo = Gemma3Geometry((112, 112), 4)
    rng = np.random.default_rng()
    image = Image.fromarray(rng.integers(1, 255, (30, 50, 3), dtype=np.uint8))
    start = int(rng.integers(1, 6))
    ids = torch.full((1, start + 16 + 3), 9)
    ids[0, start:start + 16] = 7
    pos, cells, views = image_tokens(geo, ids, 7, image)
    assert pos.tolist() == list(range(start, start + 16)) and len(cells) == 16
    assert views == [("image, 4x4 tokens", 0, 16)]
    assert cells[5] == (50 / 4, 30 / 4, 2 * 50 / 4, 2 * 30 / 4)  # token 5 = row 1, column 1 of the 4 x 4 grid
    ids[0, -1] = 7
    with pytest.raises(ValueError, match="17 image placeholder tokens but the processor's geometry gives 16"):
        image_tokens(geo, ids, 7, image)


def test_inspect_smolvlm_with_a_normalized_box(models, root):
    """SmolVLM (sub-images + global image, tokens interleaved with marker tokens) with a 0..1 box."""
    rng = np.random.default_rng()
    image = _fresh_image(root / "smol.png", rng)
    w, h = image.size
    x0, y0, x1, y1 = _random_box(rng, image)
    box = [x0 / w, y0 / h, x1 / w, y1 / h]
    m, recs, hm = _run_inspect(models("smolvlm"), root / "smol.png", root / "out_smol", box, "normalized")
    assert m["box"]["convention"] == "normalized"
    assert m["box"]["pixels"] == [pytest.approx([x0, y0, x1, y1])]
    assert hm["views"][-1]["label"].startswith(("global image", "single frame"))
    _check_against_reference("smolvlm", models("smolvlm"), image, m, recs, hm, box, "normalized")


def test_cell_heatmap_grid_checks_its_inputs(tmp_path):
    rng = np.random.default_rng()
    image = Image.fromarray(rng.integers(1, 255, (40, 60, 3), dtype=np.uint8))
    cells = [(0, 0, 30, 40), (30, 0, 60, 40), None]
    att = {"layer 0": torch.rand(8) + 0.01}
    pos = torch.tensor([2, 3, 4])
    path = viz.cell_heatmap_grid(att, pos, cells, [("v", 0, 3)], image, path=tmp_path / "ok.png")
    assert path.is_file()
    with pytest.raises(ValueError, match="2 token positions but 3 cells"):
        viz.cell_heatmap_grid(att, pos[:2], cells, [("v", 0, 3)], image, path=tmp_path / "a.png")
    with pytest.raises(ValueError, match="views must be"):
        viz.cell_heatmap_grid(att, pos, cells, [("v", 0, 4)], image, path=tmp_path / "b.png")
    with pytest.raises(ValueError, match="at least one"):
        viz.cell_heatmap_grid({}, pos, cells, [("v", 0, 3)], image, path=tmp_path / "c.png")
    assert not any((tmp_path / f"{n}.png").exists() for n in "abc")
