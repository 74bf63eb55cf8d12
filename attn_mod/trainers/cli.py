"""`attn-mod train CONFIG.yaml [section.key=value ...] [--resume]`.

Multi-process data parallel (DDP): `accelerate launch --multi_gpu --num_processes N -m attn_mod train CONFIG.yaml`
(on CPU: prefix `ACCELERATE_USE_CPU=true`, gloo). Exit codes: 0 done, 1 stopped (non-finite loss), 2 bad config /
data.
"""

from __future__ import annotations

import argparse
import sys


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training YAML (configs/train/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides validated like the file, e.g. optim.lr=1e-5 schedule.max_steps=10")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in output_dir (exactly: weights, optimizer, "
                        "scheduler, RNG, data position, metrics)")


def cmd_train(args) -> int:
    from .config import load_train_config
    from .loop import TrainingStopped, run

    cfg = load_train_config(args.config, args.overrides)
    try:
        run(cfg, resume=args.resume)
    except TrainingStopped as e:
        print(f"attn-mod train: stopped: {e}", file=sys.stderr)
        return 1
    return 0
