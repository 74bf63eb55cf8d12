"""GRPO (attn_mod.trainers.grpo): each named piece against float64 hand computations, the scoring forward
against eager per-sample log-probs, and short tiny runs (metrics, reference handling, direction)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attn_mod
from attn_mod.config import ConfigError
from attn_mod.trainers.config import load_train_config
from attn_mod.trainers.grpo import (Completions, GRPORecipe, GRPORollout, aggregate, attention_metrics,
                                    generate_completions, group_advantages, k3_kl, placeholder_token_ids,
                                    policy_loss, repeat_prompts, score_completions, token_logps_and_entropy)
from attn_mod.trainers.rewards import completion_mask
from objectives_ref import eager_outputs, ref_entropy, rollout_batch, target_mask, twin64
from train_helpers import make_data

ROOT = Path(__file__).resolve().parents[1]
TINY_GRPO = ROOT / "configs" / "train" / "tiny_grpo.yaml"


# ==================================================================================== pieces vs loops
@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(0, 2**31 - 1), st.booleans())
def test_group_advantages_match_loops(G, groups, seed, ties):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 2, (G * groups,), generator=g).double() if ties else torch.randn(G * groups, generator=g,
                                                                                         dtype=torch.float64)
    got = group_advantages(r, G)
    for k in range(groups):
        vals = [float(x) for x in r[k * G:(k + 1) * G]]
        mean = sum(vals) / G
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (G - 1))
        for i, v in enumerate(vals):
            assert abs(float(got[k * G + i]) - (v - mean) / (std + 1e-4)) < 1e-9
    with pytest.raises(ValueError, match="multiple of the group size"):
        group_advantages(r[:-1] if r.numel() > 1 else torch.zeros(3), G if r.numel() > 1 else 2)


@settings(max_examples=50, deadline=None)
@given(st.floats(-20, 0), st.floats(-20, 0))
def test_k3_kl_formula_and_nonnegative(lp, lr):
    got = float(k3_kl(torch.tensor(lp, dtype=torch.float64), torch.tensor(lr, dtype=torch.float64)))
    d = lr - lp
    assert abs(got - (math.exp(d) - d - 1)) <= 1e-9 * max(1.0, math.exp(d))
    assert got >= 0


def ref_policy_loss(logp, old, adv, mask, eps_low, eps_high, ref, beta, mode):
    """Loops over sequences and tokens (module docstring of grpo.py)."""
    N, T = logp.shape
    per_seq, total, count, clipped = [], 0.0, 0, 0
    for n in range(N):
        s, c = 0.0, 0
        for t in range(T):
            if not mask[n, t]:
                continue
            ratio = math.exp(float(logp[n, t]) - float(old[n, t]))
            a = float(adv[n])
            clip = min(max(ratio, 1 - eps_low), 1 + eps_high)
            l = -min(ratio * a, clip * a)
            if beta:
                d = float(ref[n, t]) - float(logp[n, t])
                l += beta * (math.exp(d) - d - 1)
            clipped += (ratio < 1 - eps_low and a < 0) or (ratio > 1 + eps_high and a > 0)
            s, c = s + l, c + 1
        total, count = total + s, count + c
        per_seq.append(s / max(c, 1))
    loss = total / count if mode == "token" else sum(per_seq) / N
    return loss, clipped / count


@pytest.mark.parametrize("mode", ["token", "sequence"])
@pytest.mark.parametrize("eps_high,beta", [(None, 0.0), (0.28, 0.0), (None, 0.04)])
def test_policy_loss_matches_loops_and_gradient(mode, eps_high, beta):
    N, T = 6, 7
    logp = (-torch.rand(N, T, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(N, T, dtype=torch.float64)  # ratios on both sides of the clip range
    ref = logp.detach() + 0.3 * torch.randn(N, T, dtype=torch.float64)
    adv = torch.randn(N, dtype=torch.float64)
    mask = torch.rand(N, T) < 0.7
    mask[:, 0] = True
    loss, clip_frac, kl = policy_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=eps_high, ref_logp=ref,
                                      beta=beta, aggregation=mode)
    want, want_clip = ref_policy_loss(logp.detach(), old, adv, mask, 0.2, eps_high or 0.2, ref, beta, mode)
    assert abs(float(loss.detach()) - want) < 1e-12 and abs(float(clip_frac) - want_clip) < 1e-12
    assert 0 < want_clip < 1
    assert (kl is None) == (beta == 0)
    # gradient: central differences of the loop reference, one entry per sequence
    loss.backward()
    for n in range(N):
        t = int(mask[n].nonzero()[0])
        h = 1e-6
        up, down = logp.detach().clone(), logp.detach().clone()
        up[n, t] += h
        down[n, t] -= h
        fd = (ref_policy_loss(up, old, adv, mask, 0.2, eps_high or 0.2, ref, beta, mode)[0]
              - ref_policy_loss(down, old, adv, mask, 0.2, eps_high or 0.2, ref, beta, mode)[0]) / (2 * h)
        assert abs(float(logp.grad[n, t]) - fd) < 1e-6
    assert not logp.grad[~mask].any()  # padding never gets a gradient


def test_aggregate_token_vs_sequence():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, True], [True, False, False]])
    assert float(aggregate(x, m, "token")) == pytest.approx(10 / 4)
    assert float(aggregate(x, m, "sequence")) == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(x, m, "batch")


def test_token_logps_and_entropy_match_loops():
    logits = torch.randn(2, 3, 11, dtype=torch.float64) * 3
    ids = torch.randint(0, 11, (2, 3))
    ids[0, 0] = 4
    for T, suppress in ((1.0, ()), (0.7, (2, 7))):
        lp, ent = token_logps_and_entropy(logits, ids, T, suppress)
        for n in range(2):
            for t in range(3):
                z = [float(v) / T for v in logits[n, t]]
                allowed = [v for v in range(11) if v not in suppress]
                mx = max(z[v] for v in allowed)
                lse = mx + math.log(sum(math.exp(z[v] - mx) for v in allowed))
                want = z[int(ids[n, t])] - lse if int(ids[n, t]) in allowed else -math.inf
                assert float(lp[n, t]) == pytest.approx(want, abs=1e-10) or (want == -math.inf and lp[n, t] == -math.inf)
                p = [math.exp(z[v] - lse) for v in allowed]
                assert float(ent[n, t]) == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-10)
    lp, ent = token_logps_and_entropy(logits[:1, :1], ids[:1, :1], 1.0)
    assert float(ent) == pytest.approx(ref_entropy(logits[0, 0]), abs=1e-10)


# ============================================================================ scoring on a tiny model
SPECS = [("What color is the square?", "You are a helpful assistant.", (130, 90), None),
         ("How many objects are there in the picture?", None, (60, 60), None)]


def test_score_completions_one_forward_matches_eager_logps():
    """An 'external engine' hands over completions; the scorer's old log-probs / entropies are those of the
    decision rows (p_t - 1), computed in ONE forward of the patched policy."""
    model, eager, proc = twin64("qwen3_vl")
    batch, comp, P = rollout_batch(proc, SPECS, ["The answer is A.", "There are 3 red circles"], max_new=8)
    eos, pad = proc.tokenizer.convert_tokens_to_ids("<|im_end|>"), proc.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    prompt_inputs = {k: (v[:, :P] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                     for k, v in batch.items()}
    target = target_mask(batch, [0.5, 0.5])[:, :P]
    valid = completion_mask(comp, eos, pad)
    c = Completions(prompt_inputs, target, comp, valid, ["", ""], [None, None], 2)
    handle = attn_mod.patch(model, proc, backend="torch")
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    s = score_completions(model, handle, c, temperature=0.8, suppress=placeholder_token_ids(model.config))
    hook.remove()
    assert len(calls) == 1 and s.ref_logps is None
    with torch.no_grad():
        _, logits = eager_outputs(eager, proc, batch)
    sup = placeholder_token_ids(model.config)
    assert len(sup) == 4
    for n in range(2):
        for t in range(comp.shape[1]):
            if not valid[n, t]:
                continue
            row = logits[n, P + t - 1].clone() / 0.8
            row[sup] = -math.inf
            want = float(row[comp[n, t]] - torch.logsumexp(row, 0))
            assert abs(float(s.old_logps[n, t]) - want) < 1e-6
            assert abs(float(s.row_entropy[n, P + t - 1]) - float(s.entropy[n, t])) == 0
    assert s.positions[:, P:].equal(valid) and not s.positions[:, :P].any()
    assert s.masses.shape[:2] == (2, 2) and s.masses.shape[3] == batch["input_ids"].shape[1]
    m = attention_metrics(s)
    assert m["target_attention"] > 0 and math.isfinite(m["vas"])
    handle.remove()


def test_generate_completions_left_padding_and_suppression(tmp_path):
    cfg = load_train_config(TINY_GRPO, [f"data.train={make_data(tmp_path / 'd', 3)}", f"output_dir={tmp_path / 'o'}"])
    r = GRPORecipe(cfg)
    r.setup()
    items = [r.dataset[i] for i in range(2)]
    prompts, samples = repeat_prompts(r.collator, items, 3)
    assert [s.id for s in samples] == ["s0"] * 3 + ["s1"] * 3
    torch.manual_seed(0)
    c = generate_completions(r.model, prompts, samples, r.tokenizer, GRPORollout(group_size=3, max_completion_length=9,
                                                                                temperature=5.0), handle=r.handle,
                             suppress=r.suppress)
    assert c.completion_ids.shape == (6, 9) and c.completion_mask.dtype == torch.bool
    assert not torch.isin(c.completion_ids, torch.tensor(r.suppress)).any()
    am = prompts.model_inputs["attention_mask"].clone()
    am[0, -1] = 0  # a right-padded prompt
    right = type(prompts)({**prompts.model_inputs, "attention_mask": am}, prompts.labels, None, prompts.ids)
    with pytest.raises(ValueError, match="left-padded"):
        generate_completions(r.model, right, samples, r.tokenizer, GRPORollout())
    r.cleanup()


# ================================================================================== recipe runs
def _cfg(tmp_path, *overrides, n=4):
    data = make_data(tmp_path / "data", n)
    return load_train_config(TINY_GRPO, [f"data.train={data}", f"output_dir={tmp_path / 'out'}", *overrides])


def test_grpo_run_metrics_and_reward_components(tmp_path):
    cfg = _cfg(tmp_path, "objective.rewards={sayo: 1.0, avar_visual: 0.3, format: 0.1}", "schedule.max_steps=2",
               "data.shuffle=false")
    from attn_mod.trainers.loop import run

    rows = run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    keys = ["step", "loss", "reward", "reward/sayo", "reward/avar_visual", "reward/format", "kl", "entropy",
            "completion_length", "clip_frac", "vas", "target_attention", "lr"]
    assert list(lines[0])[:len(keys)] == keys
    for row in lines:
        assert row["kl"] is None  # beta = 0: no reference model, no KL
        assert row["reward"] == pytest.approx(row["reward/sayo"] + 0.3 * row["reward/avar_visual"]
                                              + 0.1 * row["reward/format"], abs=1e-5)
        assert 0 < row["completion_length"] <= 8 and row["entropy"] > 0 and row["target_attention"] > 0
        assert row["clip_frac"] == 0.0  # one policy update per rollout batch: ratio == 1
        # Qwen2.5-VL's template adds a default system turn to every prompt: r_vis is always defined
        assert row["reward_undefined/avar_visual"] == 0
    # step 1: s0, s1 (images with boxes); step 2: s2 (box), s3 (no image, so no box: r_v undefined x G)
    assert [row["reward_undefined/sayo"] for row in lines] == [0, 4]
    assert rows[0]["step"] == 1


def test_num_iterations_reuse_rollouts_and_clip(tmp_path):
    cfg = _cfg(tmp_path, "objective.num_iterations=2", "schedule.max_steps=2", "optim.lr=5e-2",
               "checkpoint.save_final=false")
    r = GRPORecipe(cfg)
    r.setup()
    made = []
    orig = r.make_rollout
    r.make_rollout = lambda *a: made.append(a) or orig(*a)
    rows = r.train()
    r.cleanup()
    assert made == [(1, 0)]  # one rollout batch for two policy updates
    assert rows[0]["reward"] == rows[1]["reward"]
    assert rows[0]["clip_frac"] == 0.0 and rows[1]["clip_frac"] > 0  # the second update moves off the old policy


def test_reference_model_only_with_kl_and_lora_reference_is_disabled_adapter(tmp_path):
    r = GRPORecipe(_cfg(tmp_path / "a"))
    r.setup()
    assert r.reference_model is None
    r.cleanup()
    cfg = _cfg(tmp_path / "b", "objective.beta=0.04", "lora.enabled=true", "schedule.max_steps=1",
               "checkpoint.save_final=false")
    r = GRPORecipe(cfg)
    r.setup()
    assert r.reference_model is None and r.peft_model is not None
    ro = r.make_rollout(1, 0)
    # LoRA starts at B = 0: the disabled adapter equals the policy, so old and reference log-probs coincide
    torch.testing.assert_close(ro.scores.ref_logps, ro.scores.old_logps, atol=1e-5, rtol=0)
    rows = r.train()
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    r.cleanup()
    cfg = _cfg(tmp_path / "c", "objective.beta=0.04", "schedule.max_steps=1", "checkpoint.save_final=false")
    r = GRPORecipe(cfg)
    r.setup()
    assert r.reference_model is not None and not any(p.requires_grad for p in r.reference_model.parameters())
    r.cleanup()


@pytest.mark.parametrize("override,match", [
    ("data.padding_side=right", "padding_side: left"),
    ("objective.rewards={sayo: 1.0, attention: 1.0}", "unknown reward 'attention'"),
    ("rollout.group_size=1", "group_size must be >= 2"),
    ("objective.gate_on=accuracy", "gate_on='accuracy' must be one of the rewards"),
    ("objective.num_iterations=2", "multiple of objective.num_iterations"),
])
def test_bad_grpo_configs_fail_before_loading(tmp_path, override, match):
    extra = ["checkpoint.every=3"] if "num_iterations" in override else []
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, override, *extra)


def _sampled_target_attention(r, seed: int = 123, group: int = 16) -> float:
    """Mean SAYO target attention score of completions sampled (fixed seed) for every prompt of the data."""
    torch.manual_seed(seed)
    items = [r.dataset[i] for i in range(len(r.dataset))]
    prompts, samples = repeat_prompts(r.collator, items, group)
    c = generate_completions(r.model, prompts, samples, r.tokenizer, r.cfg.rollout, handle=r.handle,
                             suppress=r.suppress)
    s = score_completions(r.model, r.handle, c, temperature=r.cfg.rollout.temperature, suppress=r.suppress)
    return attention_metrics(s, r.cfg.objective.sayo.rows)["target_attention"]


def _sayo_only_run(tmp_path, weight: float):
    cfg = _cfg(tmp_path, f"objective.rewards={{sayo: {weight}}}", "rollout.group_size=16",
               "rollout.max_completion_length=4", "optim.lr=3e-3", "schedule.max_steps=4", "checkpoint.save_final=false",
               n=2)
    r = GRPORecipe(cfg)
    r.setup()
    before = _sampled_target_attention(r)
    rows = r.train()
    after = _sampled_target_attention(r)
    r.cleanup()
    return before, after, rows


@pytest.mark.slow
def test_sayo_reward_alone_raises_target_attention(tmp_path):
    """Direction check (acceptance): a few GRPO steps with only the SAYO reward (fixed seeds, tiny data with
    boxes) raise the target attention of sampled completions; the same run with the reward negated (the control
    for drift that any update causes) ends clearly lower."""
    before, after, rows = _sayo_only_run(tmp_path / "pos", 1.0)
    before_neg, after_neg, rows_neg = _sayo_only_run(tmp_path / "neg", -1.0)
    assert before == before_neg
    assert after > before + 0.05, (before, after)
    assert after > after_neg + 0.05, (after, after_neg)
    assert rows[-1]["reward/sayo"] > rows[0]["reward/sayo"] and rows_neg[-1]["reward/sayo"] < rows[0]["reward/sayo"]


@pytest.mark.parametrize("name", ["sayo_grpo", "avar_grpo"])
def test_recipe_configs_validate_with_paper_numbers(name):
    cfg = load_train_config(ROOT / "configs" / "train" / f"{name}.yaml")
    ro, obj = cfg.rollout, cfg.objective
    if name == "sayo_grpo":
        assert (obj.beta, ro.group_size, ro.temperature, ro.top_p, ro.max_completion_length) == (1e-3, 16, 1.0, 0.9, 110)
        assert (cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha, cfg.optim.lr) == (True, 16, 32, 5e-6)
        assert obj.rewards == {"sayo": 1.0, "format": 1.0} and obj.sayo.top_frac == 0.3
    else:
        assert (obj.beta, ro.temperature, ro.group_size) == (0.0, 0.8, 8)
        assert obj.rewards == {"accuracy": 1.0, "avar_visual": 0.3, "format": 0.1}


@pytest.mark.slow
def test_crash_and_resume_matches_uninterrupted(tmp_path):
    """Rollouts are regenerated after a resume from the restored RNG, data position and weights: the resumed run
    writes the same metrics and final weights as an uninterrupted one."""
    from safetensors.torch import load_file

    from attn_mod.jsonl import read_jsonl

    common = ["schedule.max_steps=3", "checkpoint.every=1", "rollout.group_size=2", "rollout.max_completion_length=4",
              "optim.lr=1e-2"]
    data = make_data(tmp_path / "data", 6)

    def recipe(out, resume=False):
        cfg = load_train_config(TINY_GRPO, [f"data.train={data}", f"output_dir={out}", *common])
        r = GRPORecipe(cfg, resume=resume)
        r.setup()
        return r

    r = recipe(tmp_path / "a")
    r.train()
    r.cleanup()
    r = recipe(tmp_path / "b")
    orig = r.make_rollout

    def crash(index, micro):
        if index == 3:
            raise KeyboardInterrupt("simulated crash in step 3")
        return orig(index, micro)

    r.make_rollout = crash
    with pytest.raises(KeyboardInterrupt):
        r.train()
    r.cleanup()
    assert len(read_jsonl(tmp_path / "b" / "metrics.jsonl")) == 2
    r = recipe(tmp_path / "b", resume=True)
    assert r.start_step == 2
    r.train()
    r.cleanup()
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7) if ra[k] is not None else rb[k] is None, k
    wa, wb = load_file(tmp_path / "a" / "final" / "model.safetensors"), load_file(tmp_path / "b" / "final" /
                                                                                 "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0)


def test_compute_rewards_text_components_and_gating():
    """accuracy / format (with length shaping) through compute_rewards, then the gated weighted total."""
    from types import SimpleNamespace

    from attn_mod.trainers.grpo import GRPOObjective, Scores, compute_rewards
    from attn_mod.trainers.rewards import combine_rewards

    texts = ["<think>red</think><answer>A</answer>", "<think>x</think><answer>B</answer>", "B", "12"]
    samples = [SimpleNamespace(id=f"s{i}", answer=a, answer_type=t, options=o) for i, (a, t, o) in
               enumerate([("A", "choice", {"A": "red", "B": "blue"}), ("A", "choice", None), ("B", "choice", None),
                          ("12", "number", None)])]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    c = Completions({}, None, torch.zeros(4, 4, dtype=torch.long), mask, texts, samples, 2)
    s = Scores(None, None, None, torch.zeros(1, 4, 1, 4, 8), torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.bool),
               torch.zeros(4, 4))
    obj = GRPOObjective(rewards={"accuracy": 1.0, "format": 0.5})
    obj.format.max_length, obj.format.length_buffer = 4, 2  # 0 up to 2 tokens, -0.5 at 3, -1 at 4
    parts = compute_rewards(c, s, obj, num_layers=1)
    assert parts["accuracy"].values.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert parts["format"].values.tolist() == [1.0 - 0.5, 1.0 - 1.0, 0.0, 0.0]
    values = {k: v.values for k, v in parts.items()}
    values["sayo"] = torch.tensor([0.5, 0.5, -0.5, 0.25])
    total = combine_rewards(values, {"accuracy": 1.0, "sayo": 1.0, "format": 0.5}, gate_on="accuracy",
                            attention=("sayo",))
    torch.testing.assert_close(total, torch.tensor([1 + 0.5 + 0.25, 0.0, 1 - 0.5, 1 + 0.25]))
    samples[1].answer = None
    with pytest.raises(ValueError, match="has no 'answer'"):
        compute_rewards(c, s, obj, num_layers=1)
