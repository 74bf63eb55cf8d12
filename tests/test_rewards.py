"""Rewards (attn_mod.trainers.rewards) against independent float64 computations on a tiny patched model, and
property tests of the row selection."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attn_mod
from attn_mod.metrics import token_entropy
from attn_mod.trainers.rewards import (accuracy_reward, avar_visual_reward, combine_rewards, completion_mask,
                                       format_reward, length_penalty, sayo_attention_reward, select_high_entropy)
from objectives_ref import (CODES, eager_outputs, ref_avar, ref_sayo, ref_top_k, reference_categories,
                            rollout_batch, target_mask, twin64)

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
SPECS = [
    ("What color is the square?", "You are a helpful assistant.", (130, 90), None),
    ("How many objects are there in the picture?", None, (60, 60), None),
    ("Which option is correct?", "You are a helpful assistant.", (90, 120), None),
]
COMPLETIONS = ["The answer is A.", "There are 3 red circles and 2 blue squares.",
               "The answer is B. The answer is C. the value number count"]
HAS_SYSTEM = {"qwen2_5_vl": [True, True, True], "qwen3_vl": [True, False, True]}
TEMPERATURE = 0.7


@pytest.fixture(scope="module", params=FAMILIES)
def scored(request):
    """One patched teacher-forced forward over prompt + completion; eager reference outputs per sample."""
    family = request.param
    model, eager, proc = twin64(family)
    batch, comp, P = rollout_batch(proc, SPECS, COMPLETIONS, max_new=16)  # 5 + EOS + pads, 15 + EOS, 18 cut at 16 without EOS
    target = target_mask(batch, [0.5, 0.25, 0.0])  # sample 2 has no box
    handle = attn_mod.patch(model, proc, backend="torch")
    handle.set_target(target)
    with torch.no_grad(), attn_mod.capture(model) as rec:
        out = model(**batch)
    handle.remove()
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = proc.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    valid = completion_mask(comp, eos, pad)
    positions = torch.cat([torch.zeros(comp.shape[0], P, dtype=torch.bool), valid], dim=1)
    cats = reference_categories(proc, batch, HAS_SYSTEM[family], target=target)
    cats[:, P:][valid] = CODES["RESPONSE"]
    with torch.no_grad():
        attns, logits = eager_outputs(eager, proc, batch)
    return dict(family=family, rec=rec, out=out, positions=positions, cats=cats, attns=attns, logits=logits,
                comp=comp, valid=valid, eos=eos, pad=pad, batch=batch)


def test_rollout_layout(scored):
    s = scored
    assert torch.equal(s["rec"].categories.long(), s["cats"])
    assert (s["batch"]["attention_mask"][:, 0] == 0).any(), "prompts must be left-padded"
    assert s["valid"][2].all() and not (s["comp"][2] == s["eos"]).any()  # sample 2 runs to max_new without EOS
    assert s["valid"].sum(1).tolist() == [6, 16, 16] and s["comp"][0, 5] == s["eos"] and s["comp"][1, 15] == s["eos"]
    assert (s["cats"] == CODES["TARGET"]).any(1).tolist() == [True, True, False]


@pytest.mark.parametrize("rows", ["decision", "emitted"])
def test_sayo_reward_matches_eager_reference(scored, rows):
    s = scored
    ent = token_entropy(s["out"].logits, TEMPERATURE)
    res = sayo_attention_reward(s["rec"].mass(-1), s["rec"].categories, ent, s["positions"], rows=rows)
    want = ref_sayo(s["attns"][-1], s["cats"], s["logits"], s["positions"], rows=rows, temperature=TEMPERATURE)
    assert res.defined.tolist() == [w is not None for w in want] == [True, True, False]
    for b, w in enumerate(want):
        if w is None:
            assert float(res.values[b]) == 0.0 and math.isnan(float(res.extras["a_q"][b]))
        else:
            assert abs(float(res.values[b]) - w) < 1e-6, (b, float(res.values[b]), w)
    assert res.values.dtype == torch.float32 and res.values.shape == (3,)


def test_decision_and_emitted_rows_differ(scored):
    s = scored
    ent = token_entropy(s["out"].logits, TEMPERATURE)
    args = (s["rec"].mass(-1), s["rec"].categories, ent, s["positions"])
    dec = sayo_attention_reward(*args, rows="decision")
    emi = sayo_attention_reward(*args, rows="emitted")
    # the emitted rows are the decision rows shifted by one position
    assert torch.equal(emi.extras["selected"][:, 1:], dec.extras["selected"][:, :-1])
    assert not emi.extras["selected"][:, 0].any()
    assert (dec.values[:2] - emi.values[:2]).abs().max() > 1e-4
    # the selected emitted rows are completion tokens; decision rows are the rows before them
    assert not (emi.extras["selected"] & ~s["positions"]).any()
    k = [max(1, (3 * int(n)) // 10) for n in s["valid"].sum(1)]
    assert dec.extras["selected"].sum(1).tolist() == k


def test_avar_visual_reward_matches_eager_reference(scored):
    s = scored
    res = avar_visual_reward(s["rec"].masses(), s["positions"], key_cats=s["rec"].categories)
    want = ref_avar(s["attns"], s["cats"], s["positions"])
    assert res.defined.tolist() == [w is not None for w in want] == HAS_SYSTEM[s["family"]]
    for b, w in enumerate(want):
        if w is None:
            assert float(res.values[b]) == 0.0
        else:
            assert abs(float(res.values[b]) - w) <= 1e-6 * abs(w), (b, float(res.values[b]), w)
    # layer and head subsets: the released GRPO script's layer range, a head subset
    rec = s["rec"]
    sub = avar_visual_reward(rec.masses()[1:], s["positions"], heads=[0, 3], key_cats=rec.categories)
    want = ref_avar([a[:, [0, 3]] for a in s["attns"][1:]], s["cats"], s["positions"])
    for b, w in enumerate(want):
        if w is not None:
            assert abs(float(sub.values[b]) - w) <= 1e-6 * abs(w)
    # without key categories a sample with zero system mass is undefined (never a division by eps)
    no_cats = avar_visual_reward(rec.masses(), s["positions"])
    assert no_cats.defined.tolist() == res.defined.tolist()


# ------------------------------------------------------------------------------------------- row selection
def ref_completion_mask(ids, eos, pad):
    out = []
    for row in ids:
        m, done = [], False
        for t in row:
            m.append(not done and (t != pad or pad in eos))
            done = done or t in eos
        out.append(m)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=10), min_size=1, max_size=4).filter(
    lambda rows: len({len(r) for r in rows}) == 1), st.sampled_from([[1], [1, 2]]), st.sampled_from([0, 1, None]))
def test_completion_mask_property(rows, eos, pad):
    ids = torch.tensor(rows)
    got = completion_mask(ids, eos if len(eos) > 1 else eos[0], pad)
    assert got.tolist() == ref_completion_mask(rows, eos, -1 if pad is None else pad)


def test_completion_mask_examples():
    ids = torch.tensor([[7, 8, 2, 0, 0], [7, 2, 8, 2, 0], [7, 8, 9, 9, 9], [0, 7, 2, 0, 0]])
    assert completion_mask(ids, 2, 0).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1],
                                                         [0, 1, 1, 0, 0]]
    assert completion_mask(ids, [2, 9]).int().tolist()[2] == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        completion_mask(ids[0], 2)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_select_high_entropy_property(data):
    B = data.draw(st.integers(1, 4))
    T = data.draw(st.integers(1, 25))
    ties = data.draw(st.booleans())
    values = st.integers(0, 3).map(float) if ties else st.floats(0, 10, allow_nan=False)
    ent = torch.tensor([[data.draw(values) for _ in range(T)] for _ in range(B)], dtype=torch.float64)
    valid = torch.tensor([[data.draw(st.booleans()) for _ in range(T)] for _ in range(B)])
    frac = data.draw(st.sampled_from([0.3, 0.1, 0.5, 1.0]))
    got = select_high_entropy(ent, valid, frac)
    for b in range(B):
        pos = [t for t in range(T) if valid[b, t]]
        chosen = [pos[i] for i in ref_top_k([float(ent[b, t]) for t in pos], frac)]
        assert got[b].nonzero().flatten().tolist() == chosen
        assert not (got[b] & ~valid[b]).any()  # padding never selected
        if frac == 0.3:
            assert int(got[b].sum()) == (max(1, (3 * len(pos)) // 10) if pos else 0)


def test_select_high_entropy_ties_and_padding():
    ent = torch.tensor([[1.0, 5.0, 5.0, 9.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 99.0]])
    valid = torch.tensor([[True] * 10 + [False]])  # the padded slot has the largest entropy
    assert select_high_entropy(ent, valid, 0.3).nonzero()[:, 1].tolist() == [1, 2, 3]  # 9 then the earlier 5s
    assert select_high_entropy(ent, valid, 0.05).nonzero()[:, 1].tolist() == [3]  # k = max(1, 0)
    assert not select_high_entropy(ent, torch.zeros_like(valid), 0.3).any()
    with pytest.raises(ValueError, match="top_frac"):
        select_high_entropy(ent, valid, 0.0)


def test_sayo_reward_synthetic_and_errors():
    """A hand-built case: 1 head, 2 target + 2 image keys, rows with known masses."""
    cats = torch.tensor([[2, 3, 4, 4, 3, 5, 5, 5]])  # TEXT, IMAGE, TARGET, TARGET, IMAGE, then 3 completion tokens
    S = cats.shape[1]
    mass = torch.zeros(1, 1, S, 8, dtype=torch.float64)
    for i, (t, im) in enumerate([(0, 0), (0, 0), (0, 0), (0, 0), (0.2, 0.5), (0.3, 0.4), (0.05, 0.6), (0.4, 0.45)]):
        mass[0, 0, i, 4], mass[0, 0, i, 3] = t, im - t
    pos = torch.tensor([[False] * 5 + [True] * 3])
    ent = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.1, 2.0, 0.5, 0.0]])  # row 5 decides token 6: the max H_t
    dec = sayo_attention_reward(mass, cats, ent, pos)  # k = 1: token at 6, decision row 5
    a, v = 0.3 / 2, 0.4 / 4
    assert abs(float(dec.values[0]) - math.tanh(math.log((a + 1e-8) / (v + 1e-8)))) < 1e-6
    emi = sayo_attention_reward(mass, cats, ent, pos, rows="emitted")  # attention row 6
    a, v = 0.05 / 2, 0.6 / 4
    assert abs(float(emi.values[0]) - math.tanh(math.log((a + 1e-8) / (v + 1e-8)))) < 1e-6
    with pytest.raises(ValueError, match="position 0"):
        sayo_attention_reward(mass, cats, ent, torch.tensor([[True] + [False] * 7]))
    with pytest.raises(ValueError, match="rows must be one of"):
        sayo_attention_reward(mass, cats, ent, pos, rows="both")
    no_box = sayo_attention_reward(mass, torch.where(cats == 4, 3, cats), ent, pos)
    assert not no_box.defined[0] and float(no_box.values[0]) == 0.0


# ------------------------------------------------------------------------------------ text rewards
def test_format_reward_and_length_shaping():
    good = "<think>look at the left</think>\n<answer>B</answer>"
    assert format_reward([good, "B", "<answer>B</answer><think>x</think>", " " + good + "\n"]) == [1.0, 0.0, 0.0, 1.0]
    assert format_reward(["\\boxed{3}", "3"], pattern=r".*\\boxed\{.+\}.*") == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        format_reward([good], pattern="(")
    # off by default; with max_length 100 and buffer 20: 0 up to 80, linear to -1 at 100, -1 beyond
    assert length_penalty([10, 80, 90, 100, 130], 100, 20) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert format_reward([good, good], lengths=[50, 90], max_length=100, length_buffer=20) == [1.0, 0.5]
    with pytest.raises(ValueError, match="lengths="):
        format_reward([good], max_length=100)


def test_accuracy_reward_all_answer_types():
    comps = ["<think>..</think><answer>B</answer>", "The answer is 12.5", "No.", "the answer is red", "A"]
    answers = ["B", "12.5", "yes", "red", "C"]
    types = ["choice", "number", "yesno", "text", "choice"]
    assert accuracy_reward(comps, answers, types) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert accuracy_reward(["green"], ["B"], ["choice"], [{"A": "red", "B": "green"}]) == [1.0]
    with pytest.raises(ValueError, match="one answer"):
        accuracy_reward(comps, answers[:2], types)


def test_combine_rewards_weights_and_gating():
    comp = {"accuracy": torch.tensor([1.0, 0.0, 1.0]), "avar_visual": torch.tensor([2.0, 3.0, 0.5]),
            "format": torch.tensor([1.0, 1.0, 0.0])}
    w = {"accuracy": 1.0, "avar_visual": 0.3, "format": 0.1}
    torch.testing.assert_close(combine_rewards(comp, w), torch.tensor([1 + 0.6 + 0.1, 0.9 + 0.1, 1 + 0.15]))
    torch.testing.assert_close(combine_rewards(comp, w, gate_on="accuracy"), torch.tensor([1.7, 0.1, 1.15]))
    with pytest.raises(ValueError, match="weights name"):
        combine_rewards(comp, {"sayo": 1.0})
    with pytest.raises(ValueError, match="gate_on"):
        combine_rewards(comp, w, gate_on="correct")
