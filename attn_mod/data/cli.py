"""`attn-mod data synthesize|grounded|filter`: the training-data pipelines.

    attn-mod data synthesize configs/data/avar_synthesis.yaml            # AVAR describe -> reason -> anchor
    attn-mod data grounded --format gqa --questions Q.json --scene-graphs SG.json --images DIR --out train.jsonl
    attn-mod data grounded --format refocus --annotations chart_wbb.json --out train.jsonl
    attn-mod data filter configs/data/difficulty_filter.yaml             # keep prompts with accuracy in [0.25, 0.75]
"""

from __future__ import annotations

import argparse


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="{synthesize,grounded,filter}")
    s = sub.add_parser("synthesize", help="AVAR visual-anchored reflection synthesis (OpenAI-compatible endpoints)")
    s.add_argument("config", help="synthesis YAML (see configs/data/avar_synthesis.yaml)")
    s.add_argument("--limit", type=int, default=None, help="only the first N source items")
    s.add_argument("--output-dir", default=None, help="override output_dir of the config")
    s.add_argument("--stop-after", choices=["describe", "reason"], default=None, help="run stages up to this one")
    s.add_argument("--no-progress", action="store_true")

    g = sub.add_parser("grounded", help="SAYO grounded data: GQA / ReFocus annotations -> training JSONL with boxes")
    g.add_argument("--format", required=True, choices=["gqa", "refocus"])
    g.add_argument("--out", required=True, help="output training JSONL")
    g.add_argument("--questions", help="gqa: questions JSON ({question_id: {...}})")
    g.add_argument("--scene-graphs", help="gqa: scene graphs JSON ({image_id: {width, height, objects}})")
    g.add_argument("--images", help="gqa: image folder (<imageId>.jpg); refocus: base of figure_path "
                                    "(default: the annotation file's folder)")
    g.add_argument("--targets", choices=["final", "program", "annotations"], default="final",
                   help="gqa: which object ids become TARGET boxes: the program's final target object(s) "
                        "(default), every id the program names, or the annotation ids")
    g.add_argument("--annotations", help="refocus: a *_wbb.json annotation file")
    g.add_argument("--kind", choices=["auto", "chart", "table"], default="auto", help="refocus: annotation kind")
    g.add_argument("--units", choices=["normalized", "pixel"], default="normalized",
                   help="refocus: box units (ReFocus writes fractions of the image size)")
    g.add_argument("--system", default=None, help="system prompt of every sample (default: none)")
    g.add_argument("--instructions", choices=["default", "cot"], default="cot",
                   help="answer instruction appended to the question (attn_mod.eval.prompts)")
    g.add_argument("--limit", type=int, default=None)
    g.add_argument("--no-progress", action="store_true")

    f = sub.add_parser("filter", help="difficulty filter: G rollouts per prompt, keep accuracy in [low, high]")
    f.add_argument("config", help="filter YAML (see configs/data/difficulty_filter.yaml)")
    f.add_argument("--limit", type=int, default=None)
    f.add_argument("--output-dir", default=None, help="override output_dir of the config")
    f.add_argument("--no-progress", action="store_true")


def cmd_data(args) -> int:
    from ..config import load_config

    if args.data_command == "synthesize":
        from .synthesis import SynthesisConfig, run_synthesis, summary_table

        overrides = {"output_dir": args.output_dir} if args.output_dir else None
        cfg = load_config(SynthesisConfig, args.config, overrides=overrides)
        result = run_synthesis(cfg, progress=not args.no_progress, limit=args.limit, stop_after=args.stop_after)
        print(summary_table(result))
        print(f"train: {result.paths['train']}  rejected: {result.paths['rejected']}  report: {result.paths['report']}")
        return 0
    if args.data_command == "grounded":
        from .grounded import convert_gqa, convert_refocus, summary_table

        if args.format == "gqa":
            missing = [n for n in ("questions", "scene_graphs", "images") if not getattr(args, n)]
            if missing:
                raise ValueError(f"--format gqa needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
            result = convert_gqa(args.questions, args.scene_graphs, args.images, args.out, targets=args.targets,
                                 system=args.system, instructions=args.instructions, limit=args.limit,
                                 progress=not args.no_progress)
        else:
            if not args.annotations:
                raise ValueError("--format refocus needs --annotations FILE (a ReFocus *_wbb.json)")
            result = convert_refocus(args.annotations, args.out, image_root=args.images, kind=args.kind, units=args.units,
                                     system=args.system, instructions=args.instructions, limit=args.limit,
                                     progress=not args.no_progress)
        print(summary_table(result))
        return 0
    if args.data_command == "filter":
        from .difficulty import FilterConfig, run_filter, summary_table

        overrides = {"output_dir": args.output_dir} if args.output_dir else None
        cfg = load_config(FilterConfig, args.config, overrides=overrides)
        result = run_filter(cfg, limit=args.limit, progress=not args.no_progress)
        print(summary_table(result))
        return 0
    raise ValueError("choose a data command: attn-mod data synthesize|grounded|filter ... (see attn-mod data -h)")
