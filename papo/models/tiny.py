"""Tiny, real Qwen2.5-VL models built offline: the embedded default's family.

The tokenizer is a byte-level BPE trained here, deterministically, on text of the synthetic suite with
Qwen2's pre-tokenizer (digits split one per token) and Qwen's special tokens in Qwen's order, wrapped with a
Qwen2.5-VL chat template. The model is ``Qwen2_5_VLForConditionalGeneration`` from a small config, so every
code path (3-D rope, vision merger, processor) is the one a 7B model takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from papo.data.sample import PAPO_FORMAT_SUFFIX
from papo.models.loading import image_only_processor_class, model_from_config

# Qwen2's pre-tokenization pattern: letters, single digits, punctuation runs, newlines, spaces
QWEN2_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
# single tokens that survive skip_special_tokens decoding (the format reward reads them)
PLAIN_ADDED_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
BPE_VOCAB = 1024

# The Qwen2-VL / Qwen2.5-VL chat format: default system prompt, <|im_start|>role ... <|im_end|> turns, and
# <|vision_start|><|image_pad|><|vision_end|> for each image part.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_ffn: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_ffn: int


SIZES = {
    # ~1.4M parameters: CPU tests
    "tiny": TinySize(128, 2, 4, 2, 384, 128, 2, 4, 256),
    # ~5M: the embedded default (fp32 checkpoint under 20 MB)
    "small": TinySize(192, 4, 6, 2, 576, 160, 3, 4, 384),
    # ~15M and ~110M: GPU experiments
    "20m": TinySize(384, 6, 6, 2, 1024, 256, 4, 4, 768),
    "100m": TinySize(768, 12, 12, 4, 2048, 512, 8, 8, 1536),
}
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 224 * 224  # 16 x 16 patches -> 64 image tokens: CPU-sized


def tokenizer_corpus(n_per_task: int = 400) -> list[str]:
    """Deterministic training text: every family's questions, reasoning traces and answers, PAPO's format
    suffix and the chat scaffolding."""
    from papo.data.synthetic import FAMILIES, make_scene

    lines = [PAPO_FORMAT_SUFFIX, "You are a helpful assistant.", "system", "user", "assistant"]
    for task in FAMILIES:
        for i in range(n_per_task):
            scene = make_scene(task, "train", 0, i)
            lines += [scene.question, scene.solution, scene.answer]
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    tok.add_tokens(list(PLAIN_ADDED_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        padding_side="left", chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None):
    """A Qwen2.5-VL processor (image-only where torchvision is missing) for the tiny models."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.utils import is_torchvision_available

    tokenizer = tokenizer or build_tokenizer()
    size = {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}  # a fresh dict: pitfall 3
    if is_torchvision_available():
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
        return Qwen2_5_VLProcessor(image_processor, tokenizer, Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    image_processor = Qwen2VLImageProcessorPil(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    return image_only_processor_class(Qwen2_5_VLProcessor)(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


def build_config(size: str, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = s.text_hidden // s.text_heads
    half = head_dim // 2
    t = half // 4
    hw = (half - t) // 2
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=s.text_hidden, intermediate_size=s.text_ffn,
            num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads, num_key_value_heads=s.text_kv_heads,
            max_position_embeddings=4096,
            # the three M-RoPE sections (time, height, width) must sum to head_dim / 2
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * hw, hw, hw]},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False, use_sliding_window=False,
        ),
        vision_config=dict(
            depth=s.vision_depth, hidden_size=s.vision_hidden, intermediate_size=s.vision_ffn, num_heads=s.vision_heads,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            out_hidden_size=s.text_hidden,
            # the default (7, 15, 23, 31) would leave a shallow tower with windowed attention only
            fullatt_block_indexes=[s.vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, processor): a random-init tiny Qwen2.5-VL and its processor, fully offline."""
    processor = build_processor()
    model = model_from_config(build_config(size, processor.tokenizer), dtype=dtype, seed=seed)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model, processor
