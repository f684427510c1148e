"""Image path of qvl.media, checked against independent oracles:

* transformers 4.57.6 ``Qwen2VLImageProcessor`` (PIL backend) for pixel_values / image_grid_thw,
* qwen-vl-utils 0.0.14 for ``smart_resize`` and the RGBA -> RGB rule,
* transformers ``CLIPImageProcessor`` (448x448, no crop) for the gen-1 path,
* numbers printed in the reference notes (§5.1 / §9.2 tables).
"""

from __future__ import annotations

import base64
import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qvl import media
from qvl.media import MediaError


# ------------------------------------------------------------------------------------------
# smart_resize
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw, factor, lo, hi, expected", [
    # reference qwen2_qwen25_qwen3_vl.md §5.1 and qwen_vl_gen1_and_qwen_vl_utils.md §9.2 tables
    ((1080, 1920), 28, 3136, 12845056, (1092, 1932)),
    ((1080, 1920), 32, 65536, 16777216, (1088, 1920)),
    ((70, 42), 28, 3136, 12845056, (56, 56)),
    ((4000, 6000), 28, 3136, 1003520, (812, 1204)),
    ((1024, 1024), 28, 3136, 12845056, (1036, 1036)),
    ((480, 640), 28, 3136, 12845056, (476, 644)),
    ((4000, 6000), 28, 3136, 12845056, (2912, 4368)),
    ((20, 30), 28, 3136, 12845056, (56, 84)),
])
def test_smart_resize_reference_table(hw, factor, lo, hi, expected):
    assert media.smart_resize(*hw, factor=factor, min_pixels=lo, max_pixels=hi) == expected


def test_smart_resize_round_half_even():
    # 70/28 = 2.5 rounds to 2 (Python round), 98/28 = 3.5 rounds to 4 (ref §5.1)
    assert media.smart_resize(70, 98 * 10, min_pixels=1, max_pixels=10**9) == (56, 980)


def test_smart_resize_aspect_limit():
    assert media.smart_resize(20, 4000)  # exactly 200:1 is allowed
    with pytest.raises(MediaError, match=r"aspect ratio 200\.1:1 exceeds the limit of 200:1"):
        media.smart_resize(20, 4002)
    with pytest.raises(MediaError, match="must be >= min_pixels"):
        media.smart_resize(100, 100, min_pixels=5000, max_pixels=4000)


def test_smart_resize_matches_qwen_vl_utils_grid(qvu):
    """Exhaustive-ish grid vs the qwen-vl-utils 0.0.14 oracle (factor 28, several budgets)."""
    sizes = [1, 3, 13, 14, 15, 27, 28, 29, 41, 42, 55, 70, 98, 111, 224, 333, 480, 719, 1080, 1999, 4001]
    budgets = [(3136, 12845056), (256 * 784, 1280 * 784), (100352, 602112), (3136, 3136 * 2)]
    checked = 0
    for h in sizes:
        for w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in budgets:
                ref = qvu.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
                if 0 in ref:  # qwen-vl-utils can floor a side to 0 at extreme aspect; qvl keeps >= factor
                    assert media.smart_resize(h, w, 28, lo, hi)[ref.index(0)] == 28
                    continue
                assert media.smart_resize(h, w, 28, lo, hi) == ref, (h, w, lo, hi)
                checked += 1
    assert checked > 1000


def test_smart_resize_follows_qwen_vl_utils_not_transformers_for_sub_half_factor_sides(qvu):
    """Deliberate choice: for a side < 14 px transformers rounds it to 0 and falls into the min-pixels
    branch; qwen-vl-utils (what the model cards use, before the HF processor) keeps it at 28.  qvl
    follows qwen-vl-utils."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    h, w = 10, 1990
    assert media.smart_resize(h, w) == qvu.smart_resize(h, w, factor=28) == (28, 1988)
    assert hf_smart_resize(h, w, 28, 3136, 12845056) == (28, 812)


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 6000), w=st.integers(1, 6000),
       lo_tok=st.integers(1, 2000), extra_tok=st.integers(0, 20000))
def test_smart_resize_properties(h, w, lo_tok, extra_tok):
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(MediaError):
            media.smart_resize(h, w)
        return
    f = 28
    lo, hi = lo_tok * f * f, (lo_tok + extra_tok) * f * f
    rh, rw = media.smart_resize(h, w, f, lo, hi)
    assert rh % f == 0 and rw % f == 0 and rh >= f and rw >= f
    rounded = max(f, round(h / f) * f) * max(f, round(w / f) * f)
    if rounded > hi:  # downscale branch: within max unless a side was clamped up to one factor
        scale = math.sqrt(hi / (h * w))
        if rh > f and rw > f:
            assert rh * rw <= hi
    elif rounded < lo:  # upscale branch always reaches min_pixels
        scale = math.sqrt(lo / (h * w))
        assert rh * rw >= lo
    else:
        scale = 1.0
        assert lo <= rh * rw <= hi
    # aspect ratio kept within the rounding: both sides are the same exact scaling of the input,
    # each snapped to the factor grid (moved by less than one factor), except a side clamped to f.
    for got, side in ((rh, h), (rw, w)):
        assert got == f or abs(got - side * scale) < f


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), lo=st.integers(1, 500_000), span=st.integers(0, 5_000_000))
def test_smart_resize_equals_qwen_vl_utils_property(qvu, h, w, lo, span):
    if max(h, w) / min(h, w) > 200:
        return
    ref = qvu.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=lo + span)
    if 0 not in ref:
        assert media.smart_resize(h, w, 28, lo, lo + span) == ref


# ------------------------------------------------------------------------------------------
# Test images
# ------------------------------------------------------------------------------------------
def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    """Deterministic ``[h, w, 3]`` uint8 with edges, gradients and noise (exercises the resampler)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 3 + yy) % 256, (yy * 5) % 256, ((xx // 7 + yy // 5) % 2) * 255], -1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return ((img + noise) % 256).astype(np.uint8)


def _image_cases():
    """(name, PIL image, min_pixels, max_pixels): >= 20 images of varied size, aspect and mode."""
    cases = []
    add = lambda name, img, lo=3136, hi=12845056: cases.append((name, img, lo, hi))  # noqa: E731
    add("rgb_640x480", Image.fromarray(_pattern(480, 640, 0)))
    add("rgb_odd_333x517", Image.fromarray(_pattern(333, 517, 1)))
    add("rgb_square_224", Image.fromarray(_pattern(224, 224, 2)))
    add("rgb_exact_multiple_no_resize", Image.fromarray(_pattern(280, 392, 3)))
    add("rgb_tiny_5x7_upscale", Image.fromarray(_pattern(5, 7, 4)))
    add("rgb_tiny_20x30_upscale", Image.fromarray(_pattern(20, 30, 5)))
    add("rgb_1x1", Image.fromarray(_pattern(1, 1, 6)))
    add("rgb_wide_20x3990_aspect_199", Image.fromarray(_pattern(20, 3990, 7)))
    add("rgb_tall_3000x15_aspect_200", Image.fromarray(_pattern(3000, 15, 8)))
    add("rgb_panorama_150x2400", Image.fromarray(_pattern(150, 2400, 9)))
    add("rgb_downscale_900x1200_max200k", Image.fromarray(_pattern(900, 1200, 10)), 3136, 200_704)
    add("rgb_downscale_1000x700_max_tokens64", Image.fromarray(_pattern(1000, 700, 11)), 3136, 64 * 784)
    add("rgb_upscale_min_256tok", Image.fromarray(_pattern(100, 150, 12)), 256 * 784, 1280 * 784)
    add("rgb_half_tie_70x98", Image.fromarray(_pattern(70, 98, 13)))
    add("L_gray_300x200", Image.fromarray(_pattern(300, 200, 14)[..., 0], "L"))
    add("L_gray_tiny_9x50", Image.fromarray(_pattern(9, 50, 15)[..., 1], "L"))
    pal = Image.fromarray(_pattern(180, 260, 16)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    add("P_adaptive_180x260", pal)
    add("P_web_palette_97x131", Image.fromarray(_pattern(97, 131, 17)).convert("P"))
    rgba = np.dstack([_pattern(210, 150, 18), (np.arange(150)[None, :].repeat(210, 0) * 255 // 149).astype(np.uint8)])
    add("RGBA_gradient_alpha_210x150", Image.fromarray(rgba, "RGBA"))
    add("CMYK_120x90", Image.fromarray(_pattern(120, 90, 19)).convert("CMYK"))
    add("LA_64x300", Image.fromarray(np.dstack([_pattern(64, 300, 20)[..., 0], np.full((64, 300), 255, np.uint8)]),
                                     "LA"))
    add("rgb_1_1MP_1024x1080", Image.fromarray(_pattern(1024, 1080, 21)))
    return cases


IMAGE_CASES = _image_cases()


@pytest.mark.parametrize("name, img, lo, hi", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_pixel_values_match_transformers(hf_image_processor, qvu, name, img, lo, hi):
    """qvl == transformers 4.57.6 Qwen2VLImageProcessor (PIL backend): grid identical, |diff| <= 1e-6.

    Colour conversion is given to both sides the same way: transformers 4.57 drops alpha
    (``convert("RGB")``) whereas qvl composites on white like qwen-vl-utils, so images with alpha are
    first converted with qwen-vl-utils' own ``to_rgb`` and that RGB image is fed to both.
    """
    if media._has_alpha(img):
        img = qvu.to_rgb(img)
    # channels_last: otherwise transformers guesses the layout of tiny (1x1x3) images wrongly
    ref = hf_image_processor(lo, hi)(images=[img], return_tensors="np", input_data_format="channels_last")
    ours = media.process_image(img, min_pixels=lo, max_pixels=hi)
    assert ours.grid_thw == tuple(int(v) for v in ref["image_grid_thw"][0])
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert np.abs(ours.pixel_values.numpy() - ref["pixel_values"]).max() <= 1e-6
    assert ours.image_tokens == ours.pixel_values.shape[0] // 4
    assert ours.resized_size == (ours.grid_thw[1] * 14, ours.grid_thw[2] * 14)
    assert ours.original_size == (img.height, img.width)


def test_asset_images_match_transformers(hf_image_processor, assets_dir):
    proc = hf_image_processor()
    for name in ["shapes_640x480.png", "text_scripts_1280x320.png", "tall_300x1800.png"]:
        path = assets_dir / name
        ref = proc(images=[Image.open(path).convert("RGB")], return_tensors="np")
        ours = media.process_image(str(path))
        assert ours.grid_thw == tuple(ref["image_grid_thw"][0].tolist())
        assert np.abs(ours.pixel_values.numpy() - ref["pixel_values"]).max() <= 1e-6


def test_patch_rows_follow_merge_block_order():
    """Spec check of ref §3.1 built independently of the reshape: row 4k+2i+j is patch (2br+i, 2bc+j)
    of merged token k = br*(gw/2)+bc; columns are (c, t, py, px) with t duplicated for images."""
    h, w = 56, 84  # grid 4 x 6, no resize
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([yy, xx, (yy + xx) % 256], -1).astype(np.uint8)
    out = media.process_image(arr, min_pixels=1, max_pixels=10**9)
    assert out.grid_thw == (1, 4, 6)
    vals = out.pixel_values.numpy().reshape(-1, 3, 2, 14, 14)
    mean, std = np.array(media.IMAGE_MEAN), np.array(media.IMAGE_STD)
    raw = np.rint((vals * std[None, :, None, None, None] + mean[None, :, None, None, None]) * 255)
    gw = 6
    for row in range(vals.shape[0]):
        k, r = divmod(row, 4)
        br, bc = divmod(k, gw // 2)
        pr, pc = 2 * br + r // 2, 2 * bc + r % 2
        for t in range(2):
            np.testing.assert_array_equal(raw[row, 0, t], yy[pr * 14:(pr + 1) * 14, pc * 14:(pc + 1) * 14])
            np.testing.assert_array_equal(raw[row, 1, t], xx[pr * 14:(pr + 1) * 14, pc * 14:(pc + 1) * 14])


# ------------------------------------------------------------------------------------------
# Colour modes, EXIF
# ------------------------------------------------------------------------------------------
def test_rgba_composited_on_white_like_qwen_vl_utils(qvu, assets_dir):
    img = Image.open(assets_dir / "rgba_palette.png")
    assert img.mode == "RGBA"
    ours = np.asarray(media.load_image(img))
    np.testing.assert_array_equal(ours, np.asarray(qvu.to_rgb(img)))
    assert (ours[0, 0] == 255).all()  # fully transparent corner -> white (not black)


def test_palette_transparency_composited_on_white(qvu, assets_dir):
    """qvl rule (deliberate, documented in media.to_rgb): any transparency -> white background.
    qwen-vl-utils converts 'P' straight to RGB and shows the palette colour (black here)."""
    img = Image.open(assets_dir / "palette_p.png")
    assert img.mode == "P" and "transparency" in img.info
    ours = np.asarray(media.load_image(img))
    assert (ours[0, 0] == 255).all()
    assert (np.asarray(qvu.to_rgb(img))[0, 0] == 0).all()
    # opaque palette entries keep their colours exactly
    opaque = np.asarray(img) != 0
    np.testing.assert_array_equal(ours[opaque], np.asarray(img.convert("RGB"))[opaque])


def test_la_and_greyscale_modes():
    la = Image.fromarray(np.dstack([np.full((4, 4), 100, np.uint8), np.array([[0, 255] * 2] * 4, np.uint8)]), "LA")
    out = np.asarray(media.load_image(la))
    assert (out[:, 0] == 255).all() and (out[:, 1] == 100).all()
    g16 = Image.fromarray(np.full((3, 3), 65535, np.uint16))  # 16-bit white, not clipped garbage
    assert (np.asarray(media.load_image(g16)) == 255).all()


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)  # stored top-left marker
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100, subsampling=0)
    out = np.asarray(media.load_image(str(path)))
    assert out.shape == (40, 20, 3)  # axes swapped
    assert out[0, -1, 0] > 200 and out[0, -1, 1] < 60  # marker now top-right
    assert media.account(str(path))["2"]["original_size"] == (40, 20)


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------
def test_every_source_form_loads_the_same_pixels(tmp_path, assets_dir):
    path = assets_dir / "shapes_640x480.png"
    ref = np.asarray(Image.open(path).convert("RGB"))
    raw = path.read_bytes()
    b64 = base64.b64encode(raw).decode()
    sources = [str(path), path, f"file://{path}", raw, bytearray(raw), b64, f"data:image/png;base64,{b64}",
               io.BytesIO(raw), Image.open(path), ref, torch.from_numpy(ref.copy())]
    for src in sources:
        np.testing.assert_array_equal(np.asarray(media.load_image(src)), ref, err_msg=media._label(src))


def test_numpy_layouts():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for arr in (g, g[..., None]):
        out = np.asarray(media.load_image(arr))
        assert out.shape == (3, 4, 3) and (out == g[..., None]).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = [[0, 255], [255, 0]]
    out = np.asarray(media.load_image(rgba))
    assert (out[0, 0] == 255).all() and (out[0, 1] == 0).all()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data: opening it must not decode anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("make_src, pattern", [
    (lambda d: str(d / "missing.png"), r"missing\.png: file not found"),
    (lambda d: _write(d / "empty.png", b""), r"empty\.png: file is empty"),
    (lambda d: _write(d / "junk.png", b"\x00junk" * 50), r"junk\.png: not a recognised image"),
    (lambda d: str(d), r"is a directory"),
    (lambda d: b"", r"empty data"),
    (lambda d: "data:image/png,notbase64", r"only base64 data URLs"),
    (lambda d: "data:image/png;base64,@@@@", r"invalid base64"),
    (lambda d: np.zeros((4, 4, 3), np.float32), r"must be uint8"),
    (lambda d: np.zeros((4, 4, 2), np.uint8), r"expected an HxW or HxWxC array"),
    (lambda d: "http://127.0.0.1:9/x.png", r"http://127\.0\.0\.1:9/x\.png: download failed"),
    (lambda d: _png_header_only(13400, 13300), r"13400x13300 = 178 MP, over the 178 MP limit"),
    (lambda d: _png_header_only(100000, 100000), r"decompression bomb"),
])
def test_bad_inputs_give_one_line_media_error(tmp_path, make_src, pattern):
    with pytest.raises(MediaError, match=pattern) as info:
        media.load_image(make_src(tmp_path))
    assert "\n" not in str(info.value)


def test_truncated_file_names_the_file(tmp_path, assets_dir):
    raw = (assets_dir / "text_scripts_1280x320.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MediaError, match=r"cut\.png: truncated or corrupt"):
        media.process_image(str(path))


def test_pixel_limit_applies_to_arrays_and_pil():
    with pytest.raises(MediaError, match="over the 0 MP limit"):
        media.load_image(np.zeros((100, 100, 3), np.uint8), pixel_limit=9999)
    with pytest.raises(MediaError, match="decompression bomb"):
        media.load_image(Image.new("RGB", (100, 100)), pixel_limit=9999)


def test_resized_override_follows_qwen_vl_utils(qvu):
    img = Image.fromarray(_pattern(100, 100, 0))
    out = media.process_image(img, resized_height=300, resized_width=170)
    assert out.resized_size == qvu.smart_resize(300, 170, factor=28)


# ------------------------------------------------------------------------------------------
# Gen 1
# ------------------------------------------------------------------------------------------
def test_gen1_matches_clip_processor(assets_dir):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"height": 448, "width": 448}, do_center_crop=False,
                              resample=Image.Resampling.BICUBIC, image_mean=list(media.IMAGE_MEAN),
                              image_std=list(media.IMAGE_STD))
    for name in ["shapes_640x480.png", "tall_300x1800.png"]:
        img = Image.open(assets_dir / name).convert("RGB")
        ref = proc(images=img, return_tensors="np")["pixel_values"][0]
        ours = media.process_image_gen1(img)
        assert ours.shape == (3, 448, 448) and ours.dtype == torch.float32
        assert np.abs(ours.numpy() - ref).max() <= 1e-6


# ------------------------------------------------------------------------------------------
# Token accounting
# ------------------------------------------------------------------------------------------
def test_account_image_matches_transformers_and_reads_header_only(hf_image_processor, assets_dir, monkeypatch):
    path = assets_dir / "text_scripts_1280x320.png"
    ref = hf_image_processor(3136, 1280 * 784)(images=[Image.open(path).convert("RGB")], return_tensors="np")
    t, gh, gw = ref["image_grid_thw"][0].tolist()

    def boom(*a, **k):
        raise AssertionError("account() must not decode or normalise pixels")

    monkeypatch.setattr(media, "patchify", boom)
    monkeypatch.setattr(media, "_normalise", boom)
    monkeypatch.setattr(Image.Image, "load", boom)
    acc = media.account(str(path), max_pixels=1280 * 784)
    for gen in ("2", "2.5"):
        e = acc[gen]
        assert e["grid_thw"] == (t, gh, gw) and e["patches"] == t * gh * gw
        assert e["visual_tokens"] == t * gh * gw // 4 and e["llm_tokens"] == e["visual_tokens"] + 2
        assert e["resized_size"] == (gh * 14, gw * 14) and e["original_size"] == (320, 1280)
    g1 = acc["1"]
    assert g1["resized_size"] == (448, 448) and g1["visual_tokens"] == 256 and g1["llm_tokens"] == 258


@pytest.mark.parametrize("torch_threshold", [0, 1 << 40], ids=["torch", "numpy"])
def test_normalisation_bit_identical_to_transformers_rule(monkeypatch, torch_threshold):
    """Both backends of media._normalise equal transformers' PIL-path arithmetic bit for bit:
    float64 x*(1/255) cast to float32, then float32 (x - mean) / std (ref §5.2 step 4)."""
    monkeypatch.setattr(media, "_TORCH_MIN_ELEMENTS", torch_threshold)
    u8 = np.tile(np.arange(256, dtype=np.uint8), (3, 1)).reshape(1, 3, 256)  # [1, C, 256]
    scaled = (u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(media.IMAGE_MEAN, np.float32).reshape(1, 3, 1)
    std = np.array(media.IMAGE_STD, np.float32).reshape(1, 3, 1)
    expected = (scaled - mean) / std
    got = media._normalise(u8, channel_dim=1)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), expected)
