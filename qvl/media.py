"""Image and video preprocessing for the Qwen-VL family (gen 1, Qwen2-VL, Qwen2.5-VL).

What this module reproduces (behaviour, not code):

* ``smart_resize``: the resize rule of qwen-vl-utils 0.0.14 (reference
  "qwen_vl_gen1_and_qwen_vl_utils.md" §9.2, "qwen2_qwen25_qwen3_vl.md" §5.1).
* ``process_image``: the transformers ``Qwen2VLImageProcessor`` (PIL backend) pipeline
  (§5.2): RGB, smart_resize, PIL BICUBIC, rescale 1/255, CLIP normalisation, patchify into
  ``[grid_t*grid_h*grid_w, C*T*P*P]`` rows in merge-block order (§3.1).
* ``sample_frame_indices`` / ``process_video``: frame selection and per-frame pixel budget of
  qwen-vl-utils 0.0.14 (§9.4, §9.5, §9.7), decoded with decord.
* ``process_image_gen1``: Qwen-VL (2023) fixed 448x448 bicubic + CLIP normalisation (gen-1 ref §2.2).
* ``account``: token counts for every generation without normalising any pixels.

Every user-facing failure is a one-line ``MediaError`` naming the source.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# --------------------------------------------------------------------------------------
# Constants (qwen-vl-utils 0.0.14 with factor 28; checkpoint preprocessor configs, §5.3)
# --------------------------------------------------------------------------------------
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: one merged LLM token covers 28x28 pixels
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176 features per patch row

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

MIN_PIXELS = 4 * IMAGE_FACTOR**2  # 3136: 4 tokens
MAX_PIXELS = 16384 * IMAGE_FACTOR**2  # 12_845_056: 16384 tokens
MAX_RATIO = 200  # longest/shortest side; larger is refused

VIDEO_MIN_PIXELS = 128 * IMAGE_FACTOR**2  # 100_352 per frame
VIDEO_MAX_PIXELS = 768 * IMAGE_FACTOR**2  # 602_112 per frame
# qwen-vl-utils 0.0.14: total_pixels default = MODEL_SEQ_LEN * factor^2 * 0.9 with MODEL_SEQ_LEN=128000.
# (It reads MODEL_SEQ_LEN from the environment; qvl does not read the environment: pass total_pixels.)
VIDEO_TOTAL_PIXELS = int(128000 * IMAGE_FACTOR**2 * 0.9)  # 90_316_800

FPS = 2.0
FRAME_FACTOR = 2  # frame counts are even (one temporal patch = 2 frames)
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

GEN1_IMAGE_SIZE = 448
GEN1_IMAGE_TOKENS = 256  # resampler queries; the LLM also sees <img> and </img>

# Refuse images over this many pixels before decoding them (decompression bombs).  Just under
# Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS ~ 179 MP, which we also map to MediaError);
# for scale: the largest image Qwen2/2.5-VL sees (16384 tokens) is 12.8 MP after resizing.
MAX_IMAGE_PIXELS = 178_000_000

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}
_DECODE_CHUNK = 16  # frames decoded at a time, so a long 4K clip never sits in memory at full size
_URL_TIMEOUT_S = 30


class MediaError(ValueError):
    """Bad media input: a one-line, user-facing message naming the source and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force one line


# --------------------------------------------------------------------------------------
# Resize rules
# --------------------------------------------------------------------------------------
def _round_by(x: float, f: int) -> int:
    return round(x / f) * f  # Python round: half to even (70/28 = 2.5 -> 2), §5.1


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int | None = MIN_PIXELS,
                 max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """Target ``(h, w)``: multiples of ``factor``, ``min_pixels <= h*w <= max_pixels`` where attainable,
    aspect ratio kept as far as the rounding allows (qwen-vl-utils 0.0.14 rule, ref §9.2).

    ``None`` bounds mean the defaults ``4*factor^2`` / ``16384*factor^2``.

    One deliberate guard beyond qwen-vl-utils: in the downscale branch each side is at least
    ``factor`` (as transformers does), so extreme aspect ratios never give a zero side.
    """
    min_pixels = 4 * factor * factor if min_pixels is None else min_pixels
    max_pixels = 16384 * factor * factor if max_pixels is None else max_pixels
    if height <= 0 or width <= 0:
        raise MediaError(f"image size {width}x{height}: both sides must be positive")
    if max_pixels < min_pixels:
        raise MediaError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise MediaError(f"image size {width}x{height}: aspect ratio {ratio:.1f}:1 exceeds the limit of {MAX_RATIO}:1")
    # qwen-vl-utils keeps every side >= factor at this step (transformers does not: see tests).
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, _floor_by(height / beta, factor))
        w_bar = max(factor, _floor_by(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


def _target_size(height: int, width: int, min_pixels: int, max_pixels: int,
                 resized_height: int | None, resized_width: int | None) -> tuple[int, int]:
    """qwen-vl-utils: an explicit (resized_height, resized_width) is still snapped with *default* bounds."""
    if resized_height is not None and resized_width is not None:
        return smart_resize(int(resized_height), int(resized_width), IMAGE_FACTOR)
    return smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)


# --------------------------------------------------------------------------------------
# Loading images
# --------------------------------------------------------------------------------------
_B64_RE = re.compile(r"[A-Za-z0-9+/=\s_-]+")


def _label(src: Any) -> str:
    """A short name for ``src`` to put in error messages (never a whole base64 blob)."""
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        if s.startswith("data:"):
            return f"data URL ({s[:30]}...)"
        return s if len(s) <= 120 else s[:60] + "..." + s[-20:]
    if isinstance(src, Image.Image):
        return f"<PIL image {src.width}x{src.height} {src.mode}>"
    if isinstance(src, np.ndarray):
        return f"<array {tuple(src.shape)} {src.dtype}>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def _fetch_url(url: str) -> bytes:
    """Download with urllib; any failure becomes one MediaError line."""
    try:
        with urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S) as resp:  # noqa: S310 (http/https only)
            return resp.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise MediaError(f"{_label(url)}: download failed ({reason})") from None


def _decode_data_url(s: str) -> bytes:
    head, sep, payload = s.partition(",")
    if not sep or not head.endswith(";base64"):
        raise MediaError(f"{_label(s)}: only base64 data URLs are supported (data:<mime>;base64,<data>)")
    return _b64decode(payload, s)


def _b64decode(payload: str, src: str) -> bytes:
    try:
        payload = "".join(payload.split())
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{_label(src)}: invalid base64 data") from None


def _resolve_source(src: Any) -> tuple[Any, str]:
    """Map a string/path source to a local path or raw bytes, plus a label for messages.

    Order (as qwen-vl-utils): http(s) URL, ``file://``, ``data:`` URL, local path; additionally a bare
    base64 string is accepted when it is not an existing path.
    """
    label = _label(src)
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), label
    if not isinstance(src, str):
        return src, label
    s = src.strip()
    if s.startswith(("http://", "https://")):
        return _fetch_url(s), label
    if s.startswith("file://"):
        s = s[len("file://"):]
        label = s
    elif s.startswith("data:"):
        return _decode_data_url(s), label
    if os.path.exists(s):
        if os.path.isdir(s):
            raise MediaError(f"{label}: is a directory, not a media file")
        if os.path.getsize(s) == 0:
            raise MediaError(f"{label}: file is empty (0 bytes)")
        return s, label
    if len(s) >= 64 and _B64_RE.fullmatch(s) and "/" not in s[:8] and "." not in s:
        return _b64decode(s, s), "<base64 string>"
    raise MediaError(f"{label}: file not found")


def _check_pixels(width: int, height: int, label: str, limit: int) -> None:
    if width * height > limit:
        raise MediaError(f"{label}: image is {width}x{height} = {width * height / 1e6:.0f} MP, over the "
                         f"{limit / 1e6:.0f} MP limit (refusing a possible decompression bomb)")


def _open_pil(data: Any, label: str, limit: int, *, load: bool = True) -> Image.Image:
    """Open (and by default fully decode) an image file or bytes, mapping every failure to MediaError."""
    if isinstance(data, bytes):
        if not data:
            raise MediaError(f"{label}: empty data (0 bytes)")
        data = io.BytesIO(data)
    with warnings.catch_warnings():
        # We apply our own limit below; silence Pillow's warning band (89-179 MP) and turn its hard
        # error into ours.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(data)
            _check_pixels(img.width, img.height, label, limit)
            if load:
                img.load()
        except Image.DecompressionBombError:
            raise MediaError(f"{label}: image exceeds Pillow's pixel limit (refusing a possible decompression bomb)") \
                from None
        except UnidentifiedImageError:
            raise MediaError(f"{label}: not a recognised image file (corrupt or unsupported format)") from None
        except FileNotFoundError:
            raise MediaError(f"{label}: file not found") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / broken data
            if isinstance(e, MediaError):
                raise
            raise MediaError(f"{label}: truncated or corrupt image data ({e})") from None
    return img


def _array_to_pil(arr: np.ndarray, label: str) -> Image.Image:
    """HWC uint8 (C in 1, 3, 4) or HW uint8 -> PIL image in L / RGB / RGBA."""
    if arr.dtype != np.uint8:
        raise MediaError(f"{label}: arrays must be uint8 (0..255), got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), "L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
    raise MediaError(f"{label}: expected an HxW or HxWxC array with C in (1, 3, 4), got shape {tuple(arr.shape)}")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB.  Transparent pixels are composited on white.

    For RGBA this is exactly qwen-vl-utils' ``to_rgb`` (paste on white with alpha as the mask).
    qvl applies the same rule to every mode carrying transparency (LA, PA, P/L/RGB with a
    ``transparency`` entry); qwen-vl-utils and transformers 4.57 drop the alpha of those modes and keep
    the underlying colour (often black), which is rarely what the picture shows.
    16-bit greyscale ('I;16', 'I') is scaled to 8 bits instead of being clipped.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8), "L")
    if _has_alpha(img):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def load_image(src: Any, *, pixel_limit: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load an image as an RGB ``PIL.Image``.

    ``src``: path (str / PathLike, optional ``file://``), http(s) URL, ``data:`` URL, bare base64 string,
    bytes, file-like object, ``PIL.Image``, numpy uint8 array (HxW, HxWx1, HxWx3, HxWx4) or a CPU uint8
    tensor of the same layout.  EXIF orientation is applied; alpha is composited on white.
    Raises ``MediaError`` (one line, naming the source) on any problem.
    """
    label = _label(src)
    if isinstance(src, torch.Tensor):
        src = src.detach().cpu().numpy()
    if isinstance(src, np.ndarray):
        if src.ndim >= 2:
            _check_pixels(src.shape[1], src.shape[0], label, pixel_limit)
        img = _array_to_pil(src, label)
    elif isinstance(src, Image.Image):
        _check_pixels(src.width, src.height, label, pixel_limit)
        img = src
    elif hasattr(src, "read"):
        img = _open_pil(src.read(), label, pixel_limit)
    else:
        data, label = _resolve_source(src)
        img = _open_pil(data, label, pixel_limit)
    try:
        img = ImageOps.exif_transpose(img)  # camera photos: honour the EXIF orientation tag
        return to_rgb(img)
    except (OSError, ValueError) as e:
        raise MediaError(f"{label}: could not decode image ({e})") from None


def _image_size_cheap(src: Any, pixel_limit: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(height, width)`` after EXIF orientation, reading only the file header (no pixel decode)."""
    label = _label(src)
    if isinstance(src, torch.Tensor):
        src = src.detach().cpu().numpy()
    if isinstance(src, np.ndarray):
        if src.ndim < 2:
            raise MediaError(f"{label}: expected an image array, got shape {tuple(src.shape)}")
        return int(src.shape[0]), int(src.shape[1])
    if isinstance(src, Image.Image):
        img, opened = src, False
    else:
        data, label = (src.read(), label) if hasattr(src, "read") else _resolve_source(src)
        img, opened = _open_pil(data, label, pixel_limit, load=False), True
    try:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation; 5..8 swap the axes
        except Exception:  # noqa: BLE001 - malformed EXIF: exif_transpose ignores it too
            orientation = 1
    finally:
        if opened:
            img.close()
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


# --------------------------------------------------------------------------------------
# Normalisation and patchify
# --------------------------------------------------------------------------------------
_MEAN_T = torch.tensor(IMAGE_MEAN, dtype=torch.float32)
_STD_T = torch.tensor(IMAGE_STD, dtype=torch.float32)
_MEAN_NP = np.array(IMAGE_MEAN, dtype=np.float32)
_STD_NP = np.array(IMAGE_STD, dtype=np.float32)
# Below this many values numpy (one thread, no wake-up cost) beats torch's thread pool; above it
# torch's multi-threaded elementwise ops win.  Both give bit-identical results.
_TORCH_MIN_ELEMENTS = 1 << 22


def _resize(img: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    h, w = size_hw
    if img.size == (w, h):
        return img  # PIL would return an identical copy
    return img.resize((w, h), Image.Resampling.BICUBIC)


def _normalise(u8: np.ndarray, channel_dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 array -> float32 ``(x/255 - mean) / std`` along ``channel_dim`` (3 channels), written into
    ``out`` (any strided float32 view of the same shape) or a new tensor.

    The three float32 ops give bit-identical results to transformers' PIL path
    (float64 ``x * (1/255)`` cast to float32, then float32 ``(x - mean) / std``): x/255 in float32 is
    correctly rounded, as is the float64 product after the cast, for all 256 inputs (see tests).
    """
    shape = [1] * u8.ndim
    shape[channel_dim] = 3
    if out is None:
        out = torch.empty(u8.shape, dtype=torch.float32)
    if u8.size < _TORCH_MIN_ELEMENTS:
        o = out.numpy()  # a view: numpy writes straight into the tensor
        np.divide(u8, np.float32(255.0), out=o, dtype=np.float32)
        np.subtract(o, _MEAN_NP.reshape(shape), out=o)
        np.divide(o, _STD_NP.reshape(shape), out=o)
    else:
        torch.div(torch.from_numpy(u8), 255.0, out=out)  # uint8 / float -> float32 in one pass
        out.sub_(_MEAN_T.view(shape)).div_(_STD_T.view(shape))
    return out


def patchify(frames: np.ndarray, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 frames ``[T, H, W, 3]`` -> normalised ``pixel_values [T/Tp * H/P * W/P, 3*Tp*P*P]`` float32
    and ``grid_thw``.  ``T`` is a multiple of ``temporal_patch_size``, or 1 for a still image, which is
    repeated along time (ref §3.1: both temporal slots hold the same frame, grid_t = 1).

    Rows are in merge-block order (block row, block col, row-in-block, col-in-block) and columns in
    ``(c, t, py, px)`` order (ref §3.1, §5.2/§5.4).  The rearrangement is done on uint8 (one byte per
    value); a still image is normalised once and then copied into the second temporal slot, which
    halves the float work.
    """
    t, h, w, c = frames.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    still = t == 1
    if (t % tp and not still) or h % (p * m) or w % (p * m) or c != 3:
        raise MediaError(f"internal: cannot patchify frames of shape {frames.shape}")
    gt, gh, gw = (1 if still else t // tp), h // p, w // p
    tin = 1 if still else tp  # distinct frames per temporal patch
    # [T, H, W, C] -> (gt, tin, gh/m, m, p, gw/m, m, p, c)
    v = frames.reshape(gt, tin, gh // m, m, p, gw // m, m, p, c)
    # -> (gt, gh/m, gw/m, m, m, c, tin, p, p): merge-block row order, (c, t, py, px) columns
    v = v.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    n = gt * gh * gw
    u8 = np.ascontiguousarray(v).reshape(n, c, tin, p * p)  # [L, 3, tin, P*P]
    out = torch.empty((n, c, tp, p * p), dtype=torch.float32)  # [L, 3, Tp, P*P]
    _normalise(u8, channel_dim=1, out=out[:, :, :tin])
    if still:
        out[:, :, 1:] = out[:, :, :1]  # same frame in every temporal slot
    return out.view(n, c * tp * p * p), (gt, gh, gw)


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------
@dataclass
class ImageInputs:
    pixel_values: torch.Tensor  # [grid_t*grid_h*grid_w, 1176] float32
    grid_thw: tuple[int, int, int]
    original_size: tuple[int, int]  # (h, w) after EXIF orientation
    resized_size: tuple[int, int]  # (h, w) fed to the vision tower (Qwen2.5-VL boxes live here)
    image: Image.Image | None = field(default=None, repr=False)  # the resized RGB image

    @property
    def image_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (MERGE_SIZE * MERGE_SIZE)


def process_image(src: Any, min_pixels: int | None = None, max_pixels: int | None = None, *,
                  resized_height: int | None = None, resized_width: int | None = None) -> ImageInputs:
    """Qwen2-VL / Qwen2.5-VL image -> ``ImageInputs`` (pixel_values ``[gh*gw, 1176]``, grid ``(1, gh, gw)``)."""
    img = load_image(src)
    h0, w0 = img.height, img.width
    h, w = _target_size(h0, w0, MIN_PIXELS if min_pixels is None else min_pixels,
                        MAX_PIXELS if max_pixels is None else max_pixels, resized_height, resized_width)
    resized = _resize(img, (h, w))
    arr = np.asarray(resized)  # [h, w, 3] uint8
    pixel_values, grid = patchify(arr[None])  # [1, h, w, 3]: a still image, repeated along time

    return ImageInputs(pixel_values, grid, (h0, w0), (h, w), resized)


def process_image_gen1(src: Any, image_size: int = GEN1_IMAGE_SIZE) -> torch.Tensor:
    """Qwen-VL (gen 1): RGB, resize to exactly ``image_size`` square (BICUBIC, aspect not kept, no crop),
    ``/255`` and CLIP normalisation -> float32 ``[3, S, S]`` (gen-1 ref §2.2)."""
    img = _resize(load_image(src), (image_size, image_size))
    chw = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))  # [3, S, S] uint8
    return _normalise(chw, channel_dim=0)


# --------------------------------------------------------------------------------------
# Video: frame selection (qwen-vl-utils 0.0.14, §9.4 / §9.5)
# --------------------------------------------------------------------------------------
def frame_range(total_frames: int, video_fps: float, video_start: float | None = None,
                video_end: float | None = None) -> tuple[int, int, int]:
    """``(first, last, count)`` frame indices covered by ``[video_start, video_end]`` seconds (inclusive)."""
    if total_frames <= 0:
        raise MediaError("video has no frames")
    if not video_fps or video_fps <= 0 or not math.isfinite(video_fps):
        raise MediaError(f"video frame rate is unknown or invalid ({video_fps})")
    if video_start is None and video_end is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    start = 0
    if video_start is not None:
        start = math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise MediaError(f"empty time range video_start={video_start}, video_end={video_end} for a "
                         f"{duration:.2f} s video ({total_frames} frames @ {video_fps:g} fps)")
    return start, end, end - start + 1


def num_sampled_frames(total_frames: int, video_fps: float, fps: float | None = None, nframes: int | None = None,
                       min_frames: int = FPS_MIN_FRAMES, max_frames: int | None = None) -> int:
    """How many frames to sample (even, in ``[2, total_frames]``): qwen-vl-utils ``smart_nframes`` rule."""
    if nframes is not None:
        if fps is not None:
            raise MediaError("give either fps or nframes, not both")
        n = _round_by(nframes, FRAME_FACTOR)
    else:
        fps = FPS if fps is None else fps
        lo = _ceil_by(min_frames, FRAME_FACTOR)
        hi = _floor_by(min(FPS_MAX_FRAMES, total_frames) if max_frames is None else max_frames, FRAME_FACTOR)
        n = total_frames / video_fps * fps  # frames at the requested rate
        n = _floor_by(min(max(n, lo), hi, total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise MediaError(f"cannot sample {n} frames from a {total_frames}-frame video (need 2..{total_frames})")
    return int(n)


def sample_frame_indices(total_frames: int, video_fps: float, fps: float | None = None, nframes: int | None = None,
                         min_frames: int = FPS_MIN_FRAMES, max_frames: int | None = FPS_MAX_FRAMES,
                         video_start: float | None = None, video_end: float | None = None) -> list[int]:
    """Frame indices to decode, uniformly spread over the (optionally trimmed) range, both ends included.

    ``fps=None`` means 2.0.  ``max_frames`` is capped by the number of frames in range.
    Indices are ``round(linspace(first, last, n))`` computed in float32 with round-half-even, exactly as
    qwen-vl-utils' ``torch.linspace(...).round()`` does (float32 matters at .5 ties).
    """
    first, last, count = frame_range(total_frames, video_fps, video_start, video_end)
    n = num_sampled_frames(count, video_fps, fps, nframes, min_frames, max_frames)
    return torch.linspace(first, last, n, dtype=torch.float32).round().long().tolist()


def video_pixel_bounds(nframes: int, min_pixels: int | None = None, max_pixels: int | None = None,
                       total_pixels: float | None = None) -> tuple[int, float]:
    """Per-frame ``(min_pixels, max_pixels)`` for a clip of ``nframes`` frames (qwen-vl-utils §9.7):
    ``max = max(min(VIDEO_MAX_PIXELS, total/nframes*2), int(1.05*min))``, then capped by a user max."""
    lo = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
    total = VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels
    hi = max(min(VIDEO_MAX_PIXELS, total / nframes * FRAME_FACTOR), int(lo * 1.05))
    if max_pixels is not None:
        hi = min(max_pixels, hi)
    return lo, hi


# --------------------------------------------------------------------------------------
# Video: decoding and processing
# --------------------------------------------------------------------------------------
@dataclass
class VideoInputs:
    pixel_values: torch.Tensor  # [grid_t*grid_h*grid_w, 1176] float32
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float  # temporal_patch_size / sampled_fps (Qwen2.5-VL M-RoPE time axis)
    frame_indices: list[int]  # source frame per model frame (len = 2*grid_t; last repeated if padded)
    timestamps: list[float]  # seconds, one per entry of frame_indices
    sampled_fps: float
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    video_fps: float | None = None  # native rate of a decoded file (None for frame lists)
    total_frames: int | None = None  # frames in the file (None for frame lists)

    @property
    def video_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (MERGE_SIZE * MERGE_SIZE)


def _is_frame_list(src: Any) -> bool:
    return isinstance(src, (list, tuple)) or (isinstance(src, (np.ndarray, torch.Tensor)) and src.ndim == 4)


def is_video_source(src: Any) -> bool:
    """Frame lists / 4-D arrays and paths or URLs with a video extension are videos."""
    if _is_frame_list(src):
        return True
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        if s.startswith("data:video"):
            return True
        path = s.split("?", 1)[0].split("#", 1)[0]
        return Path(path).suffix.lower() in VIDEO_EXTENSIONS
    return False


def _open_video(src: Any):
    """decord ``VideoReader`` for a path / file:// / http(s) / data URL / bytes / file-like source."""
    import decord  # runtime video decoder (PyAV is only used to *write* test assets)

    label = _label(src)
    if hasattr(src, "read"):
        data = src.read()
    else:
        data, label = _resolve_source(src)
    if isinstance(data, bytes):
        if not data:
            raise MediaError(f"{label}: empty data (0 bytes)")
        data = io.BytesIO(data)
    try:
        vr = decord.VideoReader(data, num_threads=0)
    except Exception as e:  # decord raises DECORDError / RuntimeError / AssertionError  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MediaError(f"{label}: cannot decode video ({first})") from None
    if len(vr) <= 0:
        raise MediaError(f"{label}: video has no frames")
    return vr, label


def _get_batch(vr, chunk: list[int], label: str) -> np.ndarray:
    try:
        return vr.get_batch(chunk).asnumpy()  # [n, H, W, 3] uint8
    except Exception as e:  # noqa: BLE001 - decord raises several unrelated types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MediaError(f"{label}: failed to decode frames ({first})") from None


def _decode_frames(vr, indices: list[int], label: str, size_hw_fn) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``indices`` in chunks and resize each frame (PIL BICUBIC) to ``size_hw_fn(h, w)``.

    Returns uint8 ``[len(indices), h, w, 3]`` and the source ``(H, W)``.  Decoding of the next chunk
    overlaps the resizing of the current one, and frames are resized in parallel: decord and PIL both
    release the GIL, so plain threads scale.
    """
    chunks = [indices[i:i + _DECODE_CHUNK] for i in range(0, len(indices), _DECODE_CHUNK)]
    out, src_hw = None, (0, 0)
    workers = max(1, min(_DECODE_CHUNK, (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers + 1) as pool:
        pending = pool.submit(_get_batch, vr, chunks[0], label)
        start = 0
        for k in range(len(chunks)):
            batch = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(_get_batch, vr, chunks[k + 1], label)  # prefetch
            if out is None:
                src_hw = tuple(batch.shape[1:3])
                out = np.empty((len(indices), *size_hw_fn(*src_hw), 3), np.uint8)

            def resize_into(i: int, batch=batch, start=start) -> None:
                out[start + i] = np.asarray(_resize(Image.fromarray(batch[i]), out.shape[1:3]))

            list(pool.map(resize_into, range(len(batch))))
            start += len(batch)
    return out, src_hw


def _pad_frames(n: int) -> int:
    return _ceil_by(n, TEMPORAL_PATCH_SIZE) - n


def _video_meta_file(src: Any, fps, nframes, min_frames, max_frames, video_start, video_end):
    vr, label = _open_video(src)
    total, video_fps = len(vr), float(vr.get_avg_fps())
    first, last, count = frame_range(total, video_fps, video_start, video_end)
    indices = sample_frame_indices(total, video_fps, fps, nframes, min_frames, max_frames, video_start, video_end)
    sampled_fps = len(indices) / max(count, 1e-6) * video_fps
    return vr, label, total, video_fps, indices, sampled_fps


def _check_frame_list_options(nframes, video_start, video_end):
    if nframes is not None or video_start is not None or video_end is not None:
        raise MediaError("nframes / video_start / video_end apply to video files; a frame list is used as given")


def process_video(src: Any, fps: float | None = None, nframes: int | None = None, min_pixels: int | None = None,
                  max_pixels: int | None = None, total_pixels: float | None = None, *,
                  min_frames: int = FPS_MIN_FRAMES, max_frames: int | None = FPS_MAX_FRAMES,
                  video_start: float | None = None, video_end: float | None = None,
                  resized_height: int | None = None, resized_width: int | None = None) -> VideoInputs:
    """Qwen2-VL / Qwen2.5-VL video -> ``VideoInputs``.

    ``src``: a video file (path, ``file://``, http(s), data URL, bytes, file-like), or a list of frames
    (anything ``load_image`` takes) / a uint8 array ``[T, H, W, 3]``.  For a file, ``fps`` is the
    sampling rate (default 2.0) or ``nframes`` a fixed count; for a frame list, all frames are used and
    ``fps`` is the rate they were taken at (default 2.0).  Every frame is resized to one size chosen under
    the per-frame budget of :func:`video_pixel_bounds`.
    """
    if _is_frame_list(src):
        _check_frame_list_options(nframes, video_start, video_end)
        return _process_frame_list(src, fps, min_pixels, max_pixels, total_pixels, resized_height, resized_width)

    vr, label, total, video_fps, indices, sampled_fps = _video_meta_file(
        src, fps, nframes, min_frames, max_frames, video_start, video_end)
    lo, hi = video_pixel_bounds(len(indices), min_pixels, max_pixels, total_pixels)
    frames, (h0, w0) = _decode_frames(
        vr, indices, label, lambda h, w: _target_size(h, w, lo, hi, resized_height, resized_width))
    return _finish_video(frames, indices, [i / video_fps for i in indices], sampled_fps, (h0, w0),
                         video_fps=video_fps, total_frames=total)


def _frames_of(src: Any) -> list[Any]:
    if isinstance(src, torch.Tensor):
        src = src.detach().cpu().numpy()
    frames = list(src)
    if not frames:
        raise MediaError("video frame list is empty")
    return frames


def _process_frame_list(src, fps, min_pixels, max_pixels, total_pixels, resized_height, resized_width) -> VideoInputs:
    images = [load_image(f) for f in _frames_of(src)]
    n = len(images) + _pad_frames(len(images))  # the clip the model sees is padded to an even count
    lo, hi = video_pixel_bounds(n, min_pixels, max_pixels, total_pixels)
    h0, w0 = images[0].height, images[0].width
    h, w = _target_size(h0, w0, lo, hi, resized_height, resized_width)
    # Every frame goes straight from its own size to (h, w) (frames of other sizes are stretched).
    frames = np.stack([np.asarray(_resize(im, (h, w))) for im in images])  # [T, h, w, 3]
    rate = FPS if fps is None else float(fps)
    if rate <= 0:
        raise MediaError(f"frame list fps must be positive, got {fps}")
    indices = list(range(len(images)))
    return _finish_video(frames, indices, [i / rate for i in indices], rate, (h0, w0))


def _finish_video(frames: np.ndarray, indices: list[int], timestamps: list[float], sampled_fps: float,
                  original_size: tuple[int, int], **extra) -> VideoInputs:
    pad = _pad_frames(len(frames))
    if pad:  # repeat the last frame up to a whole temporal patch (ref §5.4)
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        indices = indices + [indices[-1]] * pad
        timestamps = timestamps + [timestamps[-1]] * pad
    pixel_values, grid = patchify(frames)
    return VideoInputs(pixel_values, grid, TEMPORAL_PATCH_SIZE / sampled_fps, indices, timestamps, sampled_fps,
                       original_size, tuple(frames.shape[1:3]), **extra)


# --------------------------------------------------------------------------------------
# Token accounting (cheap: headers / metadata only, no normalisation)
# --------------------------------------------------------------------------------------
def _grid_entry(kind: str, original: tuple[int, int], resized: tuple[int, int], grid_t: int) -> dict:
    gh, gw = resized[0] // PATCH_SIZE, resized[1] // PATCH_SIZE
    patches = grid_t * gh * gw
    visual = patches // (MERGE_SIZE * MERGE_SIZE)
    return {"kind": kind, "original_size": original, "resized_size": resized, "grid_thw": (grid_t, gh, gw),
            "patches": patches, "visual_tokens": visual,
            "llm_tokens": visual + 2}  # + <|vision_start|> and <|vision_end|>


def _gen1_image_entry(original: tuple[int, int]) -> dict:
    g = GEN1_IMAGE_SIZE // PATCH_SIZE  # 32x32 ViT patches, pooled to 256 queries by the resampler
    return {"kind": "image", "original_size": original, "resized_size": (GEN1_IMAGE_SIZE, GEN1_IMAGE_SIZE),
            "grid_thw": (1, g, g), "patches": g * g, "visual_tokens": GEN1_IMAGE_TOKENS,
            "llm_tokens": GEN1_IMAGE_TOKENS + 2,  # + <img> and </img>
            "note": "fixed 448x448 (aspect not kept); 256 resampler queries + <img></img>"}


def account(src: Any, *, min_pixels: int | None = None, max_pixels: int | None = None, fps: float | None = None,
            nframes: int | None = None) -> dict:
    """Token accounting per generation ``{"1": ..., "2": ..., "2.5": ...}`` without normalising pixels.

    Images read only their header; videos read the container metadata and decode a single frame (decord
    has no size query).  Each entry has ``resized_size``, ``grid_thw``, ``patches``, ``visual_tokens``
    (merged features / gen-1 queries) and ``llm_tokens`` (including the two marker tokens); video entries
    add frames, frame indices, timestamps, sampled_fps and ``second_per_grid_t``.
    """
    if is_video_source(src):
        return _account_video(src, min_pixels, max_pixels, fps, nframes)
    if isinstance(src, (str, os.PathLike, bytes, bytearray)):
        try:
            size = _image_size_cheap(src)
        except MediaError as e:
            if "not a recognised image" not in str(e):
                raise
            try:  # maybe a video without a telling extension
                return _account_video(src, min_pixels, max_pixels, fps, nframes)
            except MediaError:
                raise MediaError(f"{_label(src)}: not a recognised image or video file") from None
    else:
        size = _image_size_cheap(src)
    resized = smart_resize(size[0], size[1], IMAGE_FACTOR, MIN_PIXELS if min_pixels is None else min_pixels,
                           MAX_PIXELS if max_pixels is None else max_pixels)
    entry = _grid_entry("image", size, resized, 1)
    return {"1": _gen1_image_entry(size), "2": dict(entry), "2.5": dict(entry)}


def _account_video(src, min_pixels, max_pixels, fps, nframes) -> dict:
    if _is_frame_list(src):
        if nframes is not None:
            raise MediaError("nframes applies to video files; a frame list is used as given")
        frames = _frames_of(src)
        original = _image_size_cheap(frames[0])
        indices = list(range(len(frames)))
        rate = FPS if fps is None else float(fps)
        timestamps = [i / rate for i in indices]
        sampled_fps, video_fps, total = rate, None, None
    else:
        vr, label, total, video_fps, indices, sampled_fps = _video_meta_file(src, fps, nframes, FPS_MIN_FRAMES,
                                                                             FPS_MAX_FRAMES, None, None)
        original = tuple(vr[0].shape[:2])  # one decoded frame: decord exposes no size metadata
        timestamps = [i / video_fps for i in indices]
    pad = _pad_frames(len(indices))
    indices, timestamps = indices + indices[-1:] * pad, timestamps + timestamps[-1:] * pad
    lo, hi = video_pixel_bounds(len(indices), min_pixels, max_pixels)
    resized = smart_resize(original[0], original[1], IMAGE_FACTOR, lo, hi)
    entry = _grid_entry("video", original, resized, len(indices) // TEMPORAL_PATCH_SIZE)
    entry.update(frames=len(indices), frame_indices=indices, timestamps=timestamps, video_fps=video_fps,
                 total_frames=total, sampled_fps=sampled_fps,
                 second_per_grid_t=TEMPORAL_PATCH_SIZE / sampled_fps)
    gen2 = dict(entry, note="Qwen2-VL steps the temporal position by 1 per grid; second_per_grid_t is unused")
    gen1 = {"kind": "video", "supported": False, "note": "Qwen-VL (gen 1) has no video input"}
    return {"1": gen1, "2": gen2, "2.5": dict(entry)}
