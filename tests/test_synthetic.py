"""Synthetic grounded VQA: answers checked against the rendered pixels, boxes against the real processor's
token grid, fixed option order, splits that never share an image, and both file formats read back."""

import hashlib
import random

import pytest
import torch

from attn_mod.data.samples import read_samples
from attn_mod.data.synthetic import (CELL, COLOURS, GRID, IMAGE, SHAPES, STAGES, build_dataset, caption_item,
                                     make_bar_scene, make_scene, make_split, scene_items, task_corpus)
from attn_mod.eval.datasets import load_benchmark
from attn_mod.eval.prompts import build_prompt
from attn_mod.regions import target_token_mask


def _nearest_colour(rgb):
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb)))


def _pixel_colour_at_box(img, box):
    x0, y0, x1, y1 = box
    return _nearest_colour(img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 2)))


def _shape_from_pixels(img, box):
    """Classify a drawn shape from its filled-pixel fraction in its box and its corners (independent of drawing code)."""
    x0, y0, x1, y1 = box
    bg = img.getpixel((0, 0)) if img.getpixel((0, 0)) == (128, 128, 128) else (128, 128, 128)
    filled = [[img.getpixel((x, y)) != bg for x in range(x0, x1)] for y in range(y0, y1)]
    frac = sum(map(sum, filled)) / ((x1 - x0) * (y1 - y0))
    corners = filled[0][0] + filled[0][-1] + filled[-1][0] + filled[-1][-1]
    if corners == 4:
        return "square"
    if filled[-1][0] and filled[-1][-1]:
        return "triangle"
    return "circle" if frac > 0.65 else "star"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_scene_objects_distinct_and_inside_their_cells(n):
    rng = random.Random(n)
    for _ in range(20):
        scene = make_scene(rng, n, sizes=("small", "large"))
        objs = scene.objects
        assert len({o.shape for o in objs}) == len({o.colour for o in objs}) == len({(o.row, o.col) for o in objs}) == n
        img = scene.render()
        assert img.size == (IMAGE, IMAGE)
        for o in objs:
            x0, y0, x1, y1 = o.box
            assert o.col * CELL <= x0 < x1 <= (o.col + 1) * CELL and o.row * CELL <= y0 < y1 <= (o.row + 1) * CELL
            assert _pixel_colour_at_box(img, o.box) == o.colour
            assert _shape_from_pixels(img, o.box) == o.shape
        # nothing is drawn outside the object boxes
        boxes = [o.box for o in objs]
        for y in range(0, IMAGE, 3):
            for x in range(0, IMAGE, 3):
                if not any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in boxes):
                    assert img.getpixel((x, y)) == (128, 128, 128)


def test_answers_agree_with_pixels_and_options_are_fixed():
    rng = random.Random(7)
    for _ in range(30):
        scene = make_scene(rng, rng.randint(1, 4))
        img = scene.render()
        items = scene_items(scene, ("colour", "shape", "count", "left_of"), form="choice")
        assert len([it for it in items if it.kind == "colour"]) == len(scene.objects)
        for it in items:
            chosen = it.options[it.answer]
            if it.kind == "colour":
                assert list(it.options.values()) == list(COLOURS)
                (t,) = it.targets
                shape = it.question.split("the ")[1].rstrip("?")
                assert _shape_from_pixels(img, scene.objects[t].box) == shape
                assert _pixel_colour_at_box(img, scene.objects[t].box) == chosen
            elif it.kind == "shape":
                assert list(it.options.values()) == list(SHAPES)
                (t,) = it.targets
                colour = it.question.split("is ")[1].rstrip("?")
                assert _pixel_colour_at_box(img, scene.objects[t].box) == colour
                assert _shape_from_pixels(img, scene.objects[t].box) == chosen
            elif it.kind == "count":
                assert chosen == str(len(scene.objects)) and len(it.targets) == len(scene.objects)
            else:
                a, b = (scene.objects[i] for i in it.targets)
                assert chosen == ("Yes" if a.box[0] < b.box[0] else "No")
        free = scene_items(scene, ("colour", "shape"), form="free")
        for it in free:
            assert not it.options and it.answer_type == "text"
            assert it.answer in (scene.objects[it.targets[0]].colour, scene.objects[it.targets[0]].shape)
        assert "Options:\nA. red\nB. green\nC. blue\nD. yellow" in items[0].prompt() or items[0].kind != "colour"


def test_bar_chart_tallest_bar():
    rng = random.Random(3)
    for _ in range(10):
        scene = make_bar_scene(rng)
        img = scene.render()
        (it,) = scene_items(scene, ["bar", "colour"])  # colour questions do not apply to charts
        # tallest bar from pixels: the column whose top-most coloured pixel is highest
        tops = {}
        for col in range(GRID):
            x = col * CELL + CELL // 2
            y = next(y for y in range(IMAGE) if img.getpixel((x, y)) != (128, 128, 128))
            tops[col] = (y, _nearest_colour(img.getpixel((x, y))))
        assert it.options[it.answer] == min(tops.values())[1]


def test_caption_names_every_object_with_its_cell():
    scene = make_scene(random.Random(0), 3)
    item = caption_item(scene)
    for o in scene.objects:
        assert f"row {o.row + 1} col {o.col + 1}: {o.colour} {o.shape}" in item.answer
    assert len(item.targets) == 3


def test_target_box_selects_exactly_the_objects_token_with_the_real_processor():
    """112 x 112 -> 4 x 4 = 16 merged visual tokens of 28 px, and each target box maps to its object's cell."""
    from attn_mod.eval.generation import Request, encode_batch
    from attn_mod.tiny import build_processor

    proc = build_processor("qwen2_5_vl")
    rng = random.Random(11)
    items = [it for _ in range(4) for it in scene_items(make_scene(rng, 3), ["colour"])]
    batch = encode_batch(proc, [Request(it.prompt(), [it.scene.render()]) for it in items], "cpu")
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * len(items)
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ((batch["input_ids"] == image_id).sum(1) == GRID * GRID).all()
    mask = target_token_mask(batch["input_ids"], image_id, batch["image_grid_thw"], [it.boxes for it in items],
                             [(IMAGE, IMAGE)] * len(items), merge_size=2, patch_size=14)
    for b, it in enumerate(items):
        pos = (batch["input_ids"][b] == image_id).nonzero().flatten()
        chosen = mask[b, pos].nonzero().flatten().tolist()
        o = it.scene.objects[it.targets[0]]
        assert chosen == [o.row * GRID + o.col]


def test_build_dataset_files_round_trip_and_splits_share_no_image(tmp_path):
    paths = build_dataset(tmp_path / "d", seed=0, scale=0.01, heldout_images=12)
    a = (tmp_path / "d" / "heldout.tsv").read_bytes()
    build_dataset(tmp_path / "e", seed=0, scale=0.01, heldout_images=12)
    assert (tmp_path / "e" / "heldout.tsv").read_bytes() == a
    build_dataset(tmp_path / "f", seed=1, scale=0.01, heldout_images=12)
    assert (tmp_path / "f" / "heldout.tsv").read_bytes() != a

    bench = load_benchmark(paths["heldout_tsv"])
    rows = list(bench)
    held = read_samples(paths["heldout"], require_assistant=True)
    assert len(rows) == len(held) == 24  # 12 images x (one colour + one shape question)
    held_hashes = set()
    for r, s in zip(rows, held):
        assert r.answer_type == "choice" and r.answer == s.target_text() and set(r.options) == set("ABCD")
        assert [list(b) for b in r.bbox] == [list(b) for b in s.boxes[0]]
        assert s.messages[0]["content"][1]["text"] == build_prompt(r)  # training prompt == eval prompt
        img = r.load_image()
        assert img.tobytes() == s.load_images()[0].tobytes()
        held_hashes.add(hashlib.sha1(img.tobytes()).hexdigest())
    assert len(held_hashes) == 12
    assert set(paths) == {"heldout", "heldout_tsv", *STAGES}
    assert list(STAGES) == ["curriculum1", "curriculum2", "qa"]  # the order scripts/train_tiny_demo.sh trains in
    for stage in STAGES:
        samples = read_samples(paths[stage], require_assistant=True)
        assert samples and all(s.boxes for s in samples)
        for s in samples:
            assert hashlib.sha1(s.load_images()[0].tobytes()).hexdigest() not in held_hashes


def test_make_split_errors_and_exclusion():
    items, sigs = make_split(0, 5, objects=(1,))
    assert len(sigs) == 5
    again, sigs2 = make_split(0, 5, objects=(1,), exclude=sigs)
    assert not sigs & sigs2
    with pytest.raises(ValueError, match="cannot draw"):
        make_split(0, 300, objects=(1,))  # only 16 cells x 4 shapes x 4 colours = 256 one-object scenes
    with pytest.raises(ValueError, match="n_objects"):
        make_scene(random.Random(0), 5)
    with pytest.raises(ValueError, match="kind"):
        scene_items(make_scene(random.Random(0), 2), ["size"])
    with pytest.raises(ValueError, match="form"):
        scene_items(make_scene(random.Random(0), 2), ["colour"], form="mc")
    with pytest.raises(ValueError, match="sizes"):
        make_scene(random.Random(0), 2, sizes=("huge",))


def test_task_corpus_makes_task_words_short():
    from attn_mod.tiny import build_tokenizer

    plain, task = build_tokenizer(), build_tokenizer(extra_corpus=task_corpus(), vocab_size=512)
    item = scene_items(make_scene(random.Random(0), 3), ["colour"])[0]
    text = item.prompt()
    assert len(task(text)["input_ids"]) < len(plain(text)["input_ids"])
    for word in list(COLOURS) + list(SHAPES):
        assert task.decode(task(word)["input_ids"]) == word
    assert torch.tensor(task(text)["input_ids"]).numel() <= 40
