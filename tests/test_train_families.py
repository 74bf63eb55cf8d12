"""`attn-mod train` beyond Qwen-VL: LLaVA-1.5, InternVL and Gemma3 through the same collator and recipes.

SFT step 0 on a left-padded batch (images and image-less samples, with and without a system turn): labels are
the last assistant turn found independently in the rendered text, and the losses equal the DESIGN formulas
computed in float64 from each sample's own eager attention; TARGET tokens equal what `handle.set_target(boxes=)`
selects; a short GRPO run works end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from train_helpers import ENTRY, ROOT, TINY_SFT, env, make_data

from attn_mod.categories import IMAGE, SYSTEM, TARGET
from attn_mod.tiny import build_tiny
from attn_mod.trainers.config import load_train_config
from attn_mod.trainers.data import IGNORE
from attn_mod.trainers.sft import SFTRecipe

FAMILIES = ["llava", "internvl", "gemma3", "llava_onevision", "idefics3"]
# the assistant header and end-of-turn text of each family's chat template
TURNS = {"llava": ("ASSISTANT:", "</s>"), "internvl": ("<|im_start|>assistant\n", "<|im_end|>"),
         "gemma3": ("<start_of_turn>model\n", "<end_of_turn>"), "llava_onevision": ("<|im_start|>assistant \n", "<|im_end|>"),
         "idefics3": ("Assistant:", "<end_of_utterance>")}
SIZES = [(56, 56), (90, 40), (40, 84)]  # different crop / sub-image counts per sample (OneVision, Idefics3)


def _recipe(tmp_path, family, *overrides):
    data = make_data(tmp_path / "data", 4, sizes=SIZES)
    cfg = load_train_config(TINY_SFT, [f"data.train={data}", f"output_dir={tmp_path / 'out'}", "data.shuffle=false",
                                       f"model.tiny={family}", "model.dtype=float64", "schedule.batch_size=4",
                                       "data.padding_side=left", "schedule.max_steps=1", *overrides])
    recipe = SFTRecipe(cfg)
    recipe.setup()
    return recipe


def _label_positions_from_text(tok, text, family, n_ids):
    """Positions (in the processor's `n_ids` ids) of the last assistant body through its end-of-turn token, by
    character offsets of the rendered text (an independent route: the library finds them by token ids). The
    tokenizer alone does not expand image placeholders, which all come before the last assistant turn, so
    positions are counted from the end."""
    header, end = TURNS[family]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    body = text.rindex(header) + len(header)
    stop = text.index(end, body) + len(end)
    shift = n_ids - len(enc["input_ids"])
    return {i + shift for i, (a, b) in enumerate(enc["offset_mapping"]) if b > body and a < stop and b > a}, \
        enc["input_ids"][next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > text.rindex(header)):]


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_step0_labels_and_losses_match_eager_float64(tmp_path, family):
    recipe = _recipe(tmp_path, family)
    tok = recipe.processor.tokenizer
    # model.freeze_vision (default): the vision tower and its projector are frozen, the language model trains
    trainable = [n for n, p in recipe.model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n or "text_model" in n or n.startswith("lm_head") for n in trainable)
    batch = recipe.micro_batch(1, 0)
    ids, attn = batch.model_inputs["input_ids"], batch.model_inputs["attention_mask"]
    B = ids.shape[0]
    assert (attn[:, 0] == 0).any(), "the batch must be left-padded"
    items = [recipe.dataset[i] for i in recipe.sample_indices(1, 0)]
    for b, e in enumerate(items):
        text = recipe.collator.render(e.sample)
        want, tail = _label_positions_from_text(tok, text, family, e.length)
        assert e.input_ids[-len(tail):].tolist() == tail  # the same tokens from the last header on
        assert set((e.labels != IGNORE).nonzero().flatten().tolist()) == want and want
        valid = attn[b].bool()
        assert torch.equal(batch.labels[b][valid], e.labels) and torch.equal(ids[b][valid], e.input_ids)

    if family in ("llava_onevision", "idefics3"):  # samples with different crop / sub-image counts, zero-padded
        counts = [e.vision["pixel_values"].shape[1] for e in items if "pixel_values" in e.vision]
        assert len(set(counts)) > 1 and batch.model_inputs["pixel_values"].shape[1] == max(counts)
    res = recipe.train_step(batch).metrics  # the patched float64 model on the padded batch
    cats_all = recipe.handle.categories.long()
    # TARGET: what the patch's own box path selects for these boxes and images
    with_box = [b for b, e in enumerate(items) if e.sample.region_boxes()]
    assert with_box and batch.target_mask is not None
    for b in with_box:
        e = items[b]
        assert int(batch.target_mask[b].sum()) > 0
        valid = attn[b].bool()
        assert torch.equal(batch.target_mask[b][valid], cats_all[b][valid] == TARGET)

    eager, _ = build_tiny(family, seed=0, attn_implementation="eager", dtype=torch.float64)
    eager.load_state_dict(recipe.model.state_dict())
    text_cfg = eager.config.get_text_config()
    types = getattr(text_cfg, "layer_types", None) or ["full_attention"] * text_cfg.num_hidden_layers
    windows = [text_cfg.sliding_window if t == "sliding_attention" else None for t in types]
    if family == "gemma3":
        assert None in windows and any(w is not None and w < int(attn.sum(1).max()) for w in windows)
    eps, logs_img, logs_sys, lm_terms, has_img, has_sys = 1e-6, [], [], [], [], []
    for b, e in enumerate(items):
        valid = attn[b].bool()
        c = cats_all[b][valid].tolist()
        has_img.append(any(x in (IMAGE, TARGET) for x in c))
        has_sys.append(any(x == SYSTEM for x in c))
        one = {"input_ids": e.input_ids[None], "attention_mask": torch.ones_like(e.input_ids)[None],
               **{k: v[None] for k, v in e.token_inputs.items()}, **e.vision}
        with torch.no_grad():
            out = eager(**one, output_attentions=True, use_cache=False)
        rows = [i for i in range(len(c)) if e.labels[i] != IGNORE]
        lm_terms += [(out.logits[0, i - 1], e.labels[i]) for i in rows]
        cat = torch.tensor(c)
        S_b = len(c)
        i_idx, j_idx = torch.arange(S_b)[:, None], torch.arange(S_b)[None, :]
        for layer, att in enumerate(out.attentions):  # (1, H, S_b, S_b) eager probabilities
            w = windows[layer]
            # keys a row sees: causal, within a sliding layer's window (answer rows are in no image block)
            seen = (j_idx <= i_idx) & (torch.ones_like(i_idx, dtype=torch.bool) if w is None else (i_idx - j_idx < w))
            for codes, has, logs in (((IMAGE, TARGET), has_img[b], logs_img), ((SYSTEM,), has_sys[b], logs_sys)):
                if not has:
                    continue
                keys = seen & torch.isin(cat, torch.tensor(codes))[None, :]  # (S_b, S_b)
                use = [i for i in rows if keys[i].any()]
                if not use:  # (layer, sample) not covered
                    continue
                for h in range(att.shape[1]):
                    ratios = [float((att[0, h, i] * keys[i]).sum()) / int(keys[i].sum()) for i in use]
                    logs.append(math.log(sum(ratios) / len(ratios) + eps))
    recipe.cleanup()
    assert any(has_img) and not all(has_img) and any(has_sys)
    if family != "llava":  # LLaVA's SYSTEM is its template prefix, present in every prompt
        assert not all(has_sys)
    ref_img, ref_sys = -sum(logs_img) / len(logs_img), sum(logs_sys) / len(logs_sys)
    ref_lm = float(sum(-torch.log_softmax(lg, -1)[t] for lg, t in lm_terms) / len(lm_terms))
    assert res["samples_img"] == sum(has_img) and res["samples_sys"] == sum(has_sys)
    assert res["loss_img"] == pytest.approx(ref_img, rel=1e-6)
    assert res["loss_sys"] == pytest.approx(ref_sys, rel=1e-6)
    assert res["loss_lm"] == pytest.approx(ref_lm, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_and_grpo_runs_end_to_end(tmp_path, family):
    """`attn-mod train` (SFT, then GRPO with the SAYO reward) on the family's tiny model: metrics rows with
    finite losses / rewards, the SAYO target attention defined, OUT/final loadable."""
    from attn_mod.jsonl import read_jsonl
    from attn_mod.loading import load_model

    data = make_data(tmp_path / "data", 8, sizes=SIZES)
    for config, out in ((TINY_SFT, "sft"), (ROOT / "configs" / "train" / "tiny_grpo.yaml", "grpo")):
        proc = subprocess.run([sys.executable, str(ENTRY), "train", str(config), f"data.train={data}",
                               f"model.tiny={family}", "schedule.max_steps=2", f"output_dir={tmp_path / out}"],
                              env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = read_jsonl(tmp_path / out / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    sft = read_jsonl(tmp_path / "sft" / "metrics.jsonl")
    assert sum(r["samples_img"] for r in sft) > 0 and sum(r["samples_sys"] for r in sft) > 0
    grpo = read_jsonl(tmp_path / "grpo" / "metrics.jsonl")
    assert all(math.isfinite(r["reward"]) and 0 < r["completion_length"] for r in grpo)
    assert any(r["target_attention"] is not None and 0 < r["target_attention"] < 1 for r in grpo)
    model, _ = load_model(tmp_path / "sft" / "final")
    assert model.config.model_type == family
    assert json.loads((tmp_path / "sft" / "data_stats.json").read_text())["kept"] == 8
