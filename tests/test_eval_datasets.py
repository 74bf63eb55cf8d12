"""Local benchmark loading: VLMEvalKit TSV, JSONL / JSON / Parquet, image folders, synthetic data, prompts, errors."""

import base64
import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from attn_mod.eval.datasets import (
    Benchmark,
    DatasetError,
    ImageSource,
    Sample,
    load_benchmark,
    make_synthetic_benchmark,
)
from attn_mod.eval.prompts import COT_INSTRUCTIONS, build_prompt
from attn_mod.eval.scoring import aggregate, score


def png_bytes(size=(8, 6), color=(255, 0, 0), mode="RGB"):
    buf = io.BytesIO()
    fill = color if mode == "RGB" else (*color, 0)
    Image.new(mode, size, fill).save(buf, format="PNG")
    return buf.getvalue()


def b64(size=(8, 6), color=(255, 0, 0)):
    return base64.b64encode(png_bytes(size, color)).decode()


def write_tsv(path, header, rows):
    """Write like pandas `to_csv(sep='\\t', index=False)`: minimal quoting with double quotes."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(header)
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------- VLMEvalKit TSV


@pytest.fixture
def mmstar_like(tmp_path):
    """MMStar / MMBench-style TSV: options A-D (some empty), hint, a duplicate-image reference, a multi-image
    row, a path-only row, a question with tabs / newlines / quotes."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "p.png").write_bytes(png_bytes((5, 7), (0, 0, 255)))
    header = ["index", "image", "image_path", "question", "hint", "A", "B", "C", "D", "answer", "category",
              "l2-category", "split"]
    rows = [
        [10, b64((8, 6), (255, 0, 0)), "", 'Which colour?\tSay "red"\nor not', "", "red", "blue", "", "", "A",
         "coarse perception", "color", "val"],
        [11, "10", "", "Same image, other question", "Look closely", "x", "y", "z", "nan", "B", "coarse perception",
         "color", "val"],
        [12, repr([b64((4, 4), (0, 255, 0)), b64((6, 3), (0, 0, 0))]), "", "Two images", "", "1", "2", "", "", "(b)",
         "reasoning", "count", "val"],
        [13, "", "imgs/p.png", "From a path", "", "yes", "no", "", "", "A", "reasoning", "", "test"],
    ]
    return write_tsv(tmp_path / "MMStar.tsv", header, rows)


def test_tsv_fields_options_hint_meta(mmstar_like):
    bench = load_benchmark(mmstar_like)
    assert bench.name == "MMStar" and bench.format == "tsv" and len(bench) == 4
    s = bench[0]
    assert s.index == "10" and s.sample_id == "MMStar:10" and s.row == 0
    assert s.question == 'Which colour?\tSay "red"\nor not'
    assert s.options == {"A": "red", "B": "blue"}  # empty C, D are absent
    assert s.answer == "A" and s.answer_type == "choice" and s.hint is None
    assert s.category == "coarse perception"
    assert s.meta == {"l2-category": "color", "split": "val"}
    assert bench[1].options == {"A": "x", "B": "y", "C": "z"}  # "nan" = absent, as pandas writes NaN
    assert bench[1].hint == "Look closely"
    assert bench[2].answer == "B"  # "(b)" normalised to the letter


def test_tsv_images_reference_list_and_path(mmstar_like):
    samples = list(load_benchmark(mmstar_like))
    first, ref, multi, path_row = samples
    assert first.image_size == (8, 6)
    img = ref.load_image()  # index 11 reuses index 10's image
    assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((0, 0)) == (255, 0, 0)
    assert [im.size for im in multi.load_images()] == [(4, 4), (6, 3)]
    assert multi.image_size == (4, 4)
    assert path_row.load_image().getpixel((1, 1)) == (0, 0, 255)


def test_tsv_random_access_limit_and_negative_index(mmstar_like):
    bench = load_benchmark(mmstar_like, limit=2)
    assert len(bench) == 2 and [s.index for s in bench] == ["10", "11"]
    assert bench[-1].index == "11"
    with pytest.raises(IndexError):
        bench[2]
    assert load_benchmark(mmstar_like)[3].index == "13"
    assert list(load_benchmark(mmstar_like, limit=0)) == []


def test_tsv_images_are_lazy_and_bad_image_names_its_row(tmp_path):
    bad = base64.b64encode(b"definitely not an image" * 10).decode()
    path = write_tsv(tmp_path / "lazy.tsv", ["index", "image", "question", "answer"],
                     [[0, b64(), "q0", "yes"], [1, bad, "q1", "no"], [2, b64(), "q2", "yes"]])
    samples = list(load_benchmark(path))  # iterating decodes nothing: the corrupt row does not fail here
    assert len(samples) == 3
    assert samples[0].load_image().size == (8, 6)
    with pytest.raises(DatasetError, match=r"lazy\.tsv row 1: cannot decode image"):
        samples[1].load_image()
    with pytest.raises(DatasetError, match=r"lazy\.tsv row 1: cannot decode image"):
        samples[1].image_size


def test_tsv_missing_column_names_column_and_row(tmp_path):
    path = write_tsv(tmp_path / "mmstar.tsv", ["index", "image", "question"], [[0, b64(), "q"]])
    with pytest.raises(DatasetError, match=r"^mmstar\.tsv row 0: column 'answer' is missing \(columns: index, image, question\)"):
        list(load_benchmark(path))
    assert load_benchmark(path, require_answer=False)[0].answer is None


def test_tsv_empty_cell_names_row(tmp_path):
    rows = [[i, b64(), f"q{i}", "A" if i != 17 else ""] for i in range(20)]
    path = write_tsv(tmp_path / "mmstar.tsv", ["index", "image", "question", "answer"], rows)
    bench = load_benchmark(path, answer_type="text")
    with pytest.raises(DatasetError, match=r"mmstar\.tsv row 17: column 'answer' is missing"):
        list(bench)
    with pytest.raises(DatasetError, match=r"mmstar\.tsv row 17: column 'answer' is missing"):
        bench[17]
    assert [s.index for s in load_benchmark(path, limit=17, answer_type="text")][-1] == "16"


def test_tsv_missing_image_and_bad_reference(tmp_path):
    path = write_tsv(tmp_path / "t.tsv", ["index", "image", "question", "answer"],
                     [[0, "", "q", "yes"], [1, "99", "q", "no"]])
    with pytest.raises(DatasetError, match=r"t\.tsv row 0: column 'image' is missing"):
        load_benchmark(path)[0]
    assert load_benchmark(path, require_image=False)[0].images == ()
    with pytest.raises(DatasetError, match=r"t\.tsv row 1: image refers to index '99', which is not in the file"):
        load_benchmark(path)[1].load_image()


def test_tsv_duplicate_index_and_ragged_row(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", ["index", "image", "question", "answer"],
                     [[0, b64(), "q", "yes"], [0, b64(), "q", "no"]])
    with pytest.raises(DatasetError, match=r"d\.tsv row 1: duplicate index '0' \(also row 0\)"):
        list(load_benchmark(path))
    path = write_tsv(tmp_path / "r.tsv", ["index", "question", "answer"], [[0, "q", "yes", "extra"], [1, "q"]])
    with pytest.raises(DatasetError, match=r"r\.tsv row 0: 4 fields but the header has 3"):
        list(load_benchmark(path, require_image=False))
    with pytest.raises(DatasetError, match=r"r\.tsv row 1: column 'answer' is missing \(the row has only 2 fields\)"):
        load_benchmark(path, require_image=False)[1]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_benchmark(tmp_path / "nope.tsv")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unsupported format 'csv'"):
        load_benchmark(tmp_path / "x.csv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(DatasetError, match="empty.tsv: empty file"):
        load_benchmark(tmp_path / "empty.tsv")
    with pytest.raises(ValueError, match="unknown field"):
        load_benchmark(tmp_path / "empty.tsv", columns={"qestion": "q"})


def test_answer_type_inference_and_override(tmp_path):
    rows = [[0, b64(), "q", "Yes"], [1, b64(), "q", "3.5"], [2, b64(), "q", "blue"], [3, b64(), "q", "1,234"],
            [4, b64(), "q", "Windows 10"]]
    path = write_tsv(tmp_path / "t.tsv", ["index", "image", "question", "answer"], rows)
    assert [(s.answer_type, s.answer) for s in load_benchmark(path)] == [
        ("yesno", "yes"), ("number", "3.5"), ("text", "blue"), ("number", "1,234"), ("text", "Windows 10")]
    # HallusionBench-style 1 / 0 gold with an explicit type
    path = write_tsv(tmp_path / "h.tsv", ["index", "image", "question", "answer"], [[0, b64(), "q", "1"], [1, b64(), "q", "0"]])
    assert [s.answer for s in load_benchmark(path, answer_type="yesno")] == ["yes", "no"]
    with pytest.raises(DatasetError, match=r"h\.tsv row 0: answer '1' is neither an option letter nor an option text"):
        load_benchmark(path, answer_type="choice")[0]
    with pytest.raises(ValueError, match="answer_type must be one of"):
        load_benchmark(path, answer_type="essay")


def test_mathvista_like_tsv(tmp_path):
    """question_type / answer_type / choices columns as in VLMEvalKit's MathVista TSV; precision goes to meta."""
    header = ["index", "image", "question", "answer", "question_type", "answer_type", "choices", "precision", "task"]
    rows = [
        [1, b64(), "Hint: ...\nQuestion: What fraction is blue?\nChoices:\n(A) 3/11\n(B) 8/11", "8/11", "multi_choice",
         "text", "['3/11', '8/11']", "", "figure question answering"],
        [2, b64(), "How long is it?", "1.45", "free_form", "float", "", "2.0", "textbook question answering"],
        [3, b64(), "How many?", "7", "free_form", "integer", "", "", "math word problem"],
    ]
    samples = list(load_benchmark(write_tsv(tmp_path / "MathVista_MINI.tsv", header, rows)))
    assert (samples[0].answer_type, samples[0].answer, samples[0].options) == ("choice", "B", {"A": "3/11", "B": "8/11"})
    assert samples[0].category == "figure question answering"
    assert (samples[1].answer_type, samples[1].meta["precision"]) == ("number", "2.0")
    assert score(samples[1], "It is about 1.4512 m").correct  # precision 2 from meta
    assert score(samples[0], "The answer is (B) 8/11").correct
    assert samples[2].answer_type == "number"
    assert build_prompt(samples[0]).count("8/11") == 1  # options already in the question are not repeated


# ------------------------------------------------------------------------------------------- JSONL / JSON / Parquet


def test_jsonl_with_relative_paths_mapping_and_boxes(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(png_bytes((10, 20)))
    (tmp_path / "pics" / "b.png").write_bytes(png_bytes((30, 10), mode="RGBA"))
    lines = [
        {"qid": "a1", "img": "pics/a.png", "query": "What?", "label": "blue", "choices": ["red", "blue"],
         "x0": 1, "y0": 2, "x1": 5, "y1": 8, "source": "chart"},
        {"qid": "a2", "img": "pics/b.png", "query": "How many?", "label": 4, "x0": None, "y0": None, "x1": None, "y1": None},
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    cols = {"index": "qid", "image": "img", "question": "query", "answer": "label"}
    bench = load_benchmark(path, columns=cols)
    assert len(bench) == 2
    a, b = list(bench)
    assert (a.index, a.answer_type, a.answer, a.options) == ("a1", "choice", "B", {"A": "red", "B": "blue"})
    assert a.bbox == ((1.0, 2.0, 5.0, 8.0),) and a.meta == {"source": "chart"}
    assert a.image_size == (10, 20)
    assert (b.answer_type, b.answer, b.bbox) == ("number", "4", None)
    assert b.load_image().getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert bench[1].index == "a2"


def test_jsonl_errors_name_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "yes", "image": "missing.png"}\n[1, 2]\n')
    bench = load_benchmark(path)
    s = bench[0]
    with pytest.raises(DatasetError, match=r"bad\.jsonl row 0: image file '.*missing\.png' not found"):
        s.load_image()
    with pytest.raises(DatasetError, match=r"bad\.jsonl row 1 \(line 2\): expected a JSON object"):
        list(bench)
    path.write_text('{"question": "q", "answer": "yes", "image": "x.png", "bbox": [3, 1, 2, 4]}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl row 0: bbox .* x1 < x0"):
        load_benchmark(path)[0]
    path.write_text('{"question": "q", "answer": "yes", "image": "x.png", "bbox": "oops"}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl row 0: column 'bbox' is not a list"):
        load_benchmark(path)[0]
    path.write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl row 0 \(line 1\): invalid JSON"):
        list(load_benchmark(path))


def test_corrupt_image_file_names_row(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "no", "image": "broken.png"}) + "\n")
    with pytest.raises(DatasetError, match=r"a\.jsonl row 0: cannot decode image"):
        load_benchmark(path)[0].load_image()


def test_json_list_and_mathvista_dict(tmp_path):
    (tmp_path / "i.png").write_bytes(png_bytes())
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"data": [{"id": 5, "question": "Is it red?", "answer": "Yes", "image": "i.png",
                                            "bbox": [[0, 0, 2, 2], [3, 3, 4, 5]]}]}))
    s = load_benchmark(listed)[0]
    assert (s.index, s.answer_type, s.answer) == ("5", "yesno", "yes")
    assert s.bbox == ((0, 0, 2, 2), (3, 3, 4, 5))
    keyed = tmp_path / "testmini.json"
    keyed.write_text(json.dumps({
        "7": {"query": "Q7", "answer": "2", "image": "i.png", "question_type": "free_form", "answer_type": "integer"},
        "8": {"query": "Q8", "answer": "red", "image": "i.png", "question_type": "multi_choice",
              "choices": ["blue", "red"]},
    }))
    s7, s8 = load_benchmark(keyed)
    assert (s7.index, s7.question, s7.answer_type) == ("7", "Q7", "number")
    assert (s8.answer_type, s8.answer) == ("choice", "B")


def test_parquet_image_structs_and_lists(tmp_path):
    table = pa.table({
        "index": ["p0", "p1", "p2"],
        "image": [{"bytes": png_bytes((9, 4)), "path": None}, {"bytes": None, "path": "img.png"},
                  {"bytes": png_bytes((2, 2)), "path": None}],
        "question": ["q0", "q1", "q2"],
        "options": [["cat", "dog"], None, None],
        "answer": ["dog", "12%", "Paris"],
        "bbox": [[1.0, 1.0, 3.0, 3.0], None, []],
        "category": ["animals", "chart", None],
    })
    (tmp_path / "img.png").write_bytes(png_bytes((3, 5)))
    path = tmp_path / "bench.parquet"
    pq.write_table(table, path, row_group_size=2)
    bench = load_benchmark(path)
    assert len(bench) == 3 and bench.format == "parquet"
    s0, s1, s2 = list(bench)
    assert (s0.answer_type, s0.answer, s0.options, s0.bbox) == ("choice", "B", {"A": "cat", "B": "dog"}, ((1, 1, 3, 3),))
    assert s0.image_size == (9, 4) and s1.image_size == (3, 5)
    assert (s1.answer_type, s2.answer_type, s2.bbox, s2.category) == ("number", "text", None, None)
    assert bench[2].index == "p2" and bench[1].index == "p1"  # random access across row groups


def test_parquet_missing_column_names_row(tmp_path):
    path = tmp_path / "noq.parquet"
    pq.write_table(pa.table({"index": [0, 1], "answer": ["a", "b"], "question": ["q", None]}), path)
    with pytest.raises(DatasetError, match=r"noq\.parquet row 1: column 'question' is missing"):
        list(load_benchmark(path, require_image=False))


# ------------------------------------------------------------------------------------------- directory layout


def test_directory_with_images_named_by_index(tmp_path):
    (tmp_path / "images").mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0)]):
        (tmp_path / "images" / f"q{i}.png").write_bytes(png_bytes((12, 7), color))
    (tmp_path / "annotations.jsonl").write_text(
        "\n".join(json.dumps({"id": f"q{i}", "question": "Colour?", "answer": c}) for i, c in enumerate(["red", "green"]))
    )
    bench = load_benchmark(tmp_path)
    assert bench.name == tmp_path.name and len(bench) == 2
    assert [s.load_image().getpixel((0, 0)) for s in bench] == [(255, 0, 0), (0, 255, 0)]
    (tmp_path / "annotations.jsonl").write_text(json.dumps({"id": "zz", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DatasetError, match=r"annotations\.jsonl row 0: no image column and no image file named 'zz\.\*'"):
        load_benchmark(tmp_path)[0]


def test_directory_with_relative_image_column_and_ambiguous_annotations(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(png_bytes((4, 9)))
    (tmp_path / "a.json").write_text(json.dumps([{"question": "q", "answer": "no", "image": "x.png"}]))
    assert load_benchmark(tmp_path)[0].image_size == (4, 9)  # found under images/
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DatasetError, match="several annotation files"):
        load_benchmark(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no annotation file"):
        load_benchmark(empty)


def test_image_source_variants():
    src = ImageSource(fetch=lambda: Image.new("L", (3, 2), 128), where="x row 0")
    assert src().mode == "RGB" and src.size == (3, 2)
    uri = "data:image/png;base64," + b64((5, 5))
    assert ImageSource(data=uri).size == (5, 5)
    with pytest.raises(DatasetError, match="x row 3: image is not valid base64"):
        ImageSource(data="@@@@", where="x row 3").load()
    with pytest.raises(ValueError, match="exactly one"):
        ImageSource()


# ------------------------------------------------------------------------------------------- synthetic benchmark


def test_synthetic_is_deterministic(tmp_path):
    a = make_synthetic_benchmark(tmp_path / "a.tsv", n=12, seed=3).read_bytes()
    b = make_synthetic_benchmark(tmp_path / "b.tsv", n=12, seed=3).read_bytes()
    c = make_synthetic_benchmark(tmp_path / "c.tsv", n=12, seed=4).read_bytes()
    assert a == b and a != c


def test_synthetic_content_matches_its_images(tmp_path):
    from attn_mod.eval.datasets import _COLORS

    bench = load_benchmark(make_synthetic_benchmark(tmp_path / "syn.tsv", n=16, seed=0))
    assert len(bench) == 16
    kinds = {}
    for s in bench:
        kinds.setdefault(s.category, set()).add(s.answer_type)
        img = s.load_image()
        w, h = img.size
        assert 64 <= w <= 128 and 48 <= h <= 96 and w != h and s.image_size == (w, h)
        if s.category == "color":
            (x0, y0, x1, y1), = s.bbox
            assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == _COLORS[s.options[s.answer]]
            assert img.getpixel((x0, y0)) == _COLORS[s.options[s.answer]]  # a square fills its box corner
        elif s.category == "count":
            assert len(s.bbox) == int(s.answer)
            for x0, y0, x1, y1 in s.bbox:
                assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) != (245, 245, 245)
        elif s.category == "existence":
            assert (s.bbox is not None) == (s.answer == "yes")
        else:
            (x0, y0, x1, y1), = s.bbox
            assert s.answer in ("square", "circle", "triangle")
            assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 2)) != (245, 245, 245)
    assert kinds == {"color": {"choice"}, "count": {"number"}, "existence": {"yesno"}, "shape": {"text"}}
    assert {s.answer for s in bench if s.category == "existence"} == {"yes", "no"}


def test_synthetic_end_to_end_scoring(tmp_path):
    """Gold answers phrased like a model scores 100 %, a constant guess does not; aggregate by category."""
    bench = load_benchmark(make_synthetic_benchmark(tmp_path / "syn.tsv", n=16, seed=1))
    phrasing = {"choice": "The answer is ({}).", "number": "I count {} of them.", "yesno": "{}.", "text": "Answer: {}"}
    good = [{**s.to_record(), **score(s, phrasing[s.answer_type].format(s.answer)).as_dict()} for s in bench]
    assert aggregate(good)["overall"]["accuracy"] == 1.0
    bad = [{"category": s.category, **score(s, "A").as_dict()} for s in bench]
    out = aggregate(bad)
    assert out["overall"]["accuracy"] < 0.5
    assert set(out["by_category"]) == {"color", "count", "existence", "shape"}
    json.dumps(good)  # result records are JSON-serialisable


# ------------------------------------------------------------------------------------------- prompts


def test_build_prompt_default_and_overrides():
    s = Sample(index="1", question="What color is the square?", answer="B", answer_type="choice",
               options={"A": "red", "B": "blue"}, hint="Look at the left.")
    assert build_prompt(s) == (
        "Hint: Look at the left.\nWhat color is the square?\nOptions:\nA. red\nB. blue\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert build_prompt(s, include_hint=False, option_format="({letter}) {text}").startswith("What color is the square?\nOptions:\n(A) red")
    assert build_prompt(s, instructions=COT_INSTRUCTIONS).endswith("\\boxed{X}.")
    assert build_prompt(s, template="Q: {question} [{answer_type}]", instructions={"choice": ""}) == "Q: What color is the square? [choice]"
    with pytest.raises(ValueError, match="unknown field"):
        build_prompt(s, template="{nope}")
    n = {"question": "How many {curly} circles?", "answer_type": "number"}
    assert build_prompt(n) == "How many {curly} circles?\nAnswer the question using a single number."
    embedded = Sample(index="2", question="Which?\nOptions: A: red, B: blue", answer="A", answer_type="choice",
                      options={"A": "red", "B": "blue"})
    assert "Options:\nA. red" not in build_prompt(embedded)
    assert "Options:\nA. red" in build_prompt(embedded, repeat_options=True)


def test_benchmark_is_a_sequence(mmstar_like):
    bench = Benchmark(mmstar_like, name="star")
    assert repr(bench).startswith("Benchmark(name='star'")
    assert [s.sample_id for s in bench] == ["star:10", "star:11", "star:12", "star:13"]
    assert bench[0].to_record() == {"sample_id": "star:10", "index": "10", "category": "coarse perception",
                                    "answer": "A", "answer_type": "choice", "n_images": 1, "bbox": None}
