"""qvl.viz: every figure runs on the sample assets and draws what qvl computes.

Numbers are checked against closed forms written here (published sizes, window tiling by r // 4,
block masks built from cu_seqlens), and drawings by scanning their pixels.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from qvl import media, positions  # noqa: E402
from qvl.grounding import Box, Point, parse  # noqa: E402
from qvl.viz import costs, overlays, plots  # noqa: E402


@pytest.fixture(scope="module")
def shapes(assets_dir):
    return assets_dir / "shapes_640x480.png"


@pytest.fixture(scope="module")
def video(assets_dir):
    return media.process_video(assets_dir / "motion_4s_8fps.mp4")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _runs(flags) -> int:
    """Number of maximal runs of True in a 1-D boolean sequence."""
    flags = np.asarray(flags, dtype=bool)
    return int(flags[0]) + int(np.sum(flags[1:] & ~flags[:-1]))


# ---------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------


def test_patch_grid_lines_counted_on_blank_image():
    gh, gw = 6, 10  # patches
    blank = Image.new("RGB", (gw * 14, gh * 14), "white")
    out = np.asarray(overlays.draw_patch_grid(blank, caption=False)).astype(int)
    assert out.shape == (gh * 14, gw * 14, 3)
    drawn = (out != 255).any(axis=2)
    assert _runs(drawn.all(axis=0)) == gw + 1  # vertical patch lines, both borders included
    assert _runs(drawn.all(axis=1)) == gh + 1
    red = np.abs(out - np.array(overlays.MERGE_COLOR[:3])).sum(axis=2) < 10
    assert _runs(red.all(axis=0)) == gw // 2 + 1  # merge-unit lines every 28 px
    assert _runs(red.all(axis=1)) == gh // 2 + 1


def test_patch_grid_on_asset_has_model_size_and_caption(shapes):
    out = overlays.patch_grid(shapes, numbers=True)
    # 480x640 is inside the pixel budget: each side rounds to a multiple of 28 -> 476 x 644
    assert isinstance(out, Image.Image)
    assert out.width == 644 and out.height > 476
    scaled = overlays.patch_grid(shapes, max_pixels=64 * 28 * 28, scale=2, caption=False)
    h, w = media.smart_resize(480, 640, 28, media.MIN_PIXELS, 64 * 28 * 28)
    assert scaled.size == (2 * w, 2 * h)
    with pytest.raises(ValueError, match="model size"):
        overlays.draw_patch_grid(Image.new("RGB", (30, 28)))


def test_window_overlay_colours_match_window_index_membership():
    gh, gw = 20, 24  # 10 x 12 tokens -> 3 x 3 windows of 4 x 4 tokens, the last row partial
    blank = Image.new("RGB", (gw * 14, gh * 14), "white")
    out = overlays.draw_windows(blank, labels=False, caption=False)
    assert out.size == (3 * 112, 3 * 112)  # padded up to whole windows
    px = np.asarray(out)
    colour = {(r, c): tuple(px[r * 28 + 14, c * 28 + 14]) for r in range(gh // 2) for c in range(gw // 2)}
    drawn = {}
    for rc, col in colour.items():
        drawn.setdefault(col, set()).add(rc)
    # membership according to qvl.positions.window_index: slots of each window -> token (row, col)
    index, cu = positions.window_index(torch.tensor([[1, gh, gw]]))
    bounds = (cu // 4).tolist()
    by_index = {frozenset(divmod(int(i), gw // 2) for i in index[a:b]) for a, b in zip(bounds, bounds[1:])}
    assert {frozenset(s) for s in drawn.values()} == by_index
    # and both are the 4 x 4 tiling written out here
    tiles = {}
    for r in range(gh // 2):
        for c in range(gw // 2):
            tiles.setdefault((r // 4, c // 4), set()).add((r, c))
    assert by_index == {frozenset(s) for s in tiles.values()}
    # the padding rows (image ends at 280 px) carry no window colour: only the grey hatching
    pad = px[285:330, 5:105].reshape(-1, 3)  # inside the first padded window, away from its outline
    greys = {tuple(p) for p in pad}
    assert all(max(p) - min(p) <= 2 for p in greys)
    assert all(col not in greys for col in colour.values())


def test_window_ids_and_windows_on_asset(shapes):
    ids = overlays.window_ids((1, 34, 46))
    r, c = torch.meshgrid(torch.arange(17), torch.arange(23), indexing="ij")
    expected_window = (r // 4) * 6 + (c // 4)  # ceil(23 / 4) = 6 windows per row, raster order
    assert torch.equal(ids[0], expected_window)
    out = overlays.draw_windows(shapes)
    assert isinstance(out, Image.Image) and out.width == 6 * 112 and out.height > 5 * 112


def test_grounding_drawn_at_original_pixels(shapes):
    blank = Image.new("RGB", (200, 100), "white")
    out = overlays.draw_grounding(blank, [Box(20, 30, 120, 90)], caption=False, width=2)
    px = np.asarray(out)
    assert tuple(px[60, 20]) == overlays.PALETTE[0]  # left edge
    assert tuple(px[60, 119]) == overlays.PALETTE[0]  # right edge
    assert tuple(px[60, 70]) == (255, 255, 255)  # inside stays clear
    # a gen-2.5 reply (resized-pixel convention) drawn on the original asset, with its caption
    items = parse('```json\n[{"bbox_2d": [100, 80, 300, 250], "label": "square"}, {"point_2d": [400, 300]}]\n```',
                  "2.5", original_size=(480, 640), resized_size=(476, 644))
    drawn = overlays.draw_grounding(shapes, items, resized_size=(476, 644))
    assert isinstance(drawn, Image.Image) and drawn.width == 640 and drawn.height > 480
    assert "RESIZED" in overlays.CONVENTIONS["2.5"] and "ORIGINAL" in overlays.CONVENTIONS["2"]
    assert overlays.draw_grounding(shapes, [Point(10, 10, "p")], caption=False).size == (640, 480)


def test_attention_overlay_puts_weight_on_the_right_token():
    lh, lw, k = 3, 5, 7  # token 7 = row 1, col 2
    img = Image.new("RGB", (lw * 28, lh * 28), (90, 90, 90))
    weights = torch.zeros(lh * lw)
    weights[k] = 1.0
    out = overlays.attention_overlay(img, weights, (1, lh * 2, lw * 2), alpha=1.0, cmap="gray")
    px = np.asarray(out)
    assert px.shape[0] > lh * 28  # colour bar + caption below (the band is at least 320 px wide)
    assert tuple(px[1 * 28 + 14, 2 * 28 + 14]) == (255, 255, 255)
    assert tuple(px[14, 14]) == (0, 0, 0)
    attn = torch.zeros(1, 2, 3, 40)
    attn[0, 0, -1, 10 + k] = 1.0  # head 0 of the last query looks at token k of an item spanning keys 10..25
    assert torch.equal(overlays.item_weights(attn, 10, 25, head=0), weights)
    assert torch.equal(overlays.item_weights(attn, 10, 25), weights / 2)
    with pytest.raises(ValueError, match="weights"):
        overlays.attention_overlay(img, torch.ones(4), (lh, lw))


def test_video_frames_round_trip_and_strip(video):
    frames = overlays.video_frames(video)
    t, h, w = video.grid_thw
    assert len(frames) == 2 * t == len(video.timestamps)
    assert frames[0].size == (w * 14, h * 14)
    repatched, grid = media.patchify(np.stack([np.asarray(f) for f in frames]))
    assert grid == tuple(video.grid_thw)
    assert torch.allclose(repatched, video.pixel_values, atol=1e-5 + 0.5 / 255 / min(media.IMAGE_STD))
    strip = overlays.frame_strip(frames, video.timestamps, frame_indices=video.frame_indices, time_ids=list(range(t)))
    assert isinstance(strip, Image.Image)
    short = overlays.frame_strip(frames[:4], video.timestamps[:4], caption=False)
    assert short.width < strip.width
    with pytest.raises(ValueError, match="even"):
        overlays.frame_strip(frames[:3], video.timestamps[:3])


# ---------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------


def test_kv_cache_bytes_closed_form():
    # Qwen2-VL-7B: 28 layers x 2 (K, V) x 4 kv heads x 128 head dim x 2 bytes (bf16), per token
    assert costs.kv_cache_bytes("Qwen2-VL-7B-Instruct", 1000) == 28 * 2 * 4 * 128 * 2 * 1000 == 57_344_000
    assert costs.kv_cache_bytes("Qwen/Qwen2.5-VL-3B-Instruct", 10, bytes_per_value=4) == 36 * 2 * 2 * 128 * 4 * 10
    # Qwen-VL (gen 1): 32 layers, no grouped-query attention (32 K/V heads of 128)
    assert costs.kv_cache_bytes("Qwen/Qwen-VL-Chat", 1) == 32 * 2 * 32 * 128 * 2
    rows = costs.summary((1, 34, 46), 1000, "Qwen2-VL-7B-Instruct")
    assert rows["KV cache (prompt)"] == "54.69 MiB" == f"{57_344_000 / 2**20:.2f} MiB"


def test_window_flops_below_full_and_closed_form():
    for grid in [(1, 16, 16), (1, 34, 46), (2, 20, 30), (1, 4, 4)]:
        c = costs.vision_costs(grid, "Qwen2.5-VL-7B-Instruct")
        assert c["flops_window_layer"] <= c["flops_full_layer"]
        assert c["flops_as_configured"] <= c["flops_all_full"]
        assert sum(c["window_segments"]) == sum(c["full_segments"]) == grid[0] * grid[1] * grid[2]
    c = costs.vision_costs((1, 16, 16), "Qwen2.5-VL-7B-Instruct")  # 256 patches = 4 windows of 64
    assert c["flops_full_layer"] == 4 * 256**2 * 1280
    assert c["flops_window_layer"] == 4 * (4 * 64**2 * 1280)
    assert c["flops_as_configured"] == 28 * c["flops_window_layer"] + 4 * c["flops_full_layer"]
    assert c["scores_bytes_full"] == 16 * 256**2 * 2 and c["hidden_bytes"] == 256 * 1280 * 2
    q2 = costs.vision_costs((1, 16, 16), "Qwen2-VL-2B-Instruct")
    assert q2["flops_as_configured"] == q2["flops_all_full"] == 32 * 4 * 256**2 * 1280
    assert costs.vision_block_kinds("Qwen2.5-VL-3B-Instruct").count("full") == 4


@pytest.mark.parametrize("name", ["Qwen/Qwen-VL-Chat", "Qwen2-VL-2B-Instruct", "Qwen2.5-VL-3B-Instruct"])
def test_parameter_counts_match_meta_models(name):
    from qvl.checkpoint import model_class
    from qvl.models.qwen_vl import QwenVL

    cfg = costs.preset_config(name)
    with torch.device("meta"):
        model = QwenVL(cfg) if costs.generation_of(cfg) == "1" else model_class(cfg)(cfg)
    named = dict(model.named_parameters())
    counts = costs.parameter_counts(name)
    assert counts["total"] == sum(p.numel() for p in named.values())
    if costs.generation_of(cfg) != "1":
        merger = sum(p.numel() for k, p in named.items() if k.startswith("visual.merger."))
        tower = sum(p.numel() for k, p in named.items() if k.startswith("visual.")) - merger
        assert (counts["vision tower"], counts["merger"]) == (tower, merger)
        assert counts["embedding"] == named["model.embed_tokens.weight"].numel()
    published = {"Qwen/Qwen-VL-Chat": 9.6e9, "Qwen2-VL-2B-Instruct": 2.21e9, "Qwen2.5-VL-3B-Instruct": 3.75e9}[name]
    assert abs(counts["total"] - published) / published < 0.01


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

PARTS = ["<|im_start|> user", ("image", (1, 4, 6)), "what moves ?", ("video", (3, 4, 4), 1.0), "<|im_end|>"]


def test_mrope_figures_show_qvl_positions():
    toy = plots.toy_prompt(PARTS, tokens_per_second=2)
    T = len(toy["tokens"])
    assert toy["input_ids"].shape == (1, T) == (1, 2 + 1 + 6 + 1 + 3 + 1 + 12 + 1 + 1)
    fig = plots.mrope_figure(toy["position_ids"], toy["spans"], toy["tokens"], gen1_ids=toy["gen1_ids"])
    assert isinstance(fig, go.Figure)
    axis_traces = [tr for tr in fig.data if tr.x is not None and tr.x[0] is not None]
    assert len(axis_traces) == 4  # t, h, w, gen-1
    for a in range(3):
        assert list(axis_traces[a].y) == toy["position_ids"][a].tolist()
    assert list(axis_traces[3].y) == list(range(T))
    assert "<|image_pad|>" in axis_traces[0].text[4] and "image 0" in axis_traces[0].text[4]
    # text after the image resumes at max + 1: image 2 x 3 tokens starting at id 3 -> max 5 -> '<|vision_end|>' = 6
    assert toy["position_ids"][:, 9].tolist() == [6, 6, 6]
    fig3 = plots.mrope_3d_figure(toy["position_ids"], toy["spans"])
    assert [len(tr.x) for tr in fig3.data] == [6, 12]
    assert sorted(set(fig3.data[1].z)) == [toy["position_ids"][0, 14].item() + d for d in (0, 2, 4)]
    static = plots.mrope_static(toy["position_ids"], toy["spans"], toy["tokens"], gen1_ids=toy["gen1_ids"])
    assert isinstance(static, Figure) and len(static.axes) == 4


def test_video_time_ids_closed_forms():
    n = 6
    assert plots.video_time_ids(n, 2.0, None) == list(range(n))  # Qwen2-VL: one id per patch
    assert plots.video_time_ids(n, 2.0, 2.0) == [2 * i for i in range(n)]  # 1 s per patch x 2 ids/s
    assert plots.video_time_ids(n, 8.0, 2.0) == [i // 2 for i in range(n)]  # 0.25 s per patch -> shared ids
    fig = plots.time_ids_plot(fps_list=(1.0, 4.0), duration_s=4.0)
    assert isinstance(fig, Figure) and len(fig.axes) == 2


@pytest.mark.parametrize("grid,layer,kind", [((1, 8, 12), 0, "window"), ((2, 8, 8), 7, "full")])
def test_mask_figure_matches_cu_seqlens(grid, layer, kind):
    name = "Qwen2.5-VL-7B-Instruct"
    assert costs.vision_block_kinds(name)[layer] == kind
    if kind == "window":
        cu = positions.window_index(torch.tensor([grid]))[1].tolist()
    else:
        cu = positions.vision_cu_seqlens(torch.tensor([grid])).tolist()
    L = grid[0] * grid[1] * grid[2]
    expected = np.zeros((L, L), dtype=bool)
    for a, b in zip(cu, cu[1:]):
        expected[a:b, a:b] = True
    fig = plots.attention_mask_plot(grid, layer, name)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    assert shown.shape == (L, L)
    assert np.array_equal(shown != 0, expected)


def test_mask_figure_downsamples_large_grids():
    fig = plots.attention_mask_plot((1, 64, 64), 0, "Qwen2.5-VL-3B-Instruct", max_side=256)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    assert shown.shape == (256, 256)  # 4096 patches max-pooled 16 x 16
    assert shown.any() and not shown.all()


def test_tokens_vs_resolution_curves():
    sides = [112, 448, 1000]
    fig = plots.tokens_vs_resolution_plot(sides)
    gen1, gen2, gen25 = (line.get_ydata() for line in fig.axes[0].lines[:3])
    assert list(gen1) == [258] * 3
    assert list(gen2) == list(gen25) == [(112 // 28) ** 2 + 2, (448 // 28) ** 2 + 2, round(1000 / 28) ** 2 + 2]
    flops2, flops25 = fig.axes[1].lines[1].get_ydata(), fig.axes[1].lines[2].get_ydata()
    assert all(b <= a for a, b in zip(flops2, flops25))


def test_token_stream_collapses_visual_runs():
    toy = plots.toy_prompt(PARTS)
    fig = plots.token_stream_plot(toy["tokens"], toy["spans"])
    labels = [t.get_text() for t in fig.axes[0].texts]
    # 27 tokens, of which 6 image pads and 12 video pads become one cell each
    assert len(labels) == len(toy["tokens"]) - 6 - 12 + 2
    assert "<|image_pad|> x6  (image 0)" in labels and "<|video_pad|> x12  (video 0)" in labels
    assert "<|vision_start|>" in labels and plots.is_special("<|im_end|>") and not plots.is_special("moves")
    gen1 = plots.toy_prompt(["<|im_start|> user <img>", *["<imgpad>"] * 5, "</img> hi"])
    assert [(s["type"], s["start"], s["end"]) for s in gen1["spans"]] == [("text", 0, 3), ("image", 3, 8), ("text", 8, 10)]
    assert gen1["gen1_ids"].tolist() == list(range(10))


def test_parameters_plot_bars():
    fig = plots.parameters_plot(["Qwen/Qwen-VL-Chat", "Qwen2-VL-2B-Instruct"])
    ax = fig.axes[0]
    widths = {}
    for bar in ax.patches:
        y = round(bar.get_y() + bar.get_height() / 2)
        widths[y] = widths.get(y, 0) + bar.get_width()
    assert widths[1] == pytest.approx(costs.parameter_counts("Qwen2-VL-2B-Instruct")["total"] / 1e9)


STREAM = """
import sys, qvl
from qvl.data import eval_samples
from qvl.viz.app_helpers import stream_tokens
vlm = qvl.load(sys.argv[1])
batch = vlm.prepare(eval_samples("ground", "2.5", 1)[0].prompt())
steps = stream_tokens(vlm, batch, 64)
if sys.argv[2] == "stop":  # the app's Stop button: close the generator after two tokens
    next(steps), next(steps)
    steps.close()
else:
    "".join(piece for _, piece in steps)
print("ok")
"""


@pytest.mark.parametrize("how", ["to_the_end", "stop"])
def test_stream_tokens_leaves_no_thread_behind_at_exit(how):
    """The decode thread has ended when the generator returns or is closed: a daemon thread still inside torch
    when the interpreter exits aborts the process (rc 134, "terminate called without an active exception")."""
    import subprocess
    import sys
    from pathlib import Path

    model = Path(__file__).resolve().parents[1] / "assets" / "models" / "qvl-tiny-2.5"
    if not (model / "config.json").exists():
        pytest.skip("assets/models/qvl-tiny-2.5 not trained yet")
    run = subprocess.run([sys.executable, "-c", STREAM, str(model), how], capture_output=True, text=True)
    assert (run.returncode, run.stdout.split()) == (0, ["ok"]), run.stderr[-500:]
