"""Per-key attention rows (operator and capture-time tap) and the pictures of attn_mod.viz."""

import html
import math

import numpy as np
import pytest
import torch
from PIL import Image

import attn_mod
from attn_mod import viz
from attn_mod.attention_rows import record_rows
from attn_mod.categories import IMAGE, PAD, SYSTEM, TARGET, TEXT
from attn_mod.kernels.reference import category_attention_reference, category_attention_rows
from attn_mod.kernels.spec import CategoryTransform
from attn_mod.metrics import image_mass, token_entropy, vas_from_masses
from attn_mod.regions import VisualSpan, locate_visual_tokens, target_token_mask
from attn_mod.tiny import build_tiny
from helpers import chat_text, onehot

TRANSFORMS = {
    "identity": None,
    "avar_renorm": CategoryTransform.from_lists(w={IMAGE: 1.5, TARGET: 1.5, SYSTEM: 0.5}),
    "avar_raw": CategoryTransform.from_lists(w={IMAGE: 1.5, TARGET: 1.5, SYSTEM: 0.0}, renorm=False),
    "scores": CategoryTransform.from_lists(mul={IMAGE: 1.3, TEXT: 0.7}, absw={TARGET: 0.4}, add={SYSTEM: -0.5}),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("causal", [True, False])
def test_attention_rows_sum_to_reference_masses(name, causal):
    B, Hkv, G, Q, K, D = 2, 2, 2, 7, 11, 8
    q = torch.randn(B, Hkv * G, Q, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, K, D, dtype=torch.float64) * 2
    v = torch.randn(B, Hkv, K, D, dtype=torch.float64)
    cat = torch.randint(1, 6, (B, K))
    cat[0, :3] = PAD
    row_enable = torch.rand(B, Q) > 0.3
    head_enable = torch.tensor([True, False, True, True])
    kw = dict(scale=0.4, causal=causal, row_enable=row_enable, head_enable=head_enable)
    ref = category_attention_reference(q, k, v, cat, TRANSFORMS[name], return_mass=True, **kw)
    rows = torch.tensor([6, 0, 3, 4])
    p = category_attention_rows(q, k, cat, TRANSFORMS[name], rows=rows, **kw)
    assert p.shape == (B, Hkv * G, 4, K) and p.dtype == torch.float64
    torch.testing.assert_close(torch.einsum("bhrk,bkc->bhrc", p, onehot(cat).double()), ref.mass[:, :, rows],
                               atol=1e-12, rtol=0)
    vx = v.repeat_interleave(G, dim=1)
    torch.testing.assert_close(torch.einsum("bhrk,bhkd->bhrd", p, vx), ref.out[:, :, rows], atol=1e-12, rtol=0)
    assert p[0, :, :, :3].abs().max() == 0  # PAD keys
    if causal:  # row i sits at key K - Q + i: later keys get nothing
        for r, i in enumerate(rows.tolist()):
            assert p[:, :, r, K - Q + i + 1:].abs().sum() == 0
    with pytest.raises(ValueError, match="rows must index"):
        category_attention_rows(q, k, cat, rows=torch.tensor([Q]))


# ------------------------------------------------------------------------------ tiny-model run
def _scene(w=200, h=130):
    im = Image.new("RGB", (w, h), (230, 230, 215))
    im.paste((200, 30, 30), (120, 20, 180, 80))
    im.paste((30, 40, 200), (20, 70, 70, 120))
    return im


BOX = [120, 20, 180, 80]


@pytest.fixture(scope="module")
def run():
    """One greedy generate on a tiny Qwen2.5-VL with AVAR, a target box, masses and per-key rows of all layers."""
    model, proc = build_tiny("qwen2_5_vl", seed=1)
    image = _scene()
    batch = proc(text=[chat_text(proc, "What color is the square?")], images=[image], return_tensors="pt")
    geo = attn_mod.regions.geometry_for(proc, family="qwen2_5_vl")
    mask = target_token_mask(batch["input_ids"], model.config.image_token_id, batch["image_grid_thw"], [[BOX]],
                             [image], merge_size=geo.merge_size, patch_size=geo.patch_size,
                             mm_token_type_ids=batch["mm_token_type_ids"])
    handle = attn_mod.patch(model, proc, intervention=attn_mod.Intervention.avar(0.5, 0.5))
    handle.set_target(mask)
    new = 6
    with torch.no_grad(), attn_mod.capture(model) as rec, record_rows(model, layers="all") as rows, \
            record_rows(model, layers=[0], heads="all") as rows_h:
        gen = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    S = batch["input_ids"].shape[1]
    span = locate_visual_tokens(batch["input_ids"], model.config.image_token_id, batch["image_grid_thw"],
                                merge_size=geo.merge_size)[0]
    return dict(model=model, proc=proc, handle=handle, batch=batch, image=image, rec=rec, rows=rows, rows_h=rows_h,
                gen=gen, S=S, new=new, span=span, geo=geo)


def _masses_of_rows(p, cats):
    return torch.einsum("bhrk,bkc->bhrc", p, onehot(cats))


def test_recorded_rows_equal_captured_masses(run):
    rec, rows, S, new = run["rec"], run["rows"], run["S"], run["new"]
    assert rows.positions().tolist() == list(range(S - 1, S - 1 + new))  # the rows that chose each token
    cats = rec.categories.long()
    assert (cats == TARGET).sum() > 0
    for layer in range(2):
        p = rows.rows(layer)
        assert p.shape == (1, 1, new, cats.shape[1])
        got = _masses_of_rows(p, cats)[:, 0]
        want = rec.mass(layer).mean(dim=1)[:, rows.positions()]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    ph = run["rows_h"].rows(0)
    assert ph.shape == (1, 4, new, cats.shape[1])
    torch.testing.assert_close(_masses_of_rows(ph, cats), rec.mass(0)[:, :, rows.positions()], atol=1e-6, rtol=0)
    torch.testing.assert_close(ph.mean(dim=1, keepdim=True), rows.rows(0), atol=1e-7, rtol=0)
    # attention(): mean over chosen rows / layers
    pos = [S - 1, S + 1]
    sel = torch.tensor([0, 2])
    torch.testing.assert_close(rows.attention(1, positions=pos), rows.rows(1)[0, 0, sel].mean(0)[None])
    torch.testing.assert_close(rows.attention("all"), (rows.rows(0) + rows.rows(1)).mean(dim=(1, 2)) / 2)
    with pytest.raises(ValueError, match="not recorded"):
        rows.attention(-1, positions=[0])
    with pytest.raises(KeyError, match="not recorded"):
        run["rows_h"].rows(1)


def test_record_rows_all_and_positions_on_a_forward(run):
    model, batch = run["model"], run["batch"]
    S = run["S"]
    with torch.no_grad(), attn_mod.capture(model, layers=[1]) as rec, \
            record_rows(model, layers=[1], rows="all") as all_rows, \
            record_rows(model, layers=[1], rows=[5, S - 1]) as some:
        model(**batch)
    cats = rec.categories.long()
    torch.testing.assert_close(_masses_of_rows(all_rows.rows(1), cats)[:, 0], rec.mass(1).mean(1), atol=1e-6, rtol=0)
    assert some.positions().tolist() == [5, S - 1]
    torch.testing.assert_close(some.rows(1), all_rows.rows(1)[:, :, [5, S - 1]])
    unpatched, _ = build_tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match="patched"):
        with record_rows(unpatched):
            pass
    with pytest.raises(ValueError, match="rows must be"):
        with record_rows(model, rows="answer"):
            pass


# --------------------------------------------------------------------------------------- pictures
def _png(path):
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 20, "picture is (nearly) a single flat colour"
    return arr


def test_visual_token_grid_raster_order():
    span = VisualSpan("image", 0, 0, 0, (1, 6, 8), torch.arange(12) + 5)  # 3 rows x 4 cols of merged tokens
    att = torch.zeros(20)
    att[5:17] = torch.arange(12, dtype=torch.float32)
    grid = viz.visual_token_grid(att, span, merge_size=2)
    assert grid.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_image_heatmap_orientation_and_box_placement(tmp_path):
    """A single hot token at row 0, last column lands in the top-right cell; the box drawn around that
    cell (original pixels) coincides with it."""
    image = Image.new("RGB", (200, 100), (0, 200, 0))  # green: unlike any grey of labels and ticks
    span = VisualSpan("image", 0, 0, 0, (1, 4, 8), torch.arange(8) + 3)  # 2 x 4 tokens, resized 56 x 112
    att = torch.zeros(12)
    att[3 + 3] = 1.0  # token (r=0, c=3)
    path = viz.image_heatmap(att, span, image, path=tmp_path / "h.png", merge_size=2, patch_size=14,
                             boxes=[[150, 0, 200, 50]])
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert arr.shape == (600, 700, 3)
    left = arr[:, :560]  # leave out the colour bar
    r, g, b = left[..., 0], left[..., 1], left[..., 2]
    cold = np.argwhere((r < 30) & (g > 50) & (g < 110) & (b < 30))  # green under the colormap's black
    hot = np.argwhere((r > 110) & (g > 200) & (b > 50) & (b < 150))  # green under the colormap's top
    cyan = np.argwhere((g > 200) & (b > 200) & (r < 90))
    (y0, x0), (y1, x1) = np.concatenate([cold, hot]).min(0), np.concatenate([cold, hot]).max(0)  # image area
    (hy0, hx0), (hy1, hx1) = hot.min(0), hot.max(0)
    (cy0, cx0), (cy1, cx1) = cyan.min(0), cyan.max(0)
    assert hx0 > x0 + 0.7 * (x1 - x0) and hy1 < y0 + 0.55 * (y1 - y0)  # top-right quarter
    assert hx1 > x1 - 4 and hy0 < y0 + 4
    assert abs(cx0 - hx0) <= 4 and abs(cy1 - hy1) <= 4  # the box frames the hot cell


def test_image_heatmaps_on_a_capture(run, tmp_path):
    rows, span, image, geo = run["rows"], run["span"], run["image"], run["geo"]
    cats = run["rec"].categories[0]
    att = rows.attention(-1)[0]
    kw = dict(merge_size=geo.merge_size, patch_size=geo.patch_size, boxes=[BOX])
    p1 = viz.image_heatmap(att, span, image, path=tmp_path / "a.png", query="answer rows", layer="layer 1",
                           categories=cats, **kw)
    p2 = viz.image_heatmap(att, span, image, path=tmp_path / "b.png", on="resized", size=(5, 4), dpi=80, **kw)
    p3 = viz.image_heatmap_grid({f"layer {layer}": rows.attention(layer)[0] for layer in range(2)}, span, image,
                                path=tmp_path / "c.png", title="per layer", **kw)
    assert _png(p1).shape == (600, 700, 3)
    assert _png(p2).shape == (320, 400, 3)
    # 2 panels of 2.6 in side by side + colour bar; height: 1-line title + one row of 200x130 panels
    assert _png(p3).shape == (int(100 * (0.61 + 0.92 * 2.6 * 130 / 200 + 0.4 + 0.15)), 650, 3)
    with pytest.raises(ValueError, match="on must be"):
        viz.image_heatmap(att, span, image, path=tmp_path / "d.png", on="warped", **kw)


def test_token_text_figure_png_and_html(tmp_path):
    tokens = ["The", " red", " square", " <b>&", "\n", "Answer", ": $x$", " A", "<|im_end|>"] * 6
    values = [0.1, 0.5, float("nan"), 0.9, 0.2, 0.0, 0.3, 1.0, 0.4] * 6
    png = viz.token_text_figure(tokens, values, path=tmp_path / "t.png", title="demo", label="a")
    arr = _png(png)
    assert arr.shape[1] == 1000 and arr.shape[0] > 300  # six newlines: at least seven text lines
    page = viz.token_text_figure(tokens, values, path=tmp_path / "t.html", title="demo", label="a").read_text()
    for tok in set(tokens):
        assert html.escape(tok.replace("\n", "")) in page
    assert page.count('class="t"') == len(tokens) and page.count("<br>") == 6
    assert "http" not in page and "<script" not in page and "<link" not in page  # self-contained
    assert "background:transparent" in page  # NaN -> no colour
    with pytest.raises(ValueError, match="values"):
        viz.token_text_figure(tokens, values[:-1], path=tmp_path / "x.png")


def test_layer_profile_and_curves(run, tmp_path):
    rec = run["rec"]
    masses, qcats = rec.masses(), rec.query_categories()
    prof = viz.layer_profile(masses, qcats, rows="response")
    vas = vas_from_masses(masses, qcats, rows="response")
    assert prof["vas"] == pytest.approx(vas.per_layer[:, 0].tolist())
    sel = qcats[0] == 5
    for layer in range(2):
        m = masses[layer, 0].mean(0)[sel].mean(0)  # (C,)
        assert prof["image"][layer] == pytest.approx(float(image_mass(m)), abs=1e-6)
        assert prof["system"][layer] == pytest.approx(float(m[SYSTEM]), abs=1e-6)
        total = sum(prof[c][layer] for c in ("image", "system", "text", "response"))
        assert total == pytest.approx(1.0, abs=1e-5)
    path = viz.layer_curves(masses, qcats, path=tmp_path / "l.png", rows="response")
    assert _png(path).shape == (420, 1100, 3)


def test_entropy_bin_means_hand_computed():
    h = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, float("nan")])
    v = torch.tensor([1.0, 3.0, 5.0, float("nan"), 2.0, 4.0, 100.0])
    edges, means, counts = viz.entropy_bin_means(h, v, bins=3)
    assert edges.tolist() == pytest.approx([0.1, 0.2666667, 0.4333333, 0.6])
    assert means.tolist() == pytest.approx([2.0, 5.0, 3.0])  # bins {0.1,0.2}, {0.3,(0.4 NaN)}, {0.5,0.6}
    assert counts.tolist() == [2, 1, 2]
    edges, means, counts = viz.entropy_bin_means(torch.ones(4), torch.arange(4.0), bins=5)  # all ties
    assert counts.tolist() == [4] and means.tolist() == [1.5]


def test_entropy_bins_picture(run, tmp_path):
    gen, rec, S, new = run["gen"], run["rec"], run["S"], run["new"]
    ent = token_entropy(torch.stack([lg[0] for lg in gen.logits]))
    ta = attn_mod.metrics.target_attention(rec)
    a, v = ta.a[0, 0, S - 1:S - 1 + new], ta.v[0, 0, S - 1:S - 1 + new]
    assert torch.isfinite(a).all() and not math.isnan(float(ent.mean()))
    path = viz.entropy_bins(ent, {"a": a, "v": v}, path=tmp_path / "e.png", bins=3)
    assert _png(path).shape == (450, 800, 3)
