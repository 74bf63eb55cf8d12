"""The `attn-mod` command. Each subcommand lives in a module with `add_<name>_arguments(parser)` (or
`add_arguments`) and `cmd_<name>(args) -> int` (or `run`); modules are imported only when their
subcommand runs (fast `--help`)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("attn_mod.demo", "build the embedded tiny model + synthetic benchmark and run the main job"),
    "inspect": ("attn_mod.inspect", "generate with attention capture; write answer, metrics and pictures"),
    "sweep": ("attn_mod.eval.sweep_cli", "alpha/beta (or any intervention) sweep over local benchmarks"),
    "eval": ("attn_mod.eval.sweep_cli", "evaluate one intervention on local benchmarks"),
    "train": ("attn_mod.trainers.cli", "train with attention objectives (SFT / GRPO recipes from a YAML config)"),
    "study": ("attn_mod.eval.study", "accuracy vs attention (VAS, target attention) over sweep / eval runs"),
    "data": ("attn_mod.data.cli", "training data: AVAR synthesis, SAYO grounded converters, difficulty filter"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attn-mod", description="Category-aware attention for VLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            (getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments)(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    mod = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int((getattr(mod, f"cmd_{args.command}", None) or mod.run)(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"attn-mod {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:  # a refused setup (its message names the reason and the way out)
        print(f"attn-mod {args.command}: not supported: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # one line, not a traceback; a sweep says what is saved
        print(f"attn-mod {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
