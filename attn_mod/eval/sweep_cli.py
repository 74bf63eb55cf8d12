"""`attn-mod sweep CONFIG.yaml` and `attn-mod eval --model PATH --data FILE [--preset avar --alpha A --beta B]`."""

from __future__ import annotations

import argparse

# Only argparse at import time (fast --help); configs are validated before the runner (torch, transformers)
# is imported.


def _add_resume(p: argparse.ArgumentParser, folder: str) -> None:
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help=f"skip samples and cells already in {folder}/results.jsonl (default); "
                        "--no-resume deletes them and starts over")


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="sweep YAML (see configs/sweeps/)")
    _add_resume(p, "OUTPUT_DIR")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples of each dataset")
    p.add_argument("--output-dir", default=None, help="override output_dir of the config (relative to the "
                   "current folder; relative paths inside the YAML are relative to the YAML file)")
    p.add_argument("--device", default=None, help="override device of the config (cpu, cuda, cuda:1 ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--num-processes", type=int, default=None,
                   help="run in N processes (one per GPU with device: cuda; gloo on CPU) through accelerate launch; "
                        "results are merged into the same files as a one-process run")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF model directory, or tiny:qwen2_5_vl / tiny:qwen3_vl")
    p.add_argument("--data", action="append", required=True, help="benchmark file or folder (repeatable)")
    p.add_argument("--preset", default="avar", choices=["avar", "pai", "vaf", "identity"])
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--raw", action="store_true", help="AVAR without renormalisation (literal element-wise)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="layers of the intervention: indices, 'start:stop' or 'all' (default: the preset's; pai "
                        "and vaf defaults are fractions of the depth)")
    p.add_argument("--enhance", type=float, default=None, help="vaf: image-key score factor (default 1.15)")
    p.add_argument("--suppress", type=float, default=None, help="vaf: system-key score factor (default 0.95)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the unpatched model (default)")
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own; Qwen3-VL "
                   "has none, and without one beta does nothing and VAS is undefined)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default="runs/eval", help="output folder (default runs/eval)")
    _add_resume(p, "OUT")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "flex"])
    p.add_argument("--attention-metrics", action="store_true", help="record VAS / target attention per sample")
    p.add_argument("--vas-rows", default="response", choices=["response", "answer", "after_image", "all"],
                   help="query rows of VAS (default response: the generated-token rows; answer: also the last "
                        "prompt row, see attn_mod.metrics.select_rows)")
    p.add_argument("--metric", default=None,
                   help="benchmark score for every --data (mmbench, hallusionbench, mme, pope, mathvista, accuracy); "
                        "default: chosen by the file name")
    p.add_argument("--no-progress", action="store_true")


def _print_result(result) -> None:
    if not result.is_main:
        return  # the other processes of a distributed run: rank 0 reports
    print(result.paths["markdown"].read_text())
    print(f"results: {result.paths['results']} ({result.new_records} new rows)")
    for key, path in sorted(result.paths.items()):
        if key.startswith("heatmap"):
            print(f"heatmap: {path}")


def cmd_sweep(args) -> int:
    from pathlib import Path

    if not Path(args.config).is_file():  # before torch is imported
        raise FileNotFoundError(f"config file {args.config!r} not found")
    from .sweep_config import check_model, load_sweep_config

    overrides = {k: v for k, v in (("output_dir", args.output_dir), ("device", args.device)) if v is not None}
    cfg = load_sweep_config(args.config, overrides=overrides)  # validated before any process starts
    check_model(cfg)
    if args.num_processes is not None and args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes and args.num_processes > 1:
        from .distributed import launch

        if cfg.device.startswith("cuda"):
            import torch

            if args.num_processes > torch.cuda.device_count():
                raise ValueError(f"--num-processes {args.num_processes} needs as many GPUs, this machine has "
                                 f"{torch.cuda.device_count()}; use fewer processes or device: cpu")

        argv = ["sweep", args.config, "--resume" if args.resume else "--no-resume"]
        for flag, value in (("--limit", args.limit), ("--output-dir", args.output_dir), ("--device", args.device)):
            if value is not None:
                argv += [flag, str(value)]
        return launch(argv + (["--no-progress"] if args.no_progress else []), args.num_processes,
                      cpu=not cfg.device.startswith("cuda"))
    from .sweep import run_sweep

    _print_result(run_sweep(cfg, resume=args.resume, limit=args.limit, progress=not args.no_progress))
    return 0


def cmd_eval(args) -> int:
    from ..intervention import parse_layer_spec
    from .sweep_config import PRESET_PARAMS, CellConfig, DatasetConfig, GenerationConfig, SweepConfig, check_model

    params = {k: v for k, v in (("alpha", args.alpha), ("beta", args.beta), ("layers", parse_layer_spec(args.layers)),
                                ("enhance", args.enhance), ("suppress", args.suppress)) if v is not None}
    if args.raw:
        params["renorm"] = False
    allowed = PRESET_PARAMS[args.preset]
    wrong = [k for k in params if k not in allowed]
    if wrong:
        flags = ", ".join("--raw" if k == "renorm" else f"--{k}" for k in wrong)
        raise ValueError(f"--preset {args.preset} does not take {flags} (it takes "
                         f"{', '.join('--' + k for k in allowed if k != 'renorm') or 'no parameters'})")
    cells = [] if args.preset == "identity" else [CellConfig(preset=args.preset, params=params)]
    cfg = SweepConfig(model=args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                      datasets=[DatasetConfig(path=p, metric=args.metric) for p in args.data], cells=cells,
                      include_baseline=args.baseline or args.preset == "identity",
                      generation=GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
                      attention_metrics=args.attention_metrics, vas_rows=args.vas_rows, system=args.system,
                      output_dir=args.out)
    cfg.validate()
    check_model(cfg)
    from .sweep import run_sweep

    _print_result(run_sweep(cfg, resume=args.resume, limit=args.limit, progress=not args.no_progress))
    return 0

