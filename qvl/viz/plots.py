"""Figures of positions, masks, token counts and token streams.

Interactive (plotly `go.Figure`, for `gr.Plot` and notebooks):
  * `mrope_figure`        - (t, h, w) ids of every token vs token index, one row per axis, coloured by
                            modality, hover shows the token; optional gen-1 1-D ids as a last row
  * `mrope_3d_figure`     - the visual tokens' (t, h, w) as a 3-D scatter, one colour per image/video
Static (matplotlib `Figure`, also what `docs/figures/` are rendered with):
  * `mrope_static`        - the same as `mrope_figure`, for PNGs
  * `time_ids_plot`       - a video's temporal ids vs seconds, Qwen2-VL vs Qwen2.5-VL, for several fps
  * `attention_mask_plot` - the ViT's block-diagonal attention mask for one block (window vs full)
  * `tokens_vs_resolution_plot` - LLM tokens and ViT attention FLOPs vs image side, per generation
  * `token_stream_plot`   - one prompt's tokens as cells coloured by modality, special tokens named
  * `parameters_plot`     - parameters per component for published checkpoints
Helpers: `toy_prompt` (a prompt with text/image/video parts and its M-RoPE ids, no tokenizer needed),
`vision_attention_mask` (the boolean mask itself).

Every position, window and size here comes from `qvl.positions`, `qvl.media` and `qvl.viz.costs`.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt  # headless machines fall back to Agg; notebooks keep their inline backend
import numpy as np
import torch
from matplotlib.patches import Patch, Rectangle

from qvl import chat, media, positions
from qvl.viz import costs

MODALITY_COLORS = {"text": "#4C72B0", "special": "#555555", "image": "#DD8452", "video": "#55A868"}
AXES = ("t", "h", "w")
GEN_COLORS = {"1": "#8172B3", "2": "#4C72B0", "2.5": "#C44E52"}
GEN_NAMES = {"1": "Qwen-VL", "2": "Qwen2-VL", "2.5": "Qwen2.5-VL"}

SPECIAL_IDS = {  # Qwen2 vocabulary (reference §1.3)
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": chat.IMAGE_TOKEN_ID,
    "<|video_pad|>": chat.VIDEO_TOKEN_ID,
    "<img>": chat.GEN1_IMG_START_ID, "</img>": chat.GEN1_IMG_END_ID, "<imgpad>": chat.GEN1_IMG_END_ID + 1,  # gen 1
}


def is_special(token: str) -> bool:
    """Control tokens of either vocabulary: `<|...|>` (Qwen2) and `<img>`, `</img>`, `<imgpad>`, `<ref>`... (gen 1)."""
    t = token.strip()
    return (t.startswith("<|") and t.endswith("|>")) or t in {
        "<img>", "</img>", "<imgpad>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"}


# ---------------------------------------------------------------------------------------------
# A prompt without a tokenizer
# ---------------------------------------------------------------------------------------------


def toy_prompt(parts: Sequence, tokens_per_second: float | None = None) -> dict:
    """Build a prompt from parts and compute its M-RoPE ids with `qvl.positions.mrope_position_ids`.

    parts: a str is text, split on spaces into one token per word (special tokens such as
    "<|im_start|>" are kept whole; a gen-1 stream writes "<img> <imgpad> ... </img>" as text, and its
    spans then follow gen 1's rule); ("image", (t, h, w)) is an image of that patch grid; ("video",
    (t, h, w), seconds_per_temporal_patch) a video. Each visual item is wrapped in
    <|vision_start|> ... <|vision_end|> and expanded to t*h*w/4 pad tokens, as the chat template does.
    tokens_per_second: None = Qwen2-VL, 2 = Qwen2.5-VL.

    Returns dict(input_ids [1, T], tokens (list[str]), spans (chat.modality_spans), position_ids [3, T],
    image_grid_thw, video_grid_thw, second_per_grid_ts, gen1_ids [T] (what gen 1's 1-D ids would be
    for the same token stream)).
    """
    ids, tokens, images, videos, seconds = [], [], [], [], []
    words = iter(range(1000, 100000))
    for part in parts:
        if isinstance(part, str):
            for word in part.split():
                tokens.append(word)
                ids.append(SPECIAL_IDS.get(word, next(words)))
            continue
        kind, grid = part[0], tuple(int(v) for v in part[1])
        pad = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
        n = grid[0] * grid[1] * grid[2] // media.MERGE_SIZE**2
        tokens += ["<|vision_start|>", *[pad] * n, "<|vision_end|>"]
        ids += [SPECIAL_IDS["<|vision_start|>"], *[SPECIAL_IDS[pad]] * n, SPECIAL_IDS["<|vision_end|>"]]
        if kind == "image":
            images.append(grid)
        else:
            videos.append(grid)
            seconds.append(float(part[2]) if len(part) > 2 else 1.0)
    input_ids = torch.tensor([ids], dtype=torch.long)
    pos, _ = positions.mrope_position_ids(
        input_ids, images or None, videos or None, second_per_grid_ts=seconds or None,
        tokens_per_second=tokens_per_second)
    if "<img>" in tokens:  # a gen-1 stream: the image is the slots between <img> and </img>
        spans = chat.modality_spans(ids, gen1=True)
    else:
        spans = chat.modality_spans(ids, image_tokens=[g[0] * g[1] * g[2] // 4 for g in images],
                                    video_tokens=[g[0] * g[1] * g[2] // 4 for g in videos])
    return {"input_ids": input_ids, "tokens": tokens, "spans": spans, "position_ids": pos[:, 0],
            "image_grid_thw": images, "video_grid_thw": videos, "second_per_grid_ts": seconds,
            "gen1_ids": positions.text_position_ids(torch.ones_like(input_ids))[0]}


def _positions_3t(position_ids, row: int = 0) -> np.ndarray:
    """[3, T] or [3, B, T] ids -> numpy [3, T]."""
    p = torch.as_tensor(position_ids)
    if p.dim() == 3:
        p = p[:, row]
    return p.cpu().numpy()


def _token_kinds(n: int, spans, tokens=None) -> list[str]:
    """Per token: "image" / "video" (inside a visual span), "special" (a named control token), or "text"."""
    kinds = ["text"] * n
    for s in spans or []:
        if s["type"] != "text":
            kinds[s["start"]:s["end"]] = [s["type"]] * (s["end"] - s["start"])
    if tokens is not None:
        kinds = [("special" if k == "text" and is_special(tok) else k) for k, tok in zip(kinds, tokens)]
    return kinds


def _span_labels(n: int, spans) -> list[str]:
    out = ["text"] * n
    for s in spans or []:
        if s["type"] != "text":
            out[s["start"]:s["end"]] = [f"{s['type']} {s['index']}"] * (s["end"] - s["start"])
    return out


# ---------------------------------------------------------------------------------------------
# M-RoPE ids: plotly
# ---------------------------------------------------------------------------------------------


def mrope_figure(position_ids, spans=None, tokens: Sequence[str] | None = None, *, row: int = 0,
                 gen1_ids=None, gen1_spans=None, gen1_tokens=None, title: str | None = None):
    """Interactive M-RoPE ids: one subplot per axis (t, h, w), x = token index, y = position id; one
    trace per axis, markers coloured by modality (text / special / image / video), hover showing the
    token, its item and all three ids. Text tokens have equal ids on the three axes and resume at
    max + 1 after a visual run. With `gen1_ids` a last row shows Qwen-VL's plain 1-D ids for its own
    token stream (gen 1 gives its 256 image slots ordinary consecutive positions)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    p = _positions_3t(position_ids, row)
    T = p.shape[1]
    kinds = _token_kinds(T, spans, tokens)
    items = _span_labels(T, spans)
    toks = list(tokens) if tokens is not None else [""] * T
    rows = 4 if gen1_ids is not None else 3
    names = [f"{a} (M-RoPE, Qwen2/2.5-VL)" for a in AXES] + ["1-D ids (Qwen-VL gen 1)"]
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=gen1_ids is None, vertical_spacing=0.06,
                        subplot_titles=names[:rows])
    hover = [f"#{i} {toks[i]!r}<br>{items[i]}<br>(t,h,w)=({p[0, i]},{p[1, i]},{p[2, i]})" for i in range(T)]
    for a, axis in enumerate(AXES):
        fig.add_trace(go.Scatter(
            x=np.arange(T), y=p[a], mode="lines+markers", name=f"{axis} id", showlegend=False,
            line=dict(color="rgba(120,120,120,0.5)", width=1),
            marker=dict(color=[MODALITY_COLORS[k] for k in kinds], size=5),
            text=hover, hovertemplate="%{text}<extra>" + axis + "</extra>"), row=a + 1, col=1)
        fig.update_yaxes(title_text=f"{axis} id", row=a + 1, col=1)
    if gen1_ids is not None:
        g = torch.as_tensor(gen1_ids).flatten().cpu().numpy()
        gk = _token_kinds(len(g), gen1_spans, gen1_tokens)
        gt = list(gen1_tokens) if gen1_tokens is not None else [""] * len(g)
        fig.add_trace(go.Scatter(
            x=np.arange(len(g)), y=g, mode="lines+markers", name="1-D id", showlegend=False,
            line=dict(color="rgba(120,120,120,0.5)", width=1), marker=dict(color=[MODALITY_COLORS[k] for k in gk], size=5),
            text=[f"#{i} {gt[i]!r}<br>id {g[i]}" for i in range(len(g))], hovertemplate="%{text}<extra>gen 1</extra>"),
            row=4, col=1)
        fig.update_yaxes(title_text="id", row=4, col=1)
    for kind in dict.fromkeys(kinds):  # legend: one dummy entry per modality present
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=kind,
                                 marker=dict(color=MODALITY_COLORS[kind], size=9)), row=1, col=1)
    fig.update_xaxes(title_text="token index", row=rows, col=1)
    fig.update_layout(title=title or "M-RoPE position ids of every token", height=220 * rows + 80,
                      legend=dict(orientation="h", y=1.06, x=1, xanchor="right"), margin=dict(l=60, r=20, t=90, b=50))
    return fig


def mrope_3d_figure(position_ids, spans, tokens: Sequence[str] | None = None, *, row: int = 0, title: str | None = None):
    """The visual tokens' (t, h, w) ids as points in 3-D, one trace (colour) per image / video: an image
    is a flat h x w sheet at one t, a video a stack of sheets along t, each item shifted by where the
    text before it ended."""
    import plotly.graph_objects as go

    p = _positions_3t(position_ids, row)
    fig = go.Figure()
    for s in spans:
        if s["type"] == "text":
            continue
        sl = slice(s["start"], s["end"])
        fig.add_trace(go.Scatter3d(
            x=p[2, sl], y=p[1, sl], z=p[0, sl], mode="markers", name=f"{s['type']} {s['index']}",
            marker=dict(size=3),
            hovertemplate="t=%{z} h=%{y} w=%{x}<extra>" + f"{s['type']} {s['index']}" + "</extra>"))
    fig.update_layout(title=title or "(t, h, w) ids of the visual tokens",
                      scene=dict(xaxis_title="w id", yaxis_title="h id", zaxis_title="t id"),
                      height=560, margin=dict(l=0, r=0, t=50, b=0))
    return fig


# ---------------------------------------------------------------------------------------------
# M-RoPE ids: matplotlib
# ---------------------------------------------------------------------------------------------


def _modality_legend(ax, kinds, loc="upper left"):
    present = list(dict.fromkeys(kinds))
    ax.legend(handles=[Patch(color=MODALITY_COLORS[k], label=k) for k in present], loc=loc, fontsize=8,
              ncol=len(present), framealpha=0.9)


def mrope_static(position_ids, spans=None, tokens: Sequence[str] | None = None, *, row: int = 0, gen1_ids=None,
                 gen1_spans=None, gen1_tokens=None, title: str | None = None):
    """Static twin of `mrope_figure`: stacked panels t / h / w (and gen 1's 1-D ids) vs token index,
    points coloured by modality, visual spans shaded and named on the t panel."""
    p = _positions_3t(position_ids, row)
    T = p.shape[1]
    kinds = _token_kinds(T, spans, tokens)
    rows = 4 if gen1_ids is not None else 3
    fig, axes = plt.subplots(rows, 1, figsize=(10, 1.9 * rows + 0.8), sharex=gen1_ids is None, squeeze=False)
    axes = axes[:, 0]
    colors = [MODALITY_COLORS[k] for k in kinds]
    for a, axis in enumerate(AXES):
        ax = axes[a]
        ax.plot(np.arange(T), p[a], color="0.75", lw=0.8, zorder=1)
        ax.scatter(np.arange(T), p[a], c=colors, s=9, zorder=2)
        ax.set_ylabel(f"{axis} id")
        for s in spans or []:
            if s["type"] != "text":
                ax.axvspan(s["start"] - 0.5, s["end"] - 0.5, color=MODALITY_COLORS[s["type"]], alpha=0.08)
                if a == 0:
                    ax.text((s["start"] + s["end"]) / 2, 0.97, f"{s['type']} {s['index']}", ha="center", va="top",
                            transform=ax.get_xaxis_transform(), fontsize=8, color=MODALITY_COLORS[s["type"]])
        ax.grid(alpha=0.3)
    _modality_legend(axes[-1] if gen1_ids is None else axes[2], kinds)
    if gen1_ids is not None:
        g = torch.as_tensor(gen1_ids).flatten().cpu().numpy()
        gk = _token_kinds(len(g), gen1_spans, gen1_tokens)
        axes[3].plot(np.arange(len(g)), g, color="0.75", lw=0.8)
        axes[3].scatter(np.arange(len(g)), g, c=[MODALITY_COLORS[k] for k in gk], s=9)
        axes[3].set_ylabel("1-D id")
        axes[3].set_title("Qwen-VL (gen 1): one id per token, image slots included", fontsize=9, loc="left")
        axes[3].grid(alpha=0.3)
    axes[-1].set_xlabel("token index")
    fig.suptitle(title or "M-RoPE (t, h, w) position ids per token", fontsize=11)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Video time ids
# ---------------------------------------------------------------------------------------------


def video_time_ids(n_patches: int, fps: float, tokens_per_second: float | None) -> list[int]:
    """The M-RoPE t id of each temporal patch of a video sampled at `fps` (one 2x2-patch frame per
    step, so one token per temporal patch), read off `qvl.positions.mrope_position_ids`, relative
    to the video's first token."""
    spg = media.TEMPORAL_PATCH_SIZE / fps
    toy = toy_prompt([("video", (n_patches, 2, 2), spg)], tokens_per_second)
    t = toy["position_ids"][0]
    vis = [i for i, tok in enumerate(toy["tokens"]) if tok == "<|video_pad|>"]
    return (t[vis] - t[vis[0]]).tolist()


def time_ids_plot(fps_list: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0), duration_s: float = 8.0,
                  tokens_per_second: float = 2.0):
    """Two panels, x = time in the video (seconds at the start of each temporal patch), y = t id.
    Left, Qwen2-VL: the id counts patches, so its slope depends on the sampling rate. Right,
    Qwen2.5-VL: id = floor(patch index x tokens_per_second x seconds per patch), so every fps lands on
    one line (absolute time). The id step per patch is tokens_per_second x 2 / fps: 2 at 2 fps, 1 at
    4 fps, and below 1 above that, where neighbouring patches share a t id."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    cmap = plt.get_cmap("tab10")
    for j, fps in enumerate(fps_list):
        n = max(1, int(round(duration_s * fps / media.TEMPORAL_PATCH_SIZE)))
        secs = np.arange(n) * media.TEMPORAL_PATCH_SIZE / fps
        col = cmap(j % 10)
        for ax, tps in zip(axes, (None, tokens_per_second)):
            ids = video_time_ids(n, fps, tps)
            ax.step(secs, ids, where="post", color=col, lw=1.2, alpha=0.8)
            ax.plot(secs, ids, "o", color=col, ms=4, label=f"{fps:g} fps ({n} patches)")
    axes[0].set_title("Qwen2-VL: t id = temporal patch index", fontsize=10)
    axes[1].set_title(f"Qwen2.5-VL: t id = floor(index x {tokens_per_second:g} x s/patch) (absolute time)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("time in the video (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("t position id")
    axes[1].legend(fontsize=8, title="sampling rate", title_fontsize=8, loc="upper left")
    steps = ", ".join(f"{f:g} fps: {tokens_per_second * media.TEMPORAL_PATCH_SIZE / f:g}" for f in fps_list)
    axes[1].text(0.98, 0.03, f"id step per patch = {tokens_per_second:g} x 2 / fps\n{steps}\n(step < 1: patches share ids)",
                 transform=axes[1].transAxes, ha="right", va="bottom", fontsize=7.5,
                 bbox=dict(fc="white", ec="0.7", alpha=0.9))
    fig.suptitle(f"Video time ids over {duration_s:g} s (2 frames per temporal patch)", fontsize=11)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# ViT attention mask
# ---------------------------------------------------------------------------------------------


def vision_attention_mask(grid_thw, kind: str = "full", window_size: int = 112) -> torch.Tensor:
    """Boolean [L, L] mask of one ViT block, True = patch i may attend to patch j, in the order the
    Qwen2.5-VL tower holds its patches (window order; Qwen2-VL has no windows and keeps raster/merge
    order, which gives the same per-frame blocks). Blocks come from `costs.segment_lengths`:
    per frame for "full", per window for "window"."""
    lengths = torch.tensor(costs.segment_lengths(grid_thw, kind, window_size))
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return seg[:, None] == seg[None, :]


def _downsample_any(mask: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """Max-pool a square mask by an integer factor so its side is <= max_side (a pooled cell is True
    if any cell under it is). -> (pooled, factor)"""
    L = mask.shape[0]
    f = max(1, -(-L // max_side))
    if f == 1:
        return mask, 1
    n = -(-L // f)
    padded = np.zeros((n * f, n * f), dtype=bool)
    padded[:L, :L] = mask
    return padded.reshape(n, f, n, f).any(axis=(1, 3)), f


def attention_mask_plot(grid_thw, layer: int = 0, name="Qwen2.5-VL-7B-Instruct", *, max_side: int = 400):
    """The block-diagonal mask of ViT block `layer` of a preset (window or full, as the preset says),
    drawn as an image (dark = may attend), downsampled by max-pooling when there are more than
    `max_side` patches, with the title giving the kind, the number of blocks and the fraction of the
    full L x L matrix computed. Below: every block of the tower, full-attention ones dark, the chosen
    one outlined. axes[0] is the mask, axes[1] the block strip."""
    kinds = costs.vision_block_kinds(name)
    kind = kinds[layer]
    cfg = costs.preset_config(name)
    mask = vision_attention_mask(grid_thw, kind, getattr(cfg.vision, "window_size", 112)).numpy()
    L = mask.shape[0]
    shown, f = _downsample_any(mask, max_side)
    fig = plt.figure(figsize=(6.2, 7.0))
    ax = fig.add_axes([0.12, 0.22, 0.8, 0.68])
    ax.imshow(shown, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", extent=(0, L, L, 0))
    lengths = costs.segment_lengths(grid_thw, kind, getattr(cfg.vision, "window_size", 112))
    n = len(lengths)
    ax.set_title(f"ViT block {layer}: {kind} attention, {n} block{'s' if n != 1 else ''} on the diagonal\n"
                 f"{L} patches; {mask.sum() / L**2:.1%} of the {L}x{L} scores are computed"
                 + (f"\n(drawn max-pooled {f}x{f}: a dark cell = any allowed pair under it)" if f > 1 else ""),
                 fontsize=9.5)
    ax.set_xlabel("key patch (window order)")
    ax.set_ylabel("query patch (window order)")
    strip = fig.add_axes([0.12, 0.06, 0.8, 0.05])
    strip.imshow([[1 if k == "full" else 0.25 for k in kinds]], cmap="Greys", vmin=0, vmax=1, aspect="auto",
                 extent=(-0.5, len(kinds) - 0.5, 0, 1))
    strip.add_patch(Rectangle((layer - 0.5, 0), 1, 1, fill=False, ec="#C44E52", lw=2.5))
    strip.set_yticks([])
    strip.set_xticks(range(0, len(kinds), 4 if len(kinds) > 16 else 1))
    strip.set_xlabel("ViT block (dark = full attention, light = window; red = shown)", fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# Tokens and FLOPs vs resolution
# ---------------------------------------------------------------------------------------------


def _square_grid(side: int, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
    h, w = media.smart_resize(side, side, media.IMAGE_FACTOR, min_pixels, max_pixels)
    return 1, h // media.PATCH_SIZE, w // media.PATCH_SIZE


def tokens_vs_resolution_plot(sides: Sequence[int] | None = None, *, min_pixels: int = media.MIN_PIXELS,
                              max_pixels: int = media.MAX_PIXELS, gen2="Qwen2-VL-7B-Instruct",
                              gen25="Qwen2.5-VL-7B-Instruct", gen1="Qwen/Qwen-VL-Chat"):
    """Square images of side s px. Left: LLM tokens per image (gen 1 fixed 256 + 2; gen 2 and 2.5
    share smart_resize: (s/28)^2 + 2, flat beyond max_pixels). Right: ViT attention FLOPs (the L^2
    terms, all blocks) - gen 1 fixed at 448 px, Qwen2-VL full attention in every block, Qwen2.5-VL
    windows except its full blocks. Log scales; the max_pixels cap is marked."""
    sides = list(sides) if sides is not None else [int(s) for s in np.geomspace(56, 4480, 40)]
    tok2, fl2, fl25 = [], [], []
    for s in sides:
        g = _square_grid(s, min_pixels, max_pixels)
        tok2.append(g[1] * g[2] // 4 + 2)
        fl2.append(costs.vision_costs(g, gen2)["flops_as_configured"])
        fl25.append(costs.vision_costs(g, gen25)["flops_as_configured"])
    fl1 = costs.vision_costs((1, 32, 32), gen1)["flops_as_configured"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(sides, [media.GEN1_IMAGE_TOKENS + 2] * len(sides), color=GEN_COLORS["1"], lw=2, label="Qwen-VL (448 px, resampler)")
    a.plot(sides, tok2, color=GEN_COLORS["2"], lw=4, alpha=0.5, label="Qwen2-VL")
    a.plot(sides, tok2, color=GEN_COLORS["2.5"], lw=1.5, ls="--", label="Qwen2.5-VL (same resize)")
    a.set_ylabel("LLM tokens per image")
    b.plot(sides, [fl1] * len(sides), color=GEN_COLORS["1"], lw=2, label="Qwen-VL: 48 full blocks at 448 px")
    b.plot(sides, fl2, color=GEN_COLORS["2"], lw=2, label="Qwen2-VL: 32 full blocks")
    b.plot(sides, fl25, color=GEN_COLORS["2.5"], lw=2, label="Qwen2.5-VL: 28 window + 4 full")
    b.set_ylabel("ViT attention FLOPs (L² terms)")
    cap = int(np.sqrt(max_pixels))
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("image side (px, square image)")
        ax.grid(alpha=0.3, which="both")
        if cap <= max(sides):
            ax.axvline(cap, color="0.4", ls=":", lw=1)
            ax.text(cap, 0.02, " max_pixels", transform=ax.get_xaxis_transform(), fontsize=8, color="0.3")
        ax.legend(fontsize=8)
    a.set_title("Tokens vs resolution", fontsize=10)
    b.set_title("Vision-tower attention cost vs resolution", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Token stream
# ---------------------------------------------------------------------------------------------


def _cells(tokens: Sequence[str], kinds: Sequence[str], items: Sequence[str], collapse: int):
    """Group runs of identical visual tokens (>= collapse long) into one cell. -> [(label, kind, count)]"""
    out, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and tokens[j] == tokens[i] and items[j] == items[i]:
            j += 1
        if kinds[i] in ("image", "video") and j - i >= collapse:
            out.append((f"{tokens[i]} x{j - i}  ({items[i]})", kinds[i], j - i))
            i = j
        else:
            out.append((tokens[i].replace("\n", "\\n"), kinds[i], 1))
            i += 1
    return out


def token_stream_plot(tokens: Sequence[str], spans=None, *, title: str | None = None, width: float = 100.0,
                      collapse: int = 4, max_rows: int = 40):
    """One prompt's tokens as a flowing row of cells, coloured text / special / image / video; special
    tokens are printed by name (e.g. <|vision_start|>); a run of visual placeholders becomes a single
    cell "<|image_pad|> x391 (image 0)". `width` is the line length in character units."""
    kinds = _token_kinds(len(tokens), spans, tokens)
    items = _span_labels(len(tokens), spans)
    cells = _cells(list(tokens), kinds, items, collapse)
    placed, x, y = [], 0.0, 0
    for label, kind, count in cells:
        w = min(max(len(label), 2) + 1.2, width)
        if x + w > width and x > 0:
            x, y = 0.0, y + 1
        placed.append((x, y, w, label, kind))
        x += w + 0.4
    n_rows = min(y + 1, max_rows)
    fig, ax = plt.subplots(figsize=(12, 0.42 * n_rows + 1.3))
    for x, y, w, label, kind in placed:
        if y >= max_rows:
            break
        ax.add_patch(Rectangle((x, -y - 0.85), w, 0.8, fc=MODALITY_COLORS[kind], ec="white", alpha=0.85))
        ax.text(x + w / 2, -y - 0.45, label, ha="center", va="center", fontsize=7.5, family="monospace",
                color="white")
    ax.set_xlim(-0.5, width + 0.5)
    ax.set_ylim(-n_rows - 0.1, 0.1)
    ax.axis("off")
    counts = {k: kinds.count(k) for k in MODALITY_COLORS if k in kinds}
    ax.legend(handles=[Patch(color=MODALITY_COLORS[k], label=f"{k}: {n}") for k, n in counts.items()],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(counts), fontsize=8, frameon=False)
    ax.set_title(title or f"Token stream: {len(tokens)} tokens", fontsize=10, loc="left")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Parameters per component
# ---------------------------------------------------------------------------------------------


def parameters_plot(names: Sequence[str] | None = None):
    """Horizontal stacked bars: parameters (billions) of each published checkpoint split into vision
    tower, merger/resampler, embedding, decoder and untied lm_head."""
    names = list(names) if names is not None else [n for n in costs.preset_names() if n != "Qwen/Qwen-VL"]
    parts = ["vision tower", "merger", "resampler", "embedding", "decoder", "lm_head"]
    colors = dict(zip(parts, ["#DD8452", "#F2B880", "#F2B880", "#8C8C8C", "#4C72B0", "#937860"]))
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(names) + 1.5))
    for i, n in enumerate(names):
        c = costs.parameter_counts(n)
        left = 0.0
        for part in parts:
            v = c.get(part, 0) / 1e9
            if v:
                ax.barh(i, v, left=left, color=colors[part], edgecolor="white")
                left += v
        ax.text(left, i, f" {c['total'] / 1e9:.2f} B", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [n.split("/")[-1] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("parameters (billions)")
    ax.legend(handles=[Patch(color=colors[p], label=p if p != "merger" else "merger / resampler")
                       for p in parts if p != "resampler"], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.1 - 0.3 / len(names)), ncol=5, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Parameters per component (from the published configs)", fontsize=10)
    fig.tight_layout()
    return fig


__all__ = [
    "toy_prompt", "mrope_figure", "mrope_3d_figure", "mrope_static", "video_time_ids", "time_ids_plot",
    "vision_attention_mask", "attention_mask_plot", "tokens_vs_resolution_plot", "token_stream_plot",
    "parameters_plot", "is_special", "MODALITY_COLORS",
]
