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


def _visual_tokens(
    is_tok: torch.Tensor,
    grids: list[tuple[int, int, int]],
    tps: float,
    seconds: list[float],
    merge_size: int,
    kind: str,
):
    """Locate every placeholder token of one modality and its (t, h, w) offset inside its item.

    is_tok: BoolTensor[B*T] (row-major), True at this modality's real placeholder tokens.
    Items are taken in order of appearance across the whole batch (§4.3 step 2), so the k-th
    placeholder in row-major order belongs to the item whose cumulative token range contains k.

    Item i's time id advances tps * seconds[i] per temporal patch (tokens_per_second *
    second_per_grid_t; 1 * 1 for images and Qwen2-VL videos).

    Returns, K placeholder tokens, N items:
      flat_pos [K]           row-major position of each placeholder token
      item [K]               item it belongs to
      offsets [3, K]         its (t, h, w) id relative to the item's start id
      first_pos, last_pos [N] row-major position of each item's first / last token
      width [N]              1 + the largest offset any axis reaches = how far the item advances the ids
    """
    device = is_tok.device
    flat_pos = is_tok.nonzero().squeeze(1)  # (K,) row-major positions
    g = torch.tensor(grids, dtype=torch.long, device=device).reshape(-1, 3)
    t, lh, lw = g[:, 0], g[:, 1] // merge_size, g[:, 2] // merge_size
    counts = t * lh * lw  # (N,) LLM tokens per item
    if int(counts.sum()) != flat_pos.numel():
        raise ValueError(
            f"{kind}: the prompt has {flat_pos.numel()} placeholder tokens but the grids need "
            f"{int(counts.sum())} ({len(grids)} {kind}s); expand each pad to t*h*w/{merge_size**2} tokens"
        )
    n = len(grids)
    item = torch.repeat_interleave(torch.arange(n, device=device), counts)  # (K,) item of each token
    starts = torch.cumsum(counts, 0) - counts  # (N,) index of each item's first token among the K
    offset = torch.arange(flat_pos.numel(), device=device) - starts[item]  # (K,) rank inside its item
    frame = lh * lw
    ti, rem = offset // frame[item], offset % frame[item]
    r, c = rem // lw[item], rem % lw[item]
    # Temporal id: floor(ti * tokens_per_second * second_per_grid_t) on the float product (§4.3,
    # §7.12). ti * tps is exact in float64, so the product is rounded once before the floor.
    spg = torch.tensor(seconds, dtype=torch.float64, device=device)  # (N,)
    tt = torch.floor(ti.double() * tps * spg[item]).long()
    t_ext = torch.floor((t - 1).double() * tps * spg).long()
    width = torch.maximum(t_ext, torch.maximum(lh, lw) - 1) + 1  # (N,)
    first_pos = flat_pos[starts]
    last_pos = flat_pos[starts + counts - 1]
    return flat_pos, item, torch.stack([tt, r, c]), first_pos, last_pos, width


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
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    flat_ids, flat_real = input_ids.reshape(-1), real.reshape(-1)  # (B*T,)

    # Each token/item is a "unit" that advances the running id by its width: a text token by 1, a
    # visual item by 1 + its largest offset (so the next unit starts at max + 1), padding by 0.
    # A unit's start id is then the exclusive cumulative sum of widths along its row.
    width = flat_real.long().clone()  # (B*T,)
    visual = []
    video_grids = _grids(video_grid_thw)
    if second_per_grid_ts is None or tokens_per_second is None:  # Qwen2-VL: 1 per temporal patch
        video_seconds = [1.0] * len(video_grids)
    else:
        video_seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float64).reshape(-1).tolist()
        if len(video_seconds) != len(video_grids):
            raise ValueError(f"{len(video_seconds)} second_per_grid_ts for {len(video_grids)} videos")
    video_tps = 1.0 if tokens_per_second is None else float(tokens_per_second)
    # Images have t = 1, so their time step never matters; 1 keeps Qwen2-VL's rule if t > 1.
    for tok, grids, tps, seconds, kind in (
        (image_token_id, _grids(image_grid_thw), 1.0, None, "image"),
        (video_token_id, video_grids, video_tps, video_seconds, "video"),
    ):
        is_tok = (flat_ids == tok) & flat_real
        if not grids:
            if bool(is_tok.any()):
                raise ValueError(f"{kind} placeholder tokens found but no {kind}_grid_thw given")
            continue
        seconds = seconds if seconds is not None else [1.0] * len(grids)
        flat_pos, item, offsets, first_pos, last_pos, item_width = _visual_tokens(
            is_tok, grids, tps, seconds, merge_size, kind
        )
        if bool((first_pos // T != last_pos // T).any()):
            raise ValueError(f"an {kind} spans two batch rows; check the grids against the prompts")
        width[flat_pos] = 0
        width[first_pos] = item_width
        visual.append((flat_pos, item, offsets, first_pos))

    width = width.view(B, T)
    start = torch.cumsum(width, dim=1) - width  # (B, T) start id of the unit at each token
    pos = start.reshape(1, -1).repeat(3, 1)  # (3, B*T): text ids are equal on all three axes
    flat_start = start.reshape(-1)
    for flat_pos, item, offsets, first_pos in visual:
        pos[:, flat_pos] = flat_start[first_pos][item] + offsets  # item start + (t, h, w) offset
    pos[:, ~flat_real] = PAD_POSITION
    rope_deltas = width.sum(dim=1, keepdim=True) - T  # (B, 1): (max id + 1) - padded length
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
