"""Small models shared by the model tests (built offline in well under a second each)."""

import copy
import functools

import torch

from papo.config.schema import load_config
from papo.data.synthetic import make_sample
from papo.models.policy import Policy
from papo.models.tiny import build_tiny


@functools.cache
def _tiny_state():
    model, processor = build_tiny("tiny", seed=0)
    return model.state_dict(), processor


def tiny_policy() -> Policy:
    """A fresh tiny Qwen2.5-VL policy (weights and processor copied, so tests may train it or change its bounds)."""
    state, processor = _tiny_state()
    model, _ = build_tiny("tiny", seed=0)
    model.load_state_dict(state)
    return Policy(model, copy.deepcopy(processor))


def mixed_batch(policy: Policy, n: int = 2):
    """Prompts of different lengths with images of different sizes: left padding and two image grids."""
    samples = [make_sample("count", "train", 0, 0, size=224), make_sample("maze", "train", 0, 1, size=168)][:n]
    prompts = [s.formatted_prompt() for s in samples]
    images = [s.load_images(None, None) for s in samples]
    return samples, prompts, images


def sharpen_vision(policy: Policy, scale: float = 30.0) -> None:
    """Random-init models ignore the image; scaling the vision merger makes image tokens matter."""
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "merger" in name and name.endswith("weight"):
                p.mul_(scale)


def llava_policy() -> Policy:
    """A tiny LLaVA (CLIP vision tower + Qwen2 text model): the generic, non-Qwen-VL path."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaProcessor, Qwen2Config
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from papo.models.loading import model_from_config
    from papo.models.tiny import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    template = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
    tok.chat_template = template
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=112, patch_size=14),
        text_config=Qwen2Config(vocab_size=576, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, eos_token_id=eos, pad_token_id=pad),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = model_from_config(cfg, seed=0)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
    ip = CLIPImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    processor = LlavaProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=template)
    return Policy(model, processor)


def qwen3_vl_policy() -> Policy:
    """A tiny Qwen3-VL: 16-px patches and its own processor class."""
    from transformers import Qwen3VLConfig, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from papo.models.loading import image_only_processor_class, model_from_config
    from papo.models.tiny import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=576, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, out_hidden_size=64,
                           num_position_embeddings=256, deepstack_visual_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = model_from_config(cfg, seed=0)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 256 * 256}, patch_size=16,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # papo's image-only class with or without torchvision: the stock one requires a video processor, which needs
    # torchvision; saved, it reloads as the stock class where torchvision exists (the round trip the tests check)
    return Policy(model, image_only_processor_class(Qwen3VLProcessor)(ip, tok, chat_template=CHAT_TEMPLATE))


# a PAPO training step small enough for CPU tests: 2 prompts x 4 rollouts of at most 24 tokens, no evaluation
SMALL = [
    "trainer.rollout_batch_size=2", "trainer.mini_batch_size=2", "trainer.micro_batch_size=8", "rollout.n=4",
    "rollout.max_new_tokens=24", "trainer.eval_before_after=false", "trainer.report_to=none",
    "trainer.log_samples_every=0", "trainer.save_every=0", "optim.lr=1e-4",
]


def small_cfg(preset="papo_g", extra=()):
    return load_config(preset, overrides=SMALL + list(extra))


def record_gradients(trainer) -> list[list[torch.Tensor]]:
    """Filled with each optimizer step's gradients (parameters in order), taken just before the step."""
    grads: list[list[torch.Tensor]] = []
    real = trainer.optim.step

    def step(*args, **kwargs):
        grads.append([p.grad.clone() for p in trainer.policy.model.parameters() if p.grad is not None])
        return real(*args, **kwargs)

    trainer.optim.step = step
    return grads


def record_loss_advantages(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Filled with the (advantages, mask) of every papo_loss call the trainer makes."""
    import papo.training.trainer as trainer_module

    recorded, real = [], trainer_module.papo_loss

    def spy(cfg, logp, old, adv, mask, **kw):
        recorded.append((adv.clone(), mask.clone()))
        return real(cfg, logp, old, adv, mask, **kw)

    monkeypatch.setattr(trainer_module, "papo_loss", spy)
    return recorded
