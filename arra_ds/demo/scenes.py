"""Scenes of the demo data set: coloured shapes on a plain background, and captions that state them.

    "a large red circle at the top left on a black background"
    "a green square at the center and a blue triangle at the bottom right on a gray background"
    "three yellow triangles on a white background"

A scene's caption says its global content (shapes, colours, positions, counts, sizes); every word is
in the debug tokenizer's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (235, 205, 40)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # centre of a shape as a fraction of the image side (x, y)
    "top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73), "center": (0.5, 0.5),
}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SIZES = {"small": 0.11, "large": 0.2}  # shape radius as a fraction of the image side
POSITION_JITTER = 0.03  # random shift of a shape's centre (fraction of the side)




@dataclass
class Shape:
    kind: str
    colour: str
    position: str
    size: str


def _one(kind: str, colour: str, position: str, size: str | None) -> str:
    size_word = f"{size} " if size else ""
    return f"a {size_word}{colour} {kind} at the {position}"


def caption_of(shapes: list[Shape], background: str, counted: bool, sized: bool) -> str:
    if counted:
        first = shapes[0]
        return f"{COUNT_WORDS[len(shapes)]} {first.colour} {first.kind}s on a {background} background"
    parts = " and ".join(_one(s.kind, s.colour, s.position, s.size if sized else None) for s in shapes)
    return f"{parts} on a {background} background"


def _longest_caption_words() -> int:
    """Word count of the longest caption ``random_scene`` can make (each word is one debug token)."""
    shape = Shape("triangle", "yellow", "bottom right", "large")  # the two-word position is the longest
    captions = [
        caption_of([shape], "gray", counted=False, sized=True),  # one shape, with its size
        caption_of([shape] * 2, "gray", counted=False, sized=False),  # two shapes
        caption_of([shape] * max(COUNT_WORDS), "gray", counted=True, sized=False),  # counted shapes
    ]
    return max(len(c.split()) for c in captions)


MAX_CAPTION_WORDS = _longest_caption_words()


def random_scene(rng: np.random.Generator) -> tuple[list[Shape], str, str]:
    """(shapes, background, caption) of one picture."""
    background = str(rng.choice(list(BACKGROUNDS)))
    mode = rng.choice(["single", "pair", "count"])
    if mode == "count":
        n = int(rng.choice(list(COUNT_WORDS)))
        kind, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        corners = rng.choice(CORNERS, size=n, replace=False)
        shapes = [Shape(kind, colour, str(c), "small") for c in corners]
        return shapes, background, caption_of(shapes, background, counted=True, sized=False)
    n = 1 if mode == "single" else 2
    positions = rng.choice(list(POSITIONS), size=n, replace=False)
    shapes = [
        Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(p), "large" if n == 1 and rng.random() < 0.5 else "small")
        for p in positions
    ]
    return shapes, background, caption_of(shapes, background, counted=False, sized=n == 1)


def draw_scene(shapes: list[Shape], background: str, side: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (side, side), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        fx, fy = POSITIONS[shape.position]
        cx = (fx + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * side
        cy = (fy + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * side
        r = SIZES[shape.size] * side
        colour = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif shape.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    return image
