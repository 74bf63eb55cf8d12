"""SFT recipe: step-0 losses against an independent float64 eager computation, collation, direction of L_img."""

from __future__ import annotations

import math

import pytest
import torch

from train_helpers import TINY_SFT, make_data

from attn_mod.categories import IMAGE, PAD, SYSTEM, TARGET
from attn_mod.tiny import build_tiny
from attn_mod.trainers.config import load_train_config
from attn_mod.trainers.data import IGNORE
from attn_mod.trainers.sft import SFTRecipe


def make_recipe(tmp_path, *overrides, n=8, data_seed=0):
    data = make_data(tmp_path / "data", n, seed=data_seed)
    cfg = load_train_config(TINY_SFT, [f"data.train={data}", f"output_dir={tmp_path / 'out'}", "data.shuffle=false",
                                       *overrides])
    recipe = SFTRecipe(cfg)
    recipe.setup()
    return recipe


def _independent_labels(ids, tok):
    """Positions of the last assistant turn's body through its <|im_end|> (inclusive), from raw token ids."""
    start_id, end_id = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    header = tok.encode("assistant\n", add_special_tokens=False)
    ids = ids.tolist()
    starts = [p for p in range(len(ids)) if ids[p] == start_id and ids[p + 1:p + 1 + len(header)] == header]
    body = starts[-1] + 1 + len(header)
    end = ids.index(end_id, body)
    return set(range(body, end + 1))


def _independent_categories(ids, attn, target, tok, image_id):
    """(S,) PAD / SYSTEM / IMAGE / TARGET / other(2) codes from token ids (DESIGN: system turn incl. markers)."""
    start_id, end_id = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    sys_header = tok.encode("system\n", add_special_tokens=False)
    S = len(ids)
    cats = [2] * S
    ids_l = ids.tolist()
    first = int(attn.nonzero()[0])
    if ids_l[first] == start_id and ids_l[first + 1:first + 1 + len(sys_header)] == sys_header:
        end = ids_l.index(end_id, first)
        for j in range(first, end + 1):
            cats[j] = SYSTEM
    for j in range(S):
        if attn[j] == 0:
            cats[j] = PAD
        elif ids_l[j] == image_id:
            cats[j] = TARGET if target is not None and bool(target[j]) else IMAGE
    return cats


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_step0_losses_match_eager_float64(tmp_path, family):
    recipe = make_recipe(tmp_path, f"model.tiny={family}", "model.dtype=float64", "schedule.batch_size=4",
                         "data.padding_side=left", "schedule.max_steps=1", n=4)
    batch = recipe.micro_batch(1, 0)
    tok = recipe.processor.tokenizer
    image_id = recipe.model.config.image_token_id
    ids, attn = batch.model_inputs["input_ids"], batch.model_inputs["attention_mask"]
    B, S = ids.shape
    assert (attn[:, 0] == 0).any(), "the batch must be left-padded"
    for b in range(B):  # labels = last assistant turn incl. its end-of-turn token, nothing else
        assert set((batch.labels[b] != IGNORE).nonzero().flatten().tolist()) == _independent_labels(ids[b], tok)

    eager, _ = build_tiny(family, seed=0, attn_implementation="eager", dtype=torch.float64)
    eager.load_state_dict(recipe.model.state_dict())
    assert eager.config.text_config.num_key_value_heads < eager.config.text_config.num_attention_heads  # GQA
    eps = 1e-6
    logs_img, logs_sys, ref_lm_terms = [], [], []
    cats = [_independent_categories(ids[b], attn[b], None if batch.target_mask is None else batch.target_mask[b],
                                    tok, image_id) for b in range(B)]
    has_sys = [any(c == SYSTEM for c in cats[b]) for b in range(B)]
    has_img = [any(c in (IMAGE, TARGET) for c in cats[b]) for b in range(B)]
    assert not all(has_img) and any(has_img)
    if family == "qwen3_vl":
        assert not all(has_sys) and any(has_sys)  # Qwen3-VL adds no default system turn
    # Each sample alone, unpadded (eager left-padded float64 batches turn pad rows into NaN in transformers).
    grid = batch.model_inputs.get("image_grid_thw")
    patches = [] if grid is None else grid.prod(dim=1).tolist()
    n_images = [int((ids[b] == tok.convert_tokens_to_ids("<|vision_start|>")).sum()) for b in range(B)]
    img0 = patch0 = 0
    for b in range(B):
        valid = attn[b].bool()
        one = {"input_ids": ids[b][valid][None], "attention_mask": attn[b][valid][None],
               "mm_token_type_ids": batch.model_inputs["mm_token_type_ids"][b][valid][None]}
        if n_images[b]:
            n_patch = sum(patches[img0:img0 + n_images[b]])
            one["pixel_values"] = batch.model_inputs["pixel_values"][patch0:patch0 + n_patch]
            one["image_grid_thw"] = grid[img0:img0 + n_images[b]]
            img0, patch0 = img0 + n_images[b], patch0 + n_patch
        with torch.no_grad():
            out = eager(**one, output_attentions=True, use_cache=False)
        c = [x for x, v in zip(cats[b], valid.tolist()) if v]
        lab = batch.labels[b][valid]
        rows = [i for i in range(len(c)) if lab[i] != IGNORE]
        ref_lm_terms += [(out.logits[0, i - 1], lab[i]) for i in rows]
        for att in out.attentions:  # (1, H, S_b, S_b) eager probabilities
            for h in range(att.shape[1]):
                for codes, has, logs in (((IMAGE, TARGET), has_img[b], logs_img), ((SYSTEM,), has_sys[b], logs_sys)):
                    if not has:
                        continue
                    ratios = []
                    for i in rows:
                        keys = [j for j in range(i + 1) if c[j] in codes]
                        ratios.append(sum(float(att[0, h, i, j]) for j in keys) / len(keys))
                    logs.append(math.log(sum(ratios) / len(ratios) + eps))
    ref_img = -sum(logs_img) / len(logs_img)
    ref_sys = sum(logs_sys) / len(logs_sys)
    ref_lm = float(sum(-torch.log_softmax(lg, -1)[t] for lg, t in ref_lm_terms) / len(ref_lm_terms))

    res = recipe.train_step(batch).metrics
    recipe.cleanup()
    # transformers' eager attention takes its softmax in float32 (then casts back): agreement to ~1e-7 relative
    assert res["samples_img"] == sum(has_img) and res["samples_sys"] == sum(has_sys)
    assert res["loss_img"] == pytest.approx(ref_img, rel=1e-6)
    assert res["loss_sys"] == pytest.approx(ref_sys, rel=1e-6)
    assert res["loss_lm"] == pytest.approx(ref_lm, rel=1e-6)
    assert res["loss"] == pytest.approx(ref_lm + 0.15 * ref_img + 0.15 * ref_sys, rel=1e-6)


def test_right_padding_and_image_less_samples(tmp_path):
    recipe = make_recipe(tmp_path, "schedule.batch_size=4", "data.padding_side=right", n=4)
    batch = recipe.micro_batch(1, 0)
    attn = batch.model_inputs["attention_mask"]
    assert (attn[:, -1] == 0).any() and (attn[:, 0] == 1).all()
    assert batch.model_inputs["image_grid_thw"].shape[0] == 3  # sample 3 has no image
    tok = recipe.processor.tokenizer
    for b in range(4):
        assert set((batch.labels[b] != IGNORE).nonzero().flatten().tolist()) == _independent_labels(
            batch.model_inputs["input_ids"][b], tok)
    m = recipe.train_step(batch).metrics
    recipe.cleanup()
    assert m["samples_img"] == 3 and all(math.isfinite(m[k]) for k in ("loss", "loss_img", "loss_sys"))


def test_cutoff_truncates_or_drops_and_counts(tmp_path):
    from attn_mod.data.samples import write_samples

    def row(i, question, answer):
        return {"id": f"c{i}", "messages": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": answer}]}

    long = "the a of to in is on at " * 30  # ~240 tokens
    data = write_samples([row(0, "Yes?", "Yes."), row(1, "No?", "No."), row(2, "Count?", long),
                          row(3, long, "A.")], tmp_path / "cut.jsonl")
    base = [f"data.train={data}", "data.cutoff=100", "schedule.max_steps=1"]
    r = SFTRecipe(load_train_config(TINY_SFT, base + [f"output_dir={tmp_path / 't'}", "data.overflow=truncate"]))
    r.setup()
    kept = {r.dataset[i].sample.id: r.dataset[i] for i in range(len(r.dataset))}
    r.cleanup()
    # the long answer is cut at 100 tokens (still trainable); the long prompt leaves no answer token: dropped
    assert set(kept) == {"c0", "c1", "c2"} and kept["c2"].length == 100 and kept["c2"].truncated
    assert r.dataset.truncated == 1 and r.dataset.dropped == {"no label token": 1}
    r = SFTRecipe(load_train_config(TINY_SFT, base + [f"output_dir={tmp_path / 'd'}", "data.overflow=drop"]))
    r.setup()
    r.cleanup()
    assert len(r.dataset) == 2 and r.dataset.truncated == 0 and r.dataset.dropped == {"too long": 2}
    stats = __import__("json").loads((tmp_path / "d" / "data_stats.json").read_text())
    assert stats["kept"] == 2 and stats["dropped"] == {"too long": 2}


def test_bad_data_fails_before_any_step(tmp_path, monkeypatch):
    data = make_data(tmp_path / "data", 4)
    (tmp_path / "data" / "img1.png").unlink()
    cfg = load_train_config(TINY_SFT, [f"data.train={data}", f"output_dir={tmp_path / 'out'}"])

    def no_weights(self):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(SFTRecipe, "_setup_model", no_weights)
    with pytest.raises(ValueError, match=r"line 2.*img1.png"):
        SFTRecipe(cfg).setup()
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def _image_mass(recipe, batch) -> float:
    """Mean over layers, heads and trained rows of the image (IMAGE+TARGET) attention mass."""
    from attn_mod import capture

    with torch.no_grad(), capture(recipe.model, layers="all") as rec:
        recipe.handle.set_target(batch.target_mask)
        recipe.model(**batch.model_inputs, use_cache=False)
    m = rec.masses()
    img = m[..., IMAGE] + m[..., TARGET]  # (L, B, H, S)
    rows = batch.labels != IGNORE
    has = (batch.model_inputs["input_ids"] == recipe.model.config.image_token_id).any(1)
    sel = rows & has[:, None]
    return float((img * sel[None, :, None]).sum() / (sel.sum() * img.shape[0] * img.shape[2]))


def test_few_steps_of_L_img_raise_held_out_image_mass(tmp_path):
    recipe = make_recipe(tmp_path, "objective.lambda_lm=0", "objective.lambda_img=1", "objective.lambda_sys=0",
                         "optim.lr=3e-3", "schedule.max_steps=6", "schedule.warmup_steps=0",
                         "schedule.scheduler=constant", "checkpoint.save_final=false", "checkpoint.every=0", n=8)
    held = make_data(tmp_path / "held", 4, seed=123)
    from attn_mod.trainers.data import EncodedDataset, load_train_samples

    ds = EncodedDataset(load_train_samples(str(held)), recipe.collator, progress=False)
    held_batch = recipe.collator.collate([ds[i] for i in range(len(ds))])
    before = _image_mass(recipe, held_batch)
    rows = recipe.train()
    after = _image_mass(recipe, held_batch)
    recipe.cleanup()
    assert rows[-1]["loss_img"] < rows[0]["loss_img"]
    assert after > before * 1.05, (before, after)


def test_vlmevalkit_tsv_as_prompt_source(tmp_path):
    from attn_mod.data.samples import SampleFormatError
    from attn_mod.eval.datasets import load_benchmark, make_synthetic_benchmark
    from attn_mod.tiny import build_processor
    from attn_mod.trainers.data import Collator, load_train_samples

    tsv = make_synthetic_benchmark(tmp_path / "synth.tsv", n=4)
    with pytest.raises(SampleFormatError, match="SFT needs a JSONL"):
        load_train_samples(str(tsv))
    prompts = load_train_samples(str(tsv), require_assistant=False, system_prompt="Look carefully.")
    bench = load_benchmark(tsv)
    assert [p.answer for p in prompts] == [s.answer for s in bench]
    assert [p.answer_type for p in prompts] == [s.answer_type for s in bench]
    assert all(p.has_system and not p.has_assistant and len(p.images) == 1 for p in prompts)
    assert prompts[0].load_images()[0].size == bench[0].load_image().size
    proc = build_processor("qwen2_5_vl")
    from attn_mod.tiny import tiny_config

    config = tiny_config("qwen2_5_vl", proc.tokenizer)
    coll = Collator(proc, config, train_on="none")
    with pytest.raises(ValueError, match="has no image processor"):  # a bare tokenizer would drop the images
        Collator(proc.tokenizer, config, train_on="none").encode(prompts[0])
    enc = [coll.encode(p) for p in prompts]
    header = [proc.tokenizer.convert_tokens_to_ids("<|im_start|>")] + proc.tokenizer.encode("assistant\n")
    for e, s in zip(enc, bench):
        assert e.input_ids[-len(header):].tolist() == header  # ready for generation
        assert (e.labels == IGNORE).all()
        assert (e.target is not None) == bool(s.bbox)
