"""`attn-mod ...` for test subprocesses (plain or under `accelerate launch`).

ATTN_MOD_TEST_STEP_SLEEP=seconds slows every optimizer step (so a test can kill a run mid-way).
ATTN_MOD_TEST_DUMP_MASSES=folder saves the masses the SFT attention losses receive in the first two micro-batches
of this process (folder/masses-rank{R}-call{N}.pt: masses, key categories, query rows), to compare runs."""

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

if os.environ.get("ATTN_MOD_TEST_DUMP_MASSES"):
    from pathlib import Path

    import torch

    from attn_mod.trainers import losses

    _folder, _agto, _calls = Path(os.environ["ATTN_MOD_TEST_DUMP_MASSES"]), losses.agto_losses, []

    def _dumping(masses, key_cats, rows, **kwargs):
        if len(_calls) < 2:
            _folder.mkdir(parents=True, exist_ok=True)
            rank = os.environ.get("RANK", "0")
            torch.save({"masses": masses.detach().cpu().clone(), "key_cats": key_cats.cpu(), "rows": rows.cpu()},
                       _folder / f"masses-rank{rank}-call{len(_calls)}.pt")
        _calls.append(1)
        return _agto(masses, key_cats, rows, **kwargs)

    losses.agto_losses = _dumping

from attn_mod.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
