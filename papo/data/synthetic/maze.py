"""Grid path-finding (an AlgoPuzzleVQA maze / Ariadne analogue): shortest path length around walls."""

from __future__ import annotations

from collections import deque

import numpy as np

from papo.data.synthetic.common import Scene, canvas, font, seen
from papo.data.synthetic.scenes import Family

_MOVES = ((1, 0), (-1, 0), (0, 1), (0, -1))


def shortest_paths(walls: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """BFS distances (in moves) from ``start`` on the (n, n) bool wall grid; -1 where unreachable."""
    n = walls.shape[0]
    dist = np.full(walls.shape, -1, dtype=int)
    dist[start] = 0
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        for dr, dc in _MOVES:
            rr, cc = r + dr, c + dc
            if 0 <= rr < n and 0 <= cc < n and not walls[rr, cc] and dist[rr, cc] < 0:
                dist[rr, cc] = dist[r, c] + 1
                queue.append((rr, cc))
    return dist


def cell_name(r: int, c: int) -> str:
    """Chess-style name: column letter (labelled above the grid) + row number (labelled at the left)."""
    return f"{'ABCDEFGHIJ'[c]}{r + 1}"


class Maze(Family):
    name = "maze"
    answers = tuple(str(d) for d in range(2, 10))  # 2..9 moves
    knobs = {"grid": 6, "wall_percent": 25}

    def scene(self, rng, **knobs):
        k = self.check_knobs(knobs)
        n = k["grid"]
        if not 4 <= n <= 10:
            raise ValueError(f"maze grid must be 4..10 cells, got {n}")
        target = int(rng.integers(2, 10))
        for _ in range(1000):
            walls = rng.random((n, n)) < k["wall_percent"] / 100
            free = np.argwhere(~walls)
            start = tuple(int(v) for v in free[rng.integers(len(free))])
            dist = shortest_paths(walls, start)
            goals = np.argwhere(dist == target)
            if len(goals):
                goal = tuple(int(v) for v in goals[rng.integers(len(goals))])
                break
        else:
            raise ValueError(f"no {n}x{n} maze with a shortest path of {target} moves; raise grid or lower wall_percent")
        facts = {"start": cell_name(*start), "goal": cell_name(*goal)}
        return Scene(
            question="What is the length of the shortest path from the green cell to the red cell? "
            "Move up, down, left or right; black cells are walls.",
            answer=str(target), answer_type="int", facts=facts,
            reasoning=f"{seen(facts)} The shortest path takes {target} moves.",
            layout={"walls": walls.tolist(), "start": start, "goal": goal},
        )

    def render(self, scene, size, rng):
        img, draw, s = canvas(size)
        walls = scene.layout["walls"]
        n = len(walls)
        origin, cell = 48 * s, 380 * s / n
        f = font(round(22 * s))
        for i in range(n):
            draw.text((origin + (i + 0.5) * cell, origin - 20 * s), "ABCDEFGHIJ"[i], fill=(30, 30, 30), font=f, anchor="mm")
            draw.text((origin - 20 * s, origin + (i + 0.5) * cell), str(i + 1), fill=(30, 30, 30), font=f, anchor="mm")
        colours = {tuple(scene.layout["start"]): (40, 170, 60), tuple(scene.layout["goal"]): (220, 40, 40)}
        for r in range(n):
            for c in range(n):
                fill = (25, 25, 25) if walls[r][c] else colours.get((r, c), (255, 255, 255))
                x0, y0 = origin + c * cell, origin + r * cell
                draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=fill, outline=(150, 150, 150), width=max(1, round(s)))
        return img
