"""Building blocks shared by every qvl model generation.

* `RMSNorm`                  - Qwen's RMSNorm with the reference precision order (§3.4 / §7.3)
* `rotate_half`, `apply_rotary` - half-split ("NeoX") rotary embedding (§0, §7.1)
* `KVCache`                  - preallocated per-layer key/value buffers, written in place (gpt-fast style)
* `causal_mask`, `attention` - a causal (+ key padding) mask built once per forward, and SDPA with GQA

Two ways to step through the cache. Prefill (and any call with an int `start`) reads slots [0, start+T),
so its shapes grow with the text. A *static* decode step passes `start` as a LongTensor: the write goes
to that slot with `index_copy_`, and attention reads the whole [B, n_kv, max_len, hd] buffer under a
mask built from tensors, so every step has the same shapes and the same Python control flow - what
CUDA graphs (`torch.compile(mode="reduce-overhead")`) need to replay one recording for every token.

Nothing here knows about a particular generation; the model files compose these pieces.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = weight * (x / rms(x)).

    Reference §3.4: normalise in fp32, cast back to the input dtype, *then* multiply by the weight,
    so in bf16 the multiply happens in bf16 exactly as in the checkpoints' training code.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Half-split rotation: element j pairs with j + d/2, rot(x) = concat(-x2, x1) (§0)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x' = x*cos + rot(x)*sin; cos/sin broadcast against x (last dim = head dim)."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Static key/value cache: one [B, n_kv, max_len, hd] buffer pair per decoder layer.

    `update(layer, start, k, v)` writes the new keys/values for absolute slots [start, start+T) in
    place. With an int `start` it returns views of slots [0, start+T); with a LongTensor `start`
    (a static decode step) it returns the whole buffers, whose unwritten slots the caller masks.
    Slots are absolute token indices (left padding included); the rotary *angle* of a token is decided
    by the caller's position ids, not by its slot. Nothing is reallocated while generating.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    def __len__(self) -> int:
        return len(self.k)

    def mark_static(self) -> "KVCache":
        """Tell torch.compile the buffers keep their address, so CUDA graphs may write them in place."""
        for t in self.k + self.v:
            torch._dynamo.mark_static_address(t)
        return self

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        if isinstance(start, torch.Tensor):
            # Static step: the slot is data, not a Python int, so the shapes below never change.
            # (No overflow check here: it would need the slot on the host, i.e. a sync per token.)
            slots = start.reshape(1) + torch.arange(T, device=start.device)  # (T,)
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return self.k[layer], self.v[layer]
        end = start + T
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: writing slots [{start}, {end}) into a cache of {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def causal_mask(start: int | torch.Tensor, T: int, pad_mask: torch.Tensor | None = None, device=None,
                max_len: int | None = None) -> torch.Tensor | None:
    """Boolean attention mask [B or 1, 1, T, S] (True = may attend), or None when plain causal
    SDPA suffices (`start == 0`, no padding) or no mask is needed (one query, no padding).

    int `start`: S = start + T (the keys written so far). LongTensor `start` (a static decode step):
    S = `max_len`, the whole cache, and the slots after each query are masked - they hold zeros or
    stale keys. `pad_mask` is [B, >= S] with True for real tokens (only the first S columns are used).
    Every query may always attend to *itself*: a left-padding query would otherwise see no key at all,
    its softmax would be NaN, and 0 * NaN in a later layer's p @ v would poison the real rows.
    """
    static = isinstance(start, torch.Tensor)
    if static:
        S, device = max_len, start.device
        q_pos = start.reshape(1, 1) + torch.arange(T, device=device).view(T, 1)  # (T, 1) slots of the queries
    else:
        S = start + T
        if pad_mask is None and (start == 0 or T == 1):
            return None
        q_pos = torch.arange(start, S, device=device).view(T, 1)
    k_pos = torch.arange(S, device=device).view(1, S)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if pad_mask is not None:
        keys = pad_mask[:, :S].to(device=mask.device, dtype=torch.bool)
        if keys.shape[1] < S:  # a static step with a mask narrower than the cache: later slots are real
            keys = F.pad(keys, (0, S - keys.shape[1]), value=True)
        mask = (mask & keys[:, None, None, :]) | (k_pos == q_pos)[None, None]  # (B, 1, T, S)
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              is_causal: bool) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q [B, H, T, hd], k/v [B, n_kv, S, hd]. Each kv head serves a contiguous group of H/n_kv query
    heads (repeat_interleave semantics, §4.1), which is exactly SDPA's `enable_gqa`. -> [B, H, T, hd]
    """
    n_rep = q.shape[1] // k.shape[1]
    if q.shape[2] == 1 and mask is not None:  # a masked decode step (every static one)
        return grouped_decode_attention(q, k, v, mask)
    causal = is_causal and mask is None and q.shape[2] > 1
    if n_rep > 1:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        except TypeError:  # torch < 2.5 has no enable_gqa
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One masked query row per head, written out: the query heads of a group are stacked as rows against
    their one kv head, so each cached key/value is read once (SDPA's masked kernels would repeat k/v per
    query head, or fall back to a kernel without GQA). Scores and softmax in fp32.

    q [B, H, 1, hd], k/v [B, n_kv, S, hd], mask [B or 1, 1, 1, S] -> [B, H, 1, hd]
    """
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(B, n_kv, H // n_kv, hd)  # (B, n_kv, rep, hd): head h uses kv head h // rep
    scores = (qg @ k.transpose(-1, -2)).float() * hd ** -0.5  # (B, n_kv, rep, S)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)  # mask (B|1, 1, 1, S) broadcasts
    return (probs @ v).reshape(B, H, 1, hd)
