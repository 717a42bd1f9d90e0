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


# ------------------------------------------------------------------------------------------------
# Exact ground truth: what a drawn scene shows, and what a caption asks for (the study's judge)
# ------------------------------------------------------------------------------------------------

SLOTS = tuple(POSITIONS)  # the places a shape can stand, in a fixed order (the attribute model's slots)
MODES = ("single", "pair", "count")  # the caption forms of random_scene
_WORD_TO_COUNT = {word: n for n, word in COUNT_WORDS.items()}
_CAPTION_END = " background"


@dataclass(frozen=True)
class SlotShape:
    """The shape standing in one slot (its position is the slot)."""

    kind: str
    colour: str
    size: str


@dataclass
class SceneAttributes:
    """What a picture shows: its background and, per slot (``SLOTS``), a shape or None."""

    background: str
    slots: dict[str, SlotShape | None]

    @classmethod
    def of_scene(cls, shapes: list[Shape], background: str) -> "SceneAttributes":
        slots: dict[str, SlotShape | None] = {slot: None for slot in SLOTS}
        for shape in shapes:
            slots[shape.position] = SlotShape(shape.kind, shape.colour, shape.size)
        return cls(background, slots)

    @property
    def occupied(self) -> list[str]:
        return [slot for slot in SLOTS if self.slots[slot] is not None]

    def as_dict(self) -> dict:
        return {
            "background": self.background,
            "slots": {slot: None if s is None else {"kind": s.kind, "colour": s.colour, "size": s.size}
                      for slot, s in self.slots.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SceneAttributes":
        slots = {slot: None if data["slots"].get(slot) is None else SlotShape(**data["slots"][slot]) for slot in SLOTS}
        return cls(data["background"], slots)


# Aspects of a prompt that a picture can satisfy or not (CaptionSpec.check); "all" is their conjunction.
FIDELITY_ASPECTS = ("background", "count", "positions", "colours", "shapes", "sizes", "all")


@dataclass
class CaptionSpec:
    """What a caption of ``random_scene`` states (``parse_caption``). A counted caption ("three red
    squares") names no places: its shapes may stand in any corners, and ``shapes`` has no positions."""

    background: str
    shapes: list[Shape]  # counted: position "" (any corner); size None where the caption states none
    counted: bool

    @property
    def mode(self) -> str:
        if self.counted:
            return "count"
        return "single" if len(self.shapes) == 1 else "pair"

    def shapes_for(self, rng: np.random.Generator) -> list[Shape]:
        """Shapes of a fresh picture of this caption, as ``random_scene`` would draw them: counted
        shapes in random distinct corners, shapes of unstated size small."""
        if self.counted:
            corners = rng.choice(CORNERS, size=len(self.shapes), replace=False)
            return [Shape(s.kind, s.colour, str(c), "small") for s, c in zip(self.shapes, corners)]
        return [Shape(s.kind, s.colour, s.position, s.size or "small") for s in self.shapes]

    def check(self, seen: SceneAttributes) -> dict[str, bool]:
        """Aspect -> does the picture described by ``seen`` satisfy it (see ``FIDELITY_ASPECTS``)."""
        occupied = seen.occupied
        result = {"background": seen.background == self.background, "count": len(occupied) == len(self.shapes)}
        if self.counted:
            wanted = self.shapes[0]
            shown = [seen.slots[slot] for slot in occupied]
            result["positions"] = result["count"] and all(slot in CORNERS for slot in occupied)
            result["colours"] = bool(shown) and all(s.colour == wanted.colour for s in shown)
            result["shapes"] = bool(shown) and all(s.kind == wanted.kind for s in shown)
            result["sizes"] = True  # counted captions state no size
        else:
            at = [seen.slots[shape.position] for shape in self.shapes]
            result["positions"] = sorted(occupied) == sorted(shape.position for shape in self.shapes)
            result["colours"] = all(s is not None and s.colour == shape.colour for s, shape in zip(at, self.shapes))
            result["shapes"] = all(s is not None and s.kind == shape.kind for s, shape in zip(at, self.shapes))
            result["sizes"] = all(
                shape.size is None or (s is not None and s.size == shape.size) for s, shape in zip(at, self.shapes)
            )
        result["all"] = all(result[aspect] for aspect in FIDELITY_ASPECTS[:-1])
        return result


def _parse_one(text: str) -> Shape:
    """'a [size] colour kind at the position' -> Shape (size None when not stated)."""
    words = text.split()
    if len(words) < 6 or words[0] != "a" or "at" not in words:
        raise ValueError(f"cannot read the shape {text!r}")
    at = words.index("at")
    head, position = words[1:at], " ".join(words[at + 2 :])
    size = head[0] if len(head) == 3 else None
    colour, kind = head[-2], head[-1]
    if (size is not None and size not in SIZES) or colour not in COLOURS or kind not in SHAPES or position not in POSITIONS \
            or words[at + 1] != "the" or len(head) not in (2, 3):
        raise ValueError(f"cannot read the shape {text!r}")
    return Shape(kind, colour, position, size)


def parse_caption(caption: str) -> CaptionSpec:
    """The inverse of ``caption_of``: what a demo caption states. ValueError for any other text."""
    text = " ".join(caption.strip().lower().split())
    body, sep, background = text.rpartition(" on a ")
    background = background.removesuffix(_CAPTION_END)
    if not sep or not text.endswith(_CAPTION_END) or background not in BACKGROUNDS:
        raise ValueError(f"{caption!r} is not a demo caption: it must end with 'on a <{'|'.join(BACKGROUNDS)}> background'")
    words = body.split()
    if words and words[0] in _WORD_TO_COUNT:
        if len(words) != 3 or words[1] not in COLOURS or words[2].removesuffix("s") not in SHAPES or not words[2].endswith("s"):
            raise ValueError(f"{caption!r} is not a demo caption: expected '<count> <colour> <shape>s'")
        kind = words[2].removesuffix("s")
        shapes = [Shape(kind, words[1], "", None) for _ in range(_WORD_TO_COUNT[words[0]])]
        return CaptionSpec(background, shapes, counted=True)
    try:
        shapes = [_parse_one(part) for part in body.split(" and ")]
    except ValueError as e:
        raise ValueError(f"{caption!r} is not a demo caption: {e}") from None
    if len({s.position for s in shapes}) != len(shapes):
        raise ValueError(f"{caption!r} puts two shapes in one place")
    return CaptionSpec(background, shapes, counted=False)
