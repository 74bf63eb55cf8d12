"""`attn-mod inspect`: answer one image question with attention capture; write the answer, metrics and pictures.

    attn-mod inspect MODEL_DIR --image cat.jpg --question "Where is the cat?" --box 10 20 200 180 \\
        --preset avar --alpha 0.2 --beta 0.5 --out runs/inspect

Writes into --out: answer.txt, metrics.json, tokens.jsonl, heatmap.png (answer-span mean, last layer),
heatmap_layers.png (one panel per layer), heatmap.json (the numbers both heatmaps paint), tokens.png /
tokens.html, layers.png, entropy.png.

Heatmaps, per family (image 0 of the prompt; value of a visual token = its P' averaged over the answer
rows and heads, i.e. `RowRecording.attention(layer, positions=answer rows)`):
- Qwen2.5-VL / Qwen3-VL: the merged-token grid over the image (`viz.image_heatmap`).
- Gemma3, LLaVA, InternVL, LLaVA-OneVision, Idefics3 / SmolVLM: each token's value painted on its cell in
  original pixels (the adapter geometry's `cells`), one panel per view of the geometry (`views`: cells that
  tile the image once, e.g. InternVL's tiles, then its thumbnail; `viz.cell_heatmap_grid`).
- Mllama: refused (NotImplementedError): its vision tokens are cross-attention keys, whose per-key rows
  `attention_rows` does not record.
heatmap.json lists, per visual token of image 0: its KV slot, view, cell, TARGET flag and value (last
layer and per layer); the PNGs paint exactly these values.

Per generated token t the numbers come from the query row that produced it (the last prompt row for
t = 0, then the row of token t-1): its attention while choosing token t, and the entropy of the
distribution token t was chosen from (raw logits, temperature 1). These "answer rows" are the rows of
the per-token metrics (a / v / R_a) and of heatmap.png; VAS and the mass shares use the named row set of
--vas-rows (default "response", as the API's `metrics.vas(rec)`, through the same
`attn_mod.metrics.vas_from_masses`; "answer" adds the last prompt row, i.e. exactly the answer rows).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

INTERVENTION_PARAMS = {"avar": ("alpha", "beta", "renorm", "layers"), "pai": ("alpha", "layers"),
                       "vaf": ("enhance", "suppress", "layers"), "identity": ()}  # the CLI flags each preset takes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_PATH",
                        help="local Hugging Face checkpoint directory of a supported VLM")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True, help="the question (user turn text)")
    parser.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    parser.add_argument("--box", nargs=4, type=float, action="append", metavar=("X0", "Y0", "X1", "Y1"),
                        help="target region (repeatable; several boxes are unioned); pixels of the original "
                             "image unless --box-convention says otherwise")
    parser.add_argument("--box-convention", default="pixel", choices=("pixel", "normalized", "qwen1000"),
                        help="pixel: original-image pixels; normalized: 0..1; qwen1000: 0..1000 (default pixel)")
    parser.add_argument("--preset", default="identity", choices=tuple(INTERVENTION_PARAMS),
                        help="intervention preset (default identity: attention unchanged, measured only)")
    parser.add_argument("--alpha", type=float, default=None, help="avar: image boost 1+alpha; pai: |s| coefficient")
    parser.add_argument("--beta", type=float, default=None, help="avar: system weight 1-beta")
    renorm = parser.add_mutually_exclusive_group()
    renorm.add_argument("--renorm", dest="renorm", action="store_true", default=None,
                        help="avar: renormalise the reweighted attention rows (default)")
    renorm.add_argument("--raw", dest="renorm", action="store_false", help="avar: literal element-wise weights")
    add_preset_arguments(parser)
    parser.add_argument("--vas-rows", default="response", choices=("response", "answer", "after_image", "all"),
                        help="query rows of VAS and the mass shares (default response: the generated-token rows; "
                             "answer: also the last prompt row; see attn_mod.metrics.select_rows)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "flex"))
    parser.add_argument("--out", default="runs/inspect", help="output directory (created)")


# ------------------------------------------------------------------------------------ validation
def load_image(path):
    """The image at `path` as RGB PIL (FileNotFoundError / ValueError with the reason)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist; pass --image PATH to a PNG/JPEG/... file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not an image PIL can decode ({e}); pass a PNG, JPEG, WebP, ... file") from None


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
    """--layers / --enhance / --suppress (shared with `attn-mod eval`)."""
    parser.add_argument("--layers", nargs="+", default=None,
                        help="layers the intervention applies to: indices, 'start:stop' or 'all' (default: the "
                             "preset's; pai and vaf defaults are fractions of the depth, see Intervention.pai/vaf)")
    parser.add_argument("--enhance", type=float, default=None, help="vaf: image-key score factor (default 1.15)")
    parser.add_argument("--suppress", type=float, default=None, help="vaf: system-key score factor (default 0.95)")


def parse_layers(values):
    from .intervention import parse_layer_spec

    return parse_layer_spec(values)


def build_intervention(args):
    """The `Intervention` of --preset with the given parameters (the preset's validators raise ValueError)."""
    from .intervention import Intervention

    given = {"alpha": args.alpha, "beta": args.beta, "renorm": args.renorm, "layers": parse_layers(args.layers),
             "enhance": getattr(args, "enhance", None), "suppress": getattr(args, "suppress", None)}
    given = {k: v for k, v in given.items() if v is not None}
    allowed = INTERVENTION_PARAMS[args.preset]
    wrong = [k for k in given if k not in allowed]
    if wrong:
        flags = ", ".join("--raw/--renorm" if k == "renorm" else f"--{k}" for k in wrong)
        takes = ", ".join(f"--{k}" for k in allowed) or "no parameters"
        raise ValueError(f"preset {args.preset!r} does not take {flags} (it takes {takes}); "
                         "pass --preset avar (alpha, beta), --preset pai (alpha) or --preset vaf (enhance, suppress)")
    return Intervention.from_preset(args.preset, **given)


# ------------------------------------------------------------------------------------- generation
def _progress_criteria(total: int):
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria

    class Progress(StoppingCriteria):
        """Advances a tqdm bar once per generated token; never stops generation."""

        def __init__(self):
            self.bar = tqdm(total=total, desc="generating", unit="tok", leave=False)

        def __call__(self, input_ids, scores, **kwargs):
            self.bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Progress()


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Text of each generated token: the growth of the decoded prefix (keeps multi-byte characters
    whole), falling back to the token's own decoding where a prefix ends inside a character."""
    pieces, prev = [], ""
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append(text[len(prev):] if text.startswith(prev) else
                      tokenizer.decode(ids[t: t + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        prev = text
    return pieces


def _finite_mean(values) -> float | None:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _clean(x):
    """NaN / inf -> None (JSON null), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------- heatmaps
CROSS_ATTENTION_MODEL_TYPES = ("mllama",)  # vision tokens are cross-attention keys: refused (see below)


def _cross_attention_refusal(family: str) -> str:
    return (f"inspect cannot draw the {family} family: its vision tokens are the keys of its cross-attention "
            "layers, whose per-key rows attn_mod.attention_rows does not record (the <|image|> placeholder is one "
            "text token); use attn_mod.capture's rec.cross_mass for cross-layer masses")


def image_tokens(geometry, input_ids: torch.Tensor, image_token_id: int, image, *, span=None):
    """Visual tokens of image 0 of sample 0 -> (positions (n,) int64 KV slots, n cells (x0, y0, x1, y1) in
    original pixels or None, views [(label, start, stop)]), in the geometry's token order.

    Qwen-style grids (`span` = the image's `regions.VisualSpan`): the merged cells of `regions.token_cells`, one
    view. Other families: the adapter geometry's `cells(image)` / `views(image)` (single-image layout); the
    image's tokens are the first len(cells) `image_token_id` slots of the row (Idefics3's may be interleaved
    with marker tokens), and the prompt must hold exactly one image.
    """
    from .regions import token_cells

    if span is not None:
        _, r, c = span.grid_thw
        grid = token_cells(image, span.grid_thw, patch_size=geometry.patch_size, merge_size=geometry.merge_size)
        cells = [tuple(float(v) for v in cell) for cell in grid.tolist()]
        m = geometry.merge_size
        return span.positions.cpu().long()[:len(cells)], cells, [(f"image, {r // m}x{c // m} merged tokens", 0,
                                                                  len(cells))]
    cells = list(geometry.cells(image))
    views = list(geometry.views(image)) if hasattr(geometry, "views") else [("image", 0, len(cells))]
    pos = torch.nonzero(input_ids[0] == int(image_token_id), as_tuple=False).flatten()
    if pos.numel() != len(cells):
        raise ValueError(f"the prompt has {pos.numel()} image placeholder tokens but the processor's geometry gives "
                         f"{len(cells)} for this image; inspect takes one image and the model's own processor")
    return pos, cells, views


def heatmap_record(att_last: torch.Tensor, att_layers: dict, positions: torch.Tensor, cells, views, key_cats,
                   image, *, layer: int, rows: str) -> dict:
    """The numbers of heatmap.png / heatmap_layers.png as JSON: per visual token of image 0 its slot, view,
    cell (original pixels, floats; None = no cell), TARGET flag, value at the last layer and per layer."""
    from .categories import TARGET
    from .regions import image_hw

    view_of = {}
    for v, (_, a, b) in enumerate(views):
        view_of.update({n: v for n in range(a, b)})
    last = att_last.float().cpu()[positions].tolist()
    per_layer = torch.stack([a.float().cpu()[positions] for a in att_layers.values()], 1).tolist()
    target = (key_cats.cpu()[positions].long() == TARGET).tolist()
    tokens = [{"index": n, "position": int(p), "view": view_of.get(n), "target": bool(target[n]),
               "cell": None if c is None else [float(x) for x in c], "value": last[n], "per_layer": per_layer[n]}
              for n, (p, c) in enumerate(zip(positions.tolist(), cells))]
    h, w = image_hw(image)
    return {"value": "share of the answer rows' attention (mean over rows and heads) on each visual token",
            "rows": rows, "layer": layer, "layers": list(att_layers), "image_hw": [h, w],
            "views": [{"label": lab, "start": a, "stop": b, "value_sum": sum(last[a:b])} for lab, a, b in views],
            "tokens": tokens}


# -------------------------------------------------------------------------------------------- run
def _generate(model, processor, handle, args, image, boxes):
    """Greedy generate with masses of all layers and per-key answer rows -> (inputs, output, rec, rows)."""
    from .attention_rows import record_rows
    from .capture import capture
    from .eval.generation import Request, encode_batch

    inputs = encode_batch(processor, [Request(args.question, [image], args.system)], model.device)
    if boxes:
        handle.set_target(boxes=[boxes], images=[image], convention=args.box_convention)
    progress = _progress_criteria(args.max_new_tokens)
    with torch.no_grad(), capture(model, layers="all") as rec, record_rows(model, layers="all") as rows:
        gen = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             stopping_criteria=[progress], output_logits=True, return_dict_in_generate=True)
    done = gen.sequences.shape[1] - inputs["input_ids"].shape[1]
    progress.bar.total = done  # stopped early (EOS) or counted one short: end the bar at the real count
    progress.bar.n = done
    progress.bar.refresh()
    progress.bar.close()
    return inputs, gen, rec, rows


def _token_records(rec, gen, tokenizer, S: int):
    """Per generated token t, the metrics of the row S-1+t that produced it (last layer), its text and the
    entropy of its distribution -> (records, answer-row mask (1, Q), entropies (n,))."""
    from .metrics import per_token_records, token_entropy

    new_ids = gen.sequences[0, S:].tolist()
    n = len(new_ids)
    pieces = token_pieces(tokenizer, new_ids)
    entropy = token_entropy(torch.stack([lg[0] for lg in gen.logits]).float().cpu())  # (n,)
    Q = rec.query_categories().shape[1]  # S + n - 1 rows: the last token is never fed back
    answer_rows = torch.zeros(1, Q, dtype=torch.bool)
    answer_rows[0, S - 1: S - 1 + n] = True
    tokens_by_row = [[None] * (S - 1) + pieces]
    entropy_by_row = torch.full((1, Q), float("nan"))
    entropy_by_row[0, S - 1:] = entropy
    records = per_token_records(rec, layer=-1, tokens=tokens_by_row, entropy=entropy_by_row, rows=answer_rows)
    for t, r in enumerate(records):
        r["step"], r["token_id"] = t, new_ids[t]
    return records, answer_rows, entropy


def run(args) -> int:
    from .loading import check_backend, check_device, check_model_path
    from .regions import box_to_pixels

    # Validate everything (cheap: no transformers, nothing written) before loading or importing the rest.
    t_start = time.perf_counter()
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if check_model_path(args.model) in CROSS_ATTENTION_MODEL_TYPES:  # before loading: refused whatever else
        raise NotImplementedError(_cross_attention_refusal("mllama"))
    check_device(args.device)
    check_backend(args.backend, args.device)
    image = load_image(args.image)
    boxes = [list(b) for b in (args.box or [])]
    boxes_px = [box_to_pixels(b, image, args.box_convention) for b in boxes]  # ValueError if outside / inverted
    intervention = build_intervention(args)
    out = Path(args.out)

    from . import viz
    from .categories import SYSTEM, TARGET
    from .kernels.function import resolve_backend
    from .loading import load_model
    from .metrics import vas_from_masses, write_jsonl
    from .patch import patch
    from .regions import locate_visual_tokens

    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    t_loaded = time.perf_counter()
    handle = patch(model, processor, intervention=intervention, backend=args.backend, system_text=args.system)
    try:
        geometry = handle.state.geometry()
        if handle.state.cross_layers:
            raise NotImplementedError(_cross_attention_refusal(handle.state.adapter.name))
        inputs, gen, rec, rows = _generate(model, processor, handle, args, image, boxes)
    finally:
        handle.remove()
    t_generated = time.perf_counter()

    tokenizer = getattr(processor, "tokenizer", processor)
    S = inputs["input_ids"].shape[1]
    records, answer_rows, entropy = _token_records(rec, gen, tokenizer, S)
    n = len(records)
    answer = tokenizer.decode([r["token_id"] for r in records], skip_special_tokens=True)
    qwen_grid = hasattr(geometry, "merge_size")
    span = (next(s for s in locate_visual_tokens(inputs["input_ids"].cpu(), model.config.image_token_id,
                                                 inputs["image_grid_thw"].cpu(), merge_size=geometry.merge_size,
                                                 mm_token_type_ids=inputs.get("mm_token_type_ids"))
                 if s.sample == 0 and s.index_in_sample == 0) if qwen_grid else None)
    positions, cells, views = image_tokens(geometry, inputs["input_ids"].cpu(), model.config.image_token_id, image,
                                           span=span)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(records, out / "tokens.jsonl")
    (out / "answer.txt").write_text(answer + "\n", encoding="utf-8")

    qcats = rec.query_categories().cpu()
    masses = rec.masses().cpu()  # (L, 1, Hq, Q, C)
    L = masses.shape[0]
    vas = vas_from_masses(masses, qcats, rows=args.vas_rows, form="ratio")
    vas_share = vas_from_masses(masses, qcats, rows=args.vas_rows, form="share")
    profile = viz.layer_profile(masses, qcats, rows=args.vas_rows)
    key_cats = rec.categories[0].cpu()
    n_target = int((key_cats[:S] == TARGET).sum())
    n_system = int((key_cats[:S] == SYSTEM).sum())

    # Pictures.
    answer_pos = list(range(S - 1, S - 1 + n))
    short = answer if len(answer) <= 40 else answer[:37] + "..."
    rows_text = f"answer rows of {n} generated tokens"
    att_last = rows.attention(-1, positions=answer_pos)[0]
    att_layers = {f"layer {layer}": rows.attention(layer, positions=answer_pos)[0] for layer in range(L)}
    query = f"{rows_text} {short!r}, mean over rows and heads"
    if qwen_grid:
        draw = dict(merge_size=geometry.merge_size, patch_size=geometry.patch_size, boxes=boxes,
                    box_convention=args.box_convention)
        viz.image_heatmap(att_last, span, image, path=out / "heatmap.png", query=query,
                          layer=f"layer {L - 1} (last)", categories=key_cats, **draw)
        viz.image_heatmap_grid(att_layers, span, image, path=out / "heatmap_layers.png",
                               title=f"{rows_text}, mean over rows and heads", **draw)
    else:
        draw = dict(boxes=boxes, box_convention=args.box_convention)
        no_cell = [i for i, c in enumerate(cells) if c is None]
        left = (f"; {len(no_cell)} tokens without a cell (not drawn) hold "
                f"{float(att_last[positions[no_cell]].sum()):.3f}" if no_cell else "")
        what = (f"{len(cells)} visual tokens, one panel per view; {viz.CELL_PIXEL_VALUE}; dashed: TARGET cells, "
                f"cyan: --box{left}")
        viz.cell_heatmap_grid({f"layer {L - 1} (last)": att_last}, positions, cells, views, image,
                              path=out / "heatmap.png", title=f"{query}. {what}", categories=key_cats,
                              panel=5.5 if len(views) == 1 else 3.6, **draw)
        viz.cell_heatmap_grid(att_layers, positions, cells, views, image, path=out / "heatmap_layers.png",
                              title=f"{rows_text}, mean over rows and heads. {what}", panel=2.6, **draw)
    heatmap = heatmap_record(att_last, att_layers, positions, cells, views, key_cats, image, layer=L - 1,
                             rows=rows_text)
    (out / "heatmap.json").write_text(json.dumps(heatmap) + "\n", encoding="utf-8")
    color_key, color_label = (("a", "target attention a (mean P' per target token, last layer)") if n_target else
                              ("mass_image", "image attention (P' on all visual tokens, last layer)"))
    title = f"{Path(args.model).name}, {intervention.describe()}: {args.question}"
    for suffix in ("png", "html"):
        viz.token_text_figure([r["token"] for r in records], [r[color_key] for r in records],
                              path=out / f"tokens.{suffix}", label=color_label, title=title, vmin=None)
    viz.layer_curves(masses, qcats, rows=args.vas_rows, path=out / "layers.png",
                     title=f"{rows_text}, {intervention.describe()}")
    series = ({"a (target, per token)": "a", "v (image, per token)": "v"} if n_target else
              {"image mass": "mass_image"})
    viz.entropy_bins(entropy, {label: torch.tensor([r[key] for r in records]) for label, key in series.items()},
                     path=out / "entropy.png", ylabel="attention (last layer)",
                     title=f"attention vs entropy of the {n} generated tokens")
    t_done = time.perf_counter()

    metrics = {
        "model": str(args.model),
        "model_type": model.config.model_type,
        "question": args.question,
        "answer": answer,
        "intervention": {"preset": intervention.name, "describe": intervention.describe(),
                         "params": {k: (v if isinstance(v, (int, float, bool, str, type(None))) else str(v))
                                    for k, v in intervention.params.items()},
                         "backend": resolve_backend(args.backend, model.device), "device": str(model.device),
                         "dtype": str(model.dtype).removeprefix("torch.")},
        "box": {"given": boxes, "convention": args.box_convention, "pixels": [list(b) for b in boxes_px],
                "target_tokens": n_target, "image_tokens": int(positions.numel())},
        "heatmap": {"file": "heatmap.json", "layer": L - 1, "drawn": "qwen_grid" if qwen_grid else "cells",
                    "views": heatmap["views"], "value": viz.HEATMAP_VALUE},
        "tokens": {"prompt": S, "generated": n, "system": n_system},
        "answer_rows": "the query rows that produced each generated token (last prompt row, then the rows of "
                       "generated tokens 0..n-2); token metrics at the last layer",
        "vas": {"value": vas.mean(), "form": vas.form, "rows": vas.rows, "describe": vas.describe(),
                "per_layer": vas.per_layer[:, 0].tolist()},
        "vas_share": {"value": vas_share.mean(), "form": vas_share.form, "rows": vas_share.rows,
                      "describe": vas_share.describe(),
                      "per_layer": vas_share.per_layer[:, 0].tolist()},
        "target_attention": {"layer": L - 1, "defined": n_target > 0,
                             **{f"{k}_mean": _finite_mean(r[k] for r in records) for k in ("a", "v", "R_a")}},
        "mass_shares": {"layer": L - 1, "rows": args.vas_rows, **{name: profile[name][-1] for name in viz.PROFILE_CATEGORIES}},
        "mass_shares_per_layer": {name: profile[name] for name in viz.PROFILE_CATEGORIES},
        "entropy_mean": _finite_mean(entropy.tolist()),
        "timing_s": {"load": t_loaded - t_start, "generate": t_generated - t_loaded, "outputs": t_done - t_generated,
                     "total": t_done - t_start, "tokens_per_s": n / max(t_generated - t_loaded, 1e-9)},
    }
    (out / "metrics.json").write_text(json.dumps(_clean(metrics), indent=2) + "\n", encoding="utf-8")
    print(answer)
    print(f"VAS {vas.mean():.4g} ({vas.describe()}); outputs in {out}/")
    if n_system == 0:
        print("note: the prompt has no system turn (this chat template adds none): VAS (ratio form) is undefined "
              "and beta (system suppression) changes nothing; pass --system TEXT")
    return 0


__all__ = ["add_arguments", "build_intervention", "heatmap_record", "image_tokens", "load_image", "run",
           "token_pieces"]
