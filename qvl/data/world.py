"""The generated visual world: coloured shapes and words on plain canvases, deterministic by seed.

A `Scene` is pure data (canvas size, background, shapes, words, all boxes in pixels); `render(scene)`
draws it. Everything the tasks ask about is read from the scene, never from the image, so every
answer is exact.

Boxes are `(x1, y1, x2, y2)` pixel *edges*: a shape drawn on pixel columns 10..19 has x1=10, x2=20.
That is the continuous-coordinate convention `qvl.grounding` uses (a pixel i covers [i, i+1)), so a
box converts to 0-1000 or to resized pixels without off-by-one fudging.

Fonts are matplotlib's DejaVu files (a pip package, so the same glyphs on every machine; system fonts
are never used). DejaVu Sans covers Latin, Greek and Cyrillic; it has no CJK at all, and Arabic needs
contextual shaping (libraqm), which a CI machine may lack, so neither is used. Text is laid out with
Pillow's BASIC engine for the same reason: identical pixels with or without raqm.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# --------------------------------------------------------------------------------------------------
# Vocabulary of the world
# --------------------------------------------------------------------------------------------------

# Saturated colours, far from each other, from the light backgrounds and from the dark text colours,
# so a pixel's colour names its object unambiguously (the tests rely on this).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 15),
    "yellow": (235, 205, 0),
    "green": (30, 160, 50),
    "cyan": (0, 185, 205),
    "blue": (30, 70, 225),
    "purple": (135, 45, 185),
    "pink": (245, 105, 185),
}
KINDS = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}

# Text is always dark (every channel <= 70): readable on the light backgrounds, never mistaken for a shape.
TEXT_COLORS = ((0, 0, 0), (40, 40, 40), (20, 30, 70), (70, 20, 20), (15, 55, 25))
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf")

# Short everyday words per script (lower case, NFC). "number" words are drawn at random (digits matter
# for OCR and for the tokenizer's one-digit-per-token rule).
WORDS: dict[str, tuple[str, ...]] = {
    "latin": (
        "cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "rain", "milk", "door",
        "lamp", "road", "ship", "wolf", "frog", "king", "gold", "salt", "wind", "rose", "hill", "snow",
        "apple", "house", "river", "cloud", "stone", "green", "table", "chair", "bread", "light",
        "music", "water", "tiger", "zebra", "piano", "quiet", "jump", "vivid", "yak", "box",
    ),
    "cyrillic": (
        "кот", "дом", "мир", "лес", "сад", "мост", "луна", "рыба", "снег", "окно", "река", "гора",
        "хлеб", "стол", "книга", "птица", "вода", "море", "небо", "поле", "звезда", "город", "ветер",
        "цвет", "жук", "щука", "юла", "яблоко", "чай", "шар", "ёж", "эхо",
    ),
    "greek": (
        "ήλιος", "γάτα", "σκύλος", "νερό", "δέντρο", "φως", "βιβλίο", "θάλασσα", "ψάρι", "πόλη",
        "ουρανός", "λόφος", "χιόνι", "ζωή", "μήλο", "ξύλο", "κόσμος", "άνεμος", "πέτρα", "νύχτα",
        "ώρα", "μέλι", "ρόδο", "ήχος", "ψωμί", "αστέρι", "δρόμος", "φίλος",
    ),
}
SCRIPTS = ("latin", "cyrillic", "greek", "number")

NORMAL_TEXT_PX = (14, 36)  # font sizes on ordinary canvases
SMALL_TEXT_PX = (9, 13)  # small text, only on large canvases: the case native resolution is for
LARGE_CANVAS = 600  # a canvas whose longer side exceeds this is "large"
MARGIN = 4  # minimum free pixels between any two things in a scene


# --------------------------------------------------------------------------------------------------
# Scene data
# --------------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    color: str  # a key of COLORS
    box: Box  # square: width == height

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Text:
    text: str
    box: Box  # ink extent: every pixel the glyphs touch (any coverage)
    script: str  # one of SCRIPTS
    size: int  # font size in pixels
    font: str  # a name in FONTS
    color: tuple[int, int, int]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    background2: tuple[int, int, int] | None = None  # second end of a linear gradient, if any
    gradient: str = "h"  # "h": left to right, "v": top to bottom
    shapes: tuple[Shape, ...] = ()
    texts: tuple[Text, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        """(height, width), the order `qvl.media` and `qvl.grounding` use."""
        return (self.height, self.width)

    @property
    def large(self) -> bool:
        return max(self.width, self.height) > LARGE_CANVAS


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the scene distribution. `max_objects` is the curriculum knob."""

    min_side: int = 112
    max_side: int = 448
    large_prob: float = 0.15  # chance of a large canvas (sides up to large_max_side)
    large_max_side: int = 896
    min_objects: int = 1
    max_objects: int = 4
    kinds: tuple[str, ...] = KINDS
    colors: tuple[str, ...] = tuple(COLORS)
    min_shape: int = 14
    max_shape_frac: float = 0.35  # of the shorter canvas side
    text_prob: float = 0.5
    min_texts: int = 0
    max_texts: int = 2
    scripts: tuple[str, ...] = SCRIPTS
    small_text_prob: float = 0.5  # on large canvases only
    gradient_prob: float = 0.5


# --------------------------------------------------------------------------------------------------
# Fonts and text masks
# --------------------------------------------------------------------------------------------------


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder, found without importing matplotlib (that takes ~0.3 s)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("qvl.data needs matplotlib for its DejaVu fonts: pip install matplotlib")
    return Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"


@lru_cache(maxsize=256)
def get_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / name), size, layout_engine=ImageFont.Layout.BASIC)


@lru_cache(maxsize=4096)
def text_mask(text: str, font: str, size: int) -> Image.Image:
    """Antialiased coverage of `text` ("L" image) cropped to its ink: the mask's size is the text box size."""
    f = get_font(font, size)
    left, top, right, bottom = f.getbbox(text)
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), text, font=f, fill=255)
    ink = canvas.getbbox()  # bounding box of non-zero coverage
    return canvas.crop(ink) if ink else canvas.crop((0, 0, 1, 1))


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def _star_points(box: Box) -> list[tuple[int, int]]:
    """A five-pointed star stretched so its extreme vertices land exactly on the box's edge pixels."""
    angles = np.deg2rad(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    xs, ys = radii * np.cos(angles), radii * np.sin(angles)
    x1, y1, x2, y2 = box
    px = x1 + (xs - xs.min()) / (xs.max() - xs.min()) * (x2 - 1 - x1)
    py = y1 + (ys - ys.min()) / (ys.max() - ys.min()) * (y2 - 1 - y1)
    return [(int(round(x)), int(round(y))) for x, y in zip(px, py)]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: Box, rgb: tuple[int, int, int]) -> None:
    """Fill `kind` into `box` (pixel edges) without antialiasing, so every drawn pixel is exactly `rgb`.

    Pillow's coordinates are inclusive, hence the `- 1` on the far edges.
    """
    x1, y1, x2, y2 = box
    r, b = x2 - 1, y2 - 1
    if kind == "square":
        draw.rectangle((x1, y1, r, b), fill=rgb)
    elif kind == "circle":
        draw.ellipse((x1, y1, r, b), fill=rgb)
    elif kind == "triangle":
        draw.polygon([(x1, b), (r, b), (x1 + (r - x1) // 2, y1)], fill=rgb)
    elif kind == "star":
        draw.polygon(_star_points(box), fill=rgb)
    elif kind == "cross":
        arm = round(0.3 * (x2 - x1))  # arms are the middle 40 % of the box
        draw.rectangle((x1, y1 + arm, r, b - arm), fill=rgb)
        draw.rectangle((x1 + arm, y1, r - arm, b), fill=rgb)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


def background_image(width: int, height: int, c1, c2=None, gradient: str = "h") -> Image.Image:
    """A solid canvas, or a linear gradient from c1 to c2 (Pillow's 256-step ramp, resized: ~0.1 ms)."""
    base = Image.new("RGB", (width, height), tuple(c1))
    if c2 is None:
        return base
    ramp = Image.linear_gradient("L")  # 256x256, black at the top to white at the bottom
    if gradient == "h":
        ramp = ramp.rotate(90, expand=True).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mask = ramp.resize((width, height), Image.Resampling.BILINEAR)
    return Image.composite(Image.new("RGB", (width, height), tuple(c2)), base, mask)


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB PIL image of size (scene.width, scene.height)."""
    img = background_image(scene.width, scene.height, scene.background, scene.background2, scene.gradient)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        draw_shape(draw, s.kind, s.box, COLORS[s.color])
    for t in scene.texts:
        mask = text_mask(t.text, t.font, t.size)
        img.paste(t.color, t.box, mask)
    return img


# --------------------------------------------------------------------------------------------------
# Sampling scenes
# --------------------------------------------------------------------------------------------------


def as_rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def light_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A pale background colour (every channel 215..255): far from every shape and text colour."""
    return tuple(int(v) for v in rng.integers(215, 256, size=3))


def overlaps(a: Box, b: Box, margin: int = MARGIN) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def place(rng: np.random.Generator, width: int, height: int, bw: int, bh: int, taken: list[Box],
          tries: int = 40) -> Box | None:
    """A random box of size bw x bh inside the canvas (MARGIN from its edges) clear of `taken`, or None."""
    if bw + 2 * MARGIN > width or bh + 2 * MARGIN > height:
        return None
    for _ in range(tries):
        x = int(rng.integers(MARGIN, width - MARGIN - bw + 1))
        y = int(rng.integers(MARGIN, height - MARGIN - bh + 1))
        box = (x, y, x + bw, y + bh)
        if not any(overlaps(box, t) for t in taken):
            return box
    return None


def canvas_size(rng: np.random.Generator, cfg: SceneConfig) -> tuple[int, int]:
    """(width, height), each side independent so aspect ratios vary (up to 4:1 on ordinary canvases)."""
    hi = cfg.large_max_side if rng.random() < cfg.large_prob else cfg.max_side
    lo = cfg.min_side if hi == cfg.max_side else max(cfg.min_side, LARGE_CANVAS // 2)
    w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    if hi == cfg.large_max_side and max(w, h) <= LARGE_CANVAS:
        w = int(rng.integers(LARGE_CANVAS + 1, hi + 1))  # make sure a "large" draw really is large
    return w, h


def random_word(rng: np.random.Generator, script: str) -> str:
    if script == "number":
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 5)))))
    words = WORDS[script]
    return words[int(rng.integers(len(words)))]


def sample_text(rng: np.random.Generator, width: int, height: int, large: bool, cfg: SceneConfig,
                taken: list[Box]) -> Text | None:
    script = cfg.scripts[int(rng.integers(len(cfg.scripts)))]
    word = random_word(rng, script)
    lo, hi = SMALL_TEXT_PX if large and rng.random() < cfg.small_text_prob else NORMAL_TEXT_PX
    size = int(rng.integers(lo, hi + 1))
    font = FONTS[int(rng.integers(len(FONTS)))]
    color = TEXT_COLORS[int(rng.integers(len(TEXT_COLORS)))]
    while size >= 9:  # shrink until the word fits the canvas
        mw, mh = text_mask(word, font, size).size
        box = place(rng, width, height, mw, mh, taken)
        if box is not None:
            return Text(word, box, script, size, font, color)
        size -= 4
    return None


def sample_shape(rng: np.random.Generator, width: int, height: int, cfg: SceneConfig,
                 taken: list[Box]) -> Shape | None:
    kind = cfg.kinds[int(rng.integers(len(cfg.kinds)))]
    color = cfg.colors[int(rng.integers(len(cfg.colors)))]
    hi = max(cfg.min_shape, int(cfg.max_shape_frac * min(width, height)))
    side = int(rng.integers(cfg.min_shape, hi + 1))
    while side >= cfg.min_shape:  # a crowded canvas gets smaller shapes rather than fewer
        box = place(rng, width, height, side, side, taken)
        if box is not None:
            return Shape(kind, color, box)
        side = side * 3 // 4
    return None


def make_scene(seed_or_rng, cfg: SceneConfig = SceneConfig()) -> Scene:
    """A random scene; the same seed (int, sequence of ints, or a Generator in the same state) gives
    the same scene. Texts are placed first (they are wide), then shapes; nothing overlaps."""
    rng = as_rng(seed_or_rng)
    width, height = canvas_size(rng, cfg)
    large = max(width, height) > LARGE_CANVAS
    bg = light_color(rng)
    bg2 = light_color(rng) if rng.random() < cfg.gradient_prob else None
    gradient = "h" if rng.random() < 0.5 else "v"
    n_texts = int(rng.integers(1, cfg.max_texts + 1)) if rng.random() < cfg.text_prob else 0
    n_texts = max(n_texts, cfg.min_texts)
    n_shapes = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    taken: list[Box] = []
    texts: list[Text] = []
    for _ in range(n_texts):
        t = sample_text(rng, width, height, large, cfg, taken)
        if t is not None:
            texts.append(t)
            taken.append(t.box)
    shapes: list[Shape] = []
    for _ in range(n_shapes):
        s = sample_shape(rng, width, height, cfg, taken)
        if s is not None:
            shapes.append(s)
            taken.append(s.box)
    return Scene(width, height, bg, bg2, gradient, tuple(shapes), tuple(texts))


# --------------------------------------------------------------------------------------------------
# Reading a scene (used by the tasks)
# --------------------------------------------------------------------------------------------------


def left_to_right(items):
    """Order by box centre x, then centre y (the caption's reading order for shapes)."""
    return sorted(items, key=lambda it: (it.box[0] + it.box[2], it.box[1] + it.box[3]))


def reading_order(texts):
    """Top-to-bottom, then left-to-right: lines are texts whose vertical centres are within half a height."""
    rows: list[list[Text]] = []
    for t in sorted(texts, key=lambda t: (t.box[1] + t.box[3]) / 2):
        c = (t.box[1] + t.box[3]) / 2
        if rows and abs(c - (rows[-1][0].box[1] + rows[-1][0].box[3]) / 2) < rows[-1][0].height / 2:
            rows[-1].append(t)
        else:
            rows.append([t])
    return [t for row in rows for t in sorted(row, key=lambda t: t.box[0])]


__all__ = [
    "COLORS", "KINDS", "PLURALS", "WORDS", "SCRIPTS", "FONTS", "TEXT_COLORS",
    "Shape", "Text", "Scene", "SceneConfig",
    "make_scene", "render", "draw_shape", "background_image", "text_mask", "get_font", "font_dir",
    "left_to_right", "reading_order", "overlaps", "place", "as_rng",
]
