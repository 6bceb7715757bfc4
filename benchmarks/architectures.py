"""The public Qwen2.5-VL-3B / -7B-Instruct architectures (config.json values), for benchmarks with random weights.

Timing and memory do not depend on weight values. The special-token ids are papo's tokenizer's, so the
processor of the embedded model drives them; rows of the 151,936 / 152,064-token vocabularies past that
tokenizer are suppressed in sampling, as papo does for any vocabulary padded beyond its tokenizer.
"""

from __future__ import annotations

from papo.models.tiny import build_config

TEXT = {
    "3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
}


def qwen25_vl_config(size: str, tokenizer):
    from transformers import Qwen2_5_VLConfig

    tiny = build_config("tiny", tokenizer)  # for papo's special-token ids
    ids = {k: getattr(tiny, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    text = TEXT[size]
    return Qwen2_5_VLConfig(
        text_config=dict(**text, max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                         use_sliding_window=False, eos_token_id=tiny.text_config.eos_token_id,
                         pad_token_id=tiny.text_config.pad_token_id, bos_token_id=None),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=text["hidden_size"],
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        tie_word_embeddings=text["tie_word_embeddings"], **ids)
