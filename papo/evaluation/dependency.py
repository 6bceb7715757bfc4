"""How much a model's responses depend on the image, token by token (``papo eval --dependency``).

Each response is scored twice by the evaluated model: with its image and with a masked copy (PAPO's mask).
A token's visual dependency is the k3 estimate of KL(pi(.|I) || pi(.|I')) on that token
(``papo.algo.token_dependency``, the quantity VPPO trains on). Reported per benchmark: the token-weighted mean
and the share of tokens at or above a threshold; and pictures of responses with each token shaded by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from papo.algo.visual_dependency import token_dependency
from papo.data.masking import MaskingConfig, image_pair
from papo.data.sample import IMAGE_PLACEHOLDER, Sample
from papo.data.synthetic.common import font


@torch.no_grad()
def response_dependencies(policy: Any, samples: Sequence[Sample], responses: Sequence[str], masking: MaskingConfig,
                          seed: int = 0, batch_size: int = 16) -> list[tuple[list[str], list[float]]]:
    """Each response's tokens (as text pieces) and their visual dependencies under ``policy``."""
    out: list[tuple[list[str], list[float]]] = [([], []) for _ in samples]
    policy.model.eval()
    scored = [i for i, text in enumerate(responses) if text.strip()]  # an empty response has no tokens to score
    for start in range(0, len(scored), batch_size):
        rows = scored[start:start + batch_size]
        part, texts = [samples[i] for i in rows], [responses[i] for i in rows]
        pairs = [image_pair(s, masking, seed, 0, policy.min_pixels, policy.max_pixels) for s in part]
        prompts = [s.formatted_prompt() for s in part]
        ids, mask = policy.tokenize_completions(texts, add_eos=False)
        full = policy.logprobs(policy.encode(prompts, [p[0] for p in pairs]), ids, mask)[0]
        masked = policy.logprobs(policy.encode(prompts, [p[1] for p in pairs]), ids, mask)[0]
        dep = token_dependency(full.float().cpu(), masked.float().cpu())
        for i, row, m, d in zip(rows, ids, mask, dep):
            n = int(m.sum())
            out[i] = ([policy.tokenizer.decode([int(t)]) for t in row[:n]], d[:n].tolist())
    return out


def dependency_summary(deps: Sequence[Sequence[float]], threshold: float) -> dict[str, Any]:
    values = [v for d in deps for v in d]
    if not values:
        return {"mean": 0.0, "share_high": 0.0, "threshold": threshold, "tokens": 0}
    return {"mean": sum(values) / len(values), "share_high": sum(v >= threshold for v in values) / len(values),
            "threshold": threshold, "tokens": len(values)}


def dependency_picture(image: Image.Image, question: str, tokens: Sequence[str], deps: Sequence[float],
                       scale: float, width: int = 560) -> Image.Image:
    """The image beside the question and the response, each token on a red background as deep as its
    dependency (full red at ``scale`` nats and above)."""
    thumb = image.copy()
    thumb.thumbnail((224, 224))
    f = font(14)
    line_h, pad = 20, 8
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[list[tuple[str, float]]] = [[]]
    x = 0
    for token, d in zip(tokens, deps):
        for piece_no, piece in enumerate(token.split("\n")):
            if piece_no > 0:
                lines.append([])
                x = 0
            w = draw_probe.textlength(piece, font=f)
            if x + w > width - 2 * pad and lines[-1]:
                lines.append([])
                x = 0
            lines[-1].append((piece, d))
            x += w
    head = [question[i:i + 70] for i in range(0, min(len(question), 280), 70)]
    height = max(thumb.height + 2 * pad, (len(head) + 1 + len(lines)) * line_h + 2 * pad)
    sheet = Image.new("RGB", (thumb.width + width + 2 * pad, height), "white")
    sheet.paste(thumb, (pad, pad))
    draw = ImageDraw.Draw(sheet)
    left, y = thumb.width + 2 * pad, pad
    for line in head:
        draw.text((left, y), line, fill=(90, 90, 90), font=f)
        y += line_h
    y += line_h
    for line in lines:
        x = left
        for piece, d in line:
            w = draw.textlength(piece, font=f)
            depth = min(max(d / scale, 0.0), 1.0) if scale > 0 else 0.0
            shade = int(255 * (1 - 0.8 * depth))
            draw.rectangle([x, y, x + w, y + line_h - 2], fill=(255, shade, shade))
            draw.text((x, y), piece, fill=(20, 20, 20), font=f)
            x += w
        y += line_h
    return sheet


def write_pictures(policy: Any, samples: Sequence[Sample], results: Sequence[tuple[list[str], list[float]]],
                   out: Path, name: str, count: int) -> list[Path]:
    """The first ``count`` responses as pictures under ``out``, shaded on one scale: the highest dependency
    among them."""
    shown = list(zip(samples, results))[:count]
    scale = max((max(d) for _, (_, d) in shown if d), default=0.0)
    paths = []
    out.mkdir(parents=True, exist_ok=True)
    for i, (sample, (tokens, deps)) in enumerate(shown):
        images = policy.load_images(sample) or [Image.new("RGB", (224, 224), (200, 200, 200))]
        question = sample.prompt.replace(IMAGE_PLACEHOLDER, "").strip()
        path = out / f"{name}-{i}.png"
        dependency_picture(images[0], question, tokens, deps, scale).save(path)
        paths.append(path)
    return paths
