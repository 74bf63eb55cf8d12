"""The test matrix behind README's "Supported models" table: family x feature -> the test that backs the cell.

    python tests/support_matrix.py          # print the table
    python tests/support_matrix.py --write  # rewrite the table in README.md from MATRIX

`tests/test_families.py::test_readme_supported_models_table_is_generated_from_the_matrix` checks that README's
table equals `render()` and that every cited test exists.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = {"F": "test_families.py", "P": "test_patch_models.py", "M": "test_metrics.py",
         "ML": "test_families_mllama.py", "I": "test_families_idefics_onevision.py", "G": "test_families_gemma3.py",
         "S": "test_train_sft.py", "T": "test_train_families.py", "R": "test_train_run.py"}
FEATURES = ("intervention", "masses", "regions", "generate", "training step", "attn-mod train")
CITE = re.compile(r"\b(ML|[FPMIGSTR])::(\w+)")
_TRAIN = "T::test_sft_step0_labels_and_losses_match_eager_float64"
_REFUSED = "refused (collator): R::test_train_refuses_families_its_collator_does_not_encode"

_QWEN = ("P::test_avar_matches_eager_formula", "P::test_identity_matches_eager_logits_and_masses",
         "M::test_set_target_from_pixel_boxes", "P::test_left_padded_generate_equals_single_prompts",
         "P::test_training_gradients_match_eager_and_checkpointing_records_once",
         "S::test_step0_losses_match_eager_float64")
_UNKNOWN = "F::test_unknown_family_explicit_labels_and_user_geometry"
# (row label, one cell per FEATURES); a label's (`model_type`) names the adapter family it covers
MATRIX: list[tuple[str, tuple[str, ...]]] = [
    ("Qwen2.5-VL (`qwen2_5_vl`)", _QWEN),
    ("Qwen3-VL (`qwen3_vl`)", _QWEN),
    ("LLaVA-1.5 (`llava`)", ("F::test_avar_matches_eager_formula", "F::test_identity_matches_eager_logits_and_masses",
                             "F::test_llava_boxes_match_processor_patches",
                             "F::test_left_padded_generate_equals_single_prompts", "F::test_training_gradients_match_eager",
                             _TRAIN)),
    ("InternVL3 / 3.5 -HF (`internvl`)", ("F::test_avar_matches_eager_formula",
                                          "F::test_identity_matches_eager_logits_and_masses",
                                          "F::test_internvl_boxes_match_processor_tiles",
                                          "F::test_left_padded_generate_equals_single_prompts",
                                          "F::test_training_gradients_match_eager", _TRAIN)),
    ("LLaVA-OneVision (`llava_onevision`)", ("I::test_onevision_avar_matches_eager_formula",
                                             "I::test_onevision_identity_matches_eager_logits_and_masses",
                                             "I::test_onevision_boxes_match_processor_crops",
                                             "I::test_onevision_left_padded_generate_equals_single_prompts",
                                             "I::test_onevision_training_gradients_match_eager", _TRAIN)),
    ("Mllama / Llama-3.2-Vision (`mllama`)", ("ML::test_intervention_matches_eager_formula",
                                              "ML::test_identity_matches_eager_logits_and_masses",
                                              "ML::test_mllama_boxes_match_processor_tiles",
                                              "ML::test_left_padded_generate_equals_single_prompts",
                                              "ML::test_training_gradients_match_eager", _REFUSED)),
    ("Gemma3 (`gemma3`)", ("G::test_avar_matches_independent_eager_formula",
                           "G::test_identity_matches_eager_logits_and_masses", "G::test_boxes_match_processor_pixels",
                           "G::test_left_padded_generate_equals_single_prompts", "G::test_training_gradients_match_eager",
                           _TRAIN)),
    ("Idefics3 (`idefics3`) / SmolVLM (`smolvlm`)", ("I::test_avar_matches_eager_formula",
                                                     "I::test_identity_matches_eager_logits_and_masses",
                                                     "I::test_boxes_match_processor_sub_images_and_global_image",
                                                     "I::test_left_padded_generate_equals_single_prompts",
                                                     "I::test_training_gradients_match_eager", _TRAIN)),
    ("any other decoder VLM (explicit labels)", (_UNKNOWN, _UNKNOWN, "user geometry: " + _UNKNOWN, _UNKNOWN,
                                                 "F::test_unknown_family_training_gradients_match_eager",
                                                 "no (needs a family adapter; patch + capture + losses in your own "
                                                 "loop: F::test_unknown_family_training_gradients_match_eager)")),
]


def render() -> str:
    """The markdown table (header, rule, one line per MATRIX row)."""
    lines = ["| family | " + " | ".join(FEATURES) + " |", "|" + "---|" * (len(FEATURES) + 1)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in MATRIX]
    return "\n".join(lines)


def readme_table(text: str) -> tuple[int, int]:
    """[start, end) character span of the table in README's "Supported models" section."""
    start = text.index("| family | ", text.index("## Supported models"))
    end = text.index("\n\n", start)
    return start, end


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        readme = ROOT / "README.md"
        text = readme.read_text()
        a, b = readme_table(text)
        readme.write_text(text[:a] + render() + text[b:])
    else:
        print(render())
