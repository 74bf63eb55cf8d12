"""`attn-mod inspect` end to end on tiny checkpoints saved to disk and loaded back by path, and its errors."""

import html
import json
import math

import numpy as np
import pytest
from PIL import Image

from attn_mod import viz
from attn_mod.cli import main
from attn_mod.tiny import save_tiny

FILES = ("answer.txt", "metrics.json", "tokens.jsonl", "heatmap.png", "heatmap_layers.png", "tokens.png",
         "tokens.html", "layers.png", "entropy.png")
# heatmap_layers: 2 panels of 2.6 in + 1.3 in colour bar; 1-line title + one row of panels of the 240x150 image
PNG_SIZES = {"heatmap.png": (700, 600), "heatmap_layers.png": (650, int(100 * (0.61 + 0.92 * 2.6 * 150 / 240 + 0.55))),
             "layers.png": (1100, 420), "entropy.png": (800, 450)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    image = Image.new("RGB", (240, 150), (235, 235, 220))
    image.paste((210, 30, 30), (150, 30, 220, 100))
    image.paste((30, 40, 200), (20, 80, 80, 140))
    image.save(root / "scene.png")
    (root / "notes.png").write_text("not an image")
    return root, save_tiny("qwen2_5_vl", root / "tiny25"), save_tiny("qwen3_vl", root / "tiny3", seed=2)


def _run(argv, capsys):
    code = main(["inspect", *map(str, argv)])
    return code, capsys.readouterr()


def _check_pictures(out):
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name, size in PNG_SIZES.items():
        im = Image.open(out / name)
        assert im.size == size, name
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 20, f"{name} is flat"
    assert Image.open(out / "tokens.png").size[0] == 1000


def _mean(values):
    return sum(values) / len(values)


def test_inspect_end_to_end_with_box_and_avar(assets, capsys):
    root, model_dir, _ = assets
    out = root / "out25"
    code, cap = _run([model_dir, "--image", root / "scene.png", "--question", "What color is the square?",
                      "--box", 150, 30, 220, 100, "--preset", "avar", "--alpha", 0.5, "--beta", 0.5,
                      "--max-new-tokens", 6, "--out", out], capsys)
    assert code == 0, cap.err
    _check_pictures(out)
    m = json.loads((out / "metrics.json").read_text())
    recs = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    n, S = m["tokens"]["generated"], m["tokens"]["prompt"]
    assert 0 < n <= 6 and len(recs) == n
    assert [r["step"] for r in recs] == list(range(n))
    assert [r["position"] for r in recs] == list(range(S - 1, S - 1 + n))  # the rows that chose each token
    assert recs[0]["category"] == "text" and all(r["category"] == "response" for r in recs[1:])

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [r["token_id"] for r in recs]
    assert (out / "answer.txt").read_text() == tok.decode(ids, skip_special_tokens=True) + "\n"
    assert m["answer"] == tok.decode(ids, skip_special_tokens=True)

    assert m["intervention"]["preset"] == "avar" and m["intervention"]["params"]["alpha"] == 0.5
    assert m["box"]["pixels"] == [[150.0, 30.0, 220.0, 100.0]]
    assert 0 < m["box"]["target_tokens"] < m["box"]["image_tokens"]
    for key in ("vas", "vas_share"):
        assert math.isfinite(m[key]["value"]) and len(m[key]["per_layer"]) == 2
        assert m[key]["value"] == pytest.approx(_mean(m[key]["per_layer"]), rel=1e-6)
    assert m["vas"]["form"] == "ratio" and "mass_img/(mass_sys+eps)" in m["vas"]["describe"]
    assert 0 <= m["vas_share"]["value"] <= 1
    ta = m["target_attention"]
    assert ta["defined"] and ta["layer"] == 1
    for name in ("a", "v", "R_a"):
        assert all(math.isfinite(r[name]) for r in recs)
        assert ta[f"{name}_mean"] == pytest.approx(_mean([r[name] for r in recs]), rel=1e-6)
    shares = m["mass_shares"]
    assert shares["rows"] == "response"  # the VAS row set (--vas-rows); tokens.jsonl lists the answer rows
    resp = [r for r in recs if r["category"] == "response"]
    for share, column in (("image", "mass_image"), ("target", "mass_target"), ("system", "mass_system"),
                          ("image_outside_target", "mass_image_outside_target"),
                          ("text", "mass_text"), ("response", "mass_response")):
        assert shares[share] == pytest.approx(_mean([r[column] for r in resp]), abs=1e-6)
        assert m["mass_shares_per_layer"][share][-1] == pytest.approx(shares[share], abs=1e-9)
    assert sum(shares[c] for c in ("image", "system", "text", "response")) == pytest.approx(1, abs=1e-5)
    assert m["entropy_mean"] == pytest.approx(_mean([r["entropy"] for r in recs]), rel=1e-6)
    assert all(0 < r["entropy"] <= math.log(len(tok)) + 1e-4 for r in recs)
    assert m["timing_s"]["total"] > 0 and m["model"] == str(model_dir)
    assert m["intervention"]["backend"] == "torch" and m["intervention"]["dtype"] == "float32"

    page = (out / "tokens.html").read_text()
    for r in recs:
        for part in r["token"].split("\n"):
            assert html.escape(viz._shown(part)) in page
    assert page.count('class="t"') == n


def test_inspect_qwen3_without_box(assets, capsys):
    root, _, model_dir = assets
    out = root / "out3"
    code, cap = _run([model_dir, "--image", root / "scene.png", "--question", "Describe the image.",
                      "--system", "Answer with a single letter.", "--max-new-tokens", 3, "--out", out], capsys)
    assert code == 0, cap.err
    _check_pictures(out)
    m = json.loads((out / "metrics.json").read_text())
    recs = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert m["intervention"]["preset"] == "identity" and m["box"]["target_tokens"] == 0
    assert m["target_attention"]["defined"] is False and m["target_attention"]["a_mean"] is None
    assert all(r["a"] is None and math.isfinite(r["v"]) for r in recs)
    assert m["mass_shares"]["system"] > 0 and m["mass_shares"]["target"] == 0  # the given system turn is seen
    assert math.isfinite(m["vas"]["value"])


def test_inspect_errors(assets, capsys, tmp_path):
    root, model_dir, _ = assets
    img = root / "scene.png"
    base = ["--question", "Q?", "--max-new-tokens", 1, "--out", tmp_path / "o"]

    code, cap = _run([tmp_path / "nowhere", "--image", img, *base], capsys)
    assert code == 2 and "is not a directory" in cap.err

    from transformers import LlamaConfig, LlamaForCausalLM

    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(llama)
    code, cap = _run([llama, "--image", img, *base], capsys)
    assert code == 2 and "'llama' model" in cap.err and "qwen2_5_vl" in cap.err

    code, cap = _run([model_dir, "--image", root / "notes.png", *base], capsys)
    assert code == 2 and "not an image PIL can decode" in cap.err
    code, cap = _run([model_dir, "--image", root / "missing.jpg", *base], capsys)
    assert code == 2 and "does not exist" in cap.err

    code, cap = _run([model_dir, "--image", img, "--box", 0, 0, 300, 100, *base], capsys)  # image is 240 x 150
    assert code == 2 and "outside the 240x150" in cap.err
    code, cap = _run([model_dir, "--image", img, "--box", 0, 0, 0.5, 1.2, "--box-convention", "normalized", *base],
                     capsys)
    assert code == 2 and "outside" in cap.err
    code, cap = _run([model_dir, "--image", img, "--box", 50, 50, 10, 10, *base], capsys)
    assert code == 2 and "x1 < x0" in cap.err
    with pytest.raises(SystemExit):
        main(["inspect", str(model_dir), "--image", str(img), "--question", "Q", "--box-convention", "xywh"])
    assert "invalid choice" in capsys.readouterr().err

    code, cap = _run([model_dir, "--image", img, "--preset", "avar", "--alpha", -1, *base], capsys)
    assert code == 2 and "alpha must be >= 0" in cap.err
    code, cap = _run([model_dir, "--image", img, "--preset", "avar", "--beta", 1.5, *base], capsys)
    assert code == 2 and "beta must lie in [0, 1]" in cap.err
    code, cap = _run([model_dir, "--image", img, "--alpha", 0.3, *base], capsys)
    assert code == 2 and "preset 'identity' does not take --alpha" in cap.err
    code, cap = _run([model_dir, "--image", img, "--preset", "pai", "--layers", 7, *base], capsys)
    assert code == 2 and "out of range" in cap.err
    assert not (tmp_path / "o").exists()  # nothing written on errors
