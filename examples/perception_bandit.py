"""GRPO vs PAPO on a one-token "perception bandit": the algorithm pipeline without a language model.

What is real: images, PAPO's official masking (14-px cells, p = 0.6, one mask per prompt shared by its G
rollouts, fresh per draw), sampling G answers per prompt, rewards, group advantages, the clipped policy loss,
KL_prcp on a masked-image forward pass, and optimiser updates -- all from papo.algo and papo.data.masking.
What is simplified: the policy is a two-layer MLP reading 4x4 cell colour averages of the image and the
"response" is one answer token, so there is no tokenizer, no chat template and no VLM. The VLM trainer
(`papo train`) replaces this demo as the main job once it lands.

Task: count the coloured squares (1-4) in a 56x56 image. Reward 1 for the right count, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from papo.algo import LossConfig, group_advantages, papo_loss
from papo.data.masking import MaskingConfig, corrupt_images

GRID, CELL, N_ANSWERS = 4, 14, 4
BACKGROUND = 235


def make_scene(rng: np.random.Generator) -> tuple[Image.Image, int]:
    count = int(rng.integers(1, N_ANSWERS + 1))
    img = Image.new("RGB", (GRID * CELL, GRID * CELL), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(img)
    for cell in rng.choice(GRID * GRID, size=count, replace=False):
        r, c = divmod(int(cell), GRID)
        colour = tuple(int(v) for v in rng.integers(40, 200, size=3))
        draw.rectangle([c * CELL + 2, r * CELL + 2, c * CELL + CELL - 3, r * CELL + CELL - 3], fill=colour)
    return img, count


def features(images: list[Image.Image]) -> torch.Tensor:  # (N, GRID*GRID*3) cell colour means in [0, 1]
    x = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    cells = x.reshape(len(images), GRID, CELL, GRID, CELL, 3).mean(axis=(2, 4)).reshape(len(images), -1)
    return torch.from_numpy(cells - BACKGROUND / 255.0)  # empty cells read 0


def evaluate(policy: torch.nn.Module, scenes, masked_scenes) -> dict[str, float]:
    with torch.no_grad():
        answers = torch.tensor([k - 1 for _, k in scenes])
        full = policy(features([im for im, _ in scenes])).argmax(-1)
        masked = policy(features(masked_scenes)).argmax(-1)
    acc, acc_masked = (full == answers).float().mean().item(), (masked == answers).float().mean().item()
    return {"accuracy": acc, "masked_accuracy": acc_masked, "perception_gap": acc - acc_masked}


def train(name: str, cfg: LossConfig, args: argparse.Namespace, heldout, heldout_masked) -> list[dict]:
    torch.manual_seed(args.seed)
    policy = torch.nn.Sequential(torch.nn.Linear(GRID * GRID * 3, 64), torch.nn.Tanh(), torch.nn.Linear(64, N_ANSWERS))
    optim = torch.optim.Adam(policy.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    masking = MaskingConfig(ratio=0.6)
    history, window = [], []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            history.append({"method": name, "step": step, **evaluate(policy, heldout, heldout_masked)})
        if step == args.steps:
            break
        # draw prompts; one masked copy per prompt, shared by its G rollouts
        scenes = [make_scene(rng) for _ in range(args.prompts)]
        masked = [corrupt_images([im], masking, args.seed, f"train-{step}-{i}")[0] for i, (im, _) in enumerate(scenes)]
        x_full, x_masked = features([im for im, _ in scenes]), features(masked)
        answers = torch.tensor([k - 1 for _, k in scenes]).repeat_interleave(args.group)
        uids = torch.arange(args.prompts).repeat_interleave(args.group)
        # rollouts from the full image (one answer token each), then rewards and advantages
        with torch.no_grad():
            dist = torch.distributions.Categorical(logits=policy(x_full))
            tokens = dist.sample((args.group,)).T.reshape(-1)  # (P*G,) grouped by prompt
            old_logp = dist.log_prob(tokens.view(args.prompts, args.group).T).T.reshape(-1, 1)
            masked_logp = torch.distributions.Categorical(logits=policy(x_masked)).log_prob(
                tokens.view(args.prompts, args.group).T).T.reshape(-1, 1)
        rewards = (tokens == answers).float()
        adv = group_advantages(rewards, uids)
        # one on-policy update: the ratio is 1, so the clip never binds; KL_prcp pushes full-image tokens up
        logp = torch.log_softmax(policy(x_full), -1).repeat_interleave(args.group, 0).gather(1, tokens[:, None])
        loss, metrics = papo_loss(cfg, logp, old_logp, adv, torch.ones_like(logp), masked_log_probs=masked_logp)
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optim.step()
        window.append((rewards.mean().item(), metrics["kl_prcp"].item()))
        if (step + 1) % args.eval_every == 0:  # means over the steps since the last evaluation
            history[-1]["train_reward"], history[-1]["kl_prcp"] = np.mean(window, axis=0).tolist()
            window = []
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--gamma", type=float, default=0.02, help="PAPO's KL_prcp coefficient")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(10_000 + args.seed)  # held-out scenes never appear in training
    heldout = [make_scene(rng) for _ in range(1000)]
    heldout_masked = [corrupt_images([im], MaskingConfig(ratio=0.6), args.seed, f"heldout-{i}")[0] for i, (im, _) in enumerate(heldout)]

    sheet = Image.new("RGB", (8 * 60, 2 * 60), "white")
    for i in range(8):
        sheet.paste(heldout[i][0], (i * 60 + 2, 2))
        sheet.paste(heldout_masked[i], (i * 60 + 2, 62))
    sheet.save(out / "masking.png")

    runs = {
        "GRPO": LossConfig(kl_prcp_coef=0.0),
        "PAPO": LossConfig(kl_prcp_coef=args.gamma),
    }
    rows = [row for name, cfg in runs.items() for row in train(name, cfg, args, heldout, heldout_masked)]
    (out / "metrics.json").write_text(json.dumps(rows, indent=1))

    table = Table(title=f"Perception bandit: held-out greedy accuracy (1000 scenes), {args.steps} steps, "
                        f"PAPO gamma={args.gamma}, seed {args.seed}")
    for col in ("method", "step", "accuracy", "masked acc.", "perception gap", "train reward", "KL_prcp"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], str(r["step"]), f"{r['accuracy']:.3f}", f"{r['masked_accuracy']:.3f}",
                      f"{r['perception_gap']:+.3f}", f"{r.get('train_reward', float('nan')):.3f}", f"{r.get('kl_prcp', float('nan')):.4f}")
    console = Console()
    console.print(table)
    console.print(f"wrote {out / 'masking.png'} (top: images, bottom: masked copies) and {out / 'metrics.json'}")


if __name__ == "__main__":
    main()
