"""Tiny, offline, randomly initialised VLMs for tests, demos and benchmarks.

Nothing here downloads: the tokenizer is a byte-level BPE trained on a few sentences with the
Qwen special tokens, the image processor is transformers' PIL Qwen2-VL processor, and the models
are built from small configs (hidden 64, 2 layers, 4 heads, 2 KV heads, vision depth 1).

    model, processor = build_tiny("qwen2_5_vl")
    save_tiny("qwen2_5_vl", "/tmp/tiny")        # a local HF directory, loadable by path
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's released template (default system turn when none is given).
QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's template has no default system turn.
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "system user assistant",
    "Describe the image. What color is the square? Answer with a single letter.",
    "The answer is A. The answer is B. The answer is C. The answer is D. Yes. No.",
    "How many objects are there in the picture? There are 3 red circles and 2 blue squares.",
    "Question: Which option is correct? Options: A. red B. green C. blue D. yellow",
    "Please think step by step and put the final answer in \\boxed{}. 0 1 2 3 4 5 6 7 8 9",
    "the a of to in is on at left right top bottom chart plot value number count",
]

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava", "internvl", "mllama", "idefics3", "smolvlm", "llava_onevision",
            "gemma3")


def _train_bpe(corpus, special_tokens, vocab_size: int, pre_tokenizer=None):
    """A byte-level BPE `tokenizers.Tokenizer` trained offline on `corpus` (x4) with `special_tokens`
    (`pre_tokenizer`: default GPT-2-style ByteLevel)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return tok


def build_tokenizer(family: str = "qwen2_5_vl", vocab_size: int = 400, extra_corpus=()):
    """A byte-level BPE `PreTrainedTokenizerFast` with the family's special tokens and chat template.
    `extra_corpus` (sentences) is added to the BPE training text, e.g. a task's words so they tokenise short."""
    if family == "llava":
        return build_llava_tokenizer(vocab_size)
    if family == "internvl":
        return build_internvl_tokenizer(vocab_size)
    if family == "mllama":
        return build_mllama_tokenizer(vocab_size)
    if family in IDEFICS3_TINY:
        return build_idefics3_tokenizer(family, vocab_size)
    if family == "llava_onevision":
        return build_onevision_tokenizer(vocab_size)
    if family == "gemma3":
        return build_gemma3_tokenizer(vocab_size)
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(_CORPUS + list(extra_corpus), SPECIAL_TOKENS, vocab_size)
    template = QWEN3_VL_TEMPLATE if family == "qwen3_vl" else QWEN2_5_VL_TEMPLATE
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=template,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )


def _processor_classes(family: str):
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Base
    elif family == "qwen3_vl":
        from transformers import Qwen3VLProcessor as Base
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")

    class _NoVideoProcessor(Base):
        """The family's processor without a video processor (needs torchvision, absent on CPU)."""

        def check_argument_for_proper_class(self, argument_name, argument):  # noqa: D102
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return _NoVideoProcessor


def build_processor(family: str = "qwen2_5_vl", tokenizer=None, image_processor=None, **tokenizer_kwargs):
    """The family's real processor around the offline tokenizer (`build_tokenizer(family, **tokenizer_kwargs)`
    unless `tokenizer` is given) and the PIL image processor."""
    if family == "llava":
        return build_llava_processor(tokenizer, image_processor)
    if family == "internvl":
        return build_internvl_processor(tokenizer, image_processor)
    if family == "mllama":
        return build_mllama_processor(tokenizer, image_processor)
    if family in IDEFICS3_TINY:
        return build_idefics3_processor(family, tokenizer, image_processor)
    if family == "llava_onevision":
        return build_onevision_processor(tokenizer, image_processor)
    if family == "gemma3":
        return build_gemma3_processor(tokenizer, image_processor)
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(family, **tokenizer_kwargs)
    if image_processor is None:
        patch = 16 if family == "qwen3_vl" else 14
        # Small pixel budget so tests stay fast: at most 16x16 merged tokens.
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch,
            min_pixels=4 * (2 * patch) ** 2,
            max_pixels=256 * (2 * patch) ** 2,
        )
    cls = _processor_classes(family)
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
               chat_template=tokenizer.chat_template)


def tiny_config(family: str, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, vision_depth: int = 1, vision_hidden: int = 32):
    """A small config of `family` whose special-token ids match `tokenizer`."""
    if family == "llava":
        return llava_config(tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads)
    if family == "internvl":
        return internvl_config(tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads)
    if family == "mllama":
        return mllama_config(tokenizer, hidden=hidden, heads=heads, kv_heads=kv_heads)
    if family in IDEFICS3_TINY:
        return idefics3_config(family, tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads)
    if family == "llava_onevision":
        return onevision_config(tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads)
    if family == "gemma3":
        return gemma3_config(tokenizer, hidden=hidden, layers=max(layers, 4), heads=heads, kv_heads=kv_heads)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 4), half // 4, half // 4]
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096 * 4, rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=2, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["head_dim"] = head_dim
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": mrope, "mrope_interleaved": True}
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=2, out_hidden_size=hidden, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")


def build_tiny(family: str = "qwen2_5_vl", *, seed: int = 0, attn_implementation: str = "sdpa",
               dtype: torch.dtype = torch.float32, qk_scale: float = 8.0, tokenizer_kwargs: dict | None = None,
               **config_kwargs):
    """(model, processor): a randomly initialised tiny VLM of `family` in eval mode and its processor.

    `qk_scale` multiplies the language model's q/k projection weights (peaked attention for reweighting tests;
    1.0 = the plain initialisation, for training). `tokenizer_kwargs` go to `build_tokenizer` (e.g.
    ``extra_corpus=``, ``vocab_size=``); `config_kwargs` to `tiny_config` (hidden, layers, heads, ...)."""
    processor = build_processor(family, **(tokenizer_kwargs or {}))
    cfg = tiny_config(family, processor.tokenizer, **config_kwargs)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    elif family == "llava":
        from transformers import LlavaForConditionalGeneration as Model
    elif family == "internvl":
        from transformers import InternVLForConditionalGeneration as Model
    elif family == "mllama":
        from transformers import MllamaForConditionalGeneration as Model
    elif family in ("idefics3", "smolvlm"):
        from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

        Model = Idefics3ForConditionalGeneration if family == "idefics3" else SmolVLMForConditionalGeneration
    elif family == "llava_onevision":
        from transformers import LlavaOnevisionForConditionalGeneration as Model
    elif family == "gemma3":
        from transformers import Gemma3ForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLForConditionalGeneration as Model
    torch.manual_seed(seed)
    model = Model._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    # Random init gives near-uniform attention; larger q/k weights make the attention peaked, so
    # tests of reweighting see real differences.
    with torch.no_grad():
        for name, p in model.named_parameters():
            text = "language_model" in name or "text_model" in name
            if text and ("q_proj.weight" in name or "k_proj.weight" in name):
                p.mul_(qk_scale)
    if family in ("llava", "internvl", "mllama", "idefics3", "smolvlm", "llava_onevision", "gemma3"):
        with torch.no_grad():  # the tiny vision tower is random too: sharpen its attention so images differ
            for name, p in model.named_parameters():
                vision = "vision_tower" in name or "vision_model" in name
                if vision and ("q_proj.weight" in name or "k_proj.weight" in name):
                    p.mul_(4.0)
    if family == "mllama":  # gates start at 0 (cross-attention adds nothing); q/k norms undo qk_scale there
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name:
                    p.fill_(1.0)
                elif "cross_attn.q_norm" in name or "cross_attn.k_norm" in name:
                    p.mul_(qk_scale ** 0.5)
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    model.generation_config.eos_token_id = cfg.text_config.eos_token_id
    return model.eval(), processor


def save_tiny(family: str, path: str | Path, **kwargs) -> Path:
    """Write a tiny model, its tokenizer and image processor to `path` (loadable with from_pretrained)."""
    model, processor = build_tiny(family, **kwargs)
    return save_checkpoint(model, processor, path, family)


def save_checkpoint(model, processor, path: str | Path, family: str = "qwen2_5_vl") -> Path:
    """Write `model` (e.g. a trained tiny model) with the tokenizer and image processor of `processor` to `path`."""
    path = Path(path)
    model.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    if family in ("llava", "idefics3", "gemma3"):  # their processors save patch_size, image_seq_len...; the
        processor.save_pretrained(path)  # others lack a video processor
    (path / "attn_mod_tiny.json").write_text(json.dumps({"family": family}))
    return path


def load_tiny_processor(path: str | Path, family: str):
    """Load the processor of a directory written by `save_tiny` (the processor itself cannot be saved)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(path)
    from transformers import (GotOcr2ImageProcessorPil, Idefics3ImageProcessorPil, LlavaOnevisionImageProcessorPil,
                              MllamaImageProcessorPil, SmolVLMImageProcessorPil)

    from transformers import Gemma3ImageProcessorPil

    cls = {"llava": CLIPImageProcessorPil, "internvl": GotOcr2ImageProcessorPil, "mllama": MllamaImageProcessorPil,
           "idefics3": Idefics3ImageProcessorPil, "smolvlm": SmolVLMImageProcessorPil,
           "llava_onevision": LlavaOnevisionImageProcessorPil, "gemma3": Gemma3ImageProcessorPil,
           }.get(family, Qwen2VLImageProcessorPil)
    ip = cls.from_pretrained(path)
    return build_processor(family, tokenizer=tok, image_processor=ip)


# ------------------------------------------------------------------------------------------ LLaVA-1.5
LLAVA_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# LLaVA-1.5's plain-text conversation format (conv_vicuna_v1): "<s>{system} USER: <image>\n{q} ASSISTANT: {a}</s>".
# A leading system message replaces the default system prompt.
LLAVA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text'] %}"
    "{% set msgs = messages[1:] %}{% else %}{% set system = '" + LLAVA_SYSTEM.replace("'", "\\'") + "' %}"
    "{% set msgs = messages %}{% endif %}{{ system }}"
    "{% for message in msgs %}{% if message['role'] == 'user' %}{{ ' USER: ' }}{% else %}{{ ' ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)
_LLAVA_CORPUS = _CORPUS + [LLAVA_SYSTEM, "USER: ASSISTANT: USER ASSISTANT"]


def build_llava_tokenizer(vocab_size: int = 400):
    """Byte-level BPE with LLaVA's `<image>` token, `<s>`/`</s>` and the LLaVA-1.5 conversation template."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(_LLAVA_CORPUS, LLAVA_SPECIAL_TOKENS, vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=LLAVA_TEMPLATE, bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", padding_side="left")


def build_llava_processor(tokenizer=None, image_processor=None, *, image_size: int = 84, patch: int = 14):
    """transformers' LlavaProcessor around the offline tokenizer and the PIL CLIP image processor
    (resize shortest edge + centre crop, as llava-1.5's CLIPImageProcessor; 84 px = a 6x6 grid here)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = tokenizer if tokenizer is not None else build_llava_tokenizer()
    if image_processor is None:
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tokenizer.chat_template)


def llava_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 image_size: int = 84, patch: int = 14):
    """LlavaConfig: tiny Llama text model + tiny CLIP vision tower (2 layers, feature layer -2, CLS dropped)."""
    from transformers import LlavaConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=ids["<s>"],
                eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=patch, projection_dim=32)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                       image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


# -------------------------------------------------------------------------------------- InternVL3.5 -HF
INTERNVL_SPECIAL = {"start_image_token": "<img>", "end_image_token": "</img>",
                    "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
# ChatML; an image is one "<IMG_CONTEXT>" that the processor expands to <img> + tiles x tokens + </img>.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_internvl_tokenizer(vocab_size: int = 400):
    """Byte-level BPE with ChatML markers and InternVL's <img> / </img> / <IMG_CONTEXT> / <video> tokens."""
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_SPECIAL.values()]
    tok = _train_bpe(_CORPUS, special, vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=INTERNVL_TEMPLATE, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", padding_side="left",
                                   extra_special_tokens=dict(INTERNVL_SPECIAL))


def build_internvl_processor(tokenizer=None, image_processor=None, *, tile: int = 112, max_tiles: int = 4):
    """transformers' InternVLProcessor (no video processor: it needs torchvision) around the offline tokenizer
    and the PIL GotOcr2 image processor with dynamic tiling + thumbnail (112-px tiles here, 448 in InternVL3.5)."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    class _NoVideoInternVLProcessor(InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):  # noqa: D102
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = tokenizer if tokenizer is not None else build_internvl_tokenizer()
    if image_processor is None:
        image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                                   min_patches=1, max_patches=max_tiles)
    seq = (image_processor.size["height"] // 14 // 2) ** 2
    return _NoVideoInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                     image_seq_length=seq, chat_template=tokenizer.chat_template)


def internvl_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    tile: int = 112):
    """InternVLConfig: tiny Qwen2 text model + tiny InternViT (patch 14, pixel shuffle 0.5: (tile/28)^2 tokens)."""
    from transformers import InternVLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>")}
    text = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[tile, tile], patch_size=[14, 14])
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids["<IMG_CONTEXT>"],
                          image_seq_length=(tile // 28) ** 2, downsample_ratio=0.5, vision_feature_layer=-1,
                          vision_feature_select_strategy="default")


# --------------------------------------------------------------------------------- Mllama (Llama-3.2-Vision)
MLLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<|image|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
# Llama-3's pre-tokenizer regex (tokenizer.json of Llama-3.x): "\n\n" after <|end_header_id|> is one token.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama-3.2-Vision's turn format, simplified: an explicit system turn is rendered as given and none is added by
# default (the released template adds a dated system turn to text-only prompts, none with images; no tools here).
MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_mllama_tokenizer(vocab_size: int = 400):
    """Byte-level BPE with Llama-3's pre-tokenizer, its header / turn tokens, `<|image|>` and the template above."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = _train_bpe(_CORPUS + ["\n\n system\n\n user\n\n assistant\n\n"], MLLAMA_SPECIAL_TOKENS, vocab_size,
                     pre_tokenizer=pre)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=MLLAMA_TEMPLATE,
                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>", padding_side="left")


def build_mllama_processor(tokenizer=None, image_processor=None, *, tile: int = 42, max_tiles: int = 4):
    """transformers' MllamaProcessor around the offline tokenizer and the PIL Mllama image processor (aspect-ratio
    tiling onto up to `max_tiles` tiles of `tile` px, 560 in Llama-3.2-Vision; 42 px = 3 x 3 patches here)."""
    from transformers import MllamaImageProcessorPil, MllamaProcessor

    tokenizer = tokenizer if tokenizer is not None else build_mllama_tokenizer()
    if image_processor is None:
        image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=max_tiles)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def mllama_config(tokenizer, *, hidden: int = 64, heads: int = 4, kv_heads: int = 2, tile: int = 42,
                  patch: int = 14, max_tiles: int = 4, cross_attention_layers=(1,), layers: int = 3):
    """MllamaConfig: 3 text layers (self, cross, self: Llama-3.2-Vision interleaves one cross-attention layer
    every 5), a 1 + 1-layer vision encoder on `tile`-px tiles of `patch`-px patches (+ 1 CLS token per tile)."""
    from transformers import MllamaConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MLLAMA_SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads,
                cross_attention_layers=list(cross_attention_layers), max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"],
                pad_token_id=ids["<|finetune_right_pad_id|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                  vision_output_dim=64, image_size=tile, patch_size=patch, max_num_tiles=max_tiles,
                  intermediate_layers_indices=[0])
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=ids["<|image|>"])
# ------------------------------------------------------------------------------------ Idefics3 / SmolVLM
IDEFICS3_IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>",
                         *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]
# Idefics3-8B-Llama3's template ("User:<image>...<end_of_utterance>\nAssistant:"), with string content allowed
# as SmolVLM's processor default template does. SmolVLM's released template is the same after "<|im_start|>".
_IDEFICS3_TURNS = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_TEMPLATE = "<|begin_of_text|>" + _IDEFICS3_TURNS
SMOLVLM_TEMPLATE = "<|im_start|>" + _IDEFICS3_TURNS
_IDEFICS3_CORPUS = _CORPUS + ["System: User: Assistant: System User Assistant"]
# (vision image_size = max_image_size, patch, scale_factor, longest_edge): 84 px sub-images of 6x6 patches,
# shuffled 2x2 -> 9 tokens (Idefics3: 364 px, 26x26 -> 169); SmolVLM 96 px, 6x6 shuffled 3x3 -> 4 tokens
# (SmolVLM: 512 px, 32x32 shuffled 4x4 -> 64).
IDEFICS3_TINY = {"idefics3": (84, 14, 2, 168), "smolvlm": (96, 16, 3, 288)}


def build_idefics3_tokenizer(family: str = "idefics3", vocab_size: int = 400):
    """Byte-level BPE with Idefics3's image tokens (`<fake_token_around_image>`, `<image>`, `<global-img>`,
    `<row_i_col_j>`), `<end_of_utterance>` and the family's template (Idefics3: `<|begin_of_text|>` BOS;
    SmolVLM: `<|im_start|>` as its template's first token)."""
    from transformers import PreTrainedTokenizerFast

    first = "<|begin_of_text|>" if family == "idefics3" else "<|im_start|>"
    special = ["<pad>", first, "<end_of_utterance>", *IDEFICS3_IMAGE_TOKENS]
    tok = _train_bpe(_IDEFICS3_CORPUS, special, vocab_size)
    extra = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
             "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", pad_token="<pad>",
                                   bos_token=first, eos_token="<end_of_utterance>",
                                   chat_template=IDEFICS3_TEMPLATE if family == "idefics3" else SMOLVLM_TEMPLATE,
                                   extra_special_tokens=extra if family == "smolvlm" else {})


def build_idefics3_processor(family: str = "idefics3", tokenizer=None, image_processor=None):
    """transformers' Idefics3Processor / SmolVLMProcessor (no video processor: it needs torchvision) around the
    offline tokenizer and the PIL image processor (image splitting on, sizes of `IDEFICS3_TINY`)."""
    tile, patch, scale, longest = IDEFICS3_TINY[family]
    tokenizer = tokenizer if tokenizer is not None else build_idefics3_tokenizer(family)
    seq = (tile // patch) ** 2 // scale**2
    if family == "idefics3":
        from transformers import Idefics3ImageProcessorPil as IP
        from transformers import Idefics3Processor

        image_processor = image_processor or IP(size={"longest_edge": longest}, max_image_size={"longest_edge": tile})
        return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq,
                                 chat_template=tokenizer.chat_template)
    from transformers import SmolVLMImageProcessorPil as IP
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class _NoVideoSmolVLMProcessor(SmolVLMProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):  # noqa: D102
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):  # noqa: D102
            # SmolVLMProcessor's override only adds the video processor's frame defaults
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    image_processor = image_processor or IP(size={"longest_edge": longest}, max_image_size={"longest_edge": tile})
    # SmolVLMProcessor refuses to start without `num2words`, which only its video prompts use (frame counts in
    # words); without a video processor no video prompt is ever built, so a stand-in that refuses is enough.
    import transformers.models.smolvlm.processing_smolvlm as smolvlm_processing

    def _no_num2words(n):
        raise NotImplementedError("SmolVLM video prompts need the num2words package (not installed)")

    saved = smolvlm_processing.num2words
    smolvlm_processing.num2words = saved or _no_num2words
    try:
        return _NoVideoSmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                        image_seq_len=seq, chat_template=tokenizer.chat_template)
    finally:
        smolvlm_processing.num2words = saved


def idefics3_config(family: str, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """Idefics3Config / SmolVLMConfig: tiny Llama text model + tiny SigLIP-style vision tower + pixel shuffle."""
    from transformers import Idefics3Config, SmolVLMConfig

    tile, patch, scale, _ = IDEFICS3_TINY[family]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<end_of_utterance>", "<image>")}
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<pad>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=tile, patch_size=patch)
    cls = Idefics3Config if family == "idefics3" else SmolVLMConfig
    return cls(text_config=text, vision_config=vision, image_token_id=ids["<image>"], scale_factor=scale,
               pad_token_id=ids["<pad>"])


# ------------------------------------------------------------------------------------ LLaVA-OneVision
ONEVISION_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# llava-hf/llava-onevision-qwen2-*-hf's template: "<|im_start|>{role} " then the images, then "\n" + text.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{ '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# 56-px crops of 4x4 SigLIP patches (OneVision: 384 px, 27x27 = 729), anyres grids up to 3x3 crops.
ONEVISION_CROP, ONEVISION_PATCH = 56, 14
ONEVISION_PINPOINTS = [[56 * r, 56 * c] for r in (1, 2, 3) for c in (1, 2, 3)]


def build_onevision_tokenizer(vocab_size: int = 400):
    """Byte-level BPE with ChatML markers, `<image>` / `<video>` and LLaVA-OneVision's template."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(_CORPUS, ONEVISION_SPECIAL, vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=ONEVISION_TEMPLATE, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", padding_side="left")


def build_onevision_processor(tokenizer=None, image_processor=None, *, vision_aspect_ratio: str = "anyres_max_9"):
    """transformers' LlavaOnevisionProcessor (no video processor: it needs torchvision) around the offline
    tokenizer and the PIL image processor (anyres pinpoints `ONEVISION_PINPOINTS`, 56-px crops)."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    class _NoVideoOnevisionProcessor(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):  # noqa: D102
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = tokenizer if tokenizer is not None else build_onevision_tokenizer()
    if image_processor is None:
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": ONEVISION_CROP, "width": ONEVISION_CROP},
                                                          image_grid_pinpoints=ONEVISION_PINPOINTS)
    side = image_processor.size["height"] // ONEVISION_PATCH
    return _NoVideoOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                      num_image_tokens=side * side, vision_feature_select_strategy="full",
                                      vision_aspect_ratio=vision_aspect_ratio, chat_template=tokenizer.chat_template)


def onevision_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     vision_aspect_ratio: str = "anyres_max_9"):
    """LlavaOnevisionConfig: tiny Qwen2 text model + tiny SigLIP tower (56 px, patch 14, no CLS: strategy "full")."""
    from transformers import LlavaOnevisionConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ONEVISION_SPECIAL}
    text = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=ONEVISION_CROP, patch_size=ONEVISION_PATCH, vision_use_head=False)
    return LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                                video_token_index=ids["<video>"], vision_feature_select_strategy="full",
                                vision_feature_layer=-1, image_grid_pinpoints=ONEVISION_PINPOINTS,
                                vision_aspect_ratio=vision_aspect_ratio)
# ------------------------------------------------------------------------------------------------ Gemma3
GEMMA3_SPECIAL = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
GEMMA3_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *GEMMA3_SPECIAL.values()]
# Gemma3's released chat template (google/gemma-3-*-it): no system role; a system message becomes a prefix
# "{system}\n\n" of the first user turn. Assistant turns are "model" turns.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- else -%}{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}"
    "{{'<start_of_turn>model\n'}}{%- endif -%}"
)
_GEMMA3_CORPUS = _CORPUS + ["user model", "\n\n"]


def build_gemma3_tokenizer(vocab_size: int = 400):
    """Byte-level BPE with Gemma3's <bos>/<eos>/<start_of_turn>/<end_of_turn>, image tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(_GEMMA3_CORPUS, GEMMA3_SPECIAL_TOKENS, vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=GEMMA3_TEMPLATE, bos_token="<bos>",
                                   eos_token="<end_of_turn>", pad_token="<pad>", padding_side="left",
                                   extra_special_tokens=dict(GEMMA3_SPECIAL))


def build_gemma3_processor(tokenizer=None, image_processor=None, *, image_size: int = 112, tokens_per_side: int = 4):
    """transformers' Gemma3Processor around the offline tokenizer and the PIL Gemma3 image processor (square resize,
    pan & scan off): `tokens_per_side`^2 image tokens per image (16 here; 256 = 16 x 16 in Gemma3)."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    tokenizer = tokenizer if tokenizer is not None else build_gemma3_tokenizer()
    if image_processor is None:
        image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size},
                                                  do_pan_and_scan=False)
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                           image_seq_length=tokens_per_side ** 2)


def gemma3_config(tokenizer, *, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                  sliding_window: int = 8, image_size: int = 112, patch: int = 14, tokens_per_side: int = 4):
    """Gemma3Config: tiny Gemma3 text model whose layers alternate sliding (window `sliding_window`, smaller than a
    prompt so it matters) and global attention, + tiny SigLIP tower ((image_size/patch)^2 patches average-pooled to
    tokens_per_side^2 image tokens)."""
    from transformers import Gemma3Config

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_SPECIAL_TOKENS}
    head_dim = hidden // heads
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                query_pre_attn_scalar=head_dim, sliding_window=sliding_window, max_position_embeddings=4096,
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                rms_norm_eps=1e-6, bos_token_id=ids["<bos>"], eos_token_id=ids["<end_of_turn>"],
                pad_token_id=ids["<pad>"])
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=image_size, patch_size=patch)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_side ** 2,
                        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                        image_token_index=ids["<image_soft_token>"])
