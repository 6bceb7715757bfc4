"""Read-a-value families: bar chart without value labels, triangle angles drawn only in the figure, clock.

Bar charts and clocks ask the same question of every image. ``cue=1`` makes the question name the chart's or
the clock's colour (drawn in that colour), which gives the ``shortcut`` knob something in the text to key on;
``explain=1`` writes the reading out in words. With the three knobs at 0 every sample is unchanged.
"""

from __future__ import annotations

import math

from papo.data.synthetic.common import COLOURS, Scene, canvas, draw_answer, font, pick, seen
from papo.data.synthetic.scenes import Family

BAR_LABELS = "ABCDEF"


class CuedFamily(Family):
    """A family whose question text is the same for every image unless ``cue=1`` names the image's colour."""

    def check_knobs(self, knobs):
        k = super().check_knobs(knobs)
        if k["shortcut"] and not k["cue"]:
            raise ValueError(f"task {self.name!r}: shortcut needs cue=1 (without it every question has the same text, "
                             f"so nothing in it could suggest an answer)")
        return k


class BarChart(CuedFamily):
    """Bars on a 0-10 grid, labelled A.. under the axis, no value labels: read two bars, subtract."""

    name = "bar_chart"
    answers = tuple(str(d) for d in range(1, 9))  # tallest - shortest = 1..8
    knobs = {"min_bars": 3, "max_bars": 5, "cue": 0, "shortcut": 0, "explain": 0}

    def scene(self, rng, **knobs):
        k = self.check_knobs(knobs)
        # with the cue the colour is drawn first, since the shortcut's answer depends on it
        colour = pick(rng, COLOURS) if k["cue"] else None
        n = int(rng.integers(k["min_bars"], k["max_bars"] + 1))
        diff, cued = draw_answer(rng, self.answers, f"bar_chart {colour}", k["shortcut"])
        diff = int(diff)
        low = int(rng.integers(1, 11 - diff))
        values = [low, low + diff] + [int(v) for v in rng.integers(low, low + diff + 1, size=n - 2)]
        values = [values[i] for i in rng.permutation(n)]
        facts = {BAR_LABELS[i]: v for i, v in enumerate(values)}
        bars = f"{colour} bar" if colour else "bar"
        return Scene(
            question=f"What is the difference between the tallest {bars} and the shortest {bars}?",
            answer=str(diff), answer_type="int", facts=facts,
            reasoning=f"{seen(facts)} {self._explained(facts) if k['explain'] else ''}{max(values)}-{min(values)}={diff}."
            + (f" The answer is {diff}." if k["explain"] else ""),
            layout={"values": values, "colour": colour or pick(rng, COLOURS)},
            cued=cued if colour else None,
        )

    @staticmethod
    def _explained(facts: dict[str, int]) -> str:
        tallest, shortest = max(facts, key=facts.get), min(facts, key=facts.get)
        return (f"Each bar's height is read against the grid lines, one unit per line. The tallest bar is {tallest} at "
                f"{facts[tallest]} and the shortest is {shortest} at {facts[shortest]}, so the difference is the first "
                f"height minus the second: ")

    def render(self, scene, size, rng):
        img, draw, s = canvas(size)
        values = scene.layout["values"]
        left, right, top, bottom = 70 * s, 420 * s, 40 * s, 390 * s
        unit = (bottom - top) / 10
        f = font(round(20 * s))
        for v in range(11):  # light grid every unit, labelled every 2
            y = bottom - v * unit
            draw.line([left, y, right, y], fill=(205, 205, 205) if v else (30, 30, 30), width=max(1, round(s)))
            if v % 2 == 0:
                draw.text((left - 12 * s, y), str(v), fill=(30, 30, 30), font=f, anchor="rm")
        draw.line([left, top, left, bottom], fill=(30, 30, 30), width=max(1, round(2 * s)))
        slot = (right - left) / len(values)
        for i, v in enumerate(values):
            x0, x1 = left + (i + 0.2) * slot, left + (i + 0.8) * slot
            draw.rectangle([x0, bottom - v * unit, x1, bottom], fill=COLOURS[scene.layout["colour"]], outline=(30, 30, 30))
            draw.text(((x0 + x1) / 2, bottom + 20 * s), BAR_LABELS[i], fill=(30, 30, 30), font=f, anchor="mm")
        return img


class TriangleAngle(Family):
    """Two angles of a triangle are written in the figure; the question asks for the third (x)."""

    name = "triangle"
    answers = tuple(str(x) for x in range(20, 125, 5))  # x = 20..120 degrees, step 5
    knobs = {"min_angle": 20}

    def scene(self, rng, **knobs):
        k = self.check_knobs(knobs)
        x = int(pick(rng, self.answers))
        lo = k["min_angle"]
        choices = [a for a in range(lo, 180 - x - lo + 1, 5)]
        if not choices:
            raise ValueError(f"min_angle={lo} leaves no triangle with x={x}; use min_angle <= 30")
        a = int(pick(rng, choices))
        b = 180 - x - a
        facts = {"angle1": a, "angle2": b}
        return Scene(
            question="Find x, the unknown angle of the triangle, in degrees.",
            answer=str(x), answer_type="int", facts=facts,
            reasoning=f"{seen(facts)} 180-{a}-{b}={x}.",
            layout={"angles": [a, b, x], "rotation": float(rng.uniform(0, 2 * math.pi)), "flip": bool(rng.random() < 0.5)},
        )

    def render(self, scene, size, rng):
        img, draw, s = canvas(size)
        a, b, x = (math.radians(v) for v in scene.layout["angles"])
        # vertices P (angle a), Q (angle b), R (angle x) with |PQ| = 1; R from the law of sines
        pr = math.sin(b) / math.sin(x)
        pts = [(0.0, 0.0), (1.0, 0.0), (pr * math.cos(a), pr * math.sin(a))]
        if scene.layout["flip"]:
            pts = [(px, -py) for px, py in pts]
        rot = scene.layout["rotation"]
        pts = [(px * math.cos(rot) - py * math.sin(rot), px * math.sin(rot) + py * math.cos(rot)) for px, py in pts]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        scale = 330 * s / max(max(xs) - min(xs), max(ys) - min(ys))
        cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        pix = [(size / 2 + (px - cx) * scale, size / 2 + (py - cy) * scale) for px, py in pts]
        draw.polygon(pix, outline=(30, 30, 30), width=max(1, round(3 * s)))
        gx, gy = sum(p[0] for p in pix) / 3, sum(p[1] for p in pix) / 3
        f = font(round(26 * s))
        labels = [f"{scene.layout['angles'][0]}°", f"{scene.layout['angles'][1]}°", "x"]
        for (px, py), label in zip(pix, labels):
            # place each label inside the triangle, pulled from its vertex toward the centroid
            d = math.dist((px, py), (gx, gy)) or 1.0
            pull = min(0.55, 55 * s / d)
            draw.text((px + (gx - px) * pull, py + (gy - py) * pull), label, fill=(200, 30, 30), font=f, anchor="mm")
        return img


class Clock(CuedFamily):
    """An analogue clock: read the hour hand (which sits between two numbers when minutes are not 0)."""

    name = "clock"
    answers = tuple(str(h) for h in range(1, 13))
    knobs = {"minute_step": 5, "cue": 0, "shortcut": 0, "explain": 0}

    def scene(self, rng, **knobs):
        k = self.check_knobs(knobs)
        colour = pick(rng, COLOURS) if k["cue"] else None
        hour, cued = draw_answer(rng, self.answers, f"clock {colour}", k["shortcut"])
        hour = int(hour)
        minute = int(pick(rng, range(0, 60, k["minute_step"])))
        facts = {"hour hand": hour, "minute hand": minute}
        clock = f"the {colour} clock" if colour else "the clock"
        return Scene(
            question=f"What hour is shown on {clock}? Answer with a number from 1 to 12.",
            answer=str(hour), answer_type="int", facts=facts, answer_facts=("hour hand",),
            reasoning=f"{seen(facts)} {self._explained(hour, minute) if k['explain'] else ''}The hour is {hour}."
            + (f" The answer is {hour}." if k["explain"] else ""),
            layout={"hour": hour, "minute": minute, "numbers": bool(rng.random() < 0.5),
                    "radius": float(rng.uniform(150, 200)), "centre": [float(v) for v in rng.uniform(-20, 20, size=2)],
                    **({"colour": colour} if colour else {})},
            cued=cued if colour else None,
        )

    @staticmethod
    def _explained(hour: int, minute: int) -> str:
        after = hour % 12 + 1
        return (f"The short thick hand is the hour hand and the long thin one the minute hand. At {minute} minutes "
                f"past, the hour hand has moved {minute}/60 of the way from {hour} toward {after}, so it still "
                f"belongs to {hour}. ")

    def render(self, scene, size, rng):
        img, draw, s = canvas(size)
        (cx, cy), r = (size / 2 + d * s for d in scene.layout["centre"]), scene.layout["radius"] * s
        # a cued clock's rim is drawn thick in its colour, so the colour the question names is plain to see
        rim, rim_width = (COLOURS[scene.layout["colour"]], 12) if "colour" in scene.layout else ((30, 30, 30), 5)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 255, 255), outline=rim, width=max(1, round(rim_width * s)))
        f = font(round(28 * s))
        for h in range(1, 13):
            ang = math.radians(h * 30 - 90)
            inner = 0.82 if h % 3 else 0.74
            draw.line([cx + inner * r * math.cos(ang), cy + inner * r * math.sin(ang), cx + 0.95 * r * math.cos(ang),
                       cy + 0.95 * r * math.sin(ang)], fill=(30, 30, 30), width=max(1, round(4 * s)))
            if scene.layout["numbers"]:
                draw.text((cx + 0.64 * r * math.cos(ang), cy + 0.64 * r * math.sin(ang)), str(h), fill=(30, 30, 30), font=f, anchor="mm")
        hour, minute = scene.layout["hour"], scene.layout["minute"]
        for angle_deg, length, width, colour in (
            ((hour % 12) * 30 + minute * 0.5, 0.5, 12, (30, 30, 30)),  # hour hand: short and thick
            (minute * 6, 0.85, 5, (60, 60, 200)),  # minute hand: long and thin
        ):
            ang = math.radians(angle_deg - 90)
            draw.line([cx, cy, cx + length * r * math.cos(ang), cy + length * r * math.sin(ang)], fill=colour, width=max(1, round(width * s)))
        draw.ellipse([cx - 8 * s, cy - 8 * s, cx + 8 * s, cy + 8 * s], fill=(30, 30, 30))
        return img
