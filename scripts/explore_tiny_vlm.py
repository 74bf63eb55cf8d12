"""Recipe exploration for the tiny demo VLM (plain torch loop, NOT the project's trainer).

    nice -n 5 python scripts/explore_tiny_vlm.py --minutes 10 --out runs/explore/a

Stages (step counts): align (dense captions) -> curriculum (1 object, then 1-3) -> qa (3-4 objects, MC).
Loss on the assistant answer tokens + <|im_end|>. Prints held-out 4-way MC accuracy (first generated token =
greedy answer letter) every --eval-every steps and writes curve.jsonl.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from attn_mod.data.synthetic import caption_item, make_split, task_corpus
from attn_mod.eval.generation import Request, render_prompt
from attn_mod.tiny import build_tiny, save_checkpoint


def encode(processor, items, imgs):
    texts = [render_prompt(processor, Request(it.prompt(), [None])) + it.target_text() + "<|im_end|>" for it in items]
    tok = processor.tokenizer
    tok.padding_side = "right"
    b = processor(text=texts, images=[imgs[it.scene.signature] for it in items], return_tensors="pt", padding=True)
    labels = torch.full_like(b["input_ids"], -100)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    for r, ids in enumerate(b["input_ids"].tolist()):
        last = max(i for i, t in enumerate(ids) if t == start)  # "<|im_start|>assistant\n"
        n_hdr = len(tok("assistant\n")["input_ids"])
        a0 = last + 1 + n_hdr
        n = int(b["attention_mask"][r].sum())
        labels[r, a0:n] = b["input_ids"][r, a0:n]
    b["labels"] = labels
    return b


def accuracy(model, processor, items, imgs, bs=50):
    tok = processor.tokenizer
    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    ok = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), bs):
            chunk = items[i:i + bs]
            texts = [render_prompt(processor, Request(it.prompt(), [None])) for it in chunk]
            tok.padding_side = "left"
            b = processor(text=texts, images=[imgs[it.scene.signature] for it in chunk], return_tensors="pt", padding=True)
            logits = model(**b).logits[:, -1]
            pred = logits.argmax(-1).tolist()
            ok += sum(tok.convert_ids_to_tokens(p) == it.answer for p, it in zip(pred, chunk))
    model.train()
    return ok / len(items)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/explore/a")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--align-steps", type=int, default=150)
    ap.add_argument("--c1-steps", type=int, default=150)
    ap.add_argument("--c2-steps", type=int, default=200)
    ap.add_argument("--qa-steps", type=int, default=600)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny("qwen2_5_vl", seed=a.seed, layers=a.layers, hidden=64, vision_hidden=64, qk_scale=1.0,
                                  tokenizer_kwargs=dict(extra_corpus=task_corpus(), vocab_size=512))
    model.train()
    held, hs = make_split(10_000 + a.seed, 150, objects=(3, 4), per_kind=1)
    stages = []
    al, _ = make_split(1 + a.seed, 3000, objects=(1, 2, 3, 4), caption=True, exclude=hs)
    c1, _ = make_split(2 + a.seed, 200, objects=(1,), form=("free", "choice"), exclude=hs)
    c2, _ = make_split(3 + a.seed, 2000, objects=(1, 2, 3), form=("free", "choice"), exclude=hs)
    qa, _ = make_split(4 + a.seed, 4000, objects=(3, 4), form="choice", exclude=hs)
    stages = [("align", al, a.align_steps), ("c1", c1, a.c1_steps), ("c2", c2, a.c2_steps), ("qa", qa, a.qa_steps)]
    imgs = {}
    for items in [held, al, c1, c2, qa]:
        for it in items:
            if it.scene.signature not in imgs:
                imgs[it.scene.signature] = it.scene.render()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    rng = random.Random(a.seed)
    t0 = time.time()
    step = 0
    log = open(out / "curve.jsonl", "w")
    for name, items, n in stages:
        for _ in range(n):
            batch = encode(processor, rng.sample(items, a.bs), imgs)
            loss = model(**batch).loss
            opt.zero_grad(); loss.backward(); opt.step()
            step += 1
            if step % a.eval_every == 0:
                acc = accuracy(model, processor, held[:a.eval_n], imgs)
                rec = dict(step=step, stage=name, minutes=(time.time() - t0) / 60, loss=loss.item(), acc=acc)
                print(json.dumps(rec), flush=True); log.write(json.dumps(rec) + "\n"); log.flush()
                save_checkpoint(model, processor, out / "model")
            if time.time() - t0 > a.minutes * 60:
                break
        if time.time() - t0 > a.minutes * 60:
            break
    from safetensors.torch import save_file
    save_checkpoint(model, processor, out / "model")
    print("done", step, (time.time() - t0) / 60)


if __name__ == "__main__":
    main()
