"""eval.harness.lmms_eval_adapter against lmms-eval's documented `lmms` interface.

lmms-eval is NOT imported (not installed here; it pulls torchvision). Requests are fake Instance-like
objects whose `args` follow lmms-eval's simple-model layout (context, gen_kwargs, doc_to_visual, doc_id,
task, split) and documents come from `lm.task_dict[task][split][doc_id]`, as in EvolvingLMMs-Lab/lmms-eval
lmms_eval/api/model.py @ 06fd786 and lmms_eval/models/simple/qwen2_5_vl.py @ 0229ae5.
"""

import sys
import types
from dataclasses import dataclass, field

import pytest

import attn_mod
from attn_mod.categories import IMAGE, SYSTEM
from attn_mod.eval.generation import Request, generate_batch
from attn_mod.eval.harness import lmms_eval_adapter
from attn_mod.eval.harness.lmms_eval_adapter import AttnModLMMs, parse_arg_string, register_with_lmms_eval
from attn_mod.patch import patch_state
from attn_mod.tiny import build_tiny, save_tiny
from helpers import random_image

TASK, SPLIT = "tiny_vqa", "test"


@dataclass
class FakeInstance:
    """The fields of lmms_eval.api.instance.Instance that models read (`args` returns `arguments`)."""

    request_type: str
    arguments: tuple
    idx: int = 0
    metadata: dict = field(default_factory=dict)

    @property
    def args(self):
        return self.arguments


def doc_to_visual(doc):
    return [random_image(w, h, seed=s) for (w, h, s) in doc["images"]]


@pytest.fixture(scope="module")
def setup():
    model, proc = build_tiny("qwen2_5_vl")
    handle = attn_mod.patch(model, proc, intervention=attn_mod.Intervention.avar(alpha=0.5, beta=0.0))
    lm = AttnModLMMs(model, proc, handle=handle, batch_size=2, max_new_tokens=4)
    docs = [{"images": [(56, 56, 0)]}, {"images": [(84, 56, 1), (56, 84, 2)]}, {"images": []}]
    lm.task_dict = {TASK: {SPLIT: docs}}  # what lmms-eval's evaluator sets: task_obj.dataset
    yield lm, model, proc, handle, docs
    handle.remove()


def inst(context, doc_id, gen_kwargs=None, visual=doc_to_visual):
    return FakeInstance("generate_until", (context, dict(gen_kwargs or {}), visual, doc_id, TASK, SPLIT))


def direct(model, proc, question, doc, n):
    return generate_batch(model, proc, [Request(question, doc_to_visual(doc))], max_new_tokens=n)[0].text


def test_interface_without_lmms_eval():
    assert issubclass(AttnModLMMs, lmms_eval_adapter.lmms)
    if not lmms_eval_adapter.HAVE_LMMS_EVAL:
        assert lmms_eval_adapter.lmms is lmms_eval_adapter._LMMsStandIn and "lmms_eval" not in sys.modules
    assert AttnModLMMs.is_simple is True


def test_generate_until_batched_in_order_and_through_patched_attention(setup):
    lm, model, proc, _, docs = setup
    reqs = [inst("<image>\nWhat is it?", 0), inst("<image 1> and <image 2>: compare.", 1, {"max_new_tokens": 2}),
            inst("Text only.", 2), inst("Again: what is it?", 1)]
    with attn_mod.capture(model) as rec:
        outs = lm.generate_until(reqs)
    # gen_kwargs groups: {4 tokens: requests 0, 2, 3 -> batches of 2 and 1}, {2 tokens: request 1} -> 3 batches
    assert rec.num_runs == 3
    # run order: batch [0, 2], batch [3], batch [1]; 56x56 -> 4 image tokens, 84x56 and 56x84 -> 6 each
    assert [int((rec.categories_of(r) == IMAGE).sum()) for r in range(3)] == [4, 12, 12]
    expected = [direct(model, proc, "What is it?", docs[0], 4), direct(model, proc, "and : compare.", docs[1], 2),
                direct(model, proc, "Text only.", docs[2], 4), direct(model, proc, "Again: what is it?", docs[1], 4)]
    assert outs == expected and all(isinstance(o, str) for o in outs)


def test_until_cuts_the_answer(setup):
    lm, model, proc, _, docs = setup
    full = lm.generate_until([inst("What is it?", 0, {"max_new_tokens": 8})])[0]
    assert len(full) >= 2
    stop = full[-1]
    cut = lm.generate_until([inst("What is it?", 0, {"max_new_tokens": 8, "until": [stop, ""]})])[0]
    assert cut == full.split(stop)[0] and len(cut) < len(full)
    assert lm.generate_until([inst("What is it?", 0, {"max_new_tokens": 8, "until": stop})]) == [cut]


def test_gen_kwargs_translation(setup):
    lm, *_ = setup
    req, gen, until = lm._request(inst("<image>Q?", 0, {"until": ["\n\n"], "temperature": 0, "top_p": None,
                                                         "num_beams": 1, "image_aspect_ratio": "pad"}))
    assert req.question == "Q?" and len(req.images) == 1 and until == ["\n\n"]
    assert gen == {"max_new_tokens": 4, "do_sample": False}
    _, gen, _ = lm._request(inst("Q?", 2, {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5}))
    assert gen == {"max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "seed": None}
    with pytest.raises(NotImplementedError, match="num_beams"):
        lm._request(inst("Q?", 0, {"num_beams": 3}))
    with pytest.raises(KeyError, match="task_dict"):
        lm.generate_until([inst("Q?", 99)])


def test_visual_paths_and_none(setup, tmp_path):
    lm, model, proc, _, docs = setup
    path = tmp_path / "x.png"
    doc_to_visual(docs[0])[0].save(path)
    by_path = lm.generate_until([inst("What is it?", 0, visual=lambda doc: [str(path)])])
    assert by_path == [direct(model, proc, "What is it?", docs[0], 4)]
    assert lm.generate_until([inst("Text only.", 0, visual=lambda doc: None)]) == \
        [direct(model, proc, "Text only.", docs[2], 4)]
    with pytest.raises(NotImplementedError, match="video"):
        lm.generate_until([inst("Q?", 0, visual=lambda doc: ["clip.mp4"])])


def test_update_reaches_the_model(setup):
    lm, model, _, handle, _ = setup
    lm.update(beta=1.0)
    try:
        assert handle.intervention.params["beta"] == 1.0
        with attn_mod.capture(model) as rec:
            lm.generate_until([inst("What is it?", 0)])
        rows, mass = rec.query_categories(), rec.mass(-1)[..., SYSTEM]
        assert float(mass[(rows != SYSTEM)[:, None, :].expand(mass.shape)].max()) < 1e-6
    finally:
        lm.update(beta=0.0)
    with attn_mod.capture(model) as rec:
        lm.generate_until([inst("What is it?", 0)])
    assert float(rec.mass(-1)[..., SYSTEM].max()) > 0.05


def test_unimplemented_request_types_say_why(setup):
    lm, *_ = setup
    with pytest.raises(NotImplementedError, match="only generates"):
        lm.loglikelihood([FakeInstance("loglikelihood", ("ctx", " cont", doc_to_visual, 0, TASK, SPLIT))])
    with pytest.raises(NotImplementedError, match="one user turn"):
        lm.generate_until_multi_round([inst("Q?", 0)])


def test_create_from_arg_string_loads_and_patches(tmp_path):
    path = save_tiny("qwen2_5_vl", tmp_path / "tiny")
    lm = AttnModLMMs.create_from_arg_string(
        f"pretrained={path},intervention=avar,alpha=0.3,beta=0.2,max_new_tokens=3",
        {"batch_size": 2, "max_batch_size": None, "device": "cpu"})
    try:
        assert lm.batch_size == 2 and lm.max_new_tokens == 3
        assert patch_state(lm.model) is lm.handle.state
        assert lm.handle.intervention.params["alpha"] == 0.3 and lm.handle.intervention.params["beta"] == 0.2
        lm.task_dict = {TASK: {SPLIT: [{"images": [(56, 56, 0)]}]}}
        assert isinstance(lm.generate_until([inst("What is it?", 0)])[0], str)
    finally:
        lm.handle.remove()
    with pytest.raises(ValueError, match="pretrained"):
        AttnModLMMs.create_from_arg_string("intervention=avar")
    assert parse_arg_string("a=1, b=0.5,c=true,d=None,e=x") == {"a": 1, "b": 0.5, "c": True, "d": None, "e": "x"}


def test_register_with_lmms_eval(monkeypatch):
    if not lmms_eval_adapter.HAVE_LMMS_EVAL:
        with pytest.raises(ImportError, match="lmms-eval"):
            register_with_lmms_eval()
    # a stand-in lmms_eval package exposing upstream's registry API (register_model(*names) -> decorator)
    registry = {}

    def register_model(*names):
        def decorate(cls):
            for name in names:
                assert issubclass(cls, lmms_eval_adapter.lmms)
                registry[name] = cls
            return cls
        return decorate

    pkg, api = types.ModuleType("lmms_eval"), types.ModuleType("lmms_eval.api")
    mod_model, mod_registry = types.ModuleType("lmms_eval.api.model"), types.ModuleType("lmms_eval.api.registry")
    mod_model.lmms = lmms_eval_adapter.lmms
    mod_registry.register_model = register_model
    for name, mod in [("lmms_eval", pkg), ("lmms_eval.api", api), ("lmms_eval.api.model", mod_model),
                      ("lmms_eval.api.registry", mod_registry)]:
        monkeypatch.setitem(sys.modules, name, mod)
    assert register_with_lmms_eval("attn_mod_test") is AttnModLMMs
    assert registry == {"attn_mod_test": AttnModLMMs}
    mod_model.lmms = type("OtherLMMs", (), {})
    with pytest.raises(RuntimeError, match="does not subclass"):
        register_with_lmms_eval()
