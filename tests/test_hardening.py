"""Issue 8 (defects found by trying the toolkit as a new user): one test per item where no other file fits."""

import json
import math

import pytest
import torch
from PIL import Image

import attn_mod
from attn_mod import metrics
from attn_mod.cli import main as cli_main
from attn_mod.eval.generation import Request, encode_batch
from attn_mod.loading import load_model
from attn_mod.tiny import save_tiny


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    image = Image.new("RGB", (120, 90), (235, 235, 220))
    image.paste((210, 30, 30), (60, 20, 110, 70))
    image.save(root / "scene.png")
    return root, save_tiny("qwen2_5_vl", root / "tiny25"), image


def api_recording(model_dir, image, question, n_tokens, system=None, intervention=None):
    model, proc = load_model(model_dir)
    handle = attn_mod.patch(model, proc, intervention=intervention)
    inputs = encode_batch(proc, [Request(question, [image], system)], model.device)
    with torch.no_grad(), attn_mod.capture(model) as rec:
        model.generate(**inputs, max_new_tokens=n_tokens, do_sample=False)
    handle.remove()
    return rec


def test_item6_vas_api_equals_inspect_and_every_report_names_the_rows(assets, capsys):
    root, model_dir, image = assets
    out = root / "inspect6"
    q = "What color is the square?"
    assert cli_main(["inspect", str(model_dir), "--image", str(root / "scene.png"), "--question", q,
                     "--max-new-tokens", "5", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    rec = api_recording(model_dir, image, q, 5)
    api = metrics.vas(rec)
    assert api.rows == "answer" and m["vas"]["rows"] == "answer" and m["mass_shares"]["rows"] == "answer"
    assert m["vas"]["value"] == pytest.approx(api.mean(), rel=1e-5)
    # the answer rows are exactly the rows that produced the generated tokens (what tokens.jsonl lists)
    sel = metrics.select_rows(rec.query_categories(), "answer")[0].nonzero().flatten().tolist()
    K = rec.categories.shape[1]
    Q = rec.query_categories().shape[1]
    positions = [json.loads(line)["position"] for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert [K - Q + i for i in sel] == positions
    # independent float64 recomputation of the ratio-form VAS over those rows
    masses = rec.masses().double()  # (L, 1, H, Q, C)
    from attn_mod.categories import IMAGE, SYSTEM, TARGET

    ratio = (masses[..., IMAGE] + masses[..., TARGET]) / (masses[..., SYSTEM] + 1e-6)
    assert api.mean() == pytest.approx(float(ratio[:, 0, :, sel].mean()), rel=1e-5)
    # a different named row set is a different number, and says so
    resp = metrics.vas(rec, rows="response")
    assert "rows=response" in resp.describe() and "rows=answer" in api.describe()
    assert "answer tokens" in metrics.ROW_SET_MEANING["answer"]
