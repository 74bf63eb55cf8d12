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

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava", "internvl", "gemma3")


def _train_bpe(corpus, special_tokens, vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained offline on `corpus` (x4) with `special_tokens`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
            if "language_model" in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                p.mul_(qk_scale)
    if family in ("llava", "internvl", "gemma3"):  # the tiny vision tower is random too: sharpen its attention so images differ
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "vision_tower" in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                    p.mul_(4.0)
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
    if family in ("llava", "gemma3"):  # their processors save (patch_size, feature strategy / image_seq_length);
        processor.save_pretrained(path)  # the others lack a video processor
    (path / "attn_mod_tiny.json").write_text(json.dumps({"family": family}))
    return path


def load_tiny_processor(path: str | Path, family: str):
    """Load the processor of a directory written by `save_tiny` (the processor itself cannot be saved)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(path)
    from transformers import GotOcr2ImageProcessorPil

    from transformers import Gemma3ImageProcessorPil

    cls = {"llava": CLIPImageProcessorPil, "internvl": GotOcr2ImageProcessorPil,
           "gemma3": Gemma3ImageProcessorPil}.get(family, Qwen2VLImageProcessorPil)
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
