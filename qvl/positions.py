"""Position ids for every Qwen-VL generation.

Vision side (Qwen2-VL / Qwen2.5-VL ViT):
  * `vision_position_ids`  - (row, col) per patch for the 2-D vision rotary (reference §3.2)
  * `vision_cu_seqlens`    - per-frame block-diagonal attention segments (§3.3)
  * `window_index`         - Qwen2.5-VL window-attention permutation (§3.6)

LLM side:
  * `mrope_position_ids`   - 3-D M-RoPE ids (t, h, w) for a prompt (§4.3, release semantics of §8)
  * `decode_position_ids`  - ids of generated tokens from the cache length and rope_deltas (§4.4)
  * `text_position_ids`    - plain 1-D ids for Qwen-VL gen 1 (its 256 image slots are ordinary tokens)

Everything is vectorised over patches/tokens; the only Python loops run over grids (images/videos)
(vision side) or not at all (M-RoPE).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

# Value written at padding positions (attention_mask == 0). They are masked anyway; 1 is what
# transformers 4.57 writes (v5 writes 0, reference §8), so prompts padded on the left compare equal.
PAD_POSITION = 1

def _grids(grid_thw) -> list[tuple[int, int, int]]:
    """Normalise LongTensor[N,3] / list of triples / a single triple to a list of int triples."""
    if grid_thw is None:
        return []
    if isinstance(grid_thw, torch.Tensor):
        grid_thw = grid_thw.reshape(-1, 3).tolist()
    elif len(grid_thw) == 3 and all(isinstance(v, int) for v in grid_thw):
        grid_thw = [grid_thw]
    return [(int(t), int(h), int(w)) for t, h, w in grid_thw]


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


def _merge_block_rowcol(h: int, w: int, m: int) -> torch.Tensor:
    """(row, col) of every patch of one h x w frame, in merge-block order. -> LongTensor[h*w, 2]

    Patches are listed block by block (block row, block col), and inside a block in raster order,
    which is the row order of `pixel_values` (reference §3.1) and of the vision rotary (§3.2).
    """
    br = torch.arange(h // m).view(-1, 1, 1, 1)  # block row    (h/m, 1, 1, 1)
    bc = torch.arange(w // m).view(1, -1, 1, 1)  # block col    (1, w/m, 1, 1)
    ir = torch.arange(m).view(1, 1, -1, 1)  # row in block (1, 1, m, 1)
    ic = torch.arange(m).view(1, 1, 1, -1)  # col in block (1, 1, 1, m)
    shape = (h // m, w // m, m, m)
    rows = (br * m + ir).expand(shape)
    cols = (bc * m + ic).expand(shape)
    return torch.stack([rows, cols], dim=-1).reshape(h * w, 2)  # (h/m, w/m, m, m, 2) -> (h*w, 2)


def vision_position_ids(grid_thw, merge_size: int = 2) -> torch.Tensor:
    """(row, col) position of every ViT patch, all grids concatenated. -> LongTensor[L, 2]

    L = sum(t*h*w). The same (row, col) table repeats for every temporal index of a video (§3.2).
    """
    parts = [_merge_block_rowcol(h, w, merge_size).repeat(t, 1) for t, h, w in _grids(grid_thw)]
    if not parts:
        return torch.zeros(0, 2, dtype=torch.long)
    return torch.cat(parts, dim=0)


def vision_cu_seqlens(grid_thw) -> torch.Tensor:
    """Cumulative patch counts per *frame* (temporal patch), starting at 0. -> IntTensor[F+1]

    ViT attention is block-diagonal per frame, not per image/video (§3.3): a video with t temporal
    patches contributes t segments of h*w patches each.
    """
    grids = torch.tensor(_grids(grid_thw), dtype=torch.long).reshape(-1, 3)
    seg = torch.repeat_interleave(grids[:, 1] * grids[:, 2], grids[:, 0])  # (F,) patches per frame
    cu = torch.zeros(seg.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(seg, dim=0)
    return cu


def _window_order(t: int, lh: int, lw: int, ws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window permutation of one grid over merged tokens. -> (index LongTensor[t*lh*lw], sizes LongTensor[n_windows])

    Pads the (lh, lw) token grid bottom/right up to a multiple of `ws` with a -1 sentinel, cuts it
    into ws x ws windows (raster order of windows, raster order inside a window), drops sentinels.
    The reference pads a *full* extra window when lh or lw is already divisible by ws (§3.6 quirk);
    those windows are all-sentinel, have length 0 and are removed by its unique_consecutive, so
    padding only up to the next multiple gives the same index and the same cu_window_seqlens.
    """
    nwh, nww = -(-lh // ws), -(-lw // ws)  # ceil division: windows per column / row
    padded = torch.full((t, nwh * ws, nww * ws), -1, dtype=torch.long)
    padded[:, :lh, :lw] = torch.arange(t * lh * lw).view(t, lh, lw)
    # (t, nwh, ws, nww, ws) -> (t, nwh, nww, ws, ws): windows outermost, tokens inside a window last
    windows = padded.view(t, nwh, ws, nww, ws).permute(0, 1, 3, 2, 4).reshape(t * nwh * nww, ws * ws)
    valid = windows >= 0
    return windows[valid], valid.sum(dim=1)


def window_index(
    grid_thw, window_size: int = 112, patch_size: int = 14, merge_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL window-attention order (reference §3.6).

    Returns
      index:             LongTensor[L/4]  - merged-token permutation into window order; gather the
                         hidden states in units of merge_size**2 patch rows with it, undo the order
                         after the merger with `torch.argsort(index)`.
      cu_window_seqlens: IntTensor[W+1]   - cumulative window lengths in *patch* units (x merge_size**2),
                         starting at 0, with no zero-length windows.
    """
    ws = window_size // merge_size // patch_size  # window side in merged tokens (112 // 2 // 14 = 4)
    unit = merge_size * merge_size  # patches per merged token
    indices, sizes, offset = [], [], 0
    for t, h, w in _grids(grid_thw):
        lh, lw = h // merge_size, w // merge_size
        idx, n = _window_order(t, lh, lw, ws)
        indices.append(idx + offset)  # offset by the merged tokens of earlier grids
        sizes.append(n)
        offset += t * lh * lw
    if not indices:
        return torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.int32)
    sizes = torch.cat(sizes) * unit
    cu = torch.zeros(sizes.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(sizes, dim=0)
    return torch.cat(indices), cu


# ---------------------------------------------------------------------------------------------
# LLM side: M-RoPE (Qwen2-VL / Qwen2.5-VL)
# ---------------------------------------------------------------------------------------------


class _Items(NamedTuple):
    """All images, then all videos, as the LLM sees them; each field is an array [N] over items."""

    t: np.ndarray  # temporal patches
    lh: np.ndarray  # LLM grid rows (h / merge_size)
    lw: np.ndarray  # LLM grid cols
    tps: np.ndarray  # time ids per second (1 for images and Qwen2-VL videos)
    spg: np.ndarray  # seconds per temporal patch (1 for images and Qwen2-VL videos)
    n_images: int  # items [0, n_images) are images, the rest videos

    @property
    def tokens(self) -> np.ndarray:
        return self.t * self.lh * self.lw


def _numpy(x: torch.Tensor) -> np.ndarray:
    """A tensor's values as a NumPy array: shared memory on the CPU (the common case, one cheap
    call), a copy from any other device."""
    return x.numpy() if x.device.type == "cpu" and not x.requires_grad else x.numpy(force=True)


def _grid_array(grid_thw) -> np.ndarray:
    """Grids as an int64 array [N, 3]; a tensor (on any device) converts without a Python list."""
    if isinstance(grid_thw, torch.Tensor):
        return _numpy(grid_thw).reshape(-1, 3).astype(np.int64, copy=False)
    return np.array(_grids(grid_thw), dtype=np.int64).reshape(-1, 3)


def _item_table(image_grid_thw, video_grid_thw, second_per_grid_ts, tokens_per_second, merge_size) -> _Items:
    images, videos = _grid_array(image_grid_thw), _grid_array(video_grid_thw)
    n_img, n_vid = len(images), len(videos)
    grids = np.concatenate([images, videos])  # (N, 3)
    tps, spg = np.ones((2, n_img + n_vid))  # float64 (N,) each
    if tokens_per_second is not None:  # Qwen2.5-VL: videos get a time step in seconds
        tps[n_img:] = float(tokens_per_second)
        if second_per_grid_ts is not None:  # else the default of 1 s per temporal patch
            if isinstance(second_per_grid_ts, torch.Tensor):
                second_per_grid_ts = _numpy(second_per_grid_ts)
            seconds = np.asarray(second_per_grid_ts, dtype=np.float64).reshape(-1)
            if len(seconds) != n_vid:
                raise ValueError(f"{len(seconds)} second_per_grid_ts for {n_vid} videos")
            spg[n_img:] = seconds
    # Images have t = 1, so their time step never matters; 1 keeps Qwen2-VL's rule if t > 1.
    m = merge_size
    return _Items(grids[:, 0], grids[:, 1] // m, grids[:, 2] // m, tps, spg, n_img)


def _placement_error(items: _Items, bad: np.ndarray, first, last, is_img, is_vid) -> ValueError:
    """Explain the first (leftmost) item whose placeholder tokens are not one stretch of one row."""
    i = int(np.flatnonzero(bad)[np.argmin(first[bad])])
    kind, other = ("video", is_img) if i >= items.n_images else ("image", is_vid)
    if other[first[i] : last[i] + 1].any():  # a token of the other kind cuts the item in two
        grid = (int(items.t[i]), int(items.lh[i]), int(items.lw[i]))
        return ValueError(f"a run of placeholder tokens ends inside {kind} (t, lh, lw) = {grid}")
    return ValueError(
        "an image/video is not one contiguous run of placeholder tokens in one row; "
        "check the grids against the prompts"
    )


def _time_id(ti: np.ndarray, tps: np.ndarray, spg: np.ndarray) -> np.ndarray:
    """Time id of temporal patch ti: floor(ti * tokens_per_second * second_per_grid_t) on the float
    product (§4.3, §7.12); ti * tps is exact, so the product is rounded once before the floor."""
    return np.floor(ti * tps * spg).astype(np.int64)


def _groups(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For consecutive groups of the given sizes: each member's group and its index inside the group.

    _groups([2, 3]) -> ([0, 0, 1, 1, 1], [0, 1, 0, 1, 2]); np.repeat instead of a loop over groups.
    """
    group = np.repeat(np.arange(len(sizes)), sizes)  # (M,)
    return group, np.arange(len(group)) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask: torch.Tensor | None = None,
    *,
    second_per_grid_ts=None,
    tokens_per_second: float | None = None,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    vision_start_token_id: int = 151652,
    merge_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D M-RoPE position ids of a (left-padded) prompt batch, reference §4.3 with the release
    (transformers 4.57 / official Qwen) rule of §8: text after a visual run continues at
    max(all previous ids) + 1.

    input_ids:       LongTensor[B, T] with every image/video pad already expanded to t*h*w/4 tokens.
    image_grid_thw / video_grid_thw: LongTensor[N, 3] or list of (t, h, w) in ViT patches, in order
                     of appearance across the whole batch.
    attention_mask:  [B, T], 1 = real token, 0 = padding (anywhere, typically on the left).
    tokens_per_second: None = Qwen2-VL (a video's time id advances 1 per temporal patch);
                     a number = Qwen2.5-VL (time id = floor(ti * tokens_per_second * second_per_grid_t)).
    second_per_grid_ts: per video, seconds per temporal patch (= 2 / sampled fps); default 1.0 each.
    vision_start_token_id: accepted for interface compatibility; items are found from the placeholder
                     tokens themselves (§4.3 step 2), so a `<|vision_start|>` is not required.

    Returns position_ids LongTensor[3, B, T] (rows t, h, w; padding positions hold PAD_POSITION) and
    rope_deltas LongTensor[B, 1] = max id + 1 - T, with T the *padded* length, so that a token
    written at KV-cache slot s gets position s + rope_delta (see `decode_position_ids`).

    How: an id is the running sum of the steps between neighbouring tokens (the first token of a
    row gets 0). The step out of a text token is 1 on all three axes, out of padding 0 (padding's own
    ids are replaced at the end). Inside an item the w id steps by 1 along a row, and the (t, h, w)
    offsets jump back at row and frame ends; out of an item's last token all three axes jump to
    the item's start + its extent, which is max(ids so far) + 1 for whatever follows.

    Speed: the bookkeeping is NumPy on the CPU (inputs on another device are copied over once and
    the results copied back), where an op on a few thousand small integers costs ~1 us against
    5-12 us of dispatch for a torch op. The whole batch is done at once, with per-item and per-row
    tables built by np.repeat rather than Python loops, so the number of ops does not grow with B
    or the number of images. The one op over all 3*B*T ids, the running sum, is torch's cumsum
    (~4x faster than NumPy's).
    """
    del vision_start_token_id
    B, T = input_ids.shape
    N = B * T
    ids = _numpy(input_ids).reshape(-1)  # (N,) rows back to back: "flat positions"
    real = None if attention_mask is None else _numpy(attention_mask).reshape(-1) != 0  # (N,)
    items = _item_table(image_grid_thw, video_grid_thw, second_per_grid_ts, tokens_per_second, merge_size)
    n_tok, ni = items.t * items.lh * items.lw, items.n_images  # (N_items,) placeholders per item

    # Placeholder tokens of each kind (padding excluded), in order of appearance across the batch.
    if real is not None:
        ids = np.where(real, ids, -1)  # a padding position is never a placeholder
    is_img, is_vid = ids == image_token_id, ids == video_token_id  # (N,) bool
    img_pos, vid_pos = np.flatnonzero(is_img), np.flatnonzero(is_vid)
    for kind, have, need, count in (
        ("image", len(img_pos), n_tok[:ni].sum(), ni),
        ("video", len(vid_pos), n_tok[ni:].sum(), len(n_tok) - ni),
    ):
        if have != need:
            raise ValueError(
                f"the prompt has {have} {kind} placeholder tokens but the {kind} grids need {need} "
                f"({count} {kind}s); expand each pad to t*h*w/merge_size**2 tokens"
            )

    # One buffer, two views shifted by one element (row-major, axes t, h, w):
    #   out[a, n]      the step out of flat token n on axis a (to the token after it)
    #   steps[a, b, c] the step into token (b, c), i.e. out of the token before it
    buf = np.empty(3 * N + 1, dtype=np.int64)
    out, steps = buf[1:].reshape(3, N), buf[:-1].reshape(3, B, T)
    is_text = ~(is_img | is_vid) if real is None else real & ~(is_img | is_vid)  # (N,)
    out[:2] = is_text  # t, h: 1 out of text, 0 out of padding and (for now) visual tokens
    out[2] = 1 if real is None else real  # w: 1 out of text and along an item's rows

    if len(img_pos) + len(vid_pos):
        # Items take the placeholders of their kind in order (§4.3 step 2): with the images listed
        # before the videos, item i owns vis_pos[k0[i] : k0[i] + n_tok[i]]. That must be one
        # unbroken stretch of placeholders inside one row.
        vis_pos = np.concatenate([img_pos, vid_pos])  # (K,) flat positions
        k0 = np.cumsum(n_tok) - n_tok  # (N_items,)
        first, last = vis_pos[k0], vis_pos[k0 + n_tok - 1]  # (N_items,) flat positions of the ends
        bad = (last - first != n_tok - 1) | (first // T != last // T)
        if bad.any():
            raise _placement_error(items, bad, first, last, is_img, is_vid)
        _visual_steps(out, items, first, last)

    # out-step of each row's last token = (max id + 1) - its id; saved before the next line
    # overwrites it (it is the next row's first step-into).
    last_step = out[0].reshape(B, T)[:, -1:].copy()  # (B, 1)
    steps[:, :, 0] = 0  # each row starts at 0
    pos = torch.from_numpy(steps).cumsum_(dim=2)  # (3, B, T) ids, in place: `steps` now holds them too
    rope_deltas = torch.from_numpy(steps[0, :, -1:] + last_step - T)  # (B, 1)
    if real is not None:  # NumPy's masked copy (into the same memory) beats torch's masked_fill_
        np.copyto(steps, PAD_POSITION, where=~real.reshape(B, T))
    if input_ids.device.type != "cpu":
        pos, rope_deltas = pos.to(input_ids.device), rope_deltas.to(input_ids.device)
    return pos, rope_deltas


def _visual_steps(out: np.ndarray, items: _Items, first: np.ndarray, last: np.ndarray) -> None:
    """Write the steps out of every row end and every item's last token into out [3, N].

    first / last: (N_items,) flat positions of each item's first / last token. An item's tokens run
    frame by frame, row by row: t * lh rows of lw tokens. Along a row the base steps (t 0, h 0, w 1)
    already hold; the last token of a row (and of a frame) jumps back as written below.
    """
    # Rows: R = sum of t * lh over the items (a few thousand for a batch of many images).
    item, j = _groups(items.t * items.lh)  # (R,) item of each row, row index inside the item
    lh, lw, tps, spg = items.lh[item], items.lw[item], items.tps[item], items.spg[item]
    ti, r = np.divmod(j, lh)  # (R,) frame inside the item, row inside the frame
    frame_end = r == lh - 1  # (R,) bool: the row is the last of its frame
    row_end = first[item] + (j + 1) * lw - 1  # (R,) flat position of the row's last token
    out[2, row_end] = 1 - lw  # w: back to column 0
    out[1, row_end] = 1 - lh * frame_end  # h: to the next row, or back to row 0 at a frame end
    out[0, row_end] = _time_id(ti + frame_end, tps, spg) - _time_id(ti, tps, spg)  # t: next frame's, at a frame end

    # Item ends (written last: an item's last token is a row end too). Every axis jumps from the
    # last token's id, start + (its time id, lh - 1, lw - 1), to start + extent, where the extent
    # (1 + the largest offset any axis reaches) is how far the item advances the ids.
    offset = np.stack([_time_id(items.t - 1, items.tps, items.spg), items.lh - 1, items.lw - 1])  # (3, N_items)
    extent = np.maximum(np.maximum(offset[0], offset[1]), offset[2]) + 1  # (N_items,)
    out[:, last] = extent - offset


def decode_position_ids(cache_len, rope_deltas: torch.Tensor, n: int = 1) -> torch.Tensor:
    """M-RoPE ids of the next n tokens written at KV-cache slots cache_len .. cache_len+n-1.

    After the prompt every token is text, so all three axes are equal: slot + rope_delta (§4.4).
    cache_len counts padded slots (an int, or LongTensor[B] when rows differ). -> LongTensor[3, B, n]
    """
    rope_deltas = rope_deltas.reshape(-1, 1)  # (B, 1)
    cache_len = torch.as_tensor(cache_len, dtype=torch.long, device=rope_deltas.device).reshape(-1, 1)
    steps = torch.arange(n, device=rope_deltas.device).view(1, -1)  # (1, n)
    return (cache_len + steps + rope_deltas).unsqueeze(0).expand(3, -1, -1)  # (3, B, n)


# ---------------------------------------------------------------------------------------------
# Qwen-VL gen 1: plain 1-D positions
# ---------------------------------------------------------------------------------------------


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D ids for Qwen-VL gen 1, counting real tokens only. -> LongTensor[B, T]

    Gen 1 gives its `<img>` + 256 slots + `</img>` ordinary consecutive positions, exactly like
    text (gen-1 reference §4 step 5), so no image bookkeeping is needed. The original remote code
    uses 0..T-1 regardless of padding; counting only real tokens makes a left-padded row get the
    same ids as the same prompt unpadded. Padding positions hold PAD_POSITION.
    """
    real = attention_mask.bool()
    pos = torch.cumsum(real.long(), dim=1) - 1
    return pos.masked_fill(~real, PAD_POSITION)
