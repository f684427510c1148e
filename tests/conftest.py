"""Shared pytest fixtures for qvl.

* ``assets_dir``          path of the committed sample media (``assets/``)
* ``qvu``                 the qwen-vl-utils 0.0.14 ``vision_process`` module, importable without torchvision
* ``hf_image_processor``  factory for transformers 4.57.6 ``Qwen2VLImageProcessor`` (slow / PIL backend)
* ``make_video``          factory writing a small synthetic mp4 (PyAV) into ``tmp_path``

Oracles (transformers, qwen-vl-utils) are imported lazily, inside fixtures, so test files that don't
need them don't pay for the import.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return ROOT / "assets"


def _import_qwen_vl_utils():
    """Import ``qwen_vl_utils.vision_process`` with a throw-away ``torchvision`` stub.

    qwen-vl-utils imports torchvision at module import, and torchvision is not installed (it can't be,
    for this torch build).  Its pure functions (smart_resize, smart_nframes, calculate_video_frame_range,
    to_rgb) don't touch torchvision, so a stub with the attributes it reads at import is enough.  The
    stub is removed from ``sys.modules`` right after the import so it cannot fool other libraries
    (transformers probes for torchvision) later in the session.
    """
    if "qwen_vl_utils.vision_process" in sys.modules:
        return sys.modules["qwen_vl_utils.vision_process"]
    names = ["torchvision", "torchvision.io", "torchvision.transforms"]
    saved = {n: sys.modules.get(n) for n in names}
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0.0-stub"
    tv.io = types.ModuleType("torchvision.io")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear")
    tv.transforms.functional = types.SimpleNamespace()
    sys.modules.update({"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms})
    try:
        return importlib.import_module("qwen_vl_utils.vision_process")
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod


@pytest.fixture(scope="session")
def qvu():
    return _import_qwen_vl_utils()


@pytest.fixture(scope="session")
def hf_image_processor():
    """``make(min_pixels, max_pixels)`` -> transformers 4.57.6 ``Qwen2VLImageProcessor`` (PIL backend)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    cache = {}

    def make(min_pixels: int = 3136, max_pixels: int = 12845056):
        key = (min_pixels, max_pixels)
        if key not in cache:
            cache[key] = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        return cache[key]

    return make


def synthetic_frames(n: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """``[n, H, W, 3]`` uint8: smooth gradients plus a moving block (compresses well, frames differ)."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (xx * 255 // max(width - 1, 1) + 7 * i + seed) % 256
        frames[i, ..., 1] = (yy * 255 // max(height - 1, 1) + 3 * i) % 256
        frames[i, ..., 2] = (xx + yy + 11 * i) % 256
        x0 = (i * 7) % max(width - 16, 1)
        frames[i, height // 3: height // 3 + 16, x0: x0 + 16] = 255
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: float, codec: str = "mpeg4") -> Path:
    """Write frames with PyAV (test/build-time only; qvl reads video with decord)."""
    import av
    from fractions import Fraction

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def make_video(tmp_path):
    """``make(n_frames, fps, width=64, height=48, name="v.mp4") -> Path`` of a synthetic mp4."""

    def make(n_frames: int, fps: float, width: int = 64, height: int = 48, name: str = "v.mp4") -> Path:
        return write_mp4(tmp_path / name, synthetic_frames(n_frames, width, height), fps)

    return make
