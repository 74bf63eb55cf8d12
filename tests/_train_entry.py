"""`attn-mod ...` for test subprocesses (plain or under `accelerate launch`), with the losses stand-in if needed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_helpers import install_losses_standin  # noqa: E402

install_losses_standin()

from attn_mod.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
