"""AVAR AGTO losses (attn_mod.trainers.losses) against independent float64 eager computations, finite
differences and the same losses built from eager `output_attentions`."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attn_mod
from attn_mod.trainers.losses import AGTOResult, agto_losses, agto_rows, sft_objective
from objectives_ref import CODES, eager_attentions, ref_agto, reference_categories, sft_batch, twin64

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
HAS_SYSTEM = {"qwen2_5_vl": [True, True, True], "qwen3_vl": [True, False, False]}  # Qwen2.5-VL adds a default one


def ref_rows(cats, labels, query):
    """Q from labels / categories with loops."""
    B, S = cats.shape
    rows = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        resp = [i for i in range(S) if labels[b, i] != -100]
        for i in range(S):
            if query == "response":
                rows[b, i] = i in resp
            else:
                rows[b, i] = cats[b, i] != CODES["PAD"] and i < min(resp)
    return rows


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    family = request.param
    model, eager, proc = twin64(family)
    batch = sft_batch(proc)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    handle = attn_mod.patch(model, proc, backend="torch")
    yield family, model, eager, proc, batch
    handle.remove()


def ours(model, batch, query="response", **kw):
    with attn_mod.capture(model, detach=False) as rec:
        out = model(**batch)
    rows = agto_rows(rec.query_categories(), batch["labels"], query=query)
    return agto_losses(rec.masses(), rec.categories, rows, **kw), out, rec


@pytest.mark.parametrize("query", ["response", "prompt"])
def test_agto_values_match_eager_reference(setup, query):
    family, model, eager, proc, batch = setup
    res, out, rec = ours(model, batch, query)
    cats = reference_categories(proc, batch, HAS_SYSTEM[family])
    assert torch.equal(rec.categories.long(), cats)
    rows = ref_rows(cats, batch["labels"], query)
    assert torch.equal(agto_rows(rec.query_categories(), batch["labels"], query=query), rows)
    with torch.no_grad():
        l_img, l_sys, n_img, n_sys = ref_agto(eager_attentions(eager, proc, batch), cats, rows)
    assert (res.samples_img, res.samples_sys) == (n_img, n_sys) == (2, 3 if family == "qwen2_5_vl" else 1)
    torch.testing.assert_close(res.loss_img.detach(), l_img, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(res.loss_sys.detach(), l_sys, atol=1e-9, rtol=1e-7)
    assert res.loss_img.dtype == torch.float64 and res.loss_img.requires_grad
    total = sft_objective(out.loss, res, lambda_img=0.2, lambda_sys=0.05)
    torch.testing.assert_close(total.detach(), out.loss.detach() + 0.2 * l_img + 0.05 * l_sys, atol=1e-9, rtol=1e-7)


def test_agto_heads_and_layer_subsets(setup):
    family, model, eager, proc, batch = setup
    with attn_mod.capture(model, layers=[1], detach=False) as rec:
        model(**batch)
    rows = agto_rows(rec.query_categories(), batch["labels"])
    res = agto_losses(rec.masses(), rec.categories, rows, heads=[1, 2])
    cats = reference_categories(proc, batch, HAS_SYSTEM[family])
    with torch.no_grad():
        attn = eager_attentions(eager, proc, batch)[1][:, [1, 2]]
        l_img, l_sys, _, _ = ref_agto([attn], cats, rows)
    torch.testing.assert_close(res.loss_img.detach(), l_img, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(res.loss_sys.detach(), l_sys, atol=1e-9, rtol=1e-7)


def _fd_params(model):
    lm = model.model.language_model
    return [(lm.layers[0].self_attn.q_proj.weight, (3, 5)), (lm.layers[0].self_attn.k_proj.weight, (1, 7)),
            (lm.layers[0].self_attn.v_proj.weight, (2, 4)), (lm.layers[1].self_attn.q_proj.weight, (10, 2)),
            (lm.layers[1].self_attn.k_proj.weight, (6, 30)), (lm.layers[0].mlp.up_proj.weight, (9, 11)),
            (lm.embed_tokens.weight, (int(model.config.text_config.eos_token_id), 3))]


def test_agto_gradients_match_finite_differences_and_eager(setup):
    family, model, eager, proc, batch = setup
    cats = reference_categories(proc, batch, HAS_SYSTEM[family])
    rows = ref_rows(cats, batch["labels"], "response")

    model.zero_grad()
    res, _, _ = ours(model, batch)
    (res.loss_img + res.loss_sys).backward()

    eager.zero_grad()
    l_img, l_sys, _, _ = ref_agto(eager_attentions(eager, proc, batch), cats, rows)
    (l_img + l_sys).backward()
    checked = 0
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        if pe.grad is None or pe.grad.abs().max() == 0:
            continue
        # float64 throughout; the ~1e-7 relative residue comes from float32 rotary tables (padded vs unpadded runs)
        scale = float(pe.grad.abs().max())
        assert float((p.grad - pe.grad).abs().max()) <= 1e-6 * scale, name
        checked += 1
    assert checked > 10

    def value():
        with torch.no_grad():
            r, _, _ = ours(model, batch)
        return float(r.loss_img + r.loss_sys)

    h = 1e-6
    for p, idx in _fd_params(model):
        g = float(p.grad[idx])
        orig = float(p.data[idx])
        p.data[idx] = orig + h
        up = value()
        p.data[idx] = orig - h
        down = value()
        p.data[idx] = orig
        fd = (up - down) / (2 * h)
        assert abs(fd - g) <= 1e-6 + 1e-5 * abs(g), (idx, fd, g)
    assert any(abs(float(p.grad[idx])) > 1e-4 for p, idx in _fd_params(model))


def test_coverage_no_image_no_system_is_zero():
    model, _, proc = twin64("qwen3_vl")
    batch = sft_batch(proc, [("Which option is correct?", None, None, "A"), ("How many?", None, None, "The answer is 3")])
    attn_mod.patch(model, proc, backend="torch")
    res, out, rec = ours(model, batch)
    assert res.samples_img == res.samples_sys == 0
    assert res.loss_img.shape == () and float(res.loss_img) == 0.0 and float(res.loss_sys) == 0.0
    assert torch.equal(sft_objective(out.loss, res), out.loss)


# ------------------------------------------------------------------------------- synthetic properties
def _random_case(draw_seed, B, S, L=2, H=3):
    g = torch.Generator().manual_seed(draw_seed)
    cats = torch.randint(0, 6, (B, S), generator=g)
    masses = torch.rand(L, B, H, S, 8, generator=g, dtype=torch.float64)
    masses = masses / masses.sum(-1, keepdim=True)
    labels = torch.where(torch.rand(B, S, generator=g) < 0.4, torch.ones(B, S, dtype=torch.long), -100)
    return masses, cats, labels


def _ref_from_masses(masses, cats, rows, eps=1e-6):
    """Loops over (l, h, b) with n_X counted by scanning the keys before each row."""
    L, B, H, S, _ = masses.shape
    out = {}
    for name, codes, sign in (("img", (3, 4), -1.0), ("sys", (1,), 1.0)):
        terms, covered = [], 0
        for b in range(B):
            qrows = [i for i in range(S) if rows[b, i] and any(int(cats[b, j]) in codes for j in range(i + 1))]
            if not qrows:
                continue
            covered += 1
            for l in range(L):
                for h in range(H):
                    vals = [sum(float(masses[l, b, h, i, c]) for c in codes)
                            / sum(1 for j in range(i + 1) if int(cats[b, j]) in codes) for i in qrows]
                    terms.append(sign * torch.log(torch.tensor(sum(vals) / len(vals) + eps, dtype=torch.float64)))
        out[name] = (torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64), covered)
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 4), S=st.integers(1, 12),
       query=st.sampled_from(["response", "prompt"]))
def test_agto_property_matches_loop_reference(seed, B, S, query):
    masses, cats, labels = _random_case(seed, B, S)
    rows = agto_rows(cats, labels, query=query)
    res = agto_losses(masses, cats, rows)
    ref = _ref_from_masses(masses, cats, rows)
    assert (res.samples_img, res.samples_sys) == (ref["img"][1], ref["sys"][1])
    torch.testing.assert_close(res.loss_img, ref["img"][0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(res.loss_sys, ref["sys"][0], atol=1e-12, rtol=1e-10)
    # a sample without image / system keys appended to the batch changes nothing
    extra = torch.full((1, S), CODES["TEXT"])
    cats2 = torch.cat([cats, extra])
    masses2 = torch.cat([masses, masses[:, :1]], dim=1)
    res2 = agto_losses(masses2, cats2, torch.cat([rows, torch.ones(1, S, dtype=torch.bool)]))
    torch.testing.assert_close(res2.loss_img, res.loss_img, atol=1e-12, rtol=1e-10)
    assert res2.samples_img == res.samples_img


def test_agto_rows_without_labels_and_errors():
    cats = torch.tensor([[0, 1, 2, 3, 5, 5, 2], [1, 3, 2, 5, 0, 0, 0]])
    assert agto_rows(cats).tolist() == [[False, False, False, False, True, True, False],
                                        [False, False, False, True, False, False, False]]
    assert agto_rows(cats, query="prompt").tolist() == [[False, True, True, True, False, False, False],
                                                        [True, True, True, False, False, False, False]]
    with pytest.raises(ValueError, match="query must be one of"):
        agto_rows(cats, query="all")
    with pytest.raises(ValueError, match="unshifted labels"):
        agto_rows(cats, torch.zeros(2, 6))
    masses = torch.rand(1, 2, 4, 7, 8)
    with pytest.raises(ValueError, match=r"masses must be \(L, B, Hq, S, 8\)"):
        agto_losses(masses[0], cats, agto_rows(cats))
    with pytest.raises(ValueError, match="head index 9 is out of range"):
        agto_losses(masses, cats, agto_rows(cats), heads=[9])
    with pytest.raises(ValueError, match="rows have shape"):
        agto_losses(masses, cats, agto_rows(cats)[:, :3])
    assert isinstance(agto_losses(masses, cats, agto_rows(cats)), AGTOResult)
