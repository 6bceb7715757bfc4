"""Train from Python, as TRL users do: rows in memory, a reward function, a preset with overrides.

    python examples/python_api.py [OUT_DIR]

The rows are plain dicts (a ``datasets.Dataset`` works the same way): a question with an ``<image>``
placeholder, its answer and its image. The reward is any function of (response, answer) returning at least
``overall``. Two steps of PAPO-G on the embedded model take well under a minute on a CPU.
"""

import sys

from PIL import Image, ImageDraw

import papo


def squares(n: int, size: int = 112) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for i in range(n):
        x = 8 + 26 * i
        draw.rectangle([x, 40, x + 18, 58], fill="red")
    return image


rows = [{"prompt": "<image>How many red squares are there?", "answer": str(n), "images": [squares(n)]}
        for n in (1, 2, 3, 4)]


def says_the_answer(response: str, answer: str, answer_type: str = "math", meta=None, **kwargs) -> dict:
    correct = float(answer in response.split("</think>")[-1])
    return {"overall": correct, "accuracy": correct}


result = papo.train(
    "papo_g",
    {"rollout.n": 2, "rollout.max_new_tokens": 16, "trainer.rollout_batch_size": 2, "trainer.mini_batch_size": 2,
     "trainer.eval_before_after": False, "trainer.report_to": ["none"], "trainer.save_every": 0},
    dataset=rows, reward=says_the_answer, max_steps=2, device="cpu",
    out=sys.argv[1] if len(sys.argv) > 1 else "runs/python-api",
)
print(f"trained {result['steps']} steps; metrics, checkpoints and final/ are in {result['out']}")
