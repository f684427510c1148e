"""Boxes and points in each generation's own text convention (reference: qwen_vl_gen1 §7).

  gen "1"    <ref>dog</ref><box>(x1,y1),(x2,y2)</box>        ints in [0, 1000) of the ORIGINAL image
  gen "2"    <|object_ref_start|>dog<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
                                                            ints in [0, 1000) of the ORIGINAL image
  gen "2.5"  ```json [{"bbox_2d": [x1,y1,x2,y2], "label": "dog"}, {"point_2d": [x,y], ...}] ```
             also `<points x1=".." y1=".." alt="..">dog</points>` and plain `x1,y1,x2,y2 dog` lines;
                                                            absolute pixels of the RESIZED model input

`parse(text, generation, ...)` returns `Box` / `Point` objects whose coordinates are always pixels of
the original image (floats, corners ordered, clamped to the image), so the three generations can be
drawn and compared the same way. `format_boxes(...)` is the inverse, for writing training targets.
Sizes are `(height, width)` everywhere, like `qvl.media` (`original_size`, `resized_size`).

Parsing never raises on model output: whatever cannot be read is skipped, garbage gives `[]`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

GENERATIONS = ("1", "2", "2.5")

# Gen 1 / gen 2 coordinates are integers on a 1000-step grid over the original image. The README and
# paper say [0, 1000); Qwen-VL's own RefCOCO evaluation divides by 999 instead (reference §7.1), a
# <0.1% difference. We use 1000 for both parsing and formatting, and clamp formatted values to 999.
NORM = 1000


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in original-image pixels (x right, y down, x1 <= x2, y1 <= y2)."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    convention: str = "pixels"  # generation whose text it came from: "1", "2", "2.5" (or "pixels")
    raw: tuple[float, ...] = ()  # the numbers exactly as written in the text, in that convention

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def as_int(self) -> tuple[int, int, int, int]:
        """Integer corners, truncated as Qwen-VL's `draw_bbox_on_latest_picture` does (int(x/1000*w))."""
        return (int(self.x1), int(self.y1), int(self.x2), int(self.y2))


@dataclass(frozen=True)
class Point:
    """A point in original-image pixels."""

    x: float
    y: float
    label: str | None = None
    convention: str = "pixels"
    raw: tuple[float, ...] = ()

    @property
    def xy(self) -> tuple[float, float]:
        return (self.x, self.y)


# ---------------------------------------------------------------------------------------------
# Parsing: text -> raw items in the convention's own units
# ---------------------------------------------------------------------------------------------

_NUM = r"-?\d+(?:\.\d+)?"
_PAIR = rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
_BOX_BODY = re.compile(rf"{_PAIR}\s*,?\s*{_PAIR}")  # "(x1,y1),(x2,y2)"

# One regex per tag-based generation: a ref and the box body, in order of appearance.
_TAGS = {
    "1": re.compile(r"<ref>(.*?)</ref>|<box>(.*?)</box>", re.S),
    "2": re.compile(
        r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>|<\|box_start\|>(.*?)<\|box_end\|>", re.S
    ),
}


def _parse_tagged(text: str, generation: str) -> list[tuple[str | None, str, tuple[float, ...]]]:
    """Gen 1 / 2: walk refs and boxes in order; a ref labels every box that follows it directly.

    Qwen-VL's own drawing code labels only the first box after a ref, but "Several boxes may follow
    one <ref>" (§7.1) means they all belong to it, so we label each one (a box after any other text
    gets no label).
    """
    items, label, last_end = [], None, 0
    for m in _TAGS[generation].finditer(text):
        if text[last_end : m.start()].strip():
            label = None  # other text in between: the ref no longer applies
        last_end = m.end()
        if m.group(1) is not None:
            label = m.group(1).strip()
            continue
        for b in _BOX_BODY.finditer(m.group(2)):
            items.append((label, "box", tuple(float(v) for v in b.groups())))
    return items


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.S)
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}|\{[^{}]*$")  # grounding objects are flat; also a truncated tail
_KEY_COORDS = re.compile(r"""["']?(bbox_2d|point_2d)["']?\s*:\s*\[([^\]]*)\]""")
_KEY_LABEL = re.compile(r"""["']?label["']?\s*:\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)')""")
_POINTS_XML = re.compile(r"<points\b([^>]*)>(.*?)</points>", re.S)
_XML_ATTR = re.compile(r"""(\w+)\s*=\s*["']([^"']*)["']""")
_PLAIN_BOX = re.compile(rf"^\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s+(.+?)\s*$", re.M)


def _numbers(values) -> tuple[float, ...] | None:
    if any(isinstance(v, bool) for v in values):  # JSON true/false are not coordinates
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if all(v == v and abs(v) != float("inf") for v in out) else None


def _item_from_dict(d: dict) -> tuple[str | None, str, tuple[float, ...]] | None:
    label = d.get("label")
    label = None if label is None else str(label)
    for key, kind, n in (("bbox_2d", "box", 4), ("point_2d", "point", 2)):
        coords = d.get(key)
        if isinstance(coords, (list, tuple)) and len(coords) == n:
            nums = _numbers(coords)
            if nums is not None:
                return (label, kind, nums)
    return None


def _walk_json(value, out: list) -> None:
    """Collect grounding dicts anywhere in a parsed JSON value (a list, a dict, nested lists)."""
    if isinstance(value, dict):
        item = _item_from_dict(value)
        if item is not None:
            out.append(item)
        else:
            for v in value.values():
                _walk_json(v, out)
    elif isinstance(value, list):
        for v in value:
            _walk_json(v, out)


def _object_leniently(chunk: str):
    """One flat `{...}` chunk that json.loads refused: single quotes, trailing commas, truncation."""
    fixed = re.sub(r",\s*([}\]])", r"\1", chunk.replace("'", '"'))
    try:
        value = json.loads(fixed)
        return _item_from_dict(value) if isinstance(value, dict) else None
    except ValueError:
        pass
    m = _KEY_COORDS.search(chunk)  # last resort: pick the keys out with regexes
    if m is None:
        return None
    parts = [p for p in m.group(2).split(",") if p.strip()]
    lab = _KEY_LABEL.search(chunk)
    label = None
    if lab is not None:
        label = lab.group(1) if lab.group(1) is not None else lab.group(2)
        try:
            label = json.loads(f'"{label}"')  # undo JSON escapes when they are valid
        except ValueError:
            pass
    return _item_from_dict({m.group(1): parts, "label": label})


def _parse_json_like(text: str) -> list[tuple[str | None, str, tuple[float, ...]]]:
    """Gen 2.5: JSON (fenced or not, list or single object), then XML points, then plain-text boxes."""
    items: list = []
    fenced = [m.group(1) for m in _FENCE.finditer(text)]
    for body in fenced or [text]:
        found: list = []
        try:
            _walk_json(json.loads(body.strip()), found)
        except ValueError:
            # Not valid JSON as a whole (prose around it, truncated output, a stray quote...):
            # parse each flat object on its own and keep whatever reads.
            for m in _FLAT_OBJECT.finditer(body):
                item = _object_leniently(m.group(0))
                if item is not None:
                    found.append(item)
        items.extend(found)
    for m in _POINTS_XML.finditer(text):
        attrs = dict(_XML_ATTR.findall(m.group(1)))
        label = m.group(2).strip() or attrs.get("alt")
        i = 1
        while f"x{i}" in attrs and f"y{i}" in attrs:
            nums = _numbers((attrs[f"x{i}"], attrs[f"y{i}"]))
            if nums is not None:
                items.append((label, "point", nums))
            i += 1
    if not items:  # "x1,y1,x2,y2 label" lines: only when nothing structured was found
        for m in _PLAIN_BOX.finditer(text):
            items.append((m.group(5), "box", tuple(float(v) for v in m.groups()[:4])))
    return items


def parse_raw(text: str, generation: str) -> list[tuple[str | None, str, tuple[float, ...]]]:
    """Grounding items as written: `[(label, "box" | "point", numbers), ...]` in the convention's units."""
    generation = _check_generation(generation)
    if not isinstance(text, str):
        return []
    if generation == "2.5":
        return _parse_json_like(text)
    return _parse_tagged(text, generation)


# ---------------------------------------------------------------------------------------------
# Conversion between a convention's units and original-image pixels
# ---------------------------------------------------------------------------------------------


def _check_generation(generation) -> str:
    generation = str(generation)
    if generation not in GENERATIONS:
        raise ValueError(f"unknown generation {generation!r}; expected one of {GENERATIONS}")
    return generation


def _scales(generation: str, original_size, resized_size) -> tuple[float, float]:
    """(sx, sy): original pixels per unit of the convention."""
    h, w = original_size
    if generation == "2.5":
        if resized_size is None:
            raise ValueError("gen 2.5 coordinates are pixels of the resized input: pass resized_size")
        rh, rw = resized_size
        return w / rw, h / rh
    return w / NORM, h / NORM


def to_original(item, generation: str, original_size, resized_size=None) -> Box | Point:
    """One raw `(label, kind, numbers)` item -> Box/Point in original pixels (corners ordered, clamped)."""
    generation = _check_generation(generation)
    label, kind, nums = item
    sx, sy = _scales(generation, original_size, resized_size)
    h, w = original_size

    def cx(v: float) -> float:
        return min(max(v * sx, 0.0), float(w))

    def cy(v: float) -> float:
        return min(max(v * sy, 0.0), float(h))

    if kind == "point":
        return Point(cx(nums[0]), cy(nums[1]), label, generation, tuple(nums))
    x1, y1, x2, y2 = nums
    # Corners may come out reversed; the cookbook swaps them (§7.3), so do we.
    x1, x2 = sorted((cx(x1), cx(x2)))
    y1, y2 = sorted((cy(y1), cy(y2)))
    return Box(x1, y1, x2, y2, label, generation, tuple(nums))


def _sizes_from_batch(batch, image: int):
    """(original_size, resized_size) of one image of a `qvl.api.Batch` (duck-typed: `.media` items)."""
    media = [m for m in getattr(batch, "media", []) if getattr(m, "kind", "image") == "image"]
    if not media:
        raise ValueError("the batch holds no image to map the coordinates onto")
    item = media[image]
    return item.original_size, getattr(item, "resized_size", None)


def parse(
    text: str,
    generation: str,
    batch=None,
    *,
    original_size: tuple[int, int] | None = None,
    resized_size: tuple[int, int] | None = None,
    image: int = -1,
) -> list[Box | Point]:
    """Boxes and points of a reply, in original-image pixels.

    Give the sizes directly (`original_size=(h, w)`, plus `resized_size=(h, w)` for gen 2.5) or a
    Batch from `prepare`, in which case image `image` of it is used (default: the latest picture,
    which is also the one Qwen-VL draws on).
    """
    generation = _check_generation(generation)
    if original_size is None:
        if batch is None:
            raise ValueError("pass original_size=(h, w) or the Batch the reply was generated from")
        original_size, batch_resized = _sizes_from_batch(batch, image)
        resized_size = resized_size if resized_size is not None else batch_resized
    return [to_original(it, generation, original_size, resized_size) for it in parse_raw(text, generation)]


# ---------------------------------------------------------------------------------------------
# Formatting: original pixels -> the convention's text (training targets)
# ---------------------------------------------------------------------------------------------


def from_original(item: Box | Point, generation: str, original_size, resized_size=None) -> tuple[int, ...]:
    """Integer coordinates of a Box/Point in a generation's convention.

    Rounded to nearest (Python's round, half to even), then clamped: [0, 999] for gen 1/2, the
    resized image for gen 2.5 (x in [0, width], y in [0, height]; a box's far edge may equal it).
    """
    generation = _check_generation(generation)
    sx, sy = _scales(generation, original_size, resized_size)
    if generation == "2.5":
        hi_x, hi_y = resized_size[1], resized_size[0]
    else:
        hi_x = hi_y = NORM - 1
    coords = item.xy if isinstance(item, Point) else item.xyxy
    out = []
    for i, v in enumerate(coords):
        scale, hi = (sx, hi_x) if i % 2 == 0 else (sy, hi_y)
        out.append(min(max(int(round(v / scale)), 0), hi))
    return tuple(out)


def _json_dumps(d: dict) -> str:
    return json.dumps(d, ensure_ascii=False)


def format_box(item: Box | Point, generation: str, original_size, resized_size=None) -> str:
    """One Box (or, for gen 2.5, Point) as the model would write it."""
    generation = _check_generation(generation)
    c = from_original(item, generation, original_size, resized_size)
    if generation == "2.5":
        key = "point_2d" if isinstance(item, Point) else "bbox_2d"
        d = {key: list(c)}
        if item.label is not None:
            d["label"] = item.label
        return _json_dumps(d)
    if isinstance(item, Point):
        raise ValueError(f"generation {generation} has no point format; use a Box")
    body = f"({c[0]},{c[1]}),({c[2]},{c[3]})"
    if generation == "1":
        ref = f"<ref>{item.label}</ref>" if item.label is not None else ""
        return f"{ref}<box>{body}</box>"
    ref = f"<|object_ref_start|>{item.label}<|object_ref_end|>" if item.label is not None else ""
    return f"{ref}<|box_start|>{body}<|box_end|>"


def format_boxes(
    items: Iterable[Box | Point], generation: str, original_size, resized_size=None, *, fence: bool = True
) -> str:
    """Several items: concatenated tags (gen 1/2) or one JSON list, by default in a ```json fence (2.5)."""
    generation = _check_generation(generation)
    items = list(items)
    if generation != "2.5":
        return "".join(format_box(it, generation, original_size, resized_size) for it in items)
    lines = ",\n".join("\t" + format_box(it, generation, original_size, resized_size) for it in items)
    body = f"[\n{lines}\n]" if items else "[]"
    return f"```json\n{body}\n```" if fence else body


def strip(text: str, generation: str) -> str:
    """The reply with grounding markup removed but labels kept (as Qwen-VL's web demo displays it)."""
    generation = _check_generation(generation)
    if generation == "1":
        text = re.sub(r"<box>.*?</box>", "", text, flags=re.S)
        return re.sub(r"</?ref>", "", text)
    if generation == "2":
        text = re.sub(r"<\|box_start\|>.*?<\|box_end\|>", "", text, flags=re.S)
        return re.sub(r"<\|object_ref_(?:start|end)\|>", "", text)
    return text


__all__: Sequence[str] = (
    "Box",
    "Point",
    "parse",
    "parse_raw",
    "to_original",
    "from_original",
    "format_box",
    "format_boxes",
    "strip",
)
