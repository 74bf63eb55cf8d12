"""TRL plugin (attn_mod/trainers/trl.py): reward values against an independent eager float64 computation, real
GRPOTrainer / SFTTrainer runs of 2 steps whose logged values equal attn-mod's own functions, refusals before the
first step, and the import guard."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch

import attn_mod
from attn_mod.tiny import QWEN3_VL_TEMPLATE, build_tiny
from helpers import random_image, tok_id

trl = pytest.importorskip("trl")  # the [train] extra; installed in CI
datasets = pytest.importorskip("datasets")

from attn_mod.trainers import rewards as R  # noqa: E402
from attn_mod.trainers.losses import agto_losses, agto_rows, sft_objective  # noqa: E402
from attn_mod.trainers.trl import (AttentionSFTTrainer, AvarVisualReward, SayoAttentionReward,  # noqa: E402
                                   accuracy, build_completion_batch, policy_module)

SYSTEM_TEXT = "You are a helpful assistant."
SPECIAL = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|endoftext|>")


def _prompt(image, question="What color is the square?", system=True):
    msgs = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_TEXT}]}] if system else []
    return msgs + [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def _random_completions(processor, lengths, generator, eos_at=()):
    """Random non-special token ids; rows in `eos_at` end with <|im_end|>."""
    tok = processor.tokenizer
    banned = {tok_id(processor, t) for t in SPECIAL} | {tok_id(processor, "<|im_end|>")}
    allowed = torch.tensor([i for i in range(len(tok)) if i not in banned])
    out = []
    for b, n in enumerate(lengths):
        ids = allowed[torch.randint(len(allowed), (n,), generator=generator)].tolist()
        if b in eos_at:
            ids[-1] = tok_id(processor, "<|im_end|>")
        out.append(ids)
    return out


# ------------------------------------------------------------------------------- independent float64 reference


def _ref_sequence(processor, prompt, completion, template=None):
    """One unpadded teacher-forced sequence, built directly with the processor (no attn-mod code)."""
    text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False,
                                         **({"chat_template": template} if template else {}))
    image = [p["image"] for m in prompt for p in m["content"] if p["type"] == "image"]
    enc = processor(text=[text], images=image, return_tensors="pt")
    P = enc["input_ids"].shape[1]
    comp = torch.tensor([completion])
    inputs = {"input_ids": torch.cat([enc["input_ids"], comp], 1),
              "attention_mask": torch.ones(1, P + comp.shape[1], dtype=torch.long),
              "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(comp)], 1),
              "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
    return inputs, P, image[0]


def _ref_categories(processor, ids, grid, image, box):
    """Categories written out from the token ids: 1 system turn, 3 image, 4 image token whose 28x28 cell (mapped
    to original pixels) overlaps the box with positive area, 2 other prompt tokens (completion rows are never
    used as keys of a category that matters here)."""
    ids = ids.tolist()
    cats = [2] * len(ids)
    start, end = tok_id(processor, "<|im_start|>"), tok_id(processor, "<|im_end|>")
    sys_header = processor.tokenizer.encode("system\n", add_special_tokens=False)
    if ids[0] == start and ids[1:1 + len(sys_header)] == sys_header:
        j = ids.index(end)
        cats[:j + 1] = [1] * (j + 1)
    img_pos = [i for i, t in enumerate(ids) if t == tok_id(processor, "<|image_pad|>")]
    _, gh, gw = grid.tolist()
    cols = gw // 2
    rh, rw = gh * 14, gw * 14
    sx, sy = image.width / rw, image.height / rh
    for n, pos in enumerate(img_pos):
        cats[pos] = 3
        if box is not None:
            r, c = divmod(n, cols)
            x0, y0, x1, y1 = c * 28 * sx, r * 28 * sy, (c + 1) * 28 * sx, (r + 1) * 28 * sy
            if min(x1, box[2]) - max(x0, box[0]) > 0 and min(y1, box[3]) - max(y0, box[1]) > 0:
                cats[pos] = 4
    return torch.tensor(cats)


def _ref_rewards(eager64, processor, prompt, completion, box, *, temperature, eos, template=None, top_frac=0.3):
    """(SAYO r_v, AVAR r_vis) of one completion from eager float64 attention probabilities and logits."""
    inputs, P, image = _ref_sequence(processor, prompt, completion, template)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        out = eager64(**inputs, output_attentions=True, use_cache=False)
    ids = inputs["input_ids"][0]
    cats = _ref_categories(processor, ids, inputs["image_grid_thw"][0], image, box)
    S = ids.shape[0]
    L_valid = len(completion)
    for t, tok in enumerate(completion):
        if tok in eos:
            L_valid = t + 1
            break
    pos = [P + t for t in range(L_valid)]
    onehot = torch.nn.functional.one_hot(cats, 8).double()  # (S, C)
    masses = [att[0].double() @ onehot for att in out.attentions]  # L x (H, S, C)
    counts = onehot.cumsum(0)  # keys visible to row i (causal)
    # SAYO: last layer, decision rows p_t - 1, top 30 % by entropy of the decision row
    logp = torch.log_softmax(out.logits[0].double() / temperature, -1)
    H = -(logp.exp() * logp).sum(-1)  # (S,)
    k = max(1, math.floor(top_frac * L_valid))
    order = sorted(range(L_valid), key=lambda t: (-float(H[pos[t] - 1]), t))[:k]
    rows = [pos[t] - 1 for t in order]
    last = masses[-1].mean(0)  # (S, C) mean over heads
    if (cats == 4).any():
        a = [last[i, 4] / counts[i, 4] for i in rows]
        v = [(last[i, 3] + last[i, 4]) / (counts[i, 3] + counts[i, 4]) for i in rows]
        a_q, v_q = sum(a) / len(a), sum(v) / len(v)
        sayo = math.tanh(math.log((a_q + 1e-8) / (v_q + 1e-8)))
    else:
        sayo = 0.0
    # AVAR: all layers, all heads, emitted rows of the completion tokens
    if (cats == 1).any():
        img = torch.stack([m[:, pos, 3] + m[:, pos, 4] for m in masses]).mean()
        sys_ = torch.stack([m[:, pos, 1] for m in masses]).mean()
        avar = float(img / (sys_ + 1e-6))
    else:
        avar = 0.0
    return sayo, avar


def _twins(seed=0):
    model, processor = build_tiny("qwen2_5_vl", seed=seed)
    eager64, _ = build_tiny("qwen2_5_vl", seed=seed, attn_implementation="eager", dtype=torch.float64)
    eager64.load_state_dict(model.state_dict())
    return model, eager64, processor


def test_rewards_equal_independent_eager_float64():
    model, eager64, processor = _twins()
    attn_mod.patch(model, processor)
    g = torch.Generator().manual_seed(7)
    images = [random_image(56, 84, 1), random_image(84, 56, 2), random_image(56, 56, 3), random_image(84, 84, 4)]
    prompts = [_prompt(images[0]), _prompt(images[1]), _prompt(images[2]), _prompt(images[3], system=False)]
    completions = _random_completions(processor, [7, 4, 9, 6], g, eos_at=(1,))
    completions[2][5] = tok_id(processor, "<|im_end|>")  # EOS inside: later tokens are not valid
    boxes = [[[0, 0, 28, 28]], [[30.5, 0, 84, 40]], None, [[10, 10, 50, 50]]]
    eos = {tok_id(processor, "<|im_end|>")}
    logged = {}
    sayo = SayoAttentionReward(model, processor, micro_batch_size=3, temperature=0.7,
                               chat_template_kwargs={"chat_template": QWEN3_VL_TEMPLATE})
    avar = AvarVisualReward(model, processor, micro_batch_size=2,
                            chat_template_kwargs={"chat_template": QWEN3_VL_TEMPLATE})
    got_sayo = sayo(prompts=prompts, completions=None, completion_ids=completions, boxes=boxes,
                    log_metric=logged.__setitem__)
    got_avar = avar(prompts=prompts, completions=None, completion_ids=completions, boxes=boxes,
                    log_metric=logged.__setitem__)
    want = [_ref_rewards(eager64, processor, p, c, None if b is None else b[0], temperature=0.7, eos=eos,
                         template=QWEN3_VL_TEMPLATE) for p, c, b in zip(prompts, completions, boxes)]
    assert got_sayo == pytest.approx([w[0] for w in want], rel=1e-4, abs=1e-5)
    assert got_avar == pytest.approx([w[1] for w in want], rel=1e-4, abs=1e-5)
    assert got_sayo[2] == 0.0 and got_avar[3] == 0.0  # no box / no system turn
    assert all(w != 0 for w in [want[0][0], want[1][0], want[3][0], want[0][1], want[1][1], want[2][1]])
    assert logged["sayo_attention/undefined"] == 1.0 and logged["avar_visual/undefined"] == 1.0
    assert math.isfinite(logged["sayo_attention/vas"]) and math.isfinite(logged["sayo_attention/target_attention"])


def test_policy_module_unwraps_data_parallel_and_compile():
    model, processor = build_tiny("qwen2_5_vl")
    assert policy_module(torch.nn.DataParallel(model)) is model  # DDP / FSDP / DataParallel share `.module`
    attn_mod.patch(model, processor)
    assert policy_module(torch.nn.DataParallel(model)) is model
    compiled = torch.compile(model)  # not run: only the wrapper
    assert policy_module(compiled) is model


def test_reward_through_peft_wrapper_uses_patched_base():
    peft = pytest.importorskip("peft")
    model, processor = build_tiny("qwen2_5_vl")
    attn_mod.patch(model, processor)
    g = torch.Generator().manual_seed(3)
    prompts = [_prompt(random_image(56, 84, 1)), _prompt(random_image(84, 56, 2))]
    comps = _random_completions(processor, [5, 3], g)
    boxes = [[[0, 0, 40, 40]], [[0, 0, 84, 28]]]
    plain = SayoAttentionReward(model, processor)(prompts=prompts, completion_ids=comps, boxes=boxes)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    wrapped = peft.get_peft_model(model, cfg)
    assert policy_module(wrapped) is model
    got = SayoAttentionReward(wrapped, processor)(prompts=prompts, completion_ids=comps, boxes=boxes)
    assert got == pytest.approx(plain, rel=1e-5, abs=1e-6)  # LoRA B = 0: same policy, through the wrapper


# ------------------------------------------------------------------------------- real GRPOTrainer run


class _RecordingSayo(SayoAttentionReward):
    """Keeps, per call, the policy weights and the exact inputs TRL passed, and the returned values."""

    calls: list

    def __call__(self, prompts, completions=None, completion_ids=None, **kwargs):
        values = super().__call__(prompts, completions, completion_ids, **kwargs)
        state = {k: v.detach().clone() for k, v in policy_module(self.model).state_dict().items()}
        self.calls.append(dict(state=state, prompts=copy.deepcopy(prompts), completions=completions,
                               completion_ids=[list(c) for c in completion_ids], boxes=kwargs.get("boxes"),
                               answer=kwargs.get("answer"), step=kwargs["trainer_state"].global_step, values=values))
        return values


def _own_sayo(state_dict, processor, prompt, completion, boxes, temperature):
    """attn-mod's own path for one completion: public patch / set_target / capture API, full-logit entropy."""
    model, _ = build_tiny("qwen2_5_vl")
    model.load_state_dict(state_dict)
    handle = attn_mod.patch(model, processor)
    inputs, P, image = _ref_sequence(processor, prompt, completion)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, P:] = inputs["input_ids"][:, P:]
    handle.set_target(boxes=[[(0, b) for b in boxes or []]], images=[image])
    with torch.no_grad(), attn_mod.capture(model) as rec:
        out = model(**inputs, labels=labels, use_cache=False)
    ent = attn_mod.metrics.token_entropy(out.logits, temperature)
    valid = R.completion_mask(torch.tensor([completion]), tok_id(processor, "<|im_end|>"))
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, P:] = valid
    return float(R.sayo_attention_reward(rec.mass(-1), rec.categories, ent, pos).values[0])


def _own_avar(state_dict, processor, prompt, completion):
    """attn-mod's own AVAR r_vis for one completion: all layers, rows of the completion tokens."""
    model, _ = build_tiny("qwen2_5_vl")
    model.load_state_dict(state_dict)
    attn_mod.patch(model, processor)
    inputs, P, _ = _ref_sequence(processor, prompt, completion)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, P:] = inputs["input_ids"][:, P:]
    with torch.no_grad(), attn_mod.capture(model) as rec:
        model(**inputs, labels=labels, use_cache=False)
    pos = labels != -100
    pos[:, P:] &= R.completion_mask(torch.tensor([completion]), tok_id(processor, "<|im_end|>"))
    return float(R.avar_visual_reward(rec.masses(), pos, key_cats=rec.categories).values[0])


def _vlm_dataset(n_rows=2):
    images = [random_image(56, 84, 11), random_image(84, 56, 12)][:n_rows]
    return datasets.Dataset.from_dict({
        "prompt": [[{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": "What color is it?"}]]
        * n_rows,
        "image": images,
        "boxes": [[[0.0, 0.0, 28.0, 42.0]], None][:n_rows],
        "answer": ["A", "B"][:n_rows],
        "answer_type": ["choice", "choice"][:n_rows],
    })


@pytest.mark.slow
def test_grpo_trainer_two_steps_logs_attn_mod_rewards(tmp_path):
    model, processor = build_tiny("qwen2_5_vl")
    attn_mod.patch(model, processor)
    reward = _RecordingSayo(model, processor, temperature=0.9, micro_batch_size=3)
    reward.calls = []
    suppress = [tok_id(processor, t) for t in SPECIAL]
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=5, temperature=0.9, max_steps=2, logging_steps=1, learning_rate=1e-2,
                          report_to=[], bf16=False, use_cpu=True, save_strategy="no", seed=0,
                          generation_kwargs={"suppress_tokens": suppress})
    avar = AvarVisualReward(model, processor)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward, accuracy, avar], args=args,
                              train_dataset=_vlm_dataset(), processing_class=processor)
    generated = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        out = original(inputs)
        generated.append({k: out[k].clone() for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")})
        return out

    trainer._generate_and_score_completions = spy
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/sayo_attention/mean" in h]
    assert len(logs) == 2 and len(reward.calls) == 2
    assert not torch.equal(reward.calls[0]["state"]["lm_head.weight"], reward.calls[1]["state"]["lm_head.weight"])
    for log, call, gen in zip(logs, reward.calls, generated):
        # the teacher-forced sequence is exactly what TRL generated from and sampled
        batch = build_completion_batch(processor, call["prompts"], call["completion_ids"],
                                       pad_token_id=processor.tokenizer.pad_token_id)
        for b in range(len(call["prompts"])):
            trl_seq = torch.cat([gen["prompt_ids"][b][gen["prompt_mask"][b].bool()],
                                 gen["completion_ids"][b][gen["completion_mask"][b].bool()]])
            ours = batch["input_ids"][b][batch["attention_mask"][b].bool()]
            assert torch.equal(trl_seq.cpu(), ours)
        own = [_own_sayo(call["state"], processor, p, c, b, 0.9)
               for p, c, b in zip(call["prompts"], call["completion_ids"], call["boxes"])]
        assert call["values"] == pytest.approx(own, rel=1e-4, abs=1e-6)
        assert log["rewards/sayo_attention/mean"] == pytest.approx(sum(own) / len(own), rel=1e-4, abs=1e-6)
        own_avar = [_own_avar(call["state"], processor, p, c) for p, c in zip(call["prompts"], call["completion_ids"])]
        assert log["rewards/avar_visual/mean"] == pytest.approx(sum(own_avar) / len(own_avar), rel=1e-4)
        assert log["avar_visual/undefined"] == 0 and all(v > 0 for v in own_avar)
        texts = [c[0]["content"] for c in call["completions"]]
        acc = R.accuracy_reward(texts, call["answer"], ["choice"] * len(texts))
        assert log["rewards/accuracy/mean"] == pytest.approx(sum(acc) / len(acc))
        n_without_box = sum(b is None for b in call["boxes"])
        assert n_without_box > 0 and log["sayo_attention/undefined"] == n_without_box
        assert all(v == 0.0 for v, b in zip(own, call["boxes"]) if b is None)
        assert any(v != 0.0 for v, b in zip(own, call["boxes"]) if b is not None)
        assert math.isfinite(log["sayo_attention/vas"]) and math.isfinite(log["sayo_attention/target_attention"])


# ------------------------------------------------------------------------------- real SFTTrainer run


def _sft_dataset():
    images = [random_image(56, 84, 21), random_image(84, 56, 22), random_image(56, 56, 23), random_image(84, 84, 24)]
    return datasets.Dataset.from_dict({
        "prompt": [[{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": q}]
                   for q in ("What color is the square?", "How many objects?", "Which option?", "Describe it.")],
        "completion": [[{"role": "assistant", "content": a}] for a in ("The answer is A.", "There are 3 red circles.",
                                                                       "B", "a blue square on the left")],
        "image": images,
    })


class _RecordingSFT(AttentionSFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        state = {k: v.detach().clone() for k, v in policy_module(model).state_dict().items()}
        self.recorded.append((state, {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                                      for k, v in inputs.items()}))
        self.items.append(num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _own_sft(state_dict, processor, inputs):
    """attn-mod's own SFT pieces on one batch: summed next-token CE and its token count, agto_losses on masses."""
    model, _ = build_tiny("qwen2_5_vl")
    model.load_state_dict(state_dict)
    attn_mod.patch(model, processor)
    inputs = {k: v for k, v in inputs.items() if k != "use_cache"}
    labels = inputs.pop("labels")
    with torch.no_grad(), attn_mod.capture(model) as rec:
        out = model(**inputs, labels=labels, use_cache=False)
    rows = agto_rows(rec.query_categories(), labels)
    agto = agto_losses(rec.masses(), rec.categories, rows)
    shift = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).double(), shift.flatten(),
                                           ignore_index=-100, reduction="sum")
    return float(ce), int((shift != -100).sum()), agto


def _sft_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                learning_rate=1e-2, report_to=[], bf16=False, use_cpu=True, save_strategy="no", seed=0, max_length=None)
    return trl.SFTConfig(**{**base, **kw})


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sft_trainer_two_steps_logs_attn_mod_losses(tmp_path, accumulation):
    """Logged loss = L_LM over the step's tokens + 0.15 (L_img + L_sys) averaged over its micro-batches."""
    model, processor = build_tiny("qwen2_5_vl")
    model.train()
    attn_mod.patch(model, processor)
    args = _sft_args(tmp_path, per_device_train_batch_size=2 // accumulation, gradient_accumulation_steps=accumulation)
    trainer = _RecordingSFT(model=model, args=args, train_dataset=_sft_dataset(),
                            processing_class=processor)  # gradient checkpointing on (TRL's default)
    trainer.recorded, trainer.items = [], []
    assert trainer.args.gradient_checkpointing
    trainer.train()
    logs = [h for h in trainer.state.log_history if "attn/loss_img" in h]
    assert len(logs) == 2 and len(trainer.recorded) == 2 * accumulation
    assert not torch.equal(trainer.recorded[0][0]["lm_head.weight"], trainer.recorded[-1][0]["lm_head.weight"])
    for step, log in enumerate(logs):
        own = [_own_sft(state, processor, inputs)
               for state, inputs in trainer.recorded[step * accumulation:(step + 1) * accumulation]]
        for _, _, agto in own:
            assert agto.samples_img == agto.samples_sys == 2 // accumulation
            assert float(agto.loss_img) > 0 and float(agto.loss_sys) < 0
        l_img = sum(float(a.loss_img) for _, _, a in own) / accumulation
        l_sys = sum(float(a.loss_sys) for _, _, a in own) / accumulation
        if trainer.items[step * accumulation] is None:  # Trainer averages the micro-batch losses
            lm = sum(ce / n for ce, n, _ in own) / accumulation
        else:  # TRL normalises by the tokens of the whole accumulated batch
            lm = sum(ce for ce, _, _ in own) / sum(n for _, n, _ in own)
        assert log["attn/loss_img"] == pytest.approx(l_img, rel=1e-4)
        assert log["attn/loss_sys"] == pytest.approx(l_sys, rel=1e-4)
        assert log["loss"] == pytest.approx(lm + 0.15 * l_img + 0.15 * l_sys, rel=1e-4)
        one = own[0][2]
        assert float(sft_objective(torch.tensor(lm), one)) == pytest.approx(
            lm + 0.15 * float(one.loss_img) + 0.15 * float(one.loss_sys))


def test_sft_trainer_with_peft_trains_lora_through_the_patched_base(tmp_path):
    peft = pytest.importorskip("peft")
    model, processor = build_tiny("qwen2_5_vl")
    model.train()
    attn_mod.patch(model, processor)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=True)
    trainer = AttentionSFTTrainer(model=model, args=_sft_args(tmp_path, gradient_checkpointing=False),
                                  train_dataset=_sft_dataset(), processing_class=processor, peft_config=cfg)
    assert type(trainer.model).__name__.startswith("Peft") and policy_module(trainer.model) is model
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "attn/loss_img" in h]
    assert len(logs) == 2 and all(math.isfinite(h["attn/loss_img"]) and math.isfinite(h["attn/loss_sys"])
                                  for h in logs)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(lora[n], after[n].detach()) for n in lora)


def test_unpatched_policy_is_patched_on_first_call_and_said_so(caplog):
    model, processor = build_tiny("qwen2_5_vl")
    twin, _ = build_tiny("qwen2_5_vl")
    attn_mod.patch(twin, processor)
    g = torch.Generator().manual_seed(5)
    prompts = [_prompt(random_image(56, 84, 1))]
    comps = _random_completions(processor, [4], g)
    reward = SayoAttentionReward(model, processor)
    assert policy_module(model) is model
    with caplog.at_level("WARNING", logger="attn_mod.trainers.trl"):
        got = reward(prompts=prompts, completion_ids=comps, boxes=[[[0, 0, 28, 28]]])
    assert "patched it now with the identity intervention" in caplog.text
    from attn_mod.patch import patch_state

    assert patch_state(model) is not None
    assert got == pytest.approx(SayoAttentionReward(twin, processor)(prompts=prompts, completion_ids=comps,
                                                                     boxes=[[[0, 0, 28, 28]]]), rel=1e-5)


def test_sft_attention_terms_reach_the_gradient(tmp_path):
    """The returned loss carries d(lambda L_img + lambda L_sys)/dtheta: gradients differ from lambda = 0 exactly by
    the gradient of the AGTO terms computed on their own."""
    model, processor = build_tiny("qwen2_5_vl")
    model.train()
    attn_mod.patch(model, processor)
    kw = dict(model=model, args=_sft_args(tmp_path, gradient_checkpointing=False), train_dataset=_sft_dataset(),
              processing_class=processor)
    with_terms, without = AttentionSFTTrainer(**kw), AttentionSFTTrainer(lambda_img=0.0, lambda_sys=0.0, **kw)
    batch = with_terms.data_collator([_sft_dataset()[i] for i in range(2)])
    param = policy_module(model).model.language_model.layers[0].self_attn.q_proj.weight

    def grad(trainer):
        model.zero_grad()
        trainer.compute_loss(model, dict(batch)).backward()
        return param.grad.clone()

    diff = grad(with_terms) - grad(without)
    model.zero_grad()
    with attn_mod.capture(model, detach=False) as rec:
        model(**{k: v for k, v in batch.items()}, use_cache=False)
    agto = agto_losses(rec.masses(), rec.categories, agto_rows(rec.query_categories(), batch["labels"]))
    (0.15 * agto.loss_img + 0.15 * agto.loss_sys).backward()
    assert diff.abs().max() > 0
    torch.testing.assert_close(diff, param.grad, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------- refusals before the first step


@pytest.mark.parametrize("setting, fix", [
    (dict(packing=True), r"one padded sequence per row .* set packing=False"),
    (dict(padding_free=True), r"padded batches with an attention mask: set padding_free=False"),
    (dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
     r"reentrant gradient checkpointing .*=\{'use_reentrant': False\}"),
])
def test_sft_refuses_settings_without_masses(tmp_path, setting, fix):
    model, processor = build_tiny("qwen2_5_vl")
    attn_mod.patch(model, processor)
    with pytest.raises(ValueError, match=fix):
        AttentionSFTTrainer(model=model, args=_sft_args(tmp_path, **setting), train_dataset=_sft_dataset(),
                            processing_class=processor)


def test_sft_refuses_unpatched_and_whole_sequence_loss(tmp_path):
    model, processor = build_tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"attn_mod\.patch\(model, processor\)"):
        AttentionSFTTrainer(model=model, args=_sft_args(tmp_path), train_dataset=_sft_dataset(),
                            processing_class=processor)
    attn_mod.patch(model, processor)
    messages = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}]]
    ds = datasets.Dataset.from_dict({"messages": messages, "image": [random_image(56, 56)]})
    with pytest.raises(ValueError, match="assistant_only_loss=True"):
        AttentionSFTTrainer(model=model, args=_sft_args(tmp_path), train_dataset=ds, processing_class=processor)


def _text_only_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    return Qwen2ForCausalLM(cfg)


def test_unpatchable_model_fails_before_the_first_step(tmp_path):
    _, processor = build_tiny("qwen2_5_vl")
    model = _text_only_model()
    for make in (lambda: SayoAttentionReward(model, processor), lambda: AvarVisualReward(model, processor)):
        with pytest.raises(attn_mod.UnsupportedModelError, match="supported families: qwen2_5_vl"):
            make()
    with pytest.raises(attn_mod.UnsupportedModelError, match="supported families"):
        AttentionSFTTrainer(model=model, args=_sft_args(tmp_path), train_dataset=_sft_dataset(),
                            processing_class=processor)


def test_reward_option_errors_name_the_fix():
    model, processor = build_tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match="rows must be one of"):
        SayoAttentionReward(model, processor, rows="middle")
    with pytest.raises(ValueError, match="out of range"):
        AvarVisualReward(model, processor, layers=[5])
    with pytest.raises(TypeError, match="policy model object"):
        SayoAttentionReward("Qwen/Qwen2.5-VL-3B-Instruct", processor)
    reward = SayoAttentionReward(model, processor)
    with pytest.raises(ValueError, match="completion_ids"):
        reward(prompts=[_prompt(random_image(56, 56))], completions=["x"])
    with pytest.raises(ValueError, match="boxes are given but the sample has no images"):
        reward(prompts=[[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]], completion_ids=[[5, 6]],
               boxes=[[[0, 0, 5, 5]]])


def test_boxes_column_formats():
    from attn_mod.trainers.trl import region_entries

    box, other = [1.0, 2.0, 30.0, 40.0], [5, 5, 9, 9]
    assert region_entries(None, 1, "w") == [] and region_entries([], 2, "w") == []
    assert region_entries(box, 1, "w") == [(0, tuple(box))]
    assert region_entries((torch.tensor(box),), 1, "w") == [(0, tuple(box))]
    assert region_entries([box, other], 1, "w") == [(0, tuple(box)), (0, tuple(map(float, other)))]
    assert region_entries([[box], [], [other]], 3, "w") == [(0, tuple(box)), (2, tuple(map(float, other)))]
    with pytest.raises(ValueError, match="one list of boxes per image"):
        region_entries([box], 2, "column 'boxes', completion 3")
    with pytest.raises(ValueError, match="x0 < x1"):
        region_entries([30, 2, 1, 40], 1, "w")


def test_sharded_parameters_are_refused_with_the_fix():
    model, processor = build_tiny("qwen2_5_vl")
    attn_mod.patch(model, processor)
    reward = SayoAttentionReward(model, processor)
    next(model.parameters()).ds_id = 0  # what DeepSpeed ZeRO-3 puts on its partitioned parameters
    with pytest.raises(NotImplementedError, match="use DDP or ZeRO-1/2"):
        reward(prompts=[_prompt(random_image(56, 56))], completion_ids=[[5, 6]])


@pytest.mark.slow
def test_import_without_trl():
    code = ("import sys; sys.modules['trl'] = None\n"
            "import attn_mod.trainers.trl as t\n"
            "assert callable(t.SayoAttentionReward) and callable(t.accuracy)\n"
            "try:\n    t.AttentionSFTTrainer()\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERR AttentionSFTTrainer needs trl: pip install 'attn-mod[train]'" in out.stdout


def test_completion_batch_nests_images_for_processors_that_need_it():
    """Gemma3's processor reads a flat image list as ONE prompt's images: the teacher-forced batch gives it the
    images per prompt, and each row's prompt part equals that prompt processed alone."""
    from attn_mod.tiny import build_processor

    proc = build_processor("gemma3")
    prompts = [_prompt(random_image(40 + 10 * i, 30, i), system=i == 0) for i in range(2)]
    comps = [[5, 6, 7], [8]]
    batch = build_completion_batch(proc, prompts, comps, pad_token_id=proc.tokenizer.pad_token_id)
    P = batch["prompt_length"]
    assert batch["pixel_values"].shape[0] == 2 and batch["images_per_prompt"] == [1, 1]
    for b, p in enumerate(prompts):
        text = proc.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        alone = proc(text=[text], images=[[p[-1]["content"][0]["image"]]], return_tensors="pt",
                     add_special_tokens=False)["input_ids"][0]
        row = batch["input_ids"][b][:P][batch["attention_mask"][b][:P].bool()]
        assert torch.equal(row, alone)
        assert batch["input_ids"][b][P:P + len(comps[b])].tolist() == comps[b]
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
