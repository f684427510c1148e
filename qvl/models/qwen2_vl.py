"""Qwen2-VL in plain PyTorch: a ViT with 2-D rotary, a 2x2 patch merger, and a Qwen2 decoder with M-RoPE.

Paper: "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at Any Resolution"
(arXiv:2409.12191). Behaviour follows transformers' models/qwen2_vl/modeling_qwen2_vl.py (4.57),
as described in the project reference notes (shared/reference/qwen2_qwen25_qwen3_vl.md) §3-§4, cited as §n below. Read top to bottom:

  Capture            opt-in recording of attention maps / hidden states ("looking inside")
  vision tower       PatchEmbed -> VisionAttention / VisionMLP -> VisionBlock -> PatchMerger -> VisionTransformer
  language model     mrope_cos_sin -> Attention / MLP -> DecoderLayer -> Qwen2Model
  Qwen2VL            glue: embed() scatters vision features into the token embeddings, forward() -> logits

Module and parameter names equal the Hub checkpoint names (`visual.*`, `model.*`, `lm_head`), so
loading is a plain name match; the only tensor transform is the patch embedding (see PatchEmbed).
Position ids are *inputs*: the caller computes them with `qvl.positions` (no state in the modules).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import positions
from ..config import Qwen2VLConfig, TextConfig, VisionConfig
from .layers import KVCache, RMSNorm, apply_rotary, attention, causal_mask

try:  # fast path for the vision tower on CUDA; everything works without it
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - not installed on CPU machines
    flash_attn_varlen_func = None


# ---------------------------------------------------------------------------------------------
# Looking inside
# ---------------------------------------------------------------------------------------------


@dataclass
class Capture:
    """What to record during a forward; pass the same object to `embed` and `forward` (and to every
    decode step: results are appended per call). With no Capture, the model runs SDPA only.

    Decoder attention is recomputed explicitly (fp32 softmax of q·kᵀ over *all* keys, so the rows are
    true attention probabilities) for the chosen layers, heads and query rows only, and then cut to
    `key_span` (absolute cache slots, e.g. the image tokens).
    """

    layers: Sequence[int] = ()  # decoder layers whose attention is recorded
    heads: Sequence[int] | None = None  # query heads to keep (None = all)
    key_span: tuple[int, int] | None = None  # key slots [a, b) to keep (None = all keys)
    query_rows: tuple[int, int] | None = None  # rows [a, b) of the tokens being computed (None = all)
    hidden_layers: Sequence[int] = ()  # record the output hidden state of these decoder layers
    vision_block: int | None = None  # ViT block whose attention to record ...
    vision_segment: int = 0  # ... within this segment (frame for full attention, window for windowed)
    # results
    attn: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))  # layer -> [B, h, Tq, Tk] per call
    hidden: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))  # layer -> [B, T, H] per call
    vision: list[dict] = field(default_factory=list)  # per ViT call: attn [h, Ls, Ls], rows (patch indices), block, segment

    def record_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, start: int,
                         mask: torch.Tensor | None) -> None:
        """q [B, H, T, hd] (already rotated), k [B, n_kv, S, hd] (all keys so far)."""
        H, T, S = q.shape[1], q.shape[2], k.shape[2]
        heads = list(range(H)) if self.heads is None else list(self.heads)
        r0, r1 = self.query_rows or (0, T)
        r0, r1 = max(r0, 0), min(r1, T)
        n_rep = H // k.shape[1]
        qs = q[:, heads, r0:r1].float()  # (B, h, Tq, hd)
        ks = k[:, [h // n_rep for h in heads]].float()  # (B, h, S, hd): kv head serving each query head
        scores = qs @ ks.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, h, Tq, S)
        if mask is None:  # plain causal: query row r (slot start+r) sees keys <= start+r
            q_pos = torch.arange(start + r0, start + r1, device=q.device).view(-1, 1)
            allowed = torch.arange(S, device=q.device).view(1, -1) <= q_pos
        else:
            allowed = mask[:, :, r0:r1]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        a, b = self.key_span or (0, S)
        self.attn[layer].append(probs[..., a:b].detach())


# ---------------------------------------------------------------------------------------------
# Vision tower (§3)
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """One Linear over flattened 3x2x14x14 patches (§3.1).

    The checkpoint stores a Conv3d weight [D, 3, 2, 14, 14] with kernel == stride, which is exactly a
    matrix product with the weight flattened to [D, 1176]; qvl stores the flattened weight (a GEMM is
    never slower, while cuDNN's Conv3d can be pathologically slow, style ref B.2). The reshape happens
    in qvl/checkpoint.py (load and save), nowhere else.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # cast pixels to the tower's dtype *before* the projection, as the reference does (§3.1)
        return self.proj(pixel_values.to(self.proj.weight.dtype))  # (L, 1176) -> (L, D)


def vision_rotary(pos: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """2-D rotary tables for patches at (row, col) = pos [L, 2] -> fp32 cos, sin [L, head_dim] (§3.2).

    d/4 frequencies; the angle vector is [row * inv_freq | col * inv_freq] (length d/2), duplicated
    for the half-split rotation. Kept in fp32: the vision rotation runs in fp32 (§7.2).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=pos.device) / half))
    angles = (pos.float()[:, :, None] * inv_freq).flatten(1)  # (L, 2, d/4) -> (L, d/2)
    emb = torch.cat((angles, angles), dim=-1)  # (L, d)
    return emb.cos(), emb.sin()


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [L, heads, d] rotated in fp32 and cast back (§3.2)."""
    return apply_rotary(x.float(), cos[:, None], sin[:, None]).to(x.dtype)


class Segments:
    """Block-diagonal attention layout from `cu_seqlens`, prepared once per tower forward.

    Never a sequence x sequence mask (style ref B.2): segments of equal length (all frames of one
    image or video, all full windows) are stacked and run as one batched SDPA per length; with
    flash-attn on CUDA the packed sequence goes to one varlen call instead.
    """

    def __init__(self, cu_seqlens: torch.Tensor, device):
        cu = cu_seqlens.tolist()  # a CPU tensor from qvl.positions: no device sync
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        self.cu_list = cu
        self.cu = cu_seqlens.to(device=device, dtype=torch.int32)
        self.max_len = max(lengths, default=0)
        by_len: dict[int, list[int]] = defaultdict(list)
        for a, n in zip(cu[:-1], lengths):
            if n > 0:
                by_len[n].append(a)
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        for n, starts in sorted(by_len.items()):
            if len(by_len) == 1:  # one length: the rows are already [n_seg, n] in order, a view suffices
                self.groups.append((n, None))
            else:
                idx = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(n)  # (n_seg, n)
                self.groups.append((n, idx.to(device)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [L, heads, d] -> [L, heads, d], attention only within each segment, no causal mask."""
        if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return flash_attn_varlen_func(q, k, v, self.cu, self.cu, self.max_len, self.max_len)
        out = torch.empty_like(q) if any(idx is not None for _, idx in self.groups) else None
        for n, idx in self.groups:
            # (L, h, d) -> (n_seg, n, h, d) -> (n_seg, h, n, d)
            qs, ks, vs = ((x.view(-1, n, *x.shape[1:]) if idx is None else x[idx]).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)  # (n_seg, n, h, d)
            if idx is None:
                return o.reshape(q.shape)
            out[idx] = o
        return out


class VisionAttention(nn.Module):
    """Bidirectional attention within each segment, fused qkv with bias, 2-D rotary (§3.3)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)  # output rows [q | k | v], head-major
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def forward(self, x, cos, sin, segments: Segments, capture: dict | None = None):
        L, D = x.shape
        q, k, v = self.qkv(x).view(L, 3, self.num_heads, -1).unbind(1)  # 3 x (L, h, d)
        q, k = apply_vision_rotary(q, cos, sin), apply_vision_rotary(k, cos, sin)
        if capture is not None:  # explicit softmax for one segment only
            a, b = segments.cu_list[capture["segment"]], segments.cu_list[capture["segment"] + 1]
            qs, ks = q[a:b].float().transpose(0, 1), k[a:b].float().transpose(0, 1)  # (h, Ls, d)
            capture["attn"] = ((qs @ ks.transpose(1, 2)) * qs.shape[-1] ** -0.5).softmax(-1).detach()
        return self.proj(segments.attend(q, k, v).reshape(L, D))


class QuickGELU(nn.Module):
    def forward(self, x):
        # CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x) (§3.4), with one [L, mlp] buffer
        # instead of the one-liner's three: the sigmoid runs in place on the fresh 1.702 x, and when no
        # graph is being recorded the product does too (autograd would need the sigmoid's output intact).
        # At 1008^2 that takes 106 MB off each Qwen2-VL ViT block's peak.
        gate = (1.702 * x).sigmoid_()
        return x * gate if x.requires_grad else gate.mul_(x)


class VisionMLP(nn.Module):
    """fc1 -> QuickGELU -> fc2, with biases (§3.4)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.act = QuickGELU() if cfg.hidden_act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class VisionBlock(nn.Module):
    """Pre-norm residual block; the norm and MLP are parameters so Qwen2.5-VL can reuse it (§3.4)."""

    def __init__(self, cfg: VisionConfig, norm=layer_norm, mlp=VisionMLP):
        super().__init__()
        self.norm1 = norm(cfg.dim)
        self.attn = VisionAttention(cfg)
        self.norm2 = norm(cfg.dim)
        self.mlp = mlp(cfg)

    def forward(self, x, cos, sin, segments: Segments, capture: dict | None = None):
        x = x + self.attn(self.norm1(x), cos, sin, segments, capture)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm each patch, concatenate each 2x2 block (4 consecutive rows, §3.1 order), MLP to the LLM width (§3.5)."""

    def __init__(self, cfg: VisionConfig, norm=layer_norm):
        super().__init__()
        self.unit = cfg.spatial_merge_size**2
        self.ln_q = norm(cfg.dim)
        wide = cfg.dim * self.unit
        # indices 0 / 2 match the checkpoint's nn.Sequential names; GELU is the exact (erf) one (§7.7)
        self.mlp = nn.Sequential(nn.Linear(wide, wide), nn.GELU(), nn.Linear(wide, cfg.out_dim))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, x.shape[-1] * self.unit))  # (L, D) -> (L/4, 4D) -> (L/4, H)


def _vision_probe(capture: Capture | None, order: torch.Tensor, segments: Segments) -> dict | None:
    """A per-call record for the chosen ViT block; `rows` = original patch indices of the segment."""
    if capture is None or capture.vision_block is None:
        return None
    s = capture.vision_segment
    a, b = segments.cu_list[s], segments.cu_list[s + 1]
    probe = {"block": capture.vision_block, "segment": s, "rows": order[a:b], "segment_cu": (a, b)}
    capture.vision.append(probe)
    return probe


class VisionTransformer(nn.Module):
    """pixel_values [L, 1176] + grid_thw [N, 3] -> merged features [L/4, H] in placeholder-token order."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw, capture: Capture | None = None) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        pos = positions.vision_position_ids(grid_thw, self.cfg.spatial_merge_size).to(x.device)
        cos, sin = vision_rotary(pos, self.cfg.head_dim)
        segments = Segments(positions.vision_cu_seqlens(grid_thw), x.device)  # one segment per frame (§3.3)
        probe = _vision_probe(capture, torch.arange(x.shape[0]), segments)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments, probe if probe and i == capture.vision_block else None)
        return self.merger(x)


# ---------------------------------------------------------------------------------------------
# Language model (§4)
# ---------------------------------------------------------------------------------------------


def mrope_cos_sin(pos: torch.Tensor, cfg: TextConfig, dtype: torch.dtype):
    """M-RoPE tables for positions [3, B, T] -> cos, sin [B, T, head_dim] in `dtype` (§4.2).

    Angles are formed in fp32 for all three axes; frequency j takes its angle from axis k mod 3
    where k is the mrope_section chunk containing j (t | h | w contiguous). Cast to the model dtype
    only at the end: the LLM rotation itself runs in the model dtype, unlike the ViT's (§7.2).
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=pos.device) / hd))
    freqs = pos.float()[..., None] * inv_freq  # (3, B, T, hd/2)
    axis = torch.repeat_interleave(torch.arange(len(cfg.mrope_section), device=pos.device) % 3,
                                   torch.tensor(cfg.mrope_section, device=pos.device))  # (hd/2,) in {0,1,2}
    sel = freqs.gather(0, axis.expand(1, *freqs.shape[1:3], -1))[0]  # (B, T, hd/2)
    emb = torch.cat((sel, sel), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    """Causal GQA with q/k/v bias, no o_proj bias, M-RoPE, static KV cache (§4.1)."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start: int, capture: Capture | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None], sin[:, None])
        if cache is not None:  # (B, nkv, start+T, hd); the whole cache (max_len slots) when start is a tensor
            k, v = cache.update(self.layer_idx, start, k, v)
        if capture is not None:
            capture.record_attention(self.layer_idx, q, k, start, mask)
        y = attention(q, k, v, mask, is_causal=True)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The decoder's has no biases; Qwen2.5-VL's ViT reuses it
    with biases (§3.4)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.requires_grad:  # autograd keeps silu's input and both factors of the product
            return self.down_proj(F.silu(gate) * up)
        # inference: silu and the product in place, one [.., hidden] buffer fewer at the peak (126 MB per
        # Qwen2.5-VL ViT block at 1344^2; the decoder's prefill gains the same way)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, cache, start, capture=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, capture)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """The Qwen2 decoder stack (checkpoint prefix `model.`), embeddings in, final-normed hidden states out."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache, start, capture: Capture | None = None):
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, start, capture if capture and i in capture.layers else None)
            if capture is not None and i in capture.hidden_layers:
                capture.hidden[i].append(h.detach())
        return self.norm(h)


# ---------------------------------------------------------------------------------------------
# The vision-language model
# ---------------------------------------------------------------------------------------------


class Qwen2VL(nn.Module):
    generation = "2"
    vision_tower = VisionTransformer  # Qwen2.5-VL swaps in its windowed tower

    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        self.visual = self.vision_tower(config.vision)
        self.model = Qwen2Model(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:  # 2B / 3B share the input and output embedding (§2.1)
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, capture: Capture | None = None) -> torch.Tensor:
        """Token embeddings [B, T, H] with the vision features in the placeholder rows (§6.1-2).

        Images (all of them, in order of appearance across the batch) are encoded in one tower call,
        videos in another; the features fill the image / video placeholder rows in row-major [B, T] order.
        """
        x = self.model.embed_tokens(input_ids)
        for pixels, grid, token, what in ((pixel_values, image_grid_thw, self.config.image_token_id, "image"),
                                          (pixel_values_videos, video_grid_thw, self.config.video_token_id, "video")):
            if pixels is None:
                continue
            feats = self.visual(pixels.to(x.device), grid, capture).to(x.dtype)  # (sum t*h*w/4, H)
            slots = input_ids == token
            n = int(slots.sum())
            if n != feats.shape[0]:
                raise ValueError(f"{n} {what} placeholder tokens in input_ids but the {what} grids give "
                                 f"{feats.shape[0]} features")
            x = x.masked_scatter(slots[..., None], feats)
        return x

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                pad_mask: torch.Tensor | None = None, capture: Capture | None = None,
                last_only: bool = False) -> torch.Tensor:
        """embeds [B, T, H], positions [3, B, T] (M-RoPE t/h/w ids) -> logits [B, T, V] (or [B, 1, V] if last_only).

        cache/start: write keys and values for slots [start, start+T) and attend to slots [0, start+T).
        pad_mask [B, >= start+T] (True = real token) masks left padding. Without a cache, start must be 0.
        A LongTensor `start` is a static decode step (same shapes every token, for CUDA graphs): attention
        runs over all cache.max_len slots under a mask, and pad_mask should then span the cache.
        """
        static = isinstance(start, torch.Tensor)
        if cache is None and (static or start != 0):
            raise ValueError("start > 0 needs a KVCache holding the earlier tokens")
        cos, sin = mrope_cos_sin(positions.to(embeds.device), self.config.text, embeds.dtype)
        mask = causal_mask(start, embeds.shape[1], pad_mask, embeds.device, max_len=cache.max_len if static else None)
        h = self.model(embeds, cos, sin, mask, cache, start, capture)
        if last_only:  # generation only needs the next-token distribution: skip the [T, V] projection
            h = h[:, -1:]
        return self.lm_head(h)

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        w = self.lm_head.weight
        t = self.config.text
        return KVCache(t.num_hidden_layers, batch_size, t.num_key_value_heads, max_len, t.head_dim,
                       device=device or w.device, dtype=dtype or w.dtype)
