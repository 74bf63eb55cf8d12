"""attn_mod.regions against the real Qwen2.5-VL / Qwen3-VL processors (offline tiny builds).

Expected token indices are computed here independently: the resized size comes from the
processor's own ``image_grid_thw``, the sequence positions from the placeholder ids, and the
selected cells by brute force over every merged cell (raster order, which
``test_token_order_matches_patchify`` checks against the processor's pixel_values).
"""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from attn_mod import regions as R
from attn_mod.tiny import build_processor

PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}
MERGE = 2


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def fam(request):
    return request.param, build_processor(request.param)


@pytest.fixture(scope="module")
def q25():
    return build_processor("qwen2_5_vl")


# ----------------------------------------------------------------------------------------------
# independent expectations


def _msgs(n_images, text):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def run(proc, per_sample, texts=None):
    """Processor output for a batch: per_sample = list of lists of PIL images."""
    texts = texts or ["Describe the image."] * len(per_sample)
    prompts = [proc.apply_chat_template(_msgs(len(ims), t), add_generation_prompt=True)
               for ims, t in zip(per_sample, texts)]
    flat = [im for ims in per_sample for im in ims]
    return proc(text=prompts, images=flat, padding=True, return_tensors="pt")


def image_positions(input_ids, token_id, grid_thw, merge=MERGE):
    """[(sample, positions)] per grid row: placeholders split by counts, rows in batch order."""
    counts = [int(t * h * w) // merge**2 for t, h, w in grid_thw.tolist()]
    out, k = [], 0
    for b in range(input_ids.shape[0]):
        pos = (input_ids[b] == token_id).nonzero().flatten().tolist()
        while pos:
            out.append((b, pos[: counts[k]]))
            pos = pos[counts[k]:]
            k += 1
    assert k == len(counts)
    return out


def brute_force(box, hw, grid_thw, patch, by="overlap", merge=MERGE):
    """Token indices (raster over merged cells) whose cell, scaled to the original image, is selected."""
    h, w = hw
    _, gh, gw = [int(v) for v in grid_thw]
    rh, rw = gh * patch, gw * patch  # resized size straight from the processor's grid
    t = patch * merge
    x0, y0, x1, y1 = box
    sel = []
    for r in range(gh // merge):
        for c in range(gw // merge):
            cx0, cx1 = c * t * w / rw, (c + 1) * t * w / rw
            cy0, cy1 = r * t * h / rh, (r + 1) * t * h / rh
            if by == "overlap":
                ok = min(x1, cx1) - max(x0, cx0) > 0 and min(y1, cy1) - max(y0, cy0) > 0
            else:
                mx, my = (cx0 + cx1) / 2, (cy0 + cy1) / 2
                ok = x0 <= mx <= x1 and y0 <= my <= y1
            if ok:
                sel.append(r * (gw // merge) + c)
    return sel


def noise_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------
# geometry read from the processor


@pytest.mark.parametrize("hw", [(60, 100), (95, 150), (333, 77), (40, 40), (1000, 700), (17, 300)])
def test_resized_size_matches_processor(fam, hw):
    family, proc = fam
    out = proc.image_processor(images=[noise_image(*hw)], return_tensors="pt")
    grid = out["image_grid_thw"][0]
    from_grid = R.resized_size(grid, PATCH[family])
    assert from_grid == (int(grid[1]) * PATCH[family], int(grid[2]) * PATCH[family])
    assert R.resized_size_from_config(proc, hw, family) == from_grid
    assert R.resized_size_from_config(proc.image_processor, Image.new("RGB", hw[::-1])) == from_grid
    assert from_grid[0] % (2 * PATCH[family]) == 0 and from_grid[1] % (2 * PATCH[family]) == 0


def test_geometry_for(fam):
    family, proc = fam
    g = R.geometry_for(proc, family)
    assert (g.patch_size, g.merge_size, g.temporal_patch_size) == (PATCH[family], 2, 2)
    assert g.token_px == (28 if family == "qwen2_5_vl" else 32)
    assert R.geometry_for(proc.image_processor) == g
    other = "qwen3_vl" if family == "qwen2_5_vl" else "qwen2_5_vl"
    with pytest.raises(ValueError, match="uses"):
        R.geometry_for(proc, other)
    with pytest.raises(ValueError, match="unknown family"):
        R.geometry_for(proc, "llava")
    assert R.geometry_for(None, "qwen3_vl").token_px == 32


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_token_order_matches_patchify(family):
    """Pixel content encodes the merged cell; pixel_values rows 4n..4n+3 must come from cell n."""
    proc = build_processor(family)
    t = PATCH[family] * MERGE
    rows, cols = 3, 5
    h, w = rows * t, cols * t  # already a valid size: the processor's resize is the identity
    arr = np.zeros((h, w, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    arr[..., 0] = 10 * (yy // t)
    arr[..., 1] = 10 * (xx // t)
    arr[..., 2] = 7 * (2 * ((yy // PATCH[family]) % 2) + (xx // PATCH[family]) % 2)  # sub-patch in the 2x2
    out = proc.image_processor(images=[Image.fromarray(arr)], return_tensors="pt")
    assert out["image_grid_thw"][0].tolist() == [1, 2 * rows, 2 * cols]
    p = PATCH[family]
    pv = out["pixel_values"].reshape(-1, 3, 2, p, p).numpy()
    ip = proc.image_processor
    mean, std = np.array(ip.image_mean)[:, None, None], np.array(ip.image_std)[:, None, None]
    pix = np.rint((pv[:, :, 0] * std + mean) * 255)  # (patches, C, p, p)
    assert np.all(pix == pix[:, :, :1, :1])  # each patch is constant: decoding is exact
    cells = R.token_cells((h, w), out["image_grid_thw"][0], patch_size=p, merge_size=MERGE)
    assert cells.shape == (rows * cols, 4)
    for n in range(rows * cols):
        group = pix[4 * n: 4 * n + 4, :, 0, 0]
        r, c = group[:, 0] / 10, group[:, 1] / 10
        assert (r == r[0]).all() and (c == c[0]).all(), "a merged token mixes two cells"
        assert group[:, 2].tolist() == [0, 7, 14, 21]  # 2x2 sub-patches row-major inside the group
        r, c = int(r[0]), int(c[0])
        assert cells[n].tolist() == [c * t, r * t, (c + 1) * t, (r + 1) * t]
        centre = ((c + 0.5) * t, (r + 0.5) * t) * 2
        assert R.box_token_indices(centre, (h, w), out["image_grid_thw"][0], patch_size=p,
                                   merge_size=MERGE).tolist() == [n]


# ----------------------------------------------------------------------------------------------
# single image: edges, corners, borders, full box


W, H = 150, 95  # non-square and not a multiple of 28/32: the resize scale is not 1
EDGE_BOXES = [
    (0, 0, 10, 10), (140, 0, 150, 10), (0, 85, 10, 95), (140, 85, 150, 95),  # corners
    (0, 0, 150, 4), (0, 91, 150, 95), (0, 0, 3, 95), (147, 0, 150, 95),  # edge strips
    (0, 0, 150, 95),  # full image
    (40.5, 20.25, 77.75, 61.0),  # interior, fractional
    (101, 55, 150, 95), (0, 70, 150, 95), (120, 0, 150, 95),  # touching right / bottom border
    (33, 12, 34, 13),  # one pixel
]


@pytest.mark.parametrize("by", ["overlap", "center"])
def test_single_image_boxes(fam, by):
    family, proc = fam
    out = run(proc, [[noise_image(H, W)]])
    grid = out["image_grid_thw"][0]
    (_, pos), = image_positions(out["input_ids"], proc.image_token_id, out["image_grid_thw"])
    for box in EDGE_BOXES:
        want = brute_force(box, (H, W), grid, PATCH[family], by)
        got = R.box_token_indices(box, (H, W), grid, patch_size=PATCH[family], merge_size=MERGE, by=by)
        assert got.tolist() == want, box
        mask = R.target_token_mask(out["input_ids"], proc.image_token_id, out["image_grid_thw"], [[(0, box)]],
                                   [(H, W)], merge_size=MERGE, patch_size=PATCH[family], by=by)
        assert mask.shape == out["input_ids"].shape
        assert mask[0].nonzero().flatten().tolist() == [pos[i] for i in want], box
    if by == "overlap":
        full = R.box_token_indices((0, 0, W, H), (H, W), grid, patch_size=PATCH[family], merge_size=MERGE)
        assert full.tolist() == list(range(len(pos)))


def test_border_contact_selects_no_extra_cell(q25):
    """150x95 -> 140x84 (grid 6x10): cell borders at x = 30*k, y = 31.666..*k (original px)."""
    out = run(q25, [[noise_image(H, W)]])
    grid = out["image_grid_thw"][0]
    assert grid.tolist() == [1, 6, 10]

    def idx(box, **kw):
        return R.box_token_indices(box, (H, W), grid, patch_size=14, merge_size=2, **kw).tolist()

    assert idx((30, 0, 60, 10)) == [1]  # exactly one cell column, touching its neighbours' borders
    assert idx((0, 0, 30.001, 10)) == [0, 1]  # a sliver over the border counts (positive area)
    assert idx((W - 1e-4, H - 1e-4, W + 1e-4, H + 1e-4)) == [14]  # within border tolerance: clamped
    assert idx((0, Fraction(95, 3), 10, Fraction(190, 3))) == [5]  # exact rational row borders


# ----------------------------------------------------------------------------------------------
# degenerate boxes (documented rule: along a zero-length axis, the containing half-open cell)


@pytest.mark.parametrize("by", ["overlap", "center"])
def test_degenerate_boxes(q25, by):
    out = run(q25, [[noise_image(H, W)]])
    grid = out["image_grid_thw"][0]  # 6x10 patches -> 3x5 tokens; cells 30 x 31.67 original px
    idx = lambda box: R.box_token_indices(box, (H, W), grid, patch_size=14, merge_size=2, by=by).tolist()  # noqa: E731
    assert idx((45, 40, 45, 40)) == [6]  # point inside cell (r=1, c=1)
    assert idx((30, 40, 30, 40)) == [6]  # point on the vertical border x=30: the cell to its right
    assert idx((0, 0, 0, 0)) == [0]  # top-left corner
    assert idx((W, H, W, H)) == [14]  # bottom-right corner: the last cell owns the far border
    assert idx((W, 0, W, 0)) == [4]
    assert idx((45, 0, 45, H)) == [1, 6, 11]  # vertical segment: one column
    assert idx((0, 50, W, 50)) == [5, 6, 7, 8, 9]  # horizontal segment: one row


# ----------------------------------------------------------------------------------------------
# conventions


CONV_BOXES = [(0, 0, 150, 95), (30, 0, 60, 95), (12.5, 19, 99.5, 76), (0, 47.5, 75, 95), (15, 9.5, 15, 9.5)]


@pytest.mark.parametrize("by", ["overlap", "center"])
def test_conventions_equal_pixel(fam, by):
    family, proc = fam
    out = run(proc, [[noise_image(H, W)]])
    grid = out["image_grid_thw"][0]
    rh, rw = int(grid[1]) * PATCH[family], int(grid[2]) * PATCH[family]
    kw = dict(patch_size=PATCH[family], merge_size=MERGE, by=by)
    for x0, y0, x1, y1 in CONV_BOXES:
        pix = R.box_token_indices((x0, y0, x1, y1), (H, W), grid, **kw).tolist()
        norm = (x0 / W, y0 / H, x1 / W, y1 / H)
        q1000 = (x0 * 1000 / W, y0 * 1000 / H, x1 * 1000 / W, y1 * 1000 / H)
        res = (x0 * rw / W, y0 * rh / H, x1 * rw / W, y1 * rh / H)
        assert R.box_token_indices(norm, (H, W), grid, convention="normalized", **kw).tolist() == pix
        assert R.box_token_indices(q1000, (H, W), grid, convention="qwen1000", **kw).tolist() == pix
        assert R.box_token_indices(res, (H, W), grid, convention="resized", **kw).tolist() == pix
        mask = R.target_token_mask(out["input_ids"], proc.image_token_id, out["image_grid_thw"], [[(0, norm)]],
                                   [(H, W)], merge_size=MERGE, patch_size=PATCH[family], convention="normalized",
                                   by=by)
        want = R.target_token_mask(out["input_ids"], proc.image_token_id, out["image_grid_thw"],
                                   [[(0, (x0, y0, x1, y1))]], [(H, W)], merge_size=MERGE,
                                   patch_size=PATCH[family], by=by)
        assert torch.equal(mask, want)


def test_float_noise_on_a_cell_border_is_not_a_sliver():
    # The float 0.1 is 0.1000000000000000055..., so exactly 0.1 * 280 > 28 (and 0.2 * 280 > 56): taken
    # literally it would select a 1e-15 px sliver of column 0. The box must start exactly at column 1.
    grid = (1, 20, 20)  # 280x280, cells of 28 px, identity scale
    kw = dict(patch_size=14, merge_size=2)
    assert Fraction(0.1) * 280 > 28 and Fraction(0.2) * 280 > 56
    a = R.box_token_indices((0.1, 0.1, 0.2, 0.2), (280, 280), grid, convention="normalized", **kw).tolist()
    assert a == R.box_token_indices((28, 28, 56, 56), (280, 280), grid, **kw).tolist() == [11]


def test_box_to_pixels():
    assert R.box_to_pixels((0.5, 0.25, 1, 1), (200, 100), "normalized") == (50, 50, 100, 200)
    assert R.box_to_pixels((500, 250, 1000, 1000), (200, 100), "qwen1000") == (50, 50, 100, 200)
    assert R.box_to_pixels((14, 14, 28, 28), (200, 100), "resized", resized_hw=(56, 28)) == (50, 50, 100, 100)
    assert R.box_to_pixels(torch.tensor([1.0, 2.0, 3.0, 4.0]), Image.new("RGB", (10, 20))) == (1, 2, 3, 4)
    assert R.box_to_pixels((-1e-4, 0, 100 + 1e-4, 200), (200, 100)) == (0, 0, 100, 200)  # border tolerance


@pytest.mark.parametrize("box,conv,match", [
    ((10, 10, 5, 20), "pixel", "x1 < x0"),
    ((10, 20, 15, 10), "pixel", "x1 < x0"),
    ((0, 0, 101, 50), "pixel", "outside"),
    ((-0.01, 0, 50, 50), "pixel", "outside"),
    ((0, 0, 1.2, 0.5), "normalized", "outside"),
    ((0, 0, 1001, 5), "qwen1000", "outside"),
    ((0, 0, 5, float("nan")), "pixel", "finite"),
    ((0, 0, 5), "pixel", "4 numbers"),
    ((0, 0, 5, 5), "xyxy", "unknown box convention"),
])
def test_box_errors(box, conv, match):
    with pytest.raises(ValueError, match=match):
        R.box_token_indices(box, (100, 100), (1, 8, 8), patch_size=14, merge_size=2, convention=conv)


def test_selection_rule_error_and_hint():
    with pytest.raises(ValueError, match="unknown selection rule"):
        R.box_token_indices((0, 0, 5, 5), (100, 100), (1, 8, 8), patch_size=14, merge_size=2, by="area")
    with pytest.raises(ValueError, match="qwen1000"):
        R.box_to_pixels((0, 0, 900, 800), (100, 100))  # a qwen1000 box passed as pixels: outside, hint


# ----------------------------------------------------------------------------------------------
# several images, batches, padding


def test_two_images_box_on_second_only(fam):
    family, proc = fam
    ims = [noise_image(70, 120, 1), noise_image(95, 150, 2)]
    out = run(proc, [ims])
    grids = out["image_grid_thw"]
    assert grids.shape == (2, 3)
    spans = image_positions(out["input_ids"], proc.image_token_id, grids)
    box = (31, 10, 150, 60)
    mask = R.target_token_mask(out["input_ids"], proc.image_token_id, grids, [[(1, box)]], [(70, 120), (95, 150)],
                               merge_size=MERGE, patch_size=PATCH[family])
    want = [spans[1][1][i] for i in brute_force(box, (95, 150), grids[1], PATCH[family])]
    assert want and mask[0].nonzero().flatten().tolist() == want
    assert not mask[0, spans[0][1]].any()
    # same via ("image", k, box) and union of several entries
    both = R.target_token_mask(out["input_ids"], proc.image_token_id, grids,
                               [[("image", 1, box), (0, (0, 0, 120, 70))]], ims, merge_size=MERGE,
                               patch_size=PATCH[family])
    assert both[0].nonzero().flatten().tolist() == sorted(spans[0][1] + want)


def test_left_padded_batch_of_two(fam):
    family, proc = fam
    sizes = [(64, 90), (120, 100)]
    out = run(proc, [[noise_image(*sizes[0], 3)], [noise_image(*sizes[1], 4)]],
              texts=["Hi.", "Describe the image. What color is the square? Answer with a single letter."])
    am = out["attention_mask"]
    assert am[0, 0] == 0 and am[1].all(), "sample 0 must be left-padded for this test"
    spans = image_positions(out["input_ids"], proc.image_token_id, out["image_grid_thw"])
    assert [b for b, _ in spans] == [0, 1]
    boxes = [[(0, (10, 5, 50, 40))], (60, 60, 100, 120)]  # second sample: bare-box shorthand
    mask = R.target_token_mask(out["input_ids"], proc.image_token_id, out["image_grid_thw"], boxes, sizes,
                               merge_size=MERGE, patch_size=PATCH[family])
    for b, box in enumerate([(10, 5, 50, 40), (60, 60, 100, 120)]):
        want = [spans[b][1][i] for i in brute_force(box, sizes[b], out["image_grid_thw"][b], PATCH[family])]
        assert want and mask[b].nonzero().flatten().tolist() == want
    assert not mask[am == 0].any()
    # mm_token_type_ids instead of the id gives the same answer; None / [] samples get no target
    m2 = R.target_token_mask(out["input_ids"], None, out["image_grid_thw"], boxes, sizes, merge_size=MERGE,
                             patch_size=PATCH[family], mm_token_type_ids=out["mm_token_type_ids"])
    assert torch.equal(m2, mask)
    m3 = R.target_token_mask(out["input_ids"], proc.image_token_id, out["image_grid_thw"], [None, []], sizes,
                             merge_size=MERGE, patch_size=PATCH[family])
    assert not m3.any()


def test_sequence_errors(q25):
    sizes = [(64, 90), (120, 100)]
    out = run(q25, [[noise_image(*sizes[0])], [noise_image(*sizes[1])]])
    ids, grids, tid = out["input_ids"], out["image_grid_thw"], q25.image_token_id
    kw = dict(merge_size=2, patch_size=14)
    good = [[(0, (0, 0, 5, 5))], None]
    with pytest.raises(ValueError, match="one entry per batch sample"):
        R.target_token_mask(ids, tid, grids, [good[0]], sizes, **kw)
    with pytest.raises(ValueError, match="sample 0 has 1 images"):
        R.target_token_mask(ids, tid, grids, [[(1, (0, 0, 5, 5))], None], sizes, **kw)
    with pytest.raises(ValueError, match="image_sizes has 1 entries"):
        R.target_token_mask(ids, tid, grids, good, sizes[:1], **kw)
    with pytest.raises(ValueError, match="does not match image_grid_thw"):
        R.target_token_mask(ids, tid, grids[:1], good, sizes[:1], **kw)  # a grid row missing
    bigger = grids.clone()
    bigger[0, 1] += 2
    with pytest.raises(ValueError, match="does not match image_grid_thw"):
        R.target_token_mask(ids, tid, bigger, good, sizes, **kw)
    dropped = ids.clone()
    first = int((ids[1] == tid).nonzero()[0])
    dropped[1, first] = 0
    with pytest.raises(ValueError, match="does not match image_grid_thw"):
        R.target_token_mask(dropped, tid, grids, good, sizes, **kw)
    with pytest.raises(ValueError, match="disagrees"):
        R.target_token_mask(ids, tid + 1, grids, good, sizes, mm_token_type_ids=out["mm_token_type_ids"], **kw)
    with pytest.raises(ValueError, match="outside"):
        R.target_token_mask(ids, tid, grids, [[(0, (0, 0, 91, 5))], None], sizes, **kw)
    with pytest.raises(ValueError, match="2-D"):
        R.target_token_mask(ids[0], tid, grids[:1], [good[0]], sizes[:1], **kw)
    with pytest.raises(ValueError, match="not understood"):
        R.target_token_mask(ids, tid, grids, [[("video", 0, 0, 0, (0, 0, 1, 1))], None], sizes, **kw)


def test_bare_box_needs_a_single_image(q25):
    out = run(q25, [[noise_image(60, 60), noise_image(60, 60)]])
    with pytest.raises(ValueError, match="bare box"):
        R.target_token_mask(out["input_ids"], q25.image_token_id, out["image_grid_thw"], [(0, 0, 5, 5)],
                            [(60, 60)] * 2, merge_size=2, patch_size=14)


# ----------------------------------------------------------------------------------------------
# videos (the video processors need torchvision, absent here: the placeholder text comes from the
# real processors' replace_video_token with a hand-built video_grid_thw; the patch order from the
# real Qwen3-VL video processor's patchify, called as a plain function)


def test_video_patch_order_matches_patchify():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    p, t = 16, 32
    frames, rows, cols = 6, 2, 3
    v = torch.zeros(1, frames, 3, rows * t, cols * t)
    yy, xx = torch.meshgrid(torch.arange(rows * t), torch.arange(cols * t), indexing="ij")
    for f in range(frames):
        v[0, f, 0] = f // 2  # temporal group
        v[0, f, 1] = yy // t
        v[0, f, 2] = xx // t
    patches, gt, gh, gw = Qwen3VLVideoProcessor.patchify(None, v, patch_size=p, merge_size=2, temporal_patch_size=2)
    assert (gt, gh, gw) == (3, 2 * rows, 2 * cols)
    px = patches[0].reshape(-1, 3, 2, p, p)[:, :, 0, 0, 0]  # (patches, C)
    for n in range(gt * rows * cols):
        grp = px[4 * n: 4 * n + 4]
        assert (grp == grp[0]).all()
        tg, r, c = (int(x) for x in grp[0])
        idx = R.box_token_indices(((c + 0.5) * t, (r + 0.5) * t) * 2, (rows * t, cols * t), (gt, gh, gw),
                                  patch_size=p, merge_size=2, frames=tg)
        assert idx.tolist() == [n]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_video_placeholders(family):
    from transformers.video_utils import VideoMetadata

    proc = build_processor(family)
    proc.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)  # only what replace_* reads
    patch = PATCH[family]
    vgrid = torch.tensor([[3, 4, 6]])  # 3 temporal groups of 2x3 tokens
    meta = VideoMetadata(total_num_frames=6, fps=2.0, frames_indices=list(range(6)))
    placeholder = proc.replace_video_token({"video_grid_thw": vgrid, "video_metadata": [meta]}, 0)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Describe."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True).replace("<|video_pad|>", placeholder, 1)
    img = run(proc, [[noise_image(50, 80)]])  # only for a real image grid row
    igrid = img["image_grid_thw"]
    n_img = int(igrid.prod()) // 4
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_img, 1)
    ids = proc.tokenizer([text], return_tensors="pt")["input_ids"]
    vid_pos = (ids[0] == proc.video_token_id).nonzero().flatten().tolist()
    assert len(vid_pos) == 3 * 2 * 3
    runs = 1 + sum(b - a > 1 for a, b in zip(vid_pos, vid_pos[1:]))
    assert runs == (3 if family == "qwen3_vl" else 1)  # Qwen3-VL: one run per temporal group
    frame_hw = (100, 150)  # original frame size; resized 4*patch x 6*patch
    box = (0, 0, 75, 50)  # top-left quarter -> cells (0,0), (0,1) with cols*.. (brute force below)
    per_frame = brute_force(box, frame_hw, vgrid[0], patch)
    assert per_frame
    kw = dict(merge_size=2, patch_size=patch, video_token_id=proc.video_token_id, video_grid_thw=vgrid,
              video_sizes=[frame_hw])
    m = R.target_token_mask(ids, proc.image_token_id, igrid, [[("video", 0, 1, box)]], [(50, 80)], **kw)
    assert m[0].nonzero().flatten().tolist() == [vid_pos[6 + i] for i in per_frame]
    m_all = R.target_token_mask(ids, proc.image_token_id, igrid, [[("video", 0, box)]], [(50, 80)], **kw)
    assert m_all[0].nonzero().flatten().tolist() == [vid_pos[6 * f + i] for f in range(3) for i in per_frame]
    # per-frame boxes: one entry per temporal group
    boxes = [("video", 0, 0, (0, 0, 10, 10)), ("video", 0, 2, (140, 90, 150, 100))]
    m_pf = R.target_token_mask(ids, proc.image_token_id, igrid, [boxes], [(50, 80)], **kw)
    assert m_pf[0].nonzero().flatten().tolist() == [vid_pos[0], vid_pos[12 + 5]]
    with pytest.raises(ValueError, match="frame group 3 out of range"):
        R.target_token_mask(ids, proc.image_token_id, igrid, [[("video", 0, 3, box)]], [(50, 80)], **kw)
    with pytest.raises(ValueError, match="sample 0 has 1 videos"):
        R.target_token_mask(ids, proc.image_token_id, igrid, [[("video", 1, box)]], [(50, 80)], **kw)


# ----------------------------------------------------------------------------------------------
# properties on random geometry (exact rational brute force; coordinates on a 1/8 px lattice)


@st.composite
def geometry_and_box(draw):
    patch = draw(st.sampled_from([14, 16]))
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    h, w = draw(st.integers(8, 400)), draw(st.integers(8, 400))
    ax = sorted(draw(st.lists(st.integers(0, 8 * w), min_size=2, max_size=2)))
    ay = sorted(draw(st.lists(st.integers(0, 8 * h), min_size=2, max_size=2)))
    box = (ax[0] / 8, ay[0] / 8, ax[1] / 8, ay[1] / 8)
    return patch, (1, 2 * rows, 2 * cols), (h, w), box


def _cells_exact(grid, hw, patch):
    _, gh, gw = grid
    h, w = hw
    t = patch * 2
    sx, sy = Fraction(w, gw * patch), Fraction(h, gh * patch)
    return [(c * t * sx, r * t * sy, (c + 1) * t * sx, (r + 1) * t * sy)
            for r in range(gh // 2) for c in range(gw // 2)]


@settings(max_examples=150, deadline=None)
@given(geometry_and_box())
def test_property_selection(args):
    patch, grid, hw, box = args
    kw = dict(patch_size=patch, merge_size=2)
    over = set(R.box_token_indices(box, hw, grid, **kw).tolist())
    cent = set(R.box_token_indices(box, hw, grid, by="center", **kw).tolist())
    cells = _cells_exact(grid, hw, patch)
    x0, y0, x1, y1 = (Fraction(v) for v in box)
    assert cent <= over
    assert over, "a box always selects at least one token in overlap mode"
    if x1 > x0 and y1 > y0:
        # exactly the cells with positive-area overlap
        assert over == {n for n, (a, b, c, d) in enumerate(cells)
                        if min(x1, c) > max(x0, a) and min(y1, d) > max(y0, b)}
        # exactly the cells whose centre is in the closed box
        assert cent == {n for n, (a, b, c, d) in enumerate(cells)
                        if x0 <= (a + c) / 2 <= x1 and y0 <= (b + d) / 2 <= y1}
    # the union of the selected cells covers the box (a full rectangle of cells around it)
    sel = [cells[n] for n in sorted(over)]
    ux0, uy0 = min(c[0] for c in sel), min(c[1] for c in sel)
    ux1, uy1 = max(c[2] for c in sel), max(c[3] for c in sel)
    assert ux0 <= x0 and uy0 <= y0 and ux1 >= x1 and uy1 >= y1
    inside = {n for n, c in enumerate(cells) if c[0] >= ux0 and c[2] <= ux1 and c[1] >= uy0 and c[3] <= uy1}
    assert inside == over
    # cell_boxes agree with the exact cells
    tc = R.token_cells(hw, grid, patch_size=patch, merge_size=2)
    assert torch.allclose(tc, torch.tensor([[float(v) for v in c] for c in cells], dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(st.integers(10, 3000), st.integers(10, 3000), st.sampled_from([14, 16]),
       st.integers(1, 64), st.integers(64, 4096))
def test_property_smart_resize_same_as_transformers(h, w, patch, lo_cells, hi_cells):
    from transformers import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    f = 2 * patch
    ip = Qwen2VLImageProcessorPil(patch_size=patch, min_pixels=lo_cells * f * f, max_pixels=hi_cells * f * f)
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            R.resized_size_from_config(ip, (h, w))
        with pytest.raises(ValueError, match="aspect ratio"):
            R._smart_resize_fallback(h, w, f, lo_cells * f * f, hi_cells * f * f)
        return
    want = smart_resize(h, w, factor=f, min_pixels=lo_cells * f * f, max_pixels=hi_cells * f * f)
    assert R.resized_size_from_config(ip, (h, w)) == tuple(want)
    assert R._smart_resize_fallback(h, w, f, lo_cells * f * f, hi_cells * f * f) == tuple(want)
