"""`attn-mod ...` for test subprocesses (plain or under `accelerate launch`).

ATTN_MOD_TEST_STEP_SLEEP=seconds slows every optimizer step (so a test can kill a run mid-way)."""

import os
import sys
import time

if os.environ.get("ATTN_MOD_TEST_STEP_SLEEP"):
    from attn_mod.trainers.loop import Recipe

    _pause = float(os.environ["ATTN_MOD_TEST_STEP_SLEEP"])
    _micro = Recipe.micro_batch

    def _slow_micro(self, step, micro):
        time.sleep(_pause)
        return _micro(self, step, micro)

    Recipe.micro_batch = _slow_micro

from attn_mod.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
