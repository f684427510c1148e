"""Short generated clips: shapes that move in one direction and appear / disappear at known frames.

A `Clip` is pure data; `frames(clip)` draws it. Each shape (a `Track`) travels in its own lane (a strip
of the canvas), so shapes never occlude each other and its visibility in the pixels is exactly
`appear <= frame < disappear`. Times are frame indices / fps, so "appears at 1.5 s" means the first
frame showing it has timestamp 1.5 s (frame k shows time k / fps).

Clips use varied source frame rates (4-12 fps) because Qwen2-VL / 2.5-VL resample to 2 fps and
Qwen2.5-VL's absolute-time M-RoPE is what should make "when" answers independent of the source rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import COLORS, KINDS, MARGIN, Box, as_rng, background_image, draw_shape, light_color

DIRECTIONS = ("left", "right", "up", "down")
_UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image y grows downwards


@dataclass(frozen=True)
class Track:
    kind: str
    color: str
    side: int  # square box side in pixels
    x0: float  # top-left corner at t = 0 s (the path extrapolated; only frames in [appear, disappear) show it)
    y0: float
    speed: float  # pixels per second along `direction`
    direction: str  # one of DIRECTIONS
    appear: int  # first frame that shows the shape
    disappear: int  # first frame that no longer shows it (== n_frames: stays to the end)

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Clip:
    width: int
    height: int
    fps: int
    n_frames: int
    background: tuple[int, int, int]
    tracks: tuple[Track, ...]

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps

    def time(self, frame: int) -> float:
        return frame / self.fps


@dataclass(frozen=True)
class Event:
    time: float  # seconds
    kind: str  # "appear" | "disappear"
    track: int  # index into clip.tracks
    name: str  # e.g. "red circle"


@dataclass(frozen=True)
class ClipConfig:
    min_side: int = 112
    max_side: int = 336
    min_seconds: float = 2.0
    max_seconds: float = 6.0
    fps_choices: tuple[int, ...] = (4, 5, 6, 8, 10, 12)
    min_tracks: int = 1
    max_tracks: int = 3
    min_visible_s: float = 1.0  # every shape is on screen at least this long
    min_travel: int = 16  # pixels a shape moves over its visible interval, at least


def box_at(track: Track, frame: int, fps: int) -> Box:
    """The shape's box at a frame (rounded to whole pixels, so drawing stays unantialiased)."""
    dx, dy = _UNIT[track.direction]
    t = frame / fps
    x = int(round(track.x0 + dx * track.speed * t))
    y = int(round(track.y0 + dy * track.speed * t))
    return (x, y, x + track.side, y + track.side)


def visible(track: Track, frame: int) -> bool:
    return track.appear <= frame < track.disappear


def _lanes(width: int, height: int, n: int) -> list[Box]:
    """Split the canvas into n equal strips across its longer side (each shape gets one)."""
    if width >= height:
        edges = np.linspace(0, width, n + 1).astype(int)
        return [(int(a), 0, int(b), height) for a, b in zip(edges[:-1], edges[1:])]
    edges = np.linspace(0, height, n + 1).astype(int)
    return [(0, int(a), width, int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _times(rng: np.random.Generator, n_frames: int, min_visible: int) -> tuple[int, int]:
    """(appear, disappear) frames: often present from the start, often staying to the end."""
    latest = n_frames - min_visible
    appear = 0 if rng.random() < 0.35 or latest < 1 else int(rng.integers(1, latest + 1))
    if rng.random() < 0.5 or appear + min_visible >= n_frames:
        return appear, n_frames
    return appear, int(rng.integers(appear + min_visible, n_frames))


def _track(rng: np.random.Generator, lane: Box, kind: str, color: str, fps: int, n_frames: int,
           cfg: ClipConfig) -> Track | None:
    """A shape moving in a straight line inside `lane` over its visible frames, or None if it can't."""
    lx1, ly1, lx2, ly2 = lane
    min_visible = min(n_frames, max(2, math.ceil(cfg.min_visible_s * fps)))
    appear, disappear = _times(rng, n_frames, min_visible)
    t0, t1 = appear / fps, (disappear - 1) / fps  # time of the first and last visible frame
    short = min(lx2 - lx1, ly2 - ly1) - 2 * MARGIN
    for direction in rng.permutation(DIRECTIONS):
        horizontal = direction in ("left", "right")
        room = (lx2 - lx1 if horizontal else ly2 - ly1) - 2 * MARGIN  # length of the lane along the motion
        side = int(rng.integers(14, max(15, min(short, room // 2, 72) + 1)))
        if side > short:
            continue
        travel_max = room - side
        if travel_max < cfg.min_travel or t1 <= t0:
            continue
        travel = float(rng.uniform(max(cfg.min_travel, 0.5 * travel_max), travel_max))
        speed = travel / (t1 - t0)
        dx, dy = _UNIT[str(direction)]
        # where the path starts (at t0) along the motion axis, and the fixed coordinate across it
        if horizontal:
            start = lx1 + MARGIN + (0 if dx > 0 else travel) + float(rng.uniform(0, travel_max - travel))
            across = int(rng.integers(ly1 + MARGIN, ly2 - MARGIN - side + 1))
            x0, y0 = start - dx * speed * t0, float(across)
        else:
            start = ly1 + MARGIN + (0 if dy > 0 else travel) + float(rng.uniform(0, travel_max - travel))
            across = int(rng.integers(lx1 + MARGIN, lx2 - MARGIN - side + 1))
            x0, y0 = float(across), start - dy * speed * t0
        return Track(kind, color, side, x0, y0, speed, str(direction), appear, disappear)
    return None


def make_clip(seed_or_rng, cfg: ClipConfig = ClipConfig()) -> Clip:
    """A random clip. Colours are distinct, so "the red circle" always names exactly one shape."""
    rng = as_rng(seed_or_rng)
    # even sides: H.264 in yuv420p needs them, and write_mp4 must not crop the ground truth
    width, height = (2 * int(v) for v in rng.integers(cfg.min_side // 2, cfg.max_side // 2 + 1, size=2))
    fps = int(cfg.fps_choices[int(rng.integers(len(cfg.fps_choices)))])
    n_frames = max(4, int(round(float(rng.uniform(cfg.min_seconds, cfg.max_seconds)) * fps)))
    n = int(rng.integers(cfg.min_tracks, cfg.max_tracks + 1))
    colors = rng.choice(list(COLORS), size=n, replace=False)
    tracks = []
    for lane, color in zip(_lanes(width, height, n), colors):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        t = _track(rng, lane, kind, str(color), fps, n_frames, cfg)
        if t is not None:
            tracks.append(t)
    return Clip(width, height, fps, n_frames, light_color(rng), tuple(tracks))


def render_frame(clip: Clip, frame: int) -> Image.Image:
    img = background_image(clip.width, clip.height, clip.background)
    draw = ImageDraw.Draw(img)
    for t in clip.tracks:
        if visible(t, frame):
            draw_shape(draw, t.kind, box_at(t, frame, clip.fps), COLORS[t.color])
    return img


def frames(clip: Clip, indices=None) -> list[Image.Image]:
    """The clip's frames (all of them, or those at `indices`)."""
    indices = range(clip.n_frames) if indices is None else indices
    return [render_frame(clip, int(i)) for i in indices]


def render_clip(clip: Clip) -> tuple[list[Image.Image], int, list[Event]]:
    """Everything a caller needs in one go: (frames, fps, ground-truth events)."""
    return frames(clip), clip.fps, events(clip)


def events(clip: Clip) -> list[Event]:
    """Appearances after the first frame and disappearances before the end, in time order."""
    out = []
    for i, t in enumerate(clip.tracks):
        if t.appear > 0:
            out.append(Event(clip.time(t.appear), "appear", i, t.name))
        if t.disappear < clip.n_frames:
            out.append(Event(clip.time(t.disappear), "disappear", i, t.name))
    return sorted(out, key=lambda e: (e.time, e.track))


def write_mp4(clip: Clip, path, crf: int = 18) -> None:
    """Encode the clip as H.264 mp4 with PyAV at its own fps (scripts and tests; qvl decodes with decord)."""
    import av  # optional: only needed to write files

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=clip.fps)
        stream.width, stream.height, stream.pix_fmt = clip.width, clip.height, "yuv420p"
        stream.options = {"crf": str(crf)}
        for img in frames(clip):
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


__all__ = ["DIRECTIONS", "Track", "Clip", "Event", "ClipConfig", "make_clip", "box_at", "visible",
           "render_frame", "frames", "render_clip", "events", "write_mp4"]
