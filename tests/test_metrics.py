"""VAS / SAYO target attention / entropy: hand-computed values and eager-attention cross-checks."""

import json
import math

import pytest
import torch

import attn_mod
from attn_mod.categories import IMAGE, PAD, RESPONSE, SYSTEM, TARGET, TEXT
from attn_mod.metrics import (per_token_records, select_rows, target_attention, target_attention_from_masses,
                              token_entropy, vas, vas_from_masses, visible_counts, write_csv, write_jsonl)
from helpers import onehot, twin_models, vlm_inputs


def masses_from_rows(rows):
    """(L=1, B=1, H=len(rows[0]), Q=len(rows), 8) from per-row, per-head {code: mass} dicts."""
    Q, H = len(rows), len(rows[0])
    m = torch.zeros(1, 1, H, Q, 8)
    for i, heads in enumerate(rows):
        for h, d in enumerate(heads):
            for c, val in d.items():
                m[0, 0, h, i, c] = val
    return m


def test_vas_hand_computed():
    # query rows: TEXT, RESPONSE, RESPONSE; 2 heads
    rows = [
        [{SYSTEM: 0.5, IMAGE: 0.5}, {SYSTEM: 0.5, IMAGE: 0.5}],
        [{SYSTEM: 0.2, IMAGE: 0.6, TEXT: 0.2}, {SYSTEM: 0.4, IMAGE: 0.2, TARGET: 0.2, TEXT: 0.2}],
        [{SYSTEM: 0.1, IMAGE: 0.3, RESPONSE: 0.6}, {SYSTEM: 0.5, TARGET: 0.5}],
    ]
    m = masses_from_rows(rows)
    qc = torch.tensor([[TEXT, RESPONSE, RESPONSE]])
    r = vas_from_masses(m, qc, rows="response")
    want = ((0.6 / 0.2) + (0.4 / 0.4) + (0.3 / 0.1) + (0.5 / 0.5)) / 4  # eps = 1e-6 is negligible here
    assert r.value.item() == pytest.approx(want, rel=1e-5)
    assert r.per_head.shape == (1, 2, 1)
    assert r.per_head[0, 0, 0].item() == pytest.approx((3 + 3) / 2, rel=1e-5)
    share = vas_from_masses(m, qc, form="share", rows="response")
    assert share.value.item() == pytest.approx((0.75 + 0.5 + 0.75 + 0.5) / 4, rel=1e-5)
    assert "share form" in share.describe() and "ratio form" in r.describe()
    all_rows = vas_from_masses(m, qc, rows="all")
    assert all_rows.value.item() == pytest.approx((1 + 1 + 3 + 1 + 3 + 1) / 6, rel=1e-5)
    # a sample with no response rows gives NaN, not 0
    none = vas_from_masses(m, torch.tensor([[TEXT, TEXT, TEXT]]), rows="response")
    assert math.isnan(none.value.item())
    assert vas_from_masses(m, qc).value.item() == pytest.approx(want, rel=1e-5)  # default rows="response"
    # rows="answer": the rows that produce answer tokens = the last prompt row (row 0) + RESPONSE rows
    answer = vas_from_masses(m, qc, rows="answer")
    assert answer.rows == "answer" and "rows=answer" in answer.describe()
    assert answer.value.item() == pytest.approx(all_rows.value.item(), rel=1e-6)
    prompt_only = vas_from_masses(m, torch.tensor([[SYSTEM, TEXT, TEXT]]), rows="answer")  # no answer yet: the last row
    assert prompt_only.value.item() == pytest.approx((3 + 1) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="form"):
        vas_from_masses(m, qc, form="log")
    with pytest.raises(ValueError, match="rows must be one of"):
        vas_from_masses(m, qc, rows="answers")
    with pytest.raises(ValueError, match=r"expected \(B, Q\)"):
        vas_from_masses(m, qc[:, :2])


def test_select_rows_after_image():
    qc = torch.tensor([[PAD, SYSTEM, IMAGE, TARGET, TEXT, RESPONSE], [SYSTEM, TEXT, TEXT, TEXT, TEXT, TEXT]])
    assert select_rows(qc, "after_image").tolist() == [[False] * 4 + [True] * 2, [False] * 6]
    assert select_rows(qc, "all")[0].tolist() == [False] + [True] * 5


def test_target_attention_hand_computed():
    key_cats = torch.tensor([[SYSTEM, IMAGE, TARGET, TARGET, IMAGE, TEXT, RESPONSE]])
    counts = visible_counts(key_cats, 3)
    assert counts[0, :, TARGET].tolist() == [2, 2, 2] and counts[0, :, IMAGE].tolist() == [2, 2, 2]
    rows = [[{TARGET: 0.4, IMAGE: 0.2}, {TARGET: 0.2, IMAGE: 0.2}],
            [{TARGET: 0.0, IMAGE: 0.4}, {TARGET: 0.0, IMAGE: 0.4}],
            [{TARGET: 0.3, IMAGE: 0.1}, {TARGET: 0.1, IMAGE: 0.3}]]
    ta = target_attention_from_masses(masses_from_rows(rows), key_cats)
    a0, v0 = (0.4 + 0.2) / 2 / 2, ((0.6 + 0.4) / 2) / 4
    assert ta.a[0, 0, 0].item() == pytest.approx(a0) and ta.v[0, 0, 0].item() == pytest.approx(v0)
    r0 = 0.5 * (1 + math.tanh(math.log((a0 + 1e-8) / (v0 + 1e-8))))
    assert ta.R_a[0, 0, 0].item() == pytest.approx(r0, rel=1e-6)
    assert ta.R_a[0, 0, 1].item() == pytest.approx(0.5 * (1 + math.tanh(math.log(1e-8 / (0.1 + 1e-8)))), abs=1e-6)
    # no target visible -> NaN
    ta2 = target_attention_from_masses(masses_from_rows(rows), torch.tensor([[SYSTEM, IMAGE, IMAGE, IMAGE, IMAGE, TEXT, TEXT]]))
    assert torch.isnan(ta2.a).all() and not torch.isnan(ta2.v).any()


def test_token_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0]])
    h = token_entropy(logits)
    assert h[0].item() == pytest.approx(math.log(4)) and h[1].item() < 1e-6
    h2 = token_entropy(torch.tensor([[1.0, 0.0]]), temperature=2.0)
    p = torch.softmax(torch.tensor([0.5, 0.0]), 0)
    assert h2.item() == pytest.approx(float(-(p * p.log()).sum()))
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(logits, temperature=0)


def test_metrics_match_eager_attention_on_tiny_qwen(tmp_path):
    model, eager, proc = twin_models("qwen2_5_vl")
    batch = vlm_inputs(proc, ["What color is the square?", "How many objects?"], [(130, 90), (60, 60)],
                       answers=["The answer is B.", "3"])
    handle = attn_mod.patch(model, proc)
    img_pos = (batch["mm_token_type_ids"][0] == 1).nonzero().flatten()
    target = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    target[0, img_pos[:3]] = True
    handle.set_target(target)
    with torch.no_grad(), attn_mod.capture(model) as rec:
        out = model(**batch)
        ref = eager(**batch, output_attentions=True)
    cats = rec.categories
    assert (cats == TARGET).sum() == 3
    eager_masses = torch.stack([torch.einsum("bhqk,bkc->bhqc", a.float(), onehot(cats)) for a in ref.attentions])
    want = vas_from_masses(eager_masses, cats)
    got = vas(rec)
    torch.testing.assert_close(got.value, want.value, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(got.value).all() and got.value.min() > 0
    # SAYO a / v from eager weights directly: mean over heads of target mass / #target keys
    ta = target_attention(rec)
    att = ref.attentions[-1][0].float()  # (H, Q, K)
    resp = (cats[0] == RESPONSE).nonzero().flatten()
    for i in resp.tolist():
        a = att[:, i, img_pos[:3]].sum(-1).mean() / 3
        v = att[:, i, img_pos].sum(-1).mean() / len(img_pos)
        assert ta.a[0, 0, i].item() == pytest.approx(a.item(), rel=1e-4)
        assert ta.v[0, 0, i].item() == pytest.approx(v.item(), rel=1e-4)
    assert torch.isnan(ta.a[0, 1]).all()  # sample 1 has no target
    ent = token_entropy(out.logits)
    recs = per_token_records(rec, entropy=ent, rows="response")
    assert len(recs) == int((cats == RESPONSE).sum())
    assert {"mass_system", "mass_image", "mass_target", "a", "v", "R_a", "entropy"} <= set(recs[0])
    lines = write_jsonl(recs, tmp_path / "t.jsonl").read_text().splitlines()
    assert len(lines) == len(recs) and json.loads(lines[-1])["a"] is None  # NaN -> null for sample 1
    assert write_csv(recs, tmp_path / "t.csv").read_text().count("\n") == len(recs) + 1
    handle.remove()


def test_set_target_from_pixel_boxes():
    model, _, proc = twin_models("qwen2_5_vl")
    handle = attn_mod.patch(model, proc)
    sizes = [(130, 90), (60, 60)]
    batch = vlm_inputs(proc, ["Where?", "Where is it?"], sizes)
    hw = [(h, w) for (w, h) in sizes]
    # full-image box on sample 0 -> all its visual tokens; tiny box in the top-left corner of sample 1 -> one token
    handle.set_target(boxes=[[(0, 0, 130, 90)], [(0, 0, 1, 1)]], images=hw)
    with torch.no_grad(), attn_mod.capture(model) as rec:
        model(**batch)
    cats = rec.categories
    vis = batch["mm_token_type_ids"] == 1
    assert cats[0][vis[0]].eq(TARGET).all()
    first_img_1 = vis[1].nonzero()[0].item()
    assert (cats[1] == TARGET).nonzero().flatten().tolist() == [first_img_1]
    with pytest.raises(ValueError, match="images="):
        handle.set_target(boxes=[[(0, 0, 1, 1)], []])
    with pytest.raises(ValueError, match="convention"):
        handle.set_target(boxes=[[(0, 0, 1, 1)], []], images=hw, convention="xywh")
    with pytest.raises(ValueError, match=r"boxes\[0\]: .*extends outside the 130x90"):  # at the call (issue 8)
        handle.set_target(boxes=[[(0, 0, 500, 1)], []], images=hw)
    handle.remove()
