"""Token labelling from exact ids: system turn, images, response, padding, targets, sink option."""

import pytest
import torch

from attn_mod.categories import (IMAGE, PAD, RESPONSE, SYSTEM, TARGET, TEXT, LabelOptions, RoleMarkers,
                                 label_tokens, parse_categories, prompt_end_index, validate_categories)
from attn_mod.tiny import build_processor
from helpers import chat_text, random_image, tok_id


def expected_labels(processor, ids, *, response_from_header=True):
    """Hand-rolled expectation by scanning decoded tokens (independent of the labeller's id matching)."""
    toks = processor.tokenizer.convert_ids_to_tokens(ids)
    text_so_far, out, turn, role_text = "", [], None, None
    for t in toks:
        if t == "<|im_start|>":
            turn, role_text = "open", ""
            out.append("start")
            continue
        if turn == "open":
            role_text += processor.tokenizer.convert_tokens_to_string([t])
            out.append(("header", role_text))
            if role_text.endswith("\n"):
                turn = role_text.strip()
            continue
        out.append(("body", turn, t))
        if t == "<|im_end|>":
            turn = "closed:" + (turn or "")
    # second pass -> codes
    codes, cur_role = [], None
    for i, item in enumerate(out):
        if item == "start":
            # find this turn's role
            j = i + 1
            while j < len(out) and out[j][0] == "header":
                role = out[j][1]
                j += 1
            cur_role = role.strip()
            codes.append(SYSTEM if cur_role == "system" else TEXT)
        elif item[0] == "header":
            codes.append(SYSTEM if cur_role == "system" else TEXT)
        else:
            _, turn, tok = item
            in_system = turn == "system" or (turn == "closed:system" and tok == "<|im_end|>")
            in_assistant = turn == "assistant" or (turn == "closed:assistant" and tok == "<|im_end|>")
            if tok in ("<|image_pad|>", "<|video_pad|>"):
                codes.append(IMAGE)
            elif in_system:
                codes.append(SYSTEM)
            elif in_assistant and response_from_header:
                codes.append(RESPONSE)
            else:
                codes.append(TEXT)
    return codes


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family_processor(request):
    return request.param, build_processor(request.param)


def markers_of(processor):
    return RoleMarkers.from_tokenizer(processor.tokenizer)


def test_generation_prompt_labels(family_processor):
    family, proc = family_processor
    text = chat_text(proc, "What color is the square?")
    batch = proc(text=[text], images=[random_image(70, 50)], return_tensors="pt")
    cats = label_tokens(batch["input_ids"], markers_of(proc), attention_mask=batch["attention_mask"],
                        mm_token_type_ids=batch["mm_token_type_ids"])
    ids = batch["input_ids"][0].tolist()
    assert cats[0].tolist() == expected_labels(proc, ids)
    n_img = int((batch["input_ids"] == tok_id(proc, "<|image_pad|>")).sum())
    assert n_img > 0 and int((cats == IMAGE).sum()) == n_img
    assert not (cats == RESPONSE).any()  # generation prompt: no answer yet
    if family == "qwen3_vl":
        assert not (cats == SYSTEM).any()  # no default system turn
    else:
        first_end = ids.index(tok_id(proc, "<|im_end|>"))
        assert cats[0, : first_end + 1].eq(SYSTEM).all() and cats[0, first_end + 1] == TEXT
    # vision_start / vision_end are TEXT
    vs = ids.index(tok_id(proc, "<|vision_start|>"))
    assert cats[0, vs] == TEXT


def test_teacher_forced_response_and_left_padding(family_processor):
    family, proc = family_processor
    texts = [chat_text(proc, "Describe.", answer="The answer is B.", system="Be brief."),
             chat_text(proc, "How many objects are there in the picture?", answer="3")]
    batch = proc(text=texts, images=[random_image(64, 64), random_image(90, 60, 1)], return_tensors="pt",
                 padding=True)
    cats = label_tokens(batch["input_ids"], markers_of(proc), attention_mask=batch["attention_mask"],
                        mm_token_type_ids=batch["mm_token_type_ids"])
    for b in range(2):
        valid = batch["attention_mask"][b].bool()
        assert cats[b][~valid].eq(PAD).all()
        assert cats[b][valid].tolist() == expected_labels(proc, batch["input_ids"][b][valid].tolist())
        assert (cats[b] == RESPONSE).any()
        # sample 0 has an explicit system turn; sample 1 gets Qwen2.5-VL's default one, none on Qwen3-VL
        assert bool((cats[b] == SYSTEM).any()) == (b == 0 or family == "qwen2_5_vl")
    assert (~batch["attention_mask"].bool()).any()  # the batch really is padded


def test_labels_define_response(family_processor):
    _, proc = family_processor
    batch = proc(text=[chat_text(proc, "Describe.", answer="Yes.")], images=[random_image(64, 64)], return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -4:-1] = batch["input_ids"][0, -4:-1]
    cats = label_tokens(batch["input_ids"], markers_of(proc), mm_token_type_ids=batch["mm_token_type_ids"],
                        labels=labels)
    assert (cats == RESPONSE).nonzero()[:, 1].tolist() == list(range(cats.shape[1] - 4, cats.shape[1] - 1))


def test_target_mask_and_sink(family_processor):
    family, proc = family_processor
    batch = proc(text=[chat_text(proc, "Where?")], images=[random_image(64, 64)], return_tensors="pt")
    img_pos = (batch["mm_token_type_ids"][0] == 1).nonzero().flatten()
    target = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    target[0, img_pos[1:3]] = True
    cats = label_tokens(batch["input_ids"], markers_of(proc), mm_token_type_ids=batch["mm_token_type_ids"],
                        target_mask=target, options=LabelOptions(sink_category=TEXT if family != "qwen3_vl" else 6))
    assert (cats == TARGET).nonzero()[:, 1].tolist() == img_pos[1:3].tolist()
    assert cats[0, 0] == (TEXT if family != "qwen3_vl" else 6)
    bad = torch.zeros_like(target)
    bad[0, 0] = True
    with pytest.raises(ValueError, match="non-visual token"):
        label_tokens(batch["input_ids"], markers_of(proc), mm_token_type_ids=batch["mm_token_type_ids"],
                     target_mask=bad)
    with pytest.raises(ValueError, match="must match"):
        label_tokens(batch["input_ids"], markers_of(proc), target_mask=target[:, :-1])


def test_fallback_to_placeholder_ids_without_mm_token_type_ids():
    proc = build_processor("qwen2_5_vl")
    batch = proc(text=[chat_text(proc, "Hi")], images=[random_image(64, 64)], return_tensors="pt")
    a = label_tokens(batch["input_ids"], markers_of(proc), mm_token_type_ids=batch["mm_token_type_ids"])
    b = label_tokens(batch["input_ids"], markers_of(proc))
    assert torch.equal(a, b) and (a == IMAGE).any()


def test_prompt_end_index():
    cats = torch.tensor([[0, 0, 1, 2, 2, 5, 5], [1, 2, 3, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.int8)
    assert prompt_end_index(cats).tolist() == [4, 6, -1]


def test_parse_and_validate_errors():
    assert parse_categories(["visual", "system", 5]) == (IMAGE, TARGET, SYSTEM, RESPONSE)
    with pytest.raises(ValueError, match="known names"):
        parse_categories("imgae")
    with pytest.raises(ValueError, match="outside"):
        parse_categories(9)
    with pytest.raises(ValueError, match="one label per token"):
        validate_categories(torch.ones(2, 5, dtype=torch.long), (2, 6))
    with pytest.raises(ValueError, match="integer"):
        validate_categories(torch.ones(2, 5))
    with pytest.raises(ValueError, match="0..7"):
        validate_categories(torch.full((1, 3), 8))
