"""Generate the sample media in ``assets/`` (deterministic, < 2 MB in total).

    python scripts/make_assets.py [--out assets]

Files written:
  shapes_640x480.png        coloured shapes on a light background (RGB)
  text_scripts_1280x320.png one line per script: Latin, Cyrillic, Greek, Arabic (+ CJK if a font covers it)
  tall_300x1800.png         a tall, narrow strip of stacked coloured bands (extreme-ish aspect ratio 6:1)
  rgba_palette.png          RGBA image with a transparent background (tests alpha -> white compositing)
  palette_p.png             palette ("P") image with a transparent palette index
  motion_4s_8fps.mp4        4 s, 8 fps, 320x240 synthetic clip: a disc moving left to right over a gradient

PyAV (``av``) is used here only as a build-time tool to *write* the mp4; at runtime
qvl decodes video with decord.  Nothing random is used, so reruns give the same
pixels (the PNG encoder and the mpeg4 encoder are deterministic).
"""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent

# One sample line per script.  The Arabic line needs Pillow's raqm layout for shaping
# and right-to-left order (present in the Pillow wheels); without it the glyphs are
# still drawn, just unshaped.
SCRIPT_LINES = [
    ("Latin", "The quick brown fox jumps over the lazy dog. 0123456789"),
    ("Cyrillic", "Съешь же ещё этих мягких французских булок."),
    ("Greek", "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία."),
    ("Arabic", "نص حكيم له سر قاطع وذو شأن عظيم"),
]
CJK_LINE = ("CJK", "我能吞下玻璃而不伤身体。色は匂へど")


def _font_candidates() -> list[str]:
    """Fonts to try, most complete first: system DejaVu, then matplotlib's bundled copy."""
    found = sorted(glob.glob("/usr/share/fonts/**/DejaVuSans.ttf", recursive=True))
    try:  # matplotlib ships DejaVu Sans; optional
        import matplotlib

        found.append(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf"))
    except ImportError:
        pass
    return [f for f in found if os.path.exists(f)]


def _cjk_font() -> str | None:
    """A system font with CJK coverage, if any (Noto CJK, WenQuanYi, Droid Fallback...)."""
    patterns = ["/usr/share/fonts/**/*CJK*.tt[fc]", "/usr/share/fonts/**/*CJK*.otf", "/usr/share/fonts/**/wqy*.tt[fc]",
                "/usr/share/fonts/**/DroidSansFallback*.ttf"]
    for pattern in patterns:
        hits = sorted(glob.glob(pattern, recursive=True))
        if hits:
            return hits[0]
    return None


def _load_font(path: str | None, size: int) -> ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable built-in font (Latin only)
    return ImageFont.truetype(path, size)


def make_shapes(path: Path) -> None:
    img = Image.new("RGB", (640, 480), (235, 238, 242))
    d = ImageDraw.Draw(img)
    d.rectangle([40, 40, 240, 200], fill=(220, 40, 40), outline=(90, 0, 0), width=4)
    d.ellipse([300, 60, 560, 260], fill=(40, 110, 220), outline=(0, 30, 90), width=4)
    d.polygon([(120, 440), (240, 250), (360, 440)], fill=(40, 170, 70), outline=(0, 70, 20))
    d.regular_polygon((500, 370, 80), n_sides=6, fill=(245, 190, 30), outline=(120, 80, 0))
    d.line([(20, 470), (620, 230)], fill=(60, 60, 60), width=3)
    img.save(path, optimize=True)


def make_text(path: Path) -> None:
    img = Image.new("RGB", (1280, 320), (255, 255, 255))
    d = ImageDraw.Draw(img)
    fonts = _font_candidates()
    font = _load_font(fonts[0] if fonts else None, 34)
    label_font = _load_font(fonts[0] if fonts else None, 18)
    lines = list(SCRIPT_LINES)
    cjk = _cjk_font()
    if cjk is not None:
        lines.append(CJK_LINE)
    else:
        print("make_assets: no CJK font found on this system; text_scripts has no CJK line")
    step = 320 // len(lines)
    for i, (name, text) in enumerate(lines):
        y = i * step + (step - 40) // 2
        d.text((12, y + 10), name, fill=(120, 120, 120), font=label_font)
        f = _load_font(cjk, 34) if name == "CJK" else font
        d.text((130, y), text, fill=(10, 10, 10), font=f)
    img.save(path, optimize=True)


def make_tall(path: Path) -> None:
    # 300 wide x 1800 high: 12 horizontal bands, each a different hue, with a diagonal stripe.
    h, w = 1800, 300
    band = np.arange(h) // 150  # 0..11
    hue = np.stack([(band * 53) % 256, (band * 97 + 60) % 256, (band * 29 + 120) % 256], axis=-1)
    arr = np.repeat(hue[:, None, :], w, axis=1).astype(np.uint8)  # [H, W, 3]
    yy, xx = np.mgrid[0:h, 0:w]
    arr[np.abs((yy % 300) - xx) < 6] = 255
    Image.fromarray(arr, "RGB").save(path, optimize=True)


def make_rgba(path: Path) -> None:
    img = Image.new("RGBA", (256, 192), (0, 0, 0, 0))  # fully transparent black background
    d = ImageDraw.Draw(img)
    d.ellipse([20, 20, 150, 170], fill=(200, 30, 160, 255))  # opaque disc
    d.rectangle([110, 50, 236, 150], fill=(30, 160, 200, 128))  # half-transparent box
    img.save(path, optimize=True)


def make_palette(path: Path) -> None:
    img = Image.new("P", (200, 120), 0)
    # Index 0 = black but marked transparent; 1..3 are colours.
    img.putpalette([0, 0, 0, 230, 80, 20, 20, 120, 230, 250, 220, 40] + [0, 0, 0] * 252)
    d = ImageDraw.Draw(img)
    d.rectangle([10, 10, 90, 110], fill=1)
    d.ellipse([100, 10, 190, 110], fill=2)
    d.line([(0, 60), (199, 60)], fill=3, width=5)
    img.info["transparency"] = 0
    img.save(path, transparency=0, optimize=True)


def motion_frames(n: int, width: int, height: int) -> np.ndarray:
    """Synthetic frames ``[n, H, W, 3]`` uint8: a gradient background and a disc moving left to right."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                     np.full_like(xx, 96)], axis=-1).astype(np.uint8)
    frames = np.empty((n, height, width, 3), np.uint8)
    r = height // 6
    for i in range(n):
        cx = r + (width - 2 * r) * i // max(n - 1, 1)
        cy = height // 2 + int(round(height / 5 * np.sin(2 * np.pi * i / max(n, 1))))
        f = base.copy()
        f[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (250, 250, 250)
        # frame number as a bar code strip at the top, so frames are distinguishable
        f[: height // 20, : (i + 1) * width // n] = (0, 0, 0)
        frames[i] = f
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int, codec: str = "mpeg4", bit_rate: int = 400_000) -> None:
    """Write ``[n, H, W, 3]`` uint8 frames as yuv420p mp4 with PyAV (build-time only; runtime reads with decord)."""
    import av  # build-time/script dependency only

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = bit_rate
        stream.thread_count = 1  # single-threaded encode keeps the output byte-stable
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "assets"))
    out = Path(ap.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    make_shapes(out / "shapes_640x480.png")
    make_text(out / "text_scripts_1280x320.png")
    make_tall(out / "tall_300x1800.png")
    make_rgba(out / "rgba_palette.png")
    make_palette(out / "palette_p.png")
    write_video(out / "motion_4s_8fps.mp4", motion_frames(32, 320, 240), fps=8)
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"make_assets: wrote {len(list(out.iterdir()))} files to {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
