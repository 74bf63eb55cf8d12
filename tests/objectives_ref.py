"""Independent float64 references for the training objectives (tests only).

Everything here is written from DESIGN.md with plain loops over eager `output_attentions` matrices; nothing is
imported from attn_mod.trainers or attn_mod.metrics. Batches go through the real processor path.
"""

from __future__ import annotations

import math
import types

import torch

from attn_mod.tiny import build_tiny
from helpers import random_image, tok_id

CODES = dict(PAD=0, SYSTEM=1, TEXT=2, IMAGE=3, TARGET=4, RESPONSE=5)


def _rms_norm_float64(self, hidden_states):
    var = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(var + self.variance_epsilon))


def exact_float64(model):
    """The transformers RMSNorms compute in float32 even in a float64 model; make them float64 so finite
    differences are not drowned by float32 rounding."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_float64, module)
    return model


def twin64(family: str, seed: int = 0):
    """A float64 tiny model (sdpa), its eager twin with identical weights, and the processor."""
    model, proc = build_tiny(family, seed=seed, dtype=torch.float64)
    eager, _ = build_tiny(family, seed=seed, dtype=torch.float64, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    return exact_float64(model), exact_float64(eager), proc


def messages(question: str, *, system: str | None, image: bool, answer: str | None):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    out = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    if answer is not None:
        out.append({"role": "assistant", "content": answer})
    return out


# (question, system prompt, image size or None, answer): sample 0 has an explicit system turn and a big image,
# sample 1 a small image and no explicit system turn, sample 2 no image at all.
SPECS = [
    ("What color is the square?", "You are a helpful assistant.", (130, 90), "The answer is B."),
    ("How many objects are there in the picture?", None, (60, 60), "3"),
    ("Which option is correct?", None, None, "The answer is A. Yes."),
]


def sft_batch(proc, specs=SPECS, *, seed: int = 0):
    """Left-padded teacher-forced batch with labels on the last assistant reply (its <|im_end|> included)."""
    texts = [proc.apply_chat_template(messages(q, system=s, image=size is not None, answer=a), tokenize=False)
             for q, s, size, a in specs]
    images = [random_image(*size, seed=seed + i) for i, (_, _, size, _) in enumerate(specs) if size is not None]
    batch = proc(text=texts, images=images or None, return_tensors="pt", padding=True)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].double()
    ids = batch["input_ids"]
    start, end = tok_id(proc, "<|im_start|>"), tok_id(proc, "<|im_end|>")
    header = len(proc.tokenizer.encode("assistant\n", add_special_tokens=False))
    labels = torch.full_like(ids, -100)
    for b in range(ids.shape[0]):
        s = (ids[b] == start).nonzero().flatten()[-1].item() + 1 + header
        e = (ids[b] == end).nonzero().flatten()[-1].item()
        labels[b, s:e + 1] = ids[b, s:e + 1]
    batch["labels"] = labels
    return batch


def reference_categories(proc, batch, has_system, target=None):
    """(B, S) codes from masks and known structure only (system turn = first token through the first <|im_end|>)."""
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    end = tok_id(proc, "<|im_end|>")
    cats = torch.full(ids.shape, CODES["TEXT"], dtype=torch.long)
    for b in range(ids.shape[0]):
        if has_system[b]:
            first = am[b].nonzero()[0].item()
            stop = (ids[b] == end).nonzero()[0].item()
            cats[b, first:stop + 1] = CODES["SYSTEM"]
    cats[batch["mm_token_type_ids"] == 1] = CODES["IMAGE"]
    if target is not None:
        cats[target] = CODES["TARGET"]
    if "labels" in batch:
        cats[batch["labels"] != -100] = CODES["RESPONSE"]
    cats[~am] = CODES["PAD"]
    return cats


def split_unpadded(proc, batch):
    """Per-sample batches of the valid tokens only (no padding), with that sample's images; and their positions."""
    vstart = tok_id(proc, "<|vision_start|>")
    grid = batch.get("image_grid_thw")
    sizes = [] if grid is None else grid.prod(dim=1).tolist()
    img, row = 0, 0
    out = []
    for b in range(batch["input_ids"].shape[0]):
        idx = batch["attention_mask"][b].bool().nonzero().flatten()
        one = {k: batch[k][b, idx][None] for k in ("input_ids", "mm_token_type_ids") if k in batch}
        one["attention_mask"] = torch.ones_like(one["input_ids"])
        n = int((one["input_ids"] == vstart).sum())
        if n:
            rows = sum(sizes[img:img + n])
            one["pixel_values"] = batch["pixel_values"][row:row + rows]
            one["image_grid_thw"] = grid[img:img + n]
            img, row = img + n, row + rows
        out.append((one, idx))
    return out


def eager_outputs(eager, proc, batch):
    """Eager attentions (tuple over layers of (B, Hq, S, S)) and logits (B, S, V), float64 and differentiable,
    from one unpadded forward per sample placed at its positions in the padded batch (zeros elsewhere).

    Per-sample forwards keep the reference free of padding handling (and of eager's NaN rows for fully masked
    padding queries in float64)."""
    B, S = batch["input_ids"].shape
    attns, logits = None, []
    for b, (one, idx) in enumerate(split_unpadded(proc, batch)):
        out = eager(**one, output_attentions=True)
        if attns is None:
            attns = [[] for _ in out.attentions]
        scatter = torch.zeros(S, len(idx), dtype=torch.float64)
        scatter[idx, torch.arange(len(idx))] = 1.0  # (S, n): places unpadded rows at their padded positions
        for layer, A in enumerate(out.attentions):
            attns[layer].append(torch.einsum("sn,hnm,tm->hst", scatter, A[0], scatter))
        logits.append(scatter @ out.logits[0])
    return tuple(torch.stack(a) for a in attns), torch.stack(logits)


def eager_attentions(eager, proc, batch):
    return eager_outputs(eager, proc, batch)[0]


def ref_agto(attns, cats, rows, eps=1e-6):
    """L_img, L_sys and coverage with explicit loops (DESIGN.md "AVAR attention-guided SFT" + coverage rule)."""
    terms = {"img": [], "sys": []}
    covered = {"img": 0, "sys": 0}
    B, S = cats.shape
    for b in range(B):
        key_sets = {"img": [j for j in range(S) if cats[b, j] in (CODES["IMAGE"], CODES["TARGET"])],
                    "sys": [j for j in range(S) if cats[b, j] == CODES["SYSTEM"]]}
        for name, keys in key_sets.items():
            qrows = [i for i in range(S) if rows[b, i] and any(j <= i for j in keys)]
            if not qrows:
                continue
            covered[name] += 1
            for A in attns:
                for h in range(A.shape[1]):
                    vals = []
                    for i in qrows:
                        vis = [j for j in keys if j <= i]
                        vals.append(sum(A[b, h, i, j] for j in vis) / len(vis))
                    terms[name].append(torch.log(sum(vals) / len(vals) + eps))
    l_img = -torch.stack(terms["img"]).mean() if terms["img"] else torch.zeros((), dtype=torch.float64)
    l_sys = torch.stack(terms["sys"]).mean() if terms["sys"] else torch.zeros((), dtype=torch.float64)
    return l_img, l_sys, covered["img"], covered["sys"]


def ref_entropy(logits_row: torch.Tensor, temperature: float = 1.0) -> float:
    z = logits_row.double() / temperature
    z = z - z.max()
    p = torch.exp(z) / torch.exp(z).sum()
    return float(-(p * torch.log(p)).sum())


def ref_top_k(values: list[float], top_frac: float) -> list[int]:
    """Indices (into `values`) of the top k = max(1, floor(top_frac * n)); ties: earlier first."""
    n = len(values)
    if n == 0:
        return []
    k = max(1, math.floor(top_frac * n + 1e-9))
    order = sorted(range(n), key=lambda t: (-values[t], t))
    return sorted(order[:k])


def ref_sayo(last_attn, cats, logits, positions, *, rows="decision", top_frac=0.3, temperature=1.0, eps=1e-8):
    """r_v per sample with loops (DESIGN.md "SAYO attention reward" + "Objective details"); None if undefined."""
    B, H, S, _ = last_attn.shape
    out = []
    for b in range(B):
        pos = [p for p in range(S) if positions[b, p]]
        target = [j for j in range(S) if cats[b, j] == CODES["TARGET"]]
        visual = [j for j in range(S) if cats[b, j] in (CODES["IMAGE"], CODES["TARGET"])]
        if not target or not pos:
            out.append(None)
            continue
        ent = [ref_entropy(logits[b, p - 1], temperature) for p in pos]
        chosen = [pos[t] for t in ref_top_k(ent, top_frac)]
        att_rows = [p - 1 if rows == "decision" else p for p in chosen]
        a = [sum(float(last_attn[b, h, i, j]) for h in range(H) for j in target) / H / len(target) for i in att_rows]
        v = [sum(float(last_attn[b, h, i, j]) for h in range(H) for j in visual) / H / len(visual) for i in att_rows]
        a_q, v_q = sum(a) / len(a), sum(v) / len(v)
        out.append(math.tanh(math.log((a_q + eps) / (v_q + eps))))
    return out


def ref_avar(attns, cats, rows, eps=1e-6):
    """r_vis per sample with loops (ratio of means over layers x heads x rows); None without a system turn."""
    B, S = cats.shape
    out = []
    for b in range(B):
        sys_keys = [j for j in range(S) if cats[b, j] == CODES["SYSTEM"]]
        img_keys = [j for j in range(S) if cats[b, j] in (CODES["IMAGE"], CODES["TARGET"])]
        qrows = [i for i in range(S) if rows[b, i]]
        if not sys_keys or not qrows:
            out.append(None)
            continue
        img, sys_, n = 0.0, 0.0, 0
        for A in attns:
            for h in range(A.shape[1]):
                for i in qrows:
                    img += sum(float(A[b, h, i, j]) for j in img_keys)
                    sys_ += sum(float(A[b, h, i, j]) for j in sys_keys)
                    n += 1
        out.append((img / n) / (sys_ / n + eps))
    return out
