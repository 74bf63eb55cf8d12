"""eval.harness.vlmevalkit_adapter against VLMEvalKit's documented BaseModel interface.

VLMEvalKit is NOT imported (it is not installed: it pulls torchvision and a CUDA torch). The wrapper
subclasses the adapter's local stand-in, which mirrors open-compass/VLMEvalKit vlmeval/vlm/base.py
@ 23757c4 (`generate` -> `preproc_content` -> `generate_inner(message, dataset)`, `set_dump_image`,
`use_custom_prompt` / `build_prompt`); messages are lists of {'type': 'image'|'text', 'value': ...}.
"""

import sys

import pytest

import attn_mod
from attn_mod.categories import IMAGE, SYSTEM
from attn_mod.eval.generation import Request, generate_batch
from attn_mod.eval.harness import vlmevalkit_adapter
from attn_mod.eval.harness.vlmevalkit_adapter import AttnModVLMEval
from attn_mod.tiny import build_tiny
from helpers import random_image

N = 4  # max_new_tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, proc = build_tiny("qwen2_5_vl")
    handle = attn_mod.patch(model, proc, intervention=attn_mod.Intervention.avar(alpha=0.5, beta=0.0))
    root = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, (w, h) in enumerate([(56, 56), (84, 56)]):
        paths.append(str(root / f"im{i}.png"))
        random_image(w, h, seed=i).save(paths[-1])
    vlm = AttnModVLMEval(model, proc, handle=handle, max_new_tokens=N,
                         generation_overrides={"TinyOneToken": {"max_new_tokens": 1}}, custom_prompt=["TinyMCQ"])
    yield vlm, model, proc, handle, paths
    handle.remove()


def direct(model, proc, question, paths, system=None, n=N):
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    return generate_batch(model, proc, [Request(question, images, system)], max_new_tokens=n)[0]


def test_interface_without_vlmeval():
    assert issubclass(AttnModVLMEval, vlmevalkit_adapter.BaseModel)
    if not vlmevalkit_adapter.HAVE_VLMEVAL:
        assert vlmevalkit_adapter.BaseModel is vlmevalkit_adapter._BaseModelStandIn
        assert "vlmeval" not in sys.modules
    assert AttnModVLMEval.INTERLEAVE is True and AttnModVLMEval.allowed_types == ["text", "image"]
    for name in ("generate", "generate_inner", "use_custom_prompt", "build_prompt", "set_dump_image", "dump_image"):
        assert callable(getattr(AttnModVLMEval, name))


def test_multi_image_message_matches_direct_generation_and_uses_patched_attention(setup):
    vlm, model, proc, _, paths = setup
    message = [dict(type="image", value=paths[0]), dict(type="image", value=paths[1]),
               dict(type="text", value="How many pictures?"), dict(type="text", value="Answer briefly.")]
    with attn_mod.capture(model) as rec:
        out = vlm.generate(message, dataset="SomeDataset")
    assert isinstance(out, str)
    ref = direct(model, proc, "How many pictures?\nAnswer briefly.", paths)
    assert out == ref.text and vlm.last_output.token_ids == ref.token_ids
    assert rec.num_runs == 1
    n_img = int((rec.categories == IMAGE).sum())
    assert n_img == 4 + 6  # 56x56 -> 2x2 merged tokens, 84x56 -> 3x2
    assert float(rec.mass(-1)[..., IMAGE].sum()) > 0
    # the list-of-strings form (paths detected as images, like upstream parse_file) is the same request
    assert vlm.generate([paths[0], paths[1], "How many pictures?", "Answer briefly."], dataset="SomeDataset") == out


def test_dataset_is_passed_through(setup):
    vlm, model, proc, _, paths = setup
    message = [dict(type="image", value=paths[0]), dict(type="text", value="Describe it.")]
    vlm.generate(message, dataset=None)
    full = list(vlm.last_output.token_ids)
    vlm.generate(message, dataset="TinyOneToken")
    assert len(vlm.last_output.token_ids) <= 1 and vlm.last_output.token_ids == full[:1]
    assert len(full) >= 1


def test_system_role_becomes_the_system_turn(setup):
    vlm, model, proc, _, paths = setup
    msg = [dict(type="text", value="Be terse.", role="system"), dict(type="image", value=paths[1]),
           dict(type="text", value="Color?")]
    with attn_mod.capture(model) as rec:
        out = vlm.generate(msg)
        vlm.generate(msg[1:])  # no system item: the template's default system turn
    assert out == direct(model, proc, "Color?", [paths[1]], system="Be terse.").text
    n_system = [int((rec.categories_of(r) == SYSTEM).sum()) for r in range(2)]
    assert 0 < n_system[0] < n_system[1]  # "Be terse." is shorter than "You are a helpful assistant."


def test_custom_prompt_and_dump_image(setup):
    vlm, _, _, _, paths = setup
    assert vlm.use_custom_prompt("TinyMCQ") and not vlm.use_custom_prompt("MMBench_DEV_EN")
    line = {"index": 7, "question": "Which color?", "hint": "Look closely.", "A": "red", "B": "blue",
            "C": float("nan")}
    vlm.set_dump_image(lambda row: [paths[0], paths[1]] if row["index"] == 7 else [])
    msg = vlm.build_prompt(line, dataset="TinyMCQ")
    assert msg[:2] == [dict(type="image", value=paths[0]), dict(type="image", value=paths[1])]
    text = msg[2]["value"]
    assert msg[2]["type"] == "text" and text.startswith("Hint: Look closely.\nQuestion: Which color?\n")
    assert "A. red\nB. blue\n" in text and "C." not in text
    assert isinstance(vlm.generate(msg, dataset="TinyMCQ"), str)
    vlm.set_dump_image(None)  # without a dump function, an 'image_path' column is used
    plain = vlm.build_prompt({"question": "What is it?", "image_path": paths[0]}, dataset="TinyMCQ")
    assert plain == [dict(type="image", value=paths[0]), dict(type="text", value="What is it?")]
    with pytest.raises(ValueError, match="set_dump_image"):
        vlm.build_prompt({"question": "No image?"}, dataset="TinyMCQ")


def test_update_reaches_the_model(setup):
    vlm, model, _, handle, paths = setup
    message = [dict(type="image", value=paths[0]), dict(type="text", value="Describe it.")]
    vlm.update(beta=1.0)
    try:
        assert handle.intervention.params["beta"] == 1.0 and handle.intervention.params["alpha"] == 0.5
        with attn_mod.capture(model) as rec:
            vlm.generate(message)
        rows = rec.query_categories()
        mass = rec.mass(-1)[..., SYSTEM]
        assert float(mass[(rows != SYSTEM)[:, None, :].expand(mass.shape)].max()) < 1e-6
    finally:
        vlm.update(beta=0.0)
    with attn_mod.capture(model) as rec:
        vlm.generate(message)
    assert float(rec.mass(-1)[..., SYSTEM].max()) > 0.05
    with pytest.raises(RuntimeError, match="no patch handle"):
        AttnModVLMEval(model, None).update(alpha=0.1)


def test_unsupported_inputs(setup, tmp_path):
    vlm, _, _, _, paths = setup
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0")  # an existing .mp4 is typed 'video' by parse_file, then refused by allowed_types
    with pytest.raises(AssertionError, match="Invalid input type"):
        vlm.generate([dict(type="video", value=str(clip)), dict(type="text", value="What happens?")])
    with pytest.raises(NotImplementedError, match="video"):
        vlm.generate_inner([dict(type="video", value=str(clip))])
    with pytest.raises(NotImplementedError, match="assistant"):
        vlm.generate_inner([dict(type="text", value="Answer: (", role="assistant")])
    with pytest.raises(AssertionError):  # an image path that does not exist (upstream preproc_content check)
        vlm.generate([dict(type="image", value=paths[0] + ".missing.png"), dict(type="text", value="Hi")])
