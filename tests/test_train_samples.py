"""The training JSONL format: validation errors name the line and field; round trip; boxes per image."""

import base64
import io
import json

import pytest
from PIL import Image

from attn_mod.data.samples import SampleFormatError, parse_sample, read_samples, write_samples


def _png_uri(w=20, h=10):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _sample(**kw):
    s = {"id": "a", "images": [_png_uri()],
         "messages": [{"role": "system", "content": "sys"},
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q?"}]},
                      {"role": "assistant", "content": "B"}],
         "boxes": [[1, 2, 5, 8]], "answer": "B", "answer_type": "choice", "options": {"A": "x", "B": "y"},
         "source": "unit"}
    s.update(kw)
    return s


def test_round_trip_and_accessors(tmp_path):
    Image.new("RGB", (30, 40), (0, 0, 255)).save(tmp_path / "img.png")
    objs = [_sample(), _sample(id="b", images=["img.png"], boxes=[[[0, 0, 3, 3], [4, 4, 9, 9]]])]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in objs) + "\n")
    a, b = read_samples(path, require_assistant=True)
    assert a.target_text() == "B" and a.has_system and len(a.prompt_messages()) == 2
    assert a.region_boxes() == [(0, (1.0, 2.0, 5.0, 8.0))]
    assert b.region_boxes() == [(0, (0.0, 0.0, 3.0, 3.0)), (0, (4.0, 4.0, 9.0, 9.0))]
    assert b.load_images()[0].size == (30, 40) and a.load_images()[0].size == (20, 10)
    assert a.meta == {"source": "unit"}
    write_samples([a, b], tmp_path / "copy.jsonl")
    a2, b2 = read_samples(tmp_path / "copy.jsonl")
    assert (a2.messages, a2.boxes, a2.options, a2.meta) == (a.messages, a.boxes, a.options, a.meta)
    assert b2.images == ("img.png",) and b2.boxes == b.boxes


@pytest.mark.parametrize("change, message", [
    ({"id": ""}, "'id'"),
    ({"messages": []}, "'messages'"),
    ({"images": []}, "1 {\"type\": \"image\"} part(s) but \"images\" lists 0"),
    ({"boxes": [[5, 2, 1, 8]]}, "inverted"),
    ({"boxes": [[1, 2, 3]]}, "[x0, y0, x1, y1]"),
    ({"answer_type": "essay"}, "answer_type"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
])
def test_errors_name_the_field(change, message):
    with pytest.raises(SampleFormatError) as e:
        parse_sample(_sample(**change), where="train.jsonl line 3")
    assert "train.jsonl line 3" in str(e.value) and message in str(e.value)


def test_file_errors_name_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_sample()) + "\n{not json\n")
    with pytest.raises(SampleFormatError, match="t.jsonl line 2: not valid JSON"):
        read_samples(path)
    path.write_text(json.dumps(_sample()) + "\n" + json.dumps(_sample()) + "\n")
    with pytest.raises(SampleFormatError, match="line 2.*already used on line 1"):
        read_samples(path)
    no_reply = _sample(messages=_sample()["messages"][:2])
    path.write_text(json.dumps(no_reply) + "\n")
    assert not read_samples(path)[0].has_assistant
    with pytest.raises(SampleFormatError, match="last message must be the assistant"):
        read_samples(path, require_assistant=True)
