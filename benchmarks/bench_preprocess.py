"""Preprocessing speed: qvl vs transformers 4.57.6 ``Qwen2VLImageProcessor`` (PIL backend), side by side.

    .venv/bin/python benchmarks/bench_preprocess.py [--repeats 3] [--video-seconds 30]

Images: synthetic RGB images of about 0.3, 1, 4 and 12 MP, already in memory as PIL images, with the
hub-default budget (min 3136, max 12845056 pixels = 16384 tokens), so none is downscaled by the budget;
each is still resized by a few pixels to multiples of 28 (the realistic case).  Both sides do
RGB -> smart_resize -> BICUBIC -> rescale/normalise -> patchify.

Video: a 30 s 1280x720 clip at 24 fps is written to a temp dir (PyAV, build-time tool only).  qvl's
``process_video`` (decord decode of the 2-fps frames, resize, patchify) is compared with the same decord
decode + transformers' processor on those frames with the per-frame video budget.

Prints a markdown table; the ratio is qvl time / transformers time (lower is better for qvl).
Not a test: run on demand (``make bench``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qvl import media  # noqa: E402

IMAGE_SIZES = {"0.3 MP (640x480)": (480, 640), "1 MP (1152x864)": (864, 1152),
               "4 MP (2304x1728)": (1728, 2304), "12 MP (4000x3000)": (3000, 4000)}


def _image(h: int, w: int) -> Image.Image:
    """Photo-like content (smooth gradients + noise) so the resampler does real work."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (np.sin(xx / 37) * np.cos(yy / 23) + 1) * 127], -1)
    noise = rng.normal(0, 12, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _timeit(fn, repeats: int) -> float:
    """Best of ``repeats`` after a warm-up: the least noisy statistic on a shared machine."""
    fn()  # warm-up (allocator, lazy imports)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_images(repeats: int) -> list[tuple[str, float, float]]:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    hf = Qwen2VLImageProcessor(min_pixels=media.MIN_PIXELS, max_pixels=media.MAX_PIXELS)
    rows = []
    for name, (h, w) in IMAGE_SIZES.items():
        img = _image(h, w)
        ours = media.process_image(img)
        ref = hf(images=[img], return_tensors="pt")
        assert ours.grid_thw == tuple(ref["image_grid_thw"][0].tolist())
        assert torch.allclose(ours.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)
        t_q = _timeit(lambda: media.process_image(img), repeats)
        t_h = _timeit(lambda: hf(images=[img], return_tensors="pt"), repeats)
        rows.append((f"image {name} -> {ours.resized_size[1]}x{ours.resized_size[0]}", t_q, t_h))
    return rows


def bench_video(seconds: int, repeats: int) -> tuple[str, float, float]:
    import decord
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_mp4  # PyAV writer (build/test-time only)

    fps, (h, w) = 24, (720, 1280)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip_720p.mp4"
        t0 = time.perf_counter()
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx // 4, yy // 3, (xx + yy) // 8], -1).astype(np.uint8)  # [H, W, 3]
        step = np.array([3, 1, 5], np.uint8)
        frames = np.stack([base + step * np.uint8(i % 256) for i in range(seconds * fps)])  # uint8 wraps
        write_mp4(path, frames, fps)
        del frames
        print(f"(generated {seconds} s 720p test clip in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)

        ours = media.process_video(str(path))
        lo, hi = media.video_pixel_bounds(len(ours.frame_indices))
        hf = Qwen2VLImageProcessor(min_pixels=lo, max_pixels=int(hi))

        def reference():
            vr = decord.VideoReader(str(path))
            idx = media.sample_frame_indices(len(vr), vr.get_avg_fps())
            batch = vr.get_batch(idx).asnumpy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return hf(images=None, videos=[list(batch)], return_tensors="pt")

        ref = reference()
        assert ours.grid_thw == tuple(ref["video_grid_thw"][0].tolist())
        t_q = _timeit(lambda: media.process_video(str(path)), repeats)
        t_h = _timeit(reference, repeats)
    name = (f"video {seconds} s 720p@{fps} -> {len(ours.frame_indices)} frames "
            f"{ours.resized_size[1]}x{ours.resized_size[0]} (decode included)")
    return name, t_q, t_h


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--video-seconds", type=int, default=30)
    args = ap.parse_args(argv)
    import transformers

    rows = bench_images(args.repeats)
    rows.append(bench_video(args.video_seconds, args.repeats))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; transformers {transformers.__version__} "
          f"Qwen2VLImageProcessor (PIL); best of {args.repeats}\n")
    print("| input | qvl (s) | transformers (s) | ratio qvl/transformers |")
    print("|---|---:|---:|---:|")
    for name, t_q, t_h in rows:
        print(f"| {name} | {t_q:.3f} | {t_h:.3f} | {t_q / t_h:.2f} |")


if __name__ == "__main__":
    main()
