"""SAYO grounded converters on the GQA / ReFocus fixtures in tests/data/, and their boxes as TARGET tokens.

The expected pixel boxes are recomputed here from the raw fixture fields; the expected TARGET tokens come from
an independent merged-cell computation (28-px cells for Qwen2.5-VL, 32 px for Qwen3-VL, resized size read from
the processor's image_grid_thw, overlap with positive area) compared with the categories the patched tiny
models label through `handle.set_target(boxes=..., images=...)`.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from PIL import Image

import attn_mod
from attn_mod.cli import main
from attn_mod.categories import TARGET
from attn_mod.data.grounded import (convert_gqa, convert_refocus, gqa_final_object_ids, gqa_program_object_ids,
                                     label_in_question)
from attn_mod.data.samples import read_samples
from attn_mod.tiny import build_tiny

DATA = Path(__file__).resolve().parent / "data"
CELL_PX = {"qwen2_5_vl": 28, "qwen3_vl": 32}


# ----------------------------------------------------------------------------------------------- expectations


# question id -> object ids: SAYO's final target object(s) (default) and every id the program names
FINAL_IDS = {
    "05515938": ["1002"],  # select table -> relate cup (1002) -> exist: the cup
    "05515939": ["1004", "1005"],  # select lamp -> relate chairs (1004,1005) -> query color: both chairs
    "05515940": ["1002", "1003"],  # and(verify cup, verify lamp): both branches
    "07811001": ["2001"],  # the cat, hanging over the right and bottom borders
}
PROGRAM_IDS = {**FINAL_IDS, "05515938": ["1001", "1002"], "05515939": ["1003", "1004", "1005"]}


def gqa_expected(targets: str = "final") -> dict[str, list[tuple]]:
    """question id -> pixel boxes, straight from the fixture's objects (x, y, w, h) clipped to the image."""
    qs = json.loads((DATA / "gqa" / "questions.json").read_text())
    sg = json.loads((DATA / "gqa" / "scene_graphs.json").read_text())
    want = FINAL_IDS if targets == "final" else PROGRAM_IDS
    out = {}
    for qid, ids in want.items():
        g = sg[qs[qid]["imageId"]]
        boxes = []
        for i in ids:
            o = g["objects"][i]
            boxes.append((o["x"], o["y"], min(o["x"] + o["w"], g["width"]), min(o["y"] + o["h"], g["height"])))
        out[f"gqa-{qid}"] = boxes
    return out


def refocus_expected() -> dict[str, list[tuple]]:
    def px(b, w, h):
        return (b["x1"] * w, b["y1"] * h, b["x2"] * w, b["y2"] * h)

    chart = json.loads((DATA / "refocus" / "chart_v_bar_wbb.json").read_text())
    table = json.loads((DATA / "refocus" / "tablevqa_wbb.json").read_text())
    w, h = 300, 200
    c1 = chart["chartqa_1"]["x_bboxes"]
    t = table["tablevqa_1"]
    tw, th = 260, 180
    gdp, japan = px(t["columns_bbox"][1], tw, th), px(t["rows_bbox"][1], tw, th)
    cell = (max(gdp[0], japan[0]), max(gdp[1], japan[1]), min(gdp[2], japan[2]), min(gdp[3], japan[3]))
    return {
        "refocus-chartqa_1": [px(c1[1], w, h)],  # "2020"
        "refocus-chartqa_2": [px(c1[0], w, h), px(c1[2], w, h)],  # "2019" and "2021"
        "refocus-tablevqa_1": [cell],  # GDP column x Japan row
        "refocus-tablevqa_2": [px(t["columns_bbox"][2], tw, th)],  # "population" column only
    }


def convert_all(tmp_path: Path):
    g = convert_gqa(DATA / "gqa" / "questions.json", DATA / "gqa" / "scene_graphs.json", DATA / "gqa" / "images",
                    tmp_path / "out" / "gqa.jsonl", progress=False)
    c = convert_refocus(DATA / "refocus" / "chart_v_bar_wbb.json", tmp_path / "out" / "chart.jsonl", progress=False)
    t = convert_refocus(DATA / "refocus" / "tablevqa_wbb.json", tmp_path / "out" / "table.jsonl", progress=False)
    return g, c, t


def test_converters_produce_the_expected_boxes(tmp_path):
    g, c, t = convert_all(tmp_path)
    assert g.written == 4 and dict(g.skipped) == {"no_target": 2, "unknown_object_ids": 1}
    assert c.written == 2 and dict(c.skipped) == {"no_target": 1}
    assert t.written == 2 and not t.skipped
    want = {**gqa_expected(), **refocus_expected()}
    got = {}
    for res in (g, c, t):
        for s in read_samples(res.path):
            got[s.id] = s
            assert len(s.images) == 1 and not s.has_assistant
            assert s.load_images()[0].size  # relative image paths resolve from the output file
            assert s.messages[-1]["content"][0] == {"type": "image"}
    assert set(got) == set(want)
    for sid, boxes in want.items():
        assert len(got[sid].boxes[0]) == len(boxes), sid
        for a, b in zip(got[sid].boxes[0], boxes):
            assert a == pytest.approx(b, abs=1e-9), sid
    assert got["gqa-05515938"].answer == "yes" and got["gqa-05515938"].answer_type == "yesno"
    assert got["gqa-07811001"].answer_type == "text"
    assert got["refocus-chartqa_1"].answer_type == "number"
    assert got["gqa-05515939"].meta["source"]["fullAnswer"] == "The chairs are brown."
    assert [o["name"] for o in got["gqa-05515939"].meta["target_objects"]] == ["chair", "chair"]


def test_gqa_program_and_annotation_targets_and_helpers(tmp_path):
    res = convert_gqa(DATA / "gqa" / "questions.json", DATA / "gqa" / "scene_graphs.json", DATA / "gqa" / "images",
                      tmp_path / "p.jsonl", targets="program", progress=False)
    got = {s.id: s for s in read_samples(res.path)}
    for sid, boxes in gqa_expected("program").items():
        assert [tuple(b) for b in got[sid].boxes[0]] == [tuple(float(v) for v in b) for b in boxes], sid
    res = convert_gqa(DATA / "gqa" / "questions.json", DATA / "gqa" / "scene_graphs.json", DATA / "gqa" / "images",
                      tmp_path / "a.jsonl", targets="annotations", progress=False)
    got = {s.id: s for s in read_samples(res.path)}
    assert len(got["gqa-05515939"].boxes[0]) == 3  # annotation ids "1004,1005" and "1003"
    assert gqa_final_object_ids([{"argument": "a (1)"}, {"argument": "b (2)", "dependencies": [0]},
                                 {"argument": "?", "dependencies": [1]}]) == ["2"]
    assert gqa_final_object_ids([{"argument": "x", "dependencies": [0]}]) == []  # a self-loop ends
    assert gqa_program_object_ids([{"argument": "cup,on,o (12,34)"}, {"argument": "dog (-)"},
                                   {"argument": "table (12)"}, {"argument": "color"}]) == ["12", "34"]
    assert label_in_question("GDP", "What is the gdp of Japan?")
    assert not label_in_question("20", "What is the value of 2020?")
    with pytest.raises(FileNotFoundError, match="image folder"):
        convert_gqa(DATA / "gqa" / "questions.json", DATA / "gqa" / "scene_graphs.json", tmp_path / "nope",
                    tmp_path / "b.jsonl", progress=False)
    with pytest.raises(ValueError, match="units='pixel'"):
        bad = tmp_path / "bad.json"
        rec = json.loads((DATA / "refocus" / "chart_v_bar_wbb.json").read_text())["chartqa_1"]
        rec["figure_path"] = str(DATA / "refocus" / rec["figure_path"])
        rec["x_bboxes"][1] = {"x1": 108, "y1": 10, "x2": 190, "y2": 186}
        bad.write_text(json.dumps({"x": rec}))
        convert_refocus(bad, tmp_path / "c.jsonl", progress=False)
    assert not (tmp_path / "c.jsonl").exists()


def test_cli_grounded(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert main(["data", "grounded", "--format", "refocus", "--annotations", str(DATA / "refocus" / "tablevqa_wbb.json"),
                 "--out", str(out), "--no-progress"]) == 0
    assert "| written" in capsys.readouterr().out and len(read_samples(out)) == 2
    assert main(["data", "grounded", "--format", "gqa", "--out", str(out)]) == 2  # names the missing flags
    assert "--questions, --scene-graphs, --images" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- TARGET tokens


def predicted_target_positions(input_ids, image_token_id, grid_thw, patch, image: Image.Image, boxes):
    """Sequence positions of the merged cells that overlap a box with positive area (original-image pixels)."""
    _, gh, gw = (int(v) for v in grid_thw)
    rh, rw = gh * patch, gw * patch  # resized size
    t = 2 * patch  # merged cell side in resized pixels
    w, h = image.size
    positions = (input_ids == image_token_id).nonzero().flatten().tolist()
    assert len(positions) == (gh // 2) * (gw // 2)
    out = []
    for n, pos in enumerate(positions):
        r, c = divmod(n, gw // 2)
        x0, x1 = Fraction(c * t * w, rw), Fraction((c + 1) * t * w, rw)
        y0, y1 = Fraction(r * t * h, rh), Fraction((r + 1) * t * h, rh)
        if any(Fraction(bx0) < x1 and Fraction(bx1) > x0 and Fraction(by0) < y1 and Fraction(by1) > y0
               for bx0, by0, bx1, by1 in boxes):
            out.append(pos)
    return out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_boxes_become_the_predicted_target_tokens(tmp_path, family):
    convert_all(tmp_path)
    want_boxes = {**gqa_expected(), **refocus_expected()}
    model, proc = build_tiny(family)
    assert proc.image_processor.patch_size * proc.image_processor.merge_size == CELL_PX[family]
    image_token_id = model.config.image_token_id
    handle = attn_mod.patch(model, proc)
    partial = 0
    try:
        for name in ("gqa", "chart", "table"):
            for s in read_samples(tmp_path / "out" / f"{name}.jsonl"):
                image = s.load_images()[0]
                text = proc.apply_chat_template(s.prompt_messages(), add_generation_prompt=True, tokenize=False)
                batch = proc(text=[text], images=[image], return_tensors="pt")
                handle.set_target(boxes=[s.region_boxes()], images=[image])
                with torch.no_grad(), attn_mod.capture(model) as rec:
                    model(**batch)
                got = (rec.categories[0] == TARGET).nonzero().flatten().tolist()
                want = predicted_target_positions(batch["input_ids"][0], image_token_id, batch["image_grid_thw"][0],
                                                  proc.image_processor.patch_size, image, want_boxes[s.id])
                assert got == want, (family, s.id)
                n_vis = int((batch["input_ids"][0] == image_token_id).sum())
                assert 0 < len(want) <= n_vis
                partial += len(want) < n_vis
    finally:
        handle.remove()
    assert partial >= 6  # most targets are a strict part of the image: the test discriminates cells
