"""Drawings on images (PIL in, PIL out): what the vision tower sees, and what the model answered.

* `model_input_image(src)`   - the image resized exactly as Qwen2-VL / Qwen2.5-VL resize it (smart_resize)
* `patch_grid(src)`          - resized image + 14-px patch grid (thin yellow) + 2x2 merge units (thick red),
                               optionally each LLM token's number; `draw_patch_grid` for an image already sized
* `window_ids(grid_thw)`     - Qwen2.5-VL window of every merged token, from `qvl.positions.window_index`
* `draw_windows(src)`        - those windows over the resized image, one colour each, padding hatched grey
* `draw_grounding(src, items)` - Box / Point (original pixels) on the original image, convention in a caption
* `attention_overlay(src, weights, grid)` - a heat map of weights over the merged tokens blended with the image
* `video_frames(video)` / `frame_strip(frames, timestamps)` - sampled frames paired into temporal patches

Every function that adds an explanation puts it in a white caption band *below* the picture, so the
picture itself keeps its pixel geometry (the top `height` rows are the image, scaled by `scale`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from qvl import media, positions
from qvl.grounding import Box, Point

PATCH = media.PATCH_SIZE  # 14 px
UNIT = media.IMAGE_FACTOR  # 28 px: one merged token = 2x2 patches

PATCH_COLOR = (255, 215, 0, 170)  # thin yellow lines: 14-px ViT patches
MERGE_COLOR = (220, 20, 60, 255)  # thick crimson lines: 2x2 merge units = LLM tokens
PAD_COLOR = (150, 150, 150)  # padding of partial windows
# Qualitative colours for windows / labels (Okabe-Ito + a few extra), readable for colour-blind viewers.
PALETTE = [
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
    (204, 121, 167), (120, 120, 120), (148, 103, 189), (23, 190, 207), (188, 189, 34), (140, 86, 75),
]


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font at `size` px (no system fonts needed)."""
    return ImageFont.load_default(size=max(6, int(size)))


def _text_size(draw: ImageDraw.ImageDraw, text: str, f) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=f)
    return x1 - x0, y1 - y0


def _wrap(draw, text: str, f, width: int) -> list[str]:
    """Greedy word wrap of one paragraph to `width` pixels."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and _text_size(draw, trial, f)[0] > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def add_caption(img: Image.Image, lines: Sequence[str], size: int = 13) -> Image.Image:
    """The image with a white band below it holding `lines` (each wrapped to the image width)."""
    f = font(size)
    probe = ImageDraw.Draw(img)
    width = max(img.width, 320)
    wrapped = [w for line in lines for w in (_wrap(probe, line, f, width - 12) or [""])]
    line_h = int(size * 1.35)
    band = 8 + line_h * len(wrapped)
    out = Image.new("RGB", (width, img.height + band), "white")
    out.paste(img.convert("RGB"), (0, 0))
    d = ImageDraw.Draw(out)
    for i, line in enumerate(wrapped):
        d.text((6, img.height + 4 + i * line_h), line, fill=(20, 20, 20), font=f)
    return out


def _rgba_over(base: Image.Image, layer: Image.Image) -> Image.Image:
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


# ---------------------------------------------------------------------------------------------
# Patch grid and merge units
# ---------------------------------------------------------------------------------------------


def model_input_image(src, min_pixels: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """The RGB image at the size Qwen2-VL / Qwen2.5-VL feed their ViT (`qvl.media.smart_resize`, bicubic).
    `src` is anything `qvl.media.load_image` reads, or a `qvl.media.ImageInputs` (its resized image)."""
    if isinstance(src, media.ImageInputs) and src.image is not None:
        return src.image
    img = media.load_image(src)
    h, w = media.smart_resize(img.height, img.width, media.IMAGE_FACTOR,
                              media.MIN_PIXELS if min_pixels is None else min_pixels,
                              media.MAX_PIXELS if max_pixels is None else max_pixels)
    return img.resize((w, h), Image.Resampling.BICUBIC)


def _check_model_size(img: Image.Image) -> tuple[int, int]:
    """(grid_h, grid_w) in patches of an image already at model size (sides multiples of 28)."""
    if img.width % UNIT or img.height % UNIT:
        raise ValueError(f"image {img.width}x{img.height} is not at model size (sides multiples of {UNIT}); "
                         "use patch_grid(src) to resize it first")
    return img.height // PATCH, img.width // PATCH


def _grid_lines(d: ImageDraw.ImageDraw, w: int, h: int, step: int, color, width: int) -> None:
    """Vertical and horizontal lines every `step` px, including both borders (the last at w-1 / h-1)."""
    for x in range(0, w + 1, step):
        x0 = min(max(x - width // 2, 0), w - width)
        d.rectangle([x0, 0, x0 + width - 1, h - 1], fill=color)
    for y in range(0, h + 1, step):
        y0 = min(max(y - width // 2, 0), h - width)
        d.rectangle([0, y0, w - 1, y0 + width - 1], fill=color)


def draw_patch_grid(img: Image.Image, numbers: bool = False, scale: int = 1, caption: bool = True) -> Image.Image:
    """An image already at model size with every 14-px patch outlined thin yellow and every 28-px merge
    unit (one LLM token) outlined thick crimson; with numbers=True each token shows its index in the
    LLM sequence (raster order, 0-based). scale > 1 enlarges the picture (nearest) first, for small images.

    Line geometry (what tests scan for): grid_w + 1 vertical lines, one per patch border, the right
    border drawn on the last pixel column; merge lines are 2*scale px wide, patch lines 1 px.
    """
    gh, gw = _check_model_size(img)
    base = img.convert("RGB")
    if scale > 1:
        base = base.resize((base.width * scale, base.height * scale), Image.Resampling.NEAREST)
    W, H = base.size
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    _grid_lines(d, W, H, PATCH * scale, PATCH_COLOR, 1)
    _grid_lines(d, W, H, UNIT * scale, MERGE_COLOR, 2 * scale)
    out = _rgba_over(base, layer)
    if numbers:
        _number_tokens(out, gh // 2, gw // 2, UNIT * scale)
    if not caption:
        return out
    n_tok = (gh // 2) * (gw // 2)
    return add_caption(out, [
        f"Resized to {img.width}x{img.height} px -> {gh}x{gw} = {gh * gw} patches of 14 px (thin yellow).",
        f"Each 2x2 merge unit (28 px, thick red) becomes one LLM token: {gh // 2}x{gw // 2} = {n_tok} tokens"
        + (", numbered in sequence order." if numbers else "."),
    ])


def _number_tokens(img: Image.Image, lh: int, lw: int, cell: int) -> None:
    """Write each merged token's raster index at its cell centre (skipped when the digits do not fit)."""
    d = ImageDraw.Draw(img)
    f = font(cell * 0.38)
    if _text_size(d, str(lh * lw - 1), f)[0] > cell - 2:
        return
    for r in range(lh):
        for c in range(lw):
            d.text(((c + 0.5) * cell, (r + 0.5) * cell), str(r * lw + c), fill="white", font=f, anchor="mm",
                   stroke_width=2, stroke_fill="black")


def patch_grid(src, min_pixels: int | None = None, max_pixels: int | None = None, *, numbers: bool = False,
               scale: int = 1, caption: bool = True) -> Image.Image:
    """`src` resized as the model resizes it, with patches, merge units and (optionally) token numbers drawn."""
    return draw_patch_grid(model_input_image(src, min_pixels, max_pixels), numbers, scale, caption)


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL windows
# ---------------------------------------------------------------------------------------------


def window_ids(grid_thw, window_size: int = 112) -> torch.Tensor:
    """Window number of every merged token, as laid out on the image. -> LongTensor[t, h/2, w/2]

    Read off `qvl.positions.window_index`: its index lists merged tokens window by window and its
    cu_window_seqlens (in patches, 4 per merged token) gives where each window ends.
    """
    (t, h, w), = positions._grids(grid_thw)
    index, cu = positions.window_index([(t, h, w)], window_size, PATCH, media.MERGE_SIZE)
    sizes = torch.diff(cu.long()) // (media.MERGE_SIZE**2)  # merged tokens per window
    owner = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)  # window of each slot in window order
    ids = torch.empty(index.numel(), dtype=torch.long)
    ids[index] = owner
    return ids.view(t, h // 2, w // 2)


def window_color(window: int, windows_per_row: int) -> tuple[int, int, int]:
    """A colour per window: the window number's own palette entry (so up to 12 windows are all
    distinct), unless that would give touching windows (side or corner) the same colour."""
    n = len(PALETTE)
    step = windows_per_row
    if windows_per_row > 1 and windows_per_row % n in (0, 1, n - 1):
        step = 5  # row offset 5 keeps vertical and diagonal neighbours apart
    r, c = divmod(window, windows_per_row)
    return PALETTE[(r * step + c) % n]


def draw_windows(src, min_pixels: int | None = None, max_pixels: int | None = None, *, window_size: int = 112,
                 labels: bool = True, caption: bool = True, alpha: int = 100) -> Image.Image:
    """Qwen2.5-VL's attention windows over the resized image (frame 0 for a video grid).

    What you see: each merge unit (28 px, one token) tinted with its window's colour and outlined thin;
    each window (window_size px = 4x4 tokens by default) outlined thick in its colour and numbered in
    the order the tower visits them; where the image does not fill the last row/column of windows,
    the canvas extends with grey hatching: that padding is never computed (the partial window just
    holds fewer tokens). Window membership comes from `qvl.positions.window_index`.
    """
    img = model_input_image(src, min_pixels, max_pixels)
    gh, gw = _check_model_size(img)
    ids = window_ids((1, gh, gw), window_size)[0]  # (lh, lw)
    lh, lw = ids.shape
    ws = window_size // UNIT  # window side in tokens
    nwh, nww = math.ceil(lh / ws), math.ceil(lw / ws)
    W, H = nww * ws * UNIT, nwh * ws * UNIT  # padded canvas
    canvas = Image.new("RGB", (W, H), "white")
    canvas.paste(img, (0, 0))
    _hatch(canvas, img.width, img.height)
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    for r in range(lh):
        for c in range(lw):
            col = window_color(int(ids[r, c]), nww)
            d.rectangle([c * UNIT, r * UNIT, (c + 1) * UNIT - 1, (r + 1) * UNIT - 1], fill=(*col, alpha),
                        outline=(*col, 255), width=1)
    out = _rgba_over(canvas, layer)
    d = ImageDraw.Draw(out)
    f = font(max(10, UNIT * 0.45))
    for wr in range(nwh):
        for wc in range(nww):
            k = int(ids[wr * ws, wc * ws])
            col = window_color(k, nww)
            box = [wc * ws * UNIT, wr * ws * UNIT, (wc + 1) * ws * UNIT - 1, (wr + 1) * ws * UNIT - 1]
            d.rectangle(box, outline=tuple(max(0, v - 60) for v in col), width=3)
            if labels:
                d.text((box[0] + 5, box[1] + 4), f"w{k}", fill="white", font=f, stroke_width=2, stroke_fill="black")
    if not caption:
        return out
    counts = torch.bincount(ids.flatten())
    partial = int((counts < ws * ws).sum())
    return add_caption(out, [
        f"Qwen2.5-VL windows: {window_size} px = {ws}x{ws} tokens each. This {img.width}x{img.height} image "
        f"({lh}x{lw} tokens) is cut into {nwh}x{nww} = {counts.numel()} windows, {partial} of them partial.",
        "Coloured cells: tokens, tinted by window (number = order the tower visits windows). Grey hatching: "
        "padding of partial windows, never computed - a partial window just holds fewer tokens.",
    ])


def _hatch(img: Image.Image, w: int, h: int, step: int = 10) -> None:
    """Grey diagonal hatching on the part of `img` right of column w and below row h."""
    keep = img.crop((0, 0, w, h))
    d = ImageDraw.Draw(img)
    W, H = img.size
    for region in ([w, 0, W - 1, H - 1], [0, h, W - 1, H - 1]):
        if region[0] > region[2] or region[1] > region[3]:
            continue
        d.rectangle(region, fill=(235, 235, 235))
    for k in range(-H, W, step):
        d.line([(k, 0), (k + H, H)], fill=PAD_COLOR, width=1)
    img.paste(keep, (0, 0))  # hatch only the padding


# ---------------------------------------------------------------------------------------------
# Grounding: boxes and points
# ---------------------------------------------------------------------------------------------

CONVENTIONS = {
    "1": "Qwen-VL: <box>(x1,y1),(x2,y2)</box>, integers in [0, 1000) relative to the ORIGINAL image.",
    "2": "Qwen2-VL: <|box_start|>(x1,y1),(x2,y2)<|box_end|>, integers in [0, 1000) relative to the ORIGINAL image.",
    "2.5": "Qwen2.5-VL: JSON bbox_2d [x1,y1,x2,y2] / point_2d [x,y] in absolute pixels of the RESIZED model input",
    "pixels": "Coordinates in original-image pixels (x1, y1, x2, y2).",
}


def _fmt_raw(item) -> str:
    return "[" + ",".join(f"{v:g}" for v in item.raw) + "]" if item.raw else ""


def draw_grounding(src, items: Sequence[Box | Point], *, resized_size: tuple[int, int] | None = None,
                   caption: bool = True, width: int | None = None) -> Image.Image:
    """Boxes (rectangles) and points (ringed dots) on the original image, each labelled with its label
    and the numbers exactly as the model wrote them; the caption names the convention those numbers
    are in and the original size they were mapped to. `resized_size` (h, w) is only used to name the
    gen 2.5 resized canvas in the caption."""
    img = media.load_image(src).convert("RGB")
    line = width or max(2, round(max(img.size) / 250))
    d = ImageDraw.Draw(img)
    f = font(max(12, max(img.size) / 45))
    for i, it in enumerate(items):
        col = PALETTE[i % len(PALETTE)]
        text = " ".join(s for s in ((it.label or ""), _fmt_raw(it)) if s)
        if isinstance(it, Point):
            r = 2.5 * line + 3
            d.ellipse([it.x - r, it.y - r, it.x + r, it.y + r], fill=col, outline="black", width=max(1, line // 2))
            anchor = (it.x + r + 2, it.y - r)
        else:
            d.rectangle([it.x1, it.y1, it.x2, it.y2], outline=col, width=line)
            anchor = (it.x1, it.y1)
        if text:
            tw, th = _text_size(d, text, f)
            x = min(max(anchor[0], 0), max(img.width - tw - 6, 0))
            y = anchor[1] - th - 8 if anchor[1] - th - 8 >= 0 else anchor[1] + line
            d.rectangle([x, y, x + tw + 6, y + th + 6], fill=col)
            d.text((x + 3, y + 1), text, fill="black", font=f)
    if not caption:
        return img
    conventions = sorted({it.convention for it in items}) or ["pixels"]
    lines = [CONVENTIONS.get(c, c) + (f" ({resized_size[1]}x{resized_size[0]})" if c == "2.5" and resized_size else "")
             for c in conventions]
    lines.append(f"Drawn on the original {img.width}x{img.height} image; labels show the numbers as written.")
    return add_caption(img, lines)


# ---------------------------------------------------------------------------------------------
# Attention heat map
# ---------------------------------------------------------------------------------------------


def _token_grid(grid) -> tuple[int, int, int]:
    """(t, rows, cols) of merged tokens from a (t, h, w) patch grid or a (rows, cols) token grid."""
    grid = tuple(int(v) for v in (grid.tolist() if hasattr(grid, "tolist") else grid))
    if len(grid) == 2:
        return 1, grid[0], grid[1]
    t, h, w = grid
    return t, h // media.MERGE_SIZE, w // media.MERGE_SIZE


def item_weights(attn, start: int, end: int, head: int | None = None, query: int = -1, row: int = 0) -> torch.Tensor:
    """One query token's attention over one image's tokens, from a `Capture` tensor `[B, heads, Tq, keys]`
    (`capture.attn[layer][i]`): keys start..end (the item's placeholder span, e.g. a Batch MediaItem's
    .start/.end, shifted by the capture's key_span start if one was set), one head or the mean over heads."""
    a = torch.as_tensor(attn)[row, :, query, start:end].float()  # (heads, n)
    return a.mean(dim=0) if head is None else a[head]


def attention_overlay(src, weights, grid, *, frame: int = 0, alpha: float = 0.6, cmap: str = "inferno",
                      caption: str | None = None) -> Image.Image:
    """Weights over the image's merged tokens (raster order; all frames of a video one after another)
    painted as a heat map on the image: each token a flat block (not smoothed, so you see which token
    got the weight), colours scaled from the smallest (dark) to the largest weight (bright), blended
    with the image at `alpha`. `grid` is the (t, h, w) patch grid or the (rows, cols) token grid.
    `src` may be the original or the resized image: the map is stretched over it."""
    import matplotlib

    t, lh, lw = _token_grid(grid)
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() not in (lh * lw, t * lh * lw):
        raise ValueError(f"{w.numel()} weights for a grid of {t}x{lh}x{lw} tokens")
    if w.numel() != lh * lw:
        w = w.view(t, lh * lw)[frame]
    lo, hi = float(w.min()), float(w.max())
    norm = ((w - lo) / (hi - lo) if hi > lo else torch.zeros_like(w)).view(lh, lw).numpy()
    rgba = (matplotlib.colormaps[cmap](norm)[..., :3] * 255).astype(np.uint8)
    img = media.load_image(src).convert("RGB")
    heat = Image.fromarray(rgba).resize(img.size, Image.Resampling.NEAREST)
    out = Image.blend(img, heat, alpha)
    bar = _colorbar(out.width, cmap, lo, hi)
    both = Image.new("RGB", (out.width, out.height + bar.height), "white")
    both.paste(out, (0, 0))
    both.paste(bar, (0, out.height))
    if caption is None:
        caption = f"Attention over {lh}x{lw} image tokens" + (f" (frame {frame} of {t})" if t > 1 else "")
    return add_caption(both, [caption])


def _colorbar(width: int, cmap: str, lo: float, hi: float, height: int = 34) -> Image.Image:
    """A horizontal colour bar labelled with the weights at its ends."""
    import matplotlib

    bar = Image.new("RGB", (width, height), "white")
    ramp = (matplotlib.colormaps[cmap](np.linspace(0, 1, max(width - 140, 10)))[:, :3] * 255).astype(np.uint8)
    strip = Image.fromarray(np.repeat(ramp[None], 12, axis=0))
    bar.paste(strip, (70, 4))
    d = ImageDraw.Draw(bar)
    f = font(12)
    d.text((66, 10), f"{lo:.3g}", fill="black", font=f, anchor="rm")
    d.text((74 + strip.width, 10), f"{hi:.3g}", fill="black", font=f, anchor="lm")
    d.text((70 + strip.width // 2, 24), "weight (low -> high)", fill="black", font=f, anchor="mm")
    return bar


# ---------------------------------------------------------------------------------------------
# Video frames paired into temporal patches
# ---------------------------------------------------------------------------------------------


def video_frames(video: media.VideoInputs) -> list[Image.Image]:
    """The frames the model saw (resized, after padding to an even count), rebuilt from `pixel_values`
    by undoing `qvl.media.patchify` and the CLIP normalisation (exact up to float rounding)."""
    t, h, w = video.grid_thw
    m, p, tp = media.MERGE_SIZE, PATCH, media.TEMPORAL_PATCH_SIZE
    x = video.pixel_values.view(t, h // m, w // m, m, m, 3, tp, p, p)
    mean = torch.tensor(media.IMAGE_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(media.IMAGE_STD).view(3, 1, 1, 1)
    x = x * std + mean  # (c, tp, p, p) columns
    # (t, bh, bw, mh, mw, c, tp, py, px) -> (t, tp, bh, mh, py, bw, mw, px, c)
    x = x.permute(0, 6, 1, 3, 7, 2, 4, 8, 5).reshape(t * tp, h * p, w * p, 3)
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(f) for f in u8]


def frame_strip(frames: Sequence, timestamps: Sequence[float], *, frame_indices: Sequence[int] | None = None,
                time_ids: Sequence[int] | None = None, thumb_height: int = 96, max_patches: int = 8,
                caption: bool = True) -> Image.Image:
    """Sampled frames in a row, two by two: each temporal patch (2 frames -> one 3-D patch of 2x14x14)
    sits in its own coloured frame titled "patch k" (and its M-RoPE time id when `time_ids` is given),
    each frame labelled with its timestamp (and source frame index). Long videos show the first
    max_patches - 1 patches, an ellipsis, and the last one."""
    tp = media.TEMPORAL_PATCH_SIZE
    imgs = [media.load_image(f) for f in frames]
    if len(imgs) % tp:
        raise ValueError(f"{len(imgs)} frames: the model pads to an even count; pass the padded frames")
    n_patch = len(imgs) // tp
    shown = list(range(n_patch)) if n_patch <= max_patches else [*range(max_patches - 1), None, n_patch - 1]
    tw = max(1, round(imgs[0].width * thumb_height / imgs[0].height))
    gap, pad, title_h, label_h = 18, 6, 22, 18
    panel_w = tp * tw + (tp + 1) * pad
    panel_h = title_h + thumb_height + label_h + 2 * pad
    W = sum(panel_w if k is not None else 30 for k in shown) + gap * (len(shown) + 1)
    out = Image.new("RGB", (W, panel_h + 2 * gap), "white")
    d = ImageDraw.Draw(out)
    f_title, f_label = font(13), font(11)
    x = gap
    for k in shown:
        if k is None:
            d.text((x + 15, gap + panel_h // 2), "...", fill="black", font=font(18), anchor="mm")
            x += 30 + gap
            continue
        col = PALETTE[k % len(PALETTE)]
        d.rounded_rectangle([x, gap, x + panel_w, gap + panel_h], radius=8, outline=col, width=3)
        title = f"patch {k}" + (f"  ·  time id {time_ids[k]}" if time_ids is not None else "")
        d.text((x + panel_w // 2, gap + pad + title_h // 2 - 2), title, fill="black", font=f_title, anchor="mm")
        for j in range(tp):
            i = k * tp + j
            fx, fy = x + pad + j * (tw + pad), gap + pad + title_h
            out.paste(imgs[i].convert("RGB").resize((tw, thumb_height), Image.Resampling.BILINEAR), (fx, fy))
            label = f"{timestamps[i]:.2f}s" + (f" (#{frame_indices[i]})" if frame_indices is not None else "")
            d.text((fx + tw // 2, fy + thumb_height + label_h // 2 + 1), label, fill="black", font=f_label, anchor="mm")
        x += panel_w + gap
    if not caption:
        return out
    return add_caption(out, [
        f"{len(imgs)} sampled frames -> {n_patch} temporal patches: each pair of frames becomes one 3-D patch "
        "(2x14x14 pixels), so the vision tower sees half as many time steps as frames.",
        "Labels: timestamp in seconds (source frame index)." + (" Time id: the M-RoPE t position." if time_ids is not None else ""),
    ])


__all__ = [
    "model_input_image", "draw_patch_grid", "patch_grid", "window_ids", "window_color", "draw_windows",
    "draw_grounding", "item_weights", "attention_overlay", "video_frames", "frame_strip", "add_caption", "CONVENTIONS",
]
