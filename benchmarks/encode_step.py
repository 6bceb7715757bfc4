"""The host time a step spends in the processor: every scoring and update pass's images encoded once per
sequence (each rollout of a prompt again); once per prompt and view (full, masked) in a call of its own; and
``MicroBatches``, which encodes each view of all the step's prompts in one call and splits it. The processor
runs on the host (torchvision's where it is installed, else PIL's).

    python benchmarks/encode_step.py --out /tmp/encode-step.json
    python benchmarks/encode_step.py --pixels default --prompts 64 --out /tmp/encode-regime.json  # regime_run.sh's step

The step has ``train_step.py``'s shape: 32 prompts x 5 rollouts, PAPO's pixel bounds (the synthetic 224-px
images become 448 x 448, 1,024 patches each), one masked image per prompt, scoring passes of 16 and update
passes of 16 over two mini-batches. The embedded default's processor with its bounds raised to PAPO's does
the same work per image as Qwen2.5-VL-3B's; ``--pixels default`` keeps its own bounds (the tiny models' 224-px
images, as in scripts/regime_run.sh). Completions are short token runs: encoding does not read them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from papo.config.schema import load_config
from papo.data.masking import image_views
from papo.data.synthetic import dataset_from_spec
from papo.models.policy import Policy
from papo.training.experience import Experience, MicroBatches

MIN_PIXELS, MAX_PIXELS = 200704, 1003520  # PAPO's bounds


def experience(policy: Policy, prompts: int, n: int) -> Experience:
    bounds = (policy.min_pixels, policy.max_pixels)
    masking = load_config("papo_g").algorithm.masking(encoder_patch_size=policy.patch_size)
    samples, images, masked = [], [], []
    for draw, sample in enumerate(dataset_from_spec("synthetic:all", split="train", n=prompts, size=224)):
        ims, views = image_views(sample, masking, 0, draw, *bounds)
        for _ in range(n):  # as Trainer.rollout: a prompt's rollouts share its image lists
            samples.append(sample)
            images.append(ims)
            masked.append(views[0])
    size = len(samples)
    ids = torch.randint(10, 100, (size, 8))
    return Experience(samples, [s.id for s in samples], images, masked, ids, torch.ones_like(ids), [""] * size,
                      [{"overall": 0.0}] * size, torch.zeros(size, dtype=torch.long))


class OneCallPerPrompt(MicroBatches):
    """``MicroBatches`` as it was: the processor called for each distinct prompt and view alone."""

    def _encode_missing(self, cache, prompts, images) -> None:
        for prompt, ims in zip(prompts, images):
            if (prompt, id(ims)) not in cache:
                view = self.policy.encode([prompt], [ims])
                cache[(prompt, id(ims))] = view.pixels_to(self.policy.device) if self.keep else view


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pixels", choices=("papo", "default"), default="papo", help="PAPO's bounds or the model's own")
    args = ap.parse_args()
    bounds = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS} if args.pixels == "papo" else {}
    policy = Policy.from_pretrained(None, **bounds, **{f"processor_{k}": v for k, v in bounds.items()})
    exp = experience(policy, args.prompts, args.n)
    per_update = exp.size // 2

    def once_per_sequence() -> None:  # every sequence's views, one processor call per encoding unit, as before
        for rows in [rows for plan in MicroBatches(exp, policy, 4, per_update, 16, 16).plan for rows in plan]:
            prompts = [exp.samples[r].formatted_prompt() for r in rows]
            for views in (exp.images, exp.masked_images):
                policy.encode(prompts, [views[r] for r in rows])

    def call_per_prompt_and_view() -> list:  # the same passes, each distinct prompt and view in a call of its own
        batches = OneCallPerPrompt(exp, policy, 4, per_update, 16, 16)
        return [*batches.scoring(), *(mb for i in range(len(batches.plan)) for mb in batches.update_passes(i))]

    def call_per_view() -> list:  # what a step's scoring and update passes encode now
        batches = MicroBatches(exp, policy, 4, per_update, 16, 16)
        return [*batches.scoring(), *(mb for i in range(len(batches.plan)) for mb in batches.update_passes(i))]

    times: dict[str, list[float]] = {"once_per_sequence_s": [], "call_per_prompt_and_view_s": [], "call_per_view_s": []}
    passes: list = []
    for _ in range(args.repeats):  # alternating, the fastest of each: the host is shared and noisy
        for key, fn in zip(times, (once_per_sequence, call_per_prompt_and_view, call_per_view)):
            t = time.perf_counter()
            passes = fn() or passes
            times[key].append(time.perf_counter() - t)
    best = {key: round(min(values), 3) for key, values in times.items()}
    patches = int(passes[0].full.inputs["image_grid_thw"].prod(-1)[0])
    result = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "image_processor": type(policy.processor.image_processor).__name__, "prompts": args.prompts,
              "samples_per_prompt": args.n, "patches_per_image": patches, "passes": len(passes), "repeats": args.repeats,
              **best, "ratio_per_sequence": round(best["once_per_sequence_s"] / best["call_per_view_s"], 2),
              "ratio_per_prompt": round(best["call_per_prompt_and_view_s"] / best["call_per_view_s"], 2),
              "all_s": {key: [round(v, 3) for v in values] for key, values in times.items()}}
    print(json.dumps(result), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
