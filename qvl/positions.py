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

from typing import Sequence

import torch

# Value written at padding positions (attention_mask == 0). They are masked anyway; 1 is what
# transformers 4.57 writes (v5 writes 0, reference §8), so prompts padded on the left compare equal.
PAD_POSITION = 1

GridLike = "torch.Tensor | Sequence[Sequence[int]]"


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
