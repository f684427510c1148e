"""Video path of qvl.media against qwen-vl-utils 0.0.14 (frame selection, budgets) and transformers
4.57.6 ``Qwen2VLImageProcessor`` (pixel values / video_grid_thw).

qwen-vl-utils' frame selection lives inside its decord reader, so the oracle is that reader itself
(``_read_video_decord``) run against a fake ``decord`` module that only reports a frame count and fps.
"""

from __future__ import annotations

import itertools
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from qvl import media
from qvl.media import MediaError

from conftest import synthetic_frames, write_mp4


# ------------------------------------------------------------------------------------------
# Oracles
# ------------------------------------------------------------------------------------------
def _fake_decord(total_frames: int, fps: float) -> types.ModuleType:
    class VideoReader:
        def __init__(self, path, *a, **k):
            pass

        def __len__(self):
            return total_frames

        def get_avg_fps(self):
            return fps

        def get_batch(self, idx):
            return types.SimpleNamespace(asnumpy=lambda: np.zeros((len(idx), 1, 1, 3), np.uint8))

    return types.SimpleNamespace(VideoReader=VideoReader)


def _oracle_indices(qvu, monkeypatch, total, fps, opts):
    """(indices, sample_fps) from qwen-vl-utils' own decord reader, or the exception it raises."""
    monkeypatch.setitem(sys.modules, "decord", _fake_decord(total, fps))
    try:
        _, meta, sample_fps = qvu._read_video_decord({"video": "x.mp4", **opts})
    except (ValueError, AssertionError) as e:
        return e
    return meta["frames_indices"], sample_fps


@pytest.fixture
def qvu_pil_resize(qvu, monkeypatch):
    """qwen-vl-utils with its torchvision resize replaced by PIL BICUBIC on uint8 frames.

    Tolerance note: the real qwen-vl-utils resizes with torchvision's antialiased bicubic on uint8,
    which matches PIL BICUBIC only within +-1..2 levels (ref qwen2_qwen25_qwen3_vl.md §5.2), i.e. up to
    2/255/0.2613 ~ 0.03 after normalisation.  torchvision cannot be installed here, so the oracle uses
    PIL's kernel, the one qvl uses for images and video; with the same kernel every remaining step
    (frame choice, budget, size, rescale, normalise, patchify) must agree to float32 rounding: 1e-6.
    """
    def pil_resize(video, size, interpolation=None, antialias=None):  # video: [T, C, H, W] uint8
        h, w = size
        out = [np.asarray(Image.fromarray(f.permute(1, 2, 0).numpy()).resize((w, h), Image.Resampling.BICUBIC))
               for f in video]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)

    monkeypatch.setattr(qvu.transforms.functional, "resize", pil_resize, raising=False)
    monkeypatch.setattr(qvu, "get_video_reader_backend", lambda: "decord")
    return qvu


def _hf_video(hf_image_processor, video_tchw: torch.Tensor):
    """transformers' (deprecated but still present in 4.57.6) video path of Qwen2VLImageProcessor.
    Frames are already factor-aligned, so its own smart_resize with wide bounds is a no-op."""
    frames = list(video_tchw.permute(0, 2, 3, 1).numpy().astype(np.uint8))  # float 0..255 -> exact uint8
    out = hf_image_processor(3136, 12845056)(images=None, videos=[frames], return_tensors="np",
                                             input_data_format="channels_last")
    return out["pixel_values_videos"], tuple(out["video_grid_thw"][0].tolist())


# ------------------------------------------------------------------------------------------
# Frame selection: >= 100 cases against qwen-vl-utils
# ------------------------------------------------------------------------------------------
DURATIONS = [0.3, 1.0, 2.3, 4.0, 10.0, 37.7, 301.0, 1500.0]
SOURCE_FPS = [8.0, 23.976, 25.0, 29.97, 30.0, 60.0]
OPTIONS = [
    {},
    {"fps": 1.0},
    {"fps": 4.5},
    {"fps": 0.1},
    {"nframes": 7},
    {"nframes": 16},
    {"nframes": 5},
    {"min_frames": 9},
    {"max_frames": 33},
    {"fps": 3.0, "min_frames": 10, "max_frames": 100},
    {"video_start": 1.2, "video_end": 3.7},
    {"video_start": 0.5},
    {"video_end": 2.0},
    {"video_start": 5.0, "video_end": 4.0},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_frame_indices_match_qwen_vl_utils(qvu, monkeypatch, opts):
    cases = 0
    for duration, fps in itertools.product(DURATIONS, SOURCE_FPS):
        total = max(1, int(round(duration * fps)))
        ref = _oracle_indices(qvu, monkeypatch, total, fps, opts)
        kw = {"fps": opts.get("fps"), "nframes": opts.get("nframes"), "min_frames": opts.get("min_frames", 4),
              "max_frames": opts.get("max_frames", 768), "video_start": opts.get("video_start"),
              "video_end": opts.get("video_end")}
        if isinstance(ref, Exception):
            with pytest.raises(MediaError):
                media.sample_frame_indices(total, fps, **kw)
        else:
            indices, sample_fps = ref
            assert media.sample_frame_indices(total, fps, **kw) == list(indices), (duration, fps, opts)
            # and the default max_frames (None = min(768, frames in range)) agrees as well
            if "max_frames" not in opts:
                assert media.sample_frame_indices(total, fps, **{**kw, "max_frames": None}) == list(indices)
            first, last, count = media.frame_range(total, fps, kw["video_start"], kw["video_end"])
            assert len(indices) / max(count, 1e-6) * fps == pytest.approx(sample_fps, rel=1e-12)
        cases += 1
    assert cases == len(DURATIONS) * len(SOURCE_FPS)  # 48 per option, 672 in total


def test_frame_selection_examples_from_reference():
    # ref qwen_vl_gen1_and_qwen_vl_utils.md §9.4: 300@30 -> 20, 100@25 -> 8, 36000@30 -> 768
    assert len(media.sample_frame_indices(300, 30)) == 20
    assert len(media.sample_frame_indices(100, 25)) == 8
    assert len(media.sample_frame_indices(36000, 30)) == 768


def test_video_pixel_bounds_match_qwen_vl_utils_formula(qvu):
    # the formula of fetch_video (ref §9.7), written out from qwen-vl-utils' own constants
    f = 28
    vmin, vmax = qvu.VIDEO_MIN_TOKEN_NUM * f * f, qvu.VIDEO_MAX_TOKEN_NUM * f * f
    total = qvu.MODEL_SEQ_LEN * f * f * 0.9
    for n in (2, 8, 64, 300, 302, 768):
        assert media.video_pixel_bounds(n) == (vmin, max(min(vmax, total / n * 2), int(vmin * 1.05)))
    assert media.video_pixel_bounds(8, max_pixels=50_000) == (vmin, 50_000)


# ------------------------------------------------------------------------------------------
# Decoded videos: qvl vs qwen-vl-utils fetch_video + transformers processor
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, fps, size, opts", [
    (32, 8.0, (64, 48), {}),                                   # upscaled to the 128-token minimum
    (45, 15.0, (640, 360), {"total_pixels": 1_000_000}),       # total budget caps the frame size
    (40, 10.0, (320, 240), {"nframes": 6, "max_pixels": 120_000}),
    (50, 12.5, (200, 150), {"fps": 3.0, "video_start": 0.9, "video_end": 3.1}),
    (21, 7.0, (96, 96), {"resized_height": 150, "resized_width": 100}),
])
def test_video_matches_reference_pipeline(qvu_pil_resize, hf_image_processor, tmp_path, n, fps, size, opts):
    path = write_mp4(tmp_path / "clip.mp4", synthetic_frames(n, *size), fps)
    (video, meta), sample_fps = qvu_pil_resize.fetch_video(
        {"video": str(path), **opts}, return_video_sample_fps=True, return_video_metadata=True)
    ref_pv, ref_grid = _hf_video(hf_image_processor, video)

    ours = media.process_video(str(path), **opts)
    assert ours.frame_indices == list(meta["frames_indices"])
    assert ours.grid_thw == ref_grid
    assert ours.resized_size == tuple(video.shape[2:])
    assert ours.sampled_fps == pytest.approx(sample_fps, rel=1e-12)
    # Qwen2.5-VL processor: second_per_grid_ts = temporal_patch_size / fps (ref §9.8)
    assert ours.second_per_grid_t == pytest.approx(2 / sample_fps, rel=1e-12)
    assert ours.timestamps == pytest.approx([i / meta["fps"] for i in meta["frames_indices"]])
    assert ours.pixel_values.shape == ref_pv.shape
    assert np.abs(ours.pixel_values.numpy() - ref_pv).max() <= 1e-6
    assert ours.video_tokens == ref_pv.shape[0] // 4

    acc = media.account(str(path), fps=opts.get("fps"), nframes=opts.get("nframes"),
                        max_pixels=opts.get("max_pixels")) if "total_pixels" not in opts and \
        "video_start" not in opts and "resized_height" not in opts else None
    if acc is not None:  # account has no total_pixels / trimming / override knobs
        assert acc["2.5"]["grid_thw"] == ref_grid and acc["2.5"]["frame_indices"] == ours.frame_indices
        assert acc["1"]["supported"] is False


def test_asset_video(qvu_pil_resize, hf_image_processor, assets_dir, monkeypatch):
    path = str(assets_dir / "motion_4s_8fps.mp4")
    (video, meta), sample_fps = qvu_pil_resize.fetch_video({"video": path}, return_video_sample_fps=True,
                                                           return_video_metadata=True)

    def boom(*a, **k):
        raise AssertionError("account() must not normalise pixels")

    monkeypatch.setattr(media, "patchify", boom)
    acc = media.account(path)
    assert acc["2.5"]["frames"] == 8 and acc["2.5"]["frame_indices"] == list(meta["frames_indices"])
    assert acc["2.5"]["timestamps"] == pytest.approx([i / 8.0 for i in meta["frames_indices"]])
    assert acc["2.5"]["second_per_grid_t"] == pytest.approx(2 / sample_fps)
    assert acc["2.5"]["resized_size"] == tuple(video.shape[2:])
    assert acc["1"] == {"kind": "video", "supported": False, "note": "Qwen-VL (gen 1) has no video input"}


# ------------------------------------------------------------------------------------------
# Frame lists
# ------------------------------------------------------------------------------------------
def test_frame_list_matches_transformers_with_padding(qvu, hf_image_processor, tmp_path):
    """5 frames (odd): qvl resizes each frame once to the video budget size and pads to 6 by repeating
    the last frame.  Oracle: qwen-vl-utils' smart_resize with the fetch_video budget for the padded
    count, PIL bicubic, and transformers' processor (which pads odd clips itself)."""
    raw = synthetic_frames(5, 150, 100, seed=3)
    srcs = [Image.fromarray(raw[0]), raw[1], torch.from_numpy(raw[2].copy())]
    for i in (3, 4):
        Image.fromarray(raw[i]).save(tmp_path / f"f{i}.png")
        srcs.append(str(tmp_path / f"f{i}.png"))
    f = 28
    vmin = qvu.VIDEO_MIN_TOKEN_NUM * f * f
    vmax = max(min(qvu.VIDEO_MAX_TOKEN_NUM * f * f, qvu.MODEL_SEQ_LEN * f * f * 0.9 / 6 * 2), int(vmin * 1.05))
    h, w = qvu.smart_resize(100, 150, factor=f, min_pixels=vmin, max_pixels=vmax)
    frames = [np.asarray(Image.fromarray(x).resize((w, h), Image.Resampling.BICUBIC)) for x in raw]
    out = hf_image_processor(3136, 12845056)(images=None, videos=[frames], return_tensors="np",
                                             input_data_format="channels_last")

    ours = media.process_video(srcs, fps=4.0)
    assert ours.grid_thw == tuple(out["video_grid_thw"][0].tolist()) == (3, h // 14, w // 14)
    assert np.abs(ours.pixel_values.numpy() - out["pixel_values_videos"]).max() <= 1e-6
    assert ours.frame_indices == [0, 1, 2, 3, 4, 4]
    assert ours.timestamps == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert ours.second_per_grid_t == 0.5 and ours.sampled_fps == 4.0
    assert media.account(srcs, fps=4.0)["2"]["grid_thw"] == ours.grid_thw
    assert media.process_video(np.stack(raw)).grid_thw == ours.grid_thw  # [T, H, W, 3] array, default 2 fps


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
def test_video_errors(tmp_path, make_video):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x01not a video" * 100)
    cases = [
        (lambda: media.process_video(str(empty)), r"empty\.mp4: file is empty"),
        (lambda: media.process_video(str(junk)), r"junk\.mp4: cannot decode video"),
        (lambda: media.process_video(str(tmp_path / "nope.mp4")), r"nope\.mp4: file not found"),
        (lambda: media.account(str(junk)), r"junk\.mp4: cannot decode video"),
        (lambda: media.account(b"garbage" * 10), r"<70 bytes>: not a recognised image or video file"),
        (lambda: media.process_video([]), r"frame list is empty"),
        (lambda: media.process_video([np.zeros((8, 8, 3), np.uint8)], nframes=2), r"apply to video files"),
        (lambda: media.process_video(str(make_video(6, 10.0)), nframes=8), r"cannot sample 8 frames from a 6-frame"),
        (lambda: media.process_video(str(make_video(20, 10.0, name="b.mp4")), video_start=1.5, video_end=1.0),
         r"empty time range"),
        (lambda: media.sample_frame_indices(0, 30.0), r"video has no frames"),
        (lambda: media.sample_frame_indices(10, 0.0), r"frame rate is unknown"),
        (lambda: media.sample_frame_indices(100, 30.0, fps=2.0, nframes=4), r"either fps or nframes"),
    ]
    for fn, pattern in cases:
        with pytest.raises(MediaError, match=pattern) as info:
            fn()
        assert "\n" not in str(info.value)


def test_video_from_bytes_and_file_url(make_video):
    path = make_video(16, 8.0)
    a = media.process_video(path.read_bytes())
    b = media.process_video(f"file://{path}")
    assert a.grid_thw == b.grid_thw and torch.equal(a.pixel_values, b.pixel_values)
