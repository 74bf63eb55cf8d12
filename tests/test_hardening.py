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
    api = metrics.vas(rec)  # default rows="response" (the spec's), the same in inspect
    assert api.rows == "response" and m["vas"]["rows"] == "response" and m["mass_shares"]["rows"] == "response"
    assert m["vas"]["value"] == pytest.approx(api.mean(), rel=1e-5)
    ans = metrics.vas(rec, rows="answer")  # the named option, API and CLI alike
    assert cli_main(["inspect", str(model_dir), "--image", str(root / "scene.png"), "--question", q,
                     "--max-new-tokens", "5", "--vas-rows", "answer", "--out", str(out / "a")]) == 0
    m_ans = json.loads((out / "a" / "metrics.json").read_text())
    assert m_ans["vas"]["rows"] == "answer" and m_ans["vas"]["value"] == pytest.approx(ans.mean(), rel=1e-5)
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
    assert ans.mean() == pytest.approx(float(ratio[:, 0, :, sel].mean()), rel=1e-5)
    resp_rows = (rec.query_categories()[0] == attn_mod.TokenCategory.RESPONSE).nonzero().flatten().tolist()
    assert api.mean() == pytest.approx(float(ratio[:, 0, :, resp_rows].mean()), rel=1e-5)
    assert "rows=response" in api.describe() and "rows=answer" in ans.describe()
    assert "answer tokens" in metrics.ROW_SET_MEANING["answer"]


def test_item7_no_system_turn_vas_is_nan_with_one_warning_and_system_option(assets, tmp_path, capsys):
    root, _, image = assets
    model3 = save_tiny("qwen3_vl", root / "tiny3", seed=2)
    q = "What color is the square?"
    rec = api_recording(model3, image, q, 3)
    assert not (rec.categories == attn_mod.TokenCategory.SYSTEM).any()  # Qwen3-VL: no default system turn
    with pytest.warns(UserWarning, match="undefined") as caught:
        v = metrics.vas(rec)
    assert len([w for w in caught if "VAS" in str(w.message)]) == 1
    assert math.isnan(v.mean()) and torch.isnan(v.per_layer).all()
    share = metrics.vas(rec, form="share")  # the share form stays defined (= 1: no system mass)
    assert share.mean() == pytest.approx(1.0, abs=1e-4)
    rec_sys = api_recording(model3, image, q, 3, system="You are a helpful assistant.")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(metrics.vas(rec_sys).mean())
    # sweep / eval output: beta is inert without a system turn; --system fixes it
    from attn_mod.eval.datasets import make_synthetic_benchmark

    tsv = make_synthetic_benchmark(tmp_path / "b.tsv", n=2, seed=1)
    base = ["eval", "--model", str(model3), "--data", str(tsv), "--max-new-tokens", "2", "--attention-metrics",
            "--no-progress"]
    assert cli_main([*base, "--out", str(tmp_path / "nosys")]) == 0
    out = capsys.readouterr().out
    assert "beta is inert here" in out and "--system" in out
    rows = [json.loads(x) for x in (tmp_path / "nosys" / "results.jsonl").read_text().splitlines()]
    assert all(r["n_system"] == 0 and r["vas"] is None for r in rows)
    assert cli_main([*base, "--system", "You are a helpful assistant.", "--out", str(tmp_path / "sys")]) == 0
    out = capsys.readouterr().out
    assert "beta is inert" not in out
    rows = [json.loads(x) for x in (tmp_path / "sys" / "results.jsonl").read_text().splitlines()]
    assert all(r["n_system"] > 0 and math.isfinite(r["vas"]) for r in rows)
    manifest = json.loads((tmp_path / "sys" / "manifest.json").read_text())
    assert manifest["system"] == "You are a helpful assistant."
    # inspect says so too, and takes --system
    assert cli_main(["inspect", str(model3), "--image", str(root / "scene.png"), "--question", q,
                     "--max-new-tokens", "2", "--out", str(tmp_path / "ins")]) == 0
    assert "no system turn" in capsys.readouterr().out
    m = json.loads((tmp_path / "ins" / "metrics.json").read_text())
    assert m["tokens"]["system"] == 0 and m["vas"]["value"] is None


def test_item8_image_means_image_plus_target_everywhere(assets, tmp_path):
    from attn_mod import Intervention
    from attn_mod.categories import IMAGE, SYSTEM, TARGET, category_name, parse_categories
    from attn_mod.viz import PROFILE_CATEGORIES

    assert parse_categories("image") == (IMAGE, TARGET)
    assert parse_categories("image_outside_target") == (IMAGE,) and parse_categories("target") == (TARGET,)
    assert category_name(IMAGE) == "image_outside_target" and category_name(TARGET) == "target"
    # Intervention keys: "image" boosts both codes like avar does; a part's key overrides it
    iv = Intervention(w={"image": 2.0})
    avar = Intervention.avar(alpha=1.0, beta=0.0)
    assert iv.w == {IMAGE: 2.0, TARGET: 2.0} and {c: avar.w[c] for c in (IMAGE, TARGET)} == iv.w
    assert Intervention(w={"image": 2.0, "target": 3.0}).w == {IMAGE: 2.0, TARGET: 3.0}
    assert Intervention(w={"image_outside_target": 2.0}).w == {IMAGE: 2.0}
    with pytest.raises(ValueError, match="different values"):
        Intervention(w={"image": 2.0, "visual": 3.0})
    # the transform of w={"image": 2} equals avar's image part on random scores (independent float64 check)
    t = Intervention(w={"image": 2.0, "system": 0.5}).transform()
    ref = Intervention.avar(alpha=1.0, beta=0.5).transform()
    for name in ("mul", "absw", "add", "w"):
        assert torch.equal(getattr(t, name), getattr(ref, name)), name
    # per-token columns and profile names: mass_image = IMAGE + TARGET, parts named as such
    root, model_dir, image = assets
    rec = api_recording(model_dir, image, "What is red?", 2)
    row = metrics.per_token_records(rec, rows="answer")[0]
    assert "mass_image_all" not in row
    mass = rec.mass(-1).double().mean(dim=1)[0]  # (Q, C)
    i = row["position"] - (rec.categories.shape[1] - rec.query_categories().shape[1])
    assert row["mass_image"] == pytest.approx(float(mass[i, IMAGE] + mass[i, TARGET]), abs=1e-6)
    assert row["mass_image_outside_target"] == pytest.approx(float(mass[i, IMAGE]), abs=1e-6)
    assert row["mass_system"] == pytest.approx(float(mass[i, SYSTEM]), abs=1e-6)
    assert PROFILE_CATEGORIES["image"] is None and PROFILE_CATEGORIES["image_outside_target"] == IMAGE


def test_item9_presets_never_silently_do_nothing(assets, tmp_path, capsys):
    from attn_mod import Intervention
    from attn_mod.eval.datasets import make_synthetic_benchmark
    from attn_mod.intervention import DepthFraction

    # defaults relative to depth: the papers' layers on 28 / 32-layer models, at least one layer on 2 layers
    assert Intervention.pai(5.0).layer_indices(32) == tuple(range(2, 32))
    assert Intervention.pai(5.0).layer_indices(28) == tuple(range(2, 28))
    assert Intervention.pai(5.0).layer_indices(2) == ()  # PAI skips the first two layers (absolute)
    assert Intervention.vaf().layer_indices(32) == tuple(range(9, 15))
    assert Intervention.vaf().layer_indices(28) == tuple(range(8, 13))
    assert Intervention.vaf().layer_indices(2) == (1,)
    assert Intervention.pai(1.0, layers=[1]).layer_indices(2) == (1,)  # explicit layers stay absolute
    assert repr(DepthFraction(9 / 32, 15 / 32)).startswith("depth[")
    # PAI on the 2-layer tiny model changes the output; an intervention on no layer warns
    root, model_dir, image = assets
    model, proc = load_model(model_dir)
    inputs = encode_batch(proc, [Request("What is red?", [image])], model.device)
    with torch.no_grad():
        handle = attn_mod.patch(model, proc)
        base = model(**inputs).logits
        with pytest.warns(UserWarning, match="pai.*resolves to no layer of this 2-layer model"):
            handle.update(intervention=Intervention.pai(5.0))
        handle.update(intervention=Intervention.pai(5.0, layers="all"))
        assert (model(**inputs).logits - base).abs().max() > 1e-3
        with pytest.warns(UserWarning, match="resolves to no layer"):
            handle.update(intervention=Intervention(w={"image": 2.0}, layers="5:"))
        handle.update(intervention=Intervention.vaf())  # no "out of range" on 2 layers
        assert (model(**inputs).logits - base).abs().max() > 0
        handle.remove()
    # the preset parameters on the command line
    tsv = make_synthetic_benchmark(tmp_path / "b.tsv", n=1, seed=1)
    assert cli_main(["eval", "--model", str(model_dir), "--data", str(tsv), "--preset", "vaf", "--enhance", "1.3",
                     "--suppress", "0.9", "--layers", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "e"),
                     "--no-progress"]) == 0
    cells = {json.loads(x)["cell"] for x in (tmp_path / "e" / "results.jsonl").read_text().splitlines()}
    assert "vaf(enhance=1.3,layers=[1],suppress=0.9)" in cells
    assert cli_main(["eval", "--model", str(model_dir), "--data", str(tsv), "--preset", "pai", "--beta", "0.3",
                     "--out", str(tmp_path / "e2"), "--no-progress"]) == 2
    assert "does not take --beta" in capsys.readouterr().err
    assert cli_main(["inspect", str(model_dir), "--image", str(root / "scene.png"), "--question", "What is red?",
                     "--preset", "vaf", "--enhance", "1.4", "--layers", "0", "--max-new-tokens", "2",
                     "--out", str(tmp_path / "i")]) == 0
    m = json.loads((tmp_path / "i" / "metrics.json").read_text())
    assert m["intervention"]["params"]["enhance"] == 1.4


def test_item10_validation_at_the_call(assets, tmp_path, capsys):
    from attn_mod.eval.datasets import DatasetError, load_benchmark, make_synthetic_benchmark
    from attn_mod.regions import box_to_pixels

    root, model_dir, image = assets  # 120 x 90
    model, proc = load_model(model_dir)
    handle = attn_mod.patch(model, proc)
    with pytest.raises(ValueError, match=r"boxes\[0\].*x1 < x0"):
        handle.set_target(boxes=[[(50, 10, 20, 40)]], images=[image])
    with pytest.raises(ValueError, match=r"boxes\[0\].*entirely outside"):
        handle.set_target(boxes=[[(200, 100, 300, 200)]], images=[image])
    with pytest.raises(ValueError, match=r"x1=150 is 30 px past the right edge \(W=120\).*clip it to the image "
                                         r"\(100, 10, 120, 40"):
        handle.set_target(boxes=[[(100, 10, 150, 40)]], images=[image])
    with pytest.raises(ValueError, match="boxes\\[0\\]"):
        handle.set_target(boxes=[[(0.1, 0.2, 1.5, 0.5)]], images=[image], convention="normalized")
    handle.set_target(boxes=[[(60, 20, 110, 70)]], images=[image])  # a good box is accepted
    # set_categories: wrong length / PAD layout caught at the call when the batch is given
    inputs = encode_batch(proc, [Request("What is red?", [image])], model.device)
    S = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="one label per token"):
        handle.set_categories(torch.full((1, S - 1), 2), inputs=inputs)
    bad = torch.full((1, S), 2)
    bad[0, 3] = 0
    with pytest.raises(ValueError, match="disagree with attention_mask"):
        handle.set_categories(bad, inputs=inputs)
    handle.set_categories(torch.full((1, S), 2), inputs=inputs)
    handle.remove()
    assert box_to_pixels((100, 10, 120, 40), image) == (100.0, 10.0, 120.0, 40.0)
    # TSV: a path in the image column that does not exist says so; a good path loads
    image.save(tmp_path / "ok.png")
    tsv = tmp_path / "t.tsv"
    tsv.write_text("index\timage\tquestion\tanswer\tbbox\n"
                   f"0\t/nonexistent/img.png\tq\tA\t\n1\t{tmp_path / 'ok.png'}\tq\tA\t\n")
    rows = list(load_benchmark(tsv))
    with pytest.raises(DatasetError, match=r"t.tsv row 0: image file '/nonexistent/img.png' not found"):
        rows[0].load_image()
    assert rows[1].load_image().size == (120, 90)
    # an out-of-image bbox in a benchmark names the file, row and index
    data = make_synthetic_benchmark(tmp_path / "s.tsv", n=2, seed=3)
    lines = data.read_text().splitlines()
    head = lines[0].split("\t")
    cells = lines[2].split("\t")
    cells[head.index("bbox")] = "[5, 5, 900, 40]"
    lines[2] = "\t".join(cells)
    data.write_text("\n".join(lines) + "\n")
    code = cli_main(["eval", "--model", str(model_dir), "--data", str(data), "--attention-metrics", "--batch-size",
                     "1", "--max-new-tokens", "1", "--out", str(tmp_path / "e"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "s.tsv row 1 (index '1'): bbox [5.0, 5.0, 900.0, 40.0]" in err and "right edge" in err


def test_item11_api_messages_reprs_and_names(assets):
    from attn_mod import Intervention

    root, model_dir, image = assets
    model, proc = load_model(model_dir)
    handle = attn_mod.patch(model, proc, intervention=Intervention.avar(0.2, 0.5))
    inputs = encode_batch(proc, [Request("What is red?", [image])], model.device)
    with torch.no_grad(), attn_mod.capture(model, layers=[0]) as rec:
        model(**inputs)
    with pytest.raises(KeyError, match="layer -1 is model layer 1 .*not from the captured ones.*captured layers: \\[0\\]"):
        rec.mass(-1)
    assert rec.mass(0).shape[0] == 1
    with pytest.raises(ValueError, match="attn_mod.capture"):
        model(**inputs, output_attentions=True)
    r = repr(handle)
    assert "backend=auto" in r and "avar(alpha=0.2, beta=0.5" in r and "layers 0-1" in r.replace("0,1", "0-1")
    assert repr(rec).startswith("Recording(layers=0 of 2, runs=1, B=1")
    iv = repr(Intervention.avar(0.2, 0.5))
    assert "w={image: 1.2, system: 0.5}" in iv
    assert "target: 3" in repr(Intervention(w={"image": 2, "target": 3}, layers=range(0, 2)))
    handle.set_target(boxes=[[(60, 20, 110, 70)]], images=[image])
    with torch.no_grad(), attn_mod.capture(model) as rec2:
        model(**inputs)
    ta = metrics.target_attention(rec2)
    assert "R_a=" in repr(ta) and "R_a = 0.5*(1+tanh" in ta.describe()
    assert ta.mean("a") == pytest.approx(float(ta.a[~torch.isnan(ta.a)].double().mean()), rel=1e-5)
    assert ta.reward is ta.R_a  # deprecated alias
    row = metrics.per_token_records(rec2, rows="answer")[0]
    assert "R_a" in row and "reward" not in row
    assert "mean=" in repr(metrics.vas(rec2))
    handle.remove()
    # attn_mod.metrics exports only its own names
    for name in metrics.__all__:
        obj = getattr(metrics, name)
        assert getattr(obj, "__module__", "attn_mod.metrics") == "attn_mod.metrics", name


def test_item2_demo_takes_resume_and_system(tmp_path, monkeypatch):
    """`attn-mod demo --no-resume --system ...` reaches the sweep (the sweep itself is tested in test_sweep)."""
    from attn_mod.eval import sweep as sweep_mod

    seen = {}

    class Stop(Exception):
        pass

    def fake(cfg, **kw):
        seen.update(kw, system=cfg.system)
        raise Stop

    monkeypatch.setattr(sweep_mod, "run_sweep", fake)
    with pytest.raises(Stop):
        cli_main(["demo", "--out", str(tmp_path), "--samples", "1", "--no-resume", "--system", "Be brief.",
                  "--no-progress"])
    assert seen["resume"] is False and seen["system"] == "Be brief."
    with pytest.raises(Stop):
        cli_main(["demo", "--out", str(tmp_path), "--samples", "1", "--no-progress"])
    assert seen["resume"] is True and seen["system"] is None


def test_item3_inspect_checks_device_and_backend_before_loading(assets, tmp_path, capsys, monkeypatch):
    root, model_dir, _ = assets
    base = ["inspect", str(model_dir), "--image", str(root / "scene.png"), "--question", "Q", "--out",
            str(tmp_path / "o")]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli_main([*base, "--backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "Traceback" not in err and not (tmp_path / "o").exists()
    if not torch.cuda.is_available():
        assert cli_main([*base, "--device", "cuda"]) == 2
        assert "use --device cpu" in capsys.readouterr().err
