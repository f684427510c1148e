"""Position ids for every Qwen-VL generation.

Vision side (Qwen2-VL / Qwen2.5-VL ViT):
  * `vision_position_ids`  - (row, col) per patch for the 2-D vision rotary (reference §3.2)
  * `vision_cu_seqlens`    - per-frame block-diagonal attention segments (§3.3)
  * `window_index`         - Qwen2.5-VL window-attention permutation (§3.6)

LLM side:
  * `mrope_position_ids`   - 3-D M-RoPE ids (t, h, w) for a prompt (§4.3, release semantics of §8)
  * `decode_position_ids`  - ids of generated tokens from the cache length and rope_deltas (§4.4)
  * `text_position_ids`    - plain 1-D ids for Qwen-VL gen 1 (its 256 image slots are ordinary tokens)

Everything is vectorised over patches/tokens; the only Python loops run over grids (images/videos).
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


class _Item(NamedTuple):
    """One image or video as the LLM sees it."""

    kind: str  # "image" | "video"
    t: int  # temporal patches
    lh: int  # LLM grid rows (h / merge_size)
    lw: int  # LLM grid cols
    tps: float  # time ids per second (1 for images and Qwen2-VL videos)
    spg: float  # seconds per temporal patch (1 for images and Qwen2-VL videos)

    @property
    def tokens(self) -> int:
        return self.t * self.lh * self.lw


def _items(image_grid_thw, video_grid_thw, second_per_grid_ts, tokens_per_second, merge_size):
    """Image and video queues, each in order of appearance across the batch."""
    m = merge_size
    videos = _grids(video_grid_thw)
    tps = 1.0 if tokens_per_second is None else float(tokens_per_second)
    if second_per_grid_ts is None or tokens_per_second is None:  # default 1 s per temporal patch
        seconds = [1.0] * len(videos)
    else:
        seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float64).reshape(-1).tolist()
        if len(seconds) != len(videos):
            raise ValueError(f"{len(seconds)} second_per_grid_ts for {len(videos)} videos")
    # Images have t = 1, so their time step never matters; 1 keeps Qwen2-VL's rule if t > 1.
    images = [_Item("image", t, h // m, w // m, 1.0, 1.0) for t, h, w in _grids(image_grid_thw)]
    return images, [_Item("video", t, h // m, w // m, tps, s) for (t, h, w), s in zip(videos, seconds)]


def _order_items(run_is_video: list[bool], run_lengths: list[int], images: list, videos: list) -> list:
    """Assign items to the runs of placeholder tokens, taking images and videos from their own
    queues in order (§4.3 step 2). A run may hold several items written back to back."""
    for is_video, items in ((False, images), (True, videos)):
        have = sum(n for v, n in zip(run_is_video, run_lengths) if v == is_video)
        need = sum(it.tokens for it in items)
        if have != need:
            kind = "video" if is_video else "image"
            raise ValueError(
                f"the prompt has {have} {kind} placeholder tokens but the {kind} grids need {need} "
                f"({len(items)} {kind}s); expand each pad to t*h*w/merge_size**2 tokens"
            )
    queues = {False: iter(images), True: iter(videos)}
    ordered = []
    for is_video, n in zip(run_is_video, run_lengths):
        while n > 0:  # totals match, so the queue cannot run dry here
            ordered.append(next(queues[is_video]))
            n -= ordered[-1].tokens
        if n < 0:
            it = ordered[-1]
            raise ValueError(f"a run of placeholder tokens ends inside {it.kind} (t, lh, lw) = {it[1:4]}")
    return ordered


def _frame_table(items: list[_Item]):
    """Per-frame bookkeeping in plain Python (frames are few; per-token work stays on tensors).

    Returns
      frames:  list of (time id, lw, index of the frame's first token among all placeholder tokens)
      sizes:   tokens per frame (lh * lw), same order
      firsts, lasts: index of each item's first / last token among all placeholder tokens
      widths:  per item, 1 + the largest offset any axis reaches = how far the item advances the ids
    """
    frames, sizes, firsts, lasts, widths, k = [], [], [], [], [], 0
    for it in items:
        firsts.append(k)
        # Temporal id: floor(ti * tokens_per_second * second_per_grid_t) on the float product
        # (§4.3, §7.12); ti * tps is exact, so the product is rounded once before the floor.
        times = [math.floor(ti * it.tps * it.spg) for ti in range(it.t)]
        for tt in times:
            frames.append((tt, it.lw, k))
            sizes.append(it.lh * it.lw)
            k += it.lh * it.lw
        lasts.append(k - 1)
        widths.append(max(times[-1], it.lh - 1, it.lw - 1) + 1)
    return frames, sizes, firsts, lasts, widths


def _visual_offsets(frames, sizes, K: int, device) -> torch.Tensor:
    """(t, h, w) offset of every placeholder token relative to its item's start id. -> [3, K]"""
    flat = [v for frame in frames for v in frame]  # one flat list converts much faster than tuples
    table = torch.tensor(flat, dtype=torch.long, device=device).view(-1, 3).T  # (3, F): time id, lw, first
    sizes = torch.tensor(sizes, device=device)
    out = table.repeat_interleave(sizes, dim=1, output_size=K)  # (3, K), rows overwritten below
    lw = out[1]
    idx = torch.arange(K, device=device).sub_(out[2])  # raster index inside its frame
    r = torch.div(idx, lw, rounding_mode="floor")
    out[2] = idx.addcmul_(r, lw, value=-1)  # column = idx - r * lw (lw read before row 1 is replaced)
    out[1] = r
    return out


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
    vision_start_token_id: accepted for interface compatibility; runs are found from the placeholder
                     tokens themselves (§4.3 step 2), so a `<|vision_start|>` is not required.

    Returns position_ids LongTensor[3, B, T] (rows t, h, w; padding positions hold PAD_POSITION) and
    rope_deltas LongTensor[B, 1] = max id + 1 - T, with T the *padded* length, so that a token
    written at KV-cache slot s gets position s + rope_delta (see `decode_position_ids`).
    """
    del vision_start_token_id
    B, T = input_ids.shape
    device = input_ids.device
    flat_ids = input_ids.reshape(-1)  # (B*T,)
    real = None if attention_mask is None else attention_mask.reshape(-1).bool()  # (B*T,)
    images, videos = _items(image_grid_thw, video_grid_thw, second_per_grid_ts, tokens_per_second, merge_size)

    # All placeholder tokens, row-major = order of appearance across the batch.
    is_video = flat_ids == video_token_id
    is_visual = (flat_ids == image_token_id) | is_video
    if real is not None:
        is_visual &= real
    flat_pos = torch.nonzero(is_visual).view(-1)  # (K,)
    K = flat_pos.numel()
    # Split them into runs of one modality (the only per-run data that goes back to Python).
    n_video = int((is_video & is_visual).sum())
    if 0 < n_video < K:  # both kinds present
        tok_is_video = is_video[flat_pos]  # (K,)
        cuts = (torch.nonzero(tok_is_video[1:] != tok_is_video[:-1]).view(-1) + 1).tolist()
        bounds = [0, *cuts, K]
        run_is_video = [bool(v) for v in tok_is_video[bounds[:-1]].tolist()]
        run_lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    else:
        run_is_video, run_lengths = ([n_video > 0], [K]) if K else ([], [])
    frames, sizes, firsts, lasts, widths = _frame_table(_order_items(run_is_video, run_lengths, images, videos))

    # Every token advances the running id by its "width": text 1, padding 0, and a visual item
    # 1 + its largest offset, booked on its *last* token (its other tokens 0). A token's start id
    # is then the exclusive cumulative sum of widths along its row: text gets max(previous) + 1,
    # and every token of an item gets the item's start id, to which its (t, h, w) offset is added.
    width = (real ^ is_visual if real is not None else ~is_visual).long()  # (B*T,) 1 = text, else 0
    if K:
        # Each item must be one contiguous stretch of placeholders inside one row.
        n = len(firsts)
        ends = flat_pos[torch.tensor(firsts + lasts, device=device)]  # (2N,)
        first_pos, last_pos = ends[:n], ends[n:]
        n_tok = torch.tensor([b - a for a, b in zip(firsts, lasts)], device=device)
        if bool(((last_pos - first_pos != n_tok) | (first_pos // T != last_pos // T)).any()):
            raise ValueError(
                "an image/video is not one contiguous run of placeholder tokens in one row; "
                "check the grids against the prompts"
            )
        width[last_pos] = torch.tensor(widths, device=device)
    width = width.view(B, T)
    start = torch.cumsum(width, dim=1) - width  # (B, T) exclusive cumsum = start id per token
    pos = start.view(1, -1).repeat(3, 1)  # (3, B*T): text ids are equal on all three axes
    if K:
        pos.index_add_(1, flat_pos, _visual_offsets(frames, sizes, K, device))  # + (t, h, w) offset
    if real is not None:
        pos.masked_fill_(~real, PAD_POSITION)
    rope_deltas = start[:, -1:] + width[:, -1:] - T  # (B, 1): total width = max id + 1, minus padded length
    return pos.view(3, B, T), rope_deltas


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
