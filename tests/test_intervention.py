"""Intervention presets map to the DESIGN.md tables; bad settings fail with messages naming the fix."""

import math

import pytest
import torch

from attn_mod import Intervention
from attn_mod.categories import IMAGE, PAD, RESPONSE, SYSTEM, TARGET, TEXT


def test_avar_tables():
    iv = Intervention.avar(alpha=0.3, beta=0.4)
    tr = iv.transform()
    assert tr.renorm
    assert tr.w[IMAGE] == pytest.approx(1.3) and tr.w[TARGET] == pytest.approx(1.3)
    assert tr.w[SYSTEM] == pytest.approx(0.6) and tr.w[TEXT] == 1 and tr.w[RESPONSE] == 1
    assert (tr.mul == 1).all() and (tr.absw == 0).all() and (tr.add == 0).all()
    assert not Intervention.avar(0.3, 0.4, renorm=False).transform().renorm
    assert iv.layer_indices(4) == (0, 1, 2, 3)


def test_pai_and_vaf_tables():
    pai = Intervention.pai(alpha=0.5)
    tr = pai.transform()
    assert tr.absw[IMAGE] == 0.5 and tr.absw[TARGET] == 0.5 and tr.absw[SYSTEM] == 0
    assert pai.layer_indices(6) == (2, 3, 4, 5)
    cats = torch.tensor([[2, 2, 3, 2, 5, 5]])
    end = torch.tensor([3])
    rows = pai.row_enable(cats[:, 2:], torch.arange(2, 6), end)
    assert rows.tolist() == [[False, True, True, True]]
    vaf = Intervention.vaf()
    tv = vaf.transform()
    assert tv.mul[IMAGE] == pytest.approx(1.15) and tv.mul[SYSTEM] == pytest.approx(0.95)
    assert vaf.layer_indices(32) == tuple(range(9, 15))  # [9/32, 15/32) of the depth
    assert Intervention.identity().transform().is_identity()


def test_generic_constructor_and_update():
    iv = Intervention(w={"visual": 2.0, "system": 0.0}, mul={"text": 1.1}, layers="1:3", heads=[0, 2], query=["response"])
    tr = iv.transform()
    assert tr.w[IMAGE] == 2 and tr.w[TARGET] == 2 and tr.w[SYSTEM] == 0 and tr.mul[TEXT] == pytest.approx(1.1)
    assert iv.layer_indices(4) == (1, 2)
    assert iv.head_mask(4).tolist() == [True, False, True, False]
    iv2 = iv.updated(layers=[3])
    assert iv2.layer_indices(4) == (3,) and iv2.w == iv.w
    avar = Intervention.avar(0.1, 0.2, layers=[1])
    up = avar.updated(alpha=0.5)
    assert up.params["beta"] == 0.2 and up.layer_indices(2) == (1,)
    assert up.transform().w[IMAGE] == pytest.approx(1.5)


@pytest.mark.parametrize("make, match", [
    (lambda: Intervention.avar(alpha=-0.1), "alpha must be >= 0"),
    (lambda: Intervention.avar(beta=1.5), r"beta must lie in \[0, 1\]"),
    (lambda: Intervention.avar(beta=-0.01), r"beta must lie in \[0, 1\]"),
    (lambda: Intervention.avar(alpha=math.inf), "alpha must be finite"),
    (lambda: Intervention.avar(alpha=math.nan), "alpha must be finite"),
    (lambda: Intervention(w={"image": -1.0}), "must be >= 0"),
    (lambda: Intervention(w={"image": math.inf}), "must be finite"),
    (lambda: Intervention(mul={"imgae": 1.2}), "unknown category 'imgae'; known names: pad, system.*table 'mul'"),
    (lambda: Intervention(query=["answers"]), "unknown query category"),
    (lambda: Intervention.pai(alpha=-1), "alpha must be >= 0"),
    (lambda: Intervention.vaf(enhance=0), "must be > 0"),
    (lambda: Intervention.from_preset("clearsight"), "choose one of"),
    (lambda: Intervention.avar().updated(gamma=1), r"avar has no parameter\(s\) \['gamma'\]; its parameters are \['alpha', 'beta'"),
    (lambda: Intervention(w={"image": 2}).updated(alpha=1), "updatable fields"),
])
def test_validation_messages(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_layer_and_head_out_of_range():
    with pytest.raises(ValueError, match="layer index 9 is out of range for a model with 2 decoder layers"):
        Intervention.vaf(layers=[9]).layer_indices(2)
    with pytest.raises(ValueError, match="head index 4 is out of range"):
        Intervention(heads=[4]).head_mask(4)
    with pytest.raises(ValueError, match="not 'all'"):
        Intervention(layers="first").layer_indices(2)
    assert Intervention(layers=-1).layer_indices(3) == (2,)
    assert PAD == 0
