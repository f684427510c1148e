"""Qwen-VL (first generation, 2023) in plain PyTorch, readable top to bottom.

Paper: "Qwen-VL: A Versatile Vision-Language Model ..." (arXiv 2308.12966). The released model was remote
code on the Hugging Face Hub (`visual.py` + `modeling_qwen.py` in Qwen/Qwen-VL, Qwen/Qwen-VL-Chat); there is
no transformers class. Section numbers (§) refer to /work/shared/reference/qwen_vl_gen1_and_qwen_vl_utils.md.

    image [N,3,448,448] -> ViT-bigG (48 pre-LN blocks, no CLS)      -> [N,1024,1664]
                        -> Resampler: 256 learned queries attend once -> [N,256,4096]
                        -> ln_post, @ proj                          -> 256 LLM embeddings per image
    ids [B,T] -> wte, image features overwrite the 256 slots between <img> and </img> (§4)
              -> Qwen-7B decoder (RMSNorm, RoPE with dynamic NTK + log-n, SwiGLU) -> lm_head -> logits

Module names equal the official checkpoint keys (`transformer.visual.*`, `transformer.h.N.*`, `lm_head`),
so loading needs no key remapping.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.checkpoint import CheckpointError, assign_weights, on_meta, open_safetensors_dir, write_safetensors
from qvl.models.layers import KVCache, RMSNorm, apply_rotary, attention, causal_mask
from qvl.models.qwen2_vl import Capture  # the same opt-in recorder as Qwen2-VL
from qvl.tokenizer_qwen_vl import SPECIAL_TOKENS

# ----------------------------------------------------------------------------------------------------------
# Config (§2.1, §5.1). Field names are the official config.json names, so from/to JSON is a dict filter.


@dataclass
class VisionConfig:
    """The `visual` section of the official config.json (§2.1)."""

    image_size: int = 448          # square input; the paper's stage 1 ran at 224 (§8.1)
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16                # head_dim 104
    mlp_ratio: float = 4.9231      # MLP hidden = int(width * mlp_ratio) = 8192
    output_dim: int = 4096         # = LLM hidden size
    image_start_id: int = 151857   # <img>; </img> = +1, <imgpad> = +2 (§3.2)
    n_queries: int = 256           # Resampler queries, a square grid (constructor default, not in the config)
    pos_grid: int = 16             # side of the learned ViT position table (qvl field; 16 = stage-1 224 px grid)

    @property
    def grid(self) -> int:         # patches per side
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def resampler_heads(self) -> int:  # §2.1: output_dim // 128, head_dim 128
        return max(self.output_dim // 128, 1)


@dataclass
class TextConfig:
    """The LLM part of config.json, flat at the top level of the file (§5.1)."""

    vocab_size: int = 151936       # tokenizer has 151860 entries; rows above are padding (§3.2)
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128         # head_dim
    intermediate_size: int = 22016  # w1 and w2 are each half of this wide (§5.1)
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    seq_length: int = 2048         # threshold for dynamic NTK and log-n (§5.3)
    max_position_embeddings: int = 8192  # present in the file, unused by the math
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.rotary_pct != 1.0:  # every released checkpoint rotates the full head (§5.1)
            raise NotImplementedError(f"rotary_pct={self.rotary_pct}: qvl implements rotary_pct == 1.0 only")

    @property
    def ffn_dim(self) -> int:
        return self.intermediate_size // 2


@dataclass
class QwenVLConfig:
    """LLM + vision config; `from_hf` / `to_hf` read and write the official config.json."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    @classmethod
    def from_hf(cls, d: dict) -> "QwenVLConfig":
        """Official config.json dict -> config; unknown keys are ignored, missing keys take the defaults."""
        pick = lambda dc, src: dc(**{f.name: src[f.name] for f in fields(dc) if f.name in src})  # noqa: E731
        return cls(text=pick(TextConfig, d), vision=pick(VisionConfig, d.get("visual", {})))

    def to_hf(self) -> dict:
        """Config -> a config.json dict in the official layout (LLM keys flat, vision under `visual`)."""
        visual = asdict(self.vision)
        for name in ("n_queries", "pos_grid"):  # not in the official file: written only when non-default
            if visual[name] == getattr(VisionConfig, name):
                del visual[name]
        return {
            "architectures": ["QWenLMHeadModel"],
            "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
            "model_type": "qwen",
            **asdict(self.text),
            "no_bias": True, "tie_word_embeddings": False, "scale_attn_weights": True,
            "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "use_cache": True,
            "bf16": False, "fp16": False, "fp32": False,
            "visual": visual,
        }

    @classmethod
    def from_name(cls, name: str) -> "QwenVLConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown Qwen-VL preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_hf(PRESETS[name])


# Published checkpoints as data (config.json of huggingface.co/Qwen/Qwen-VL and /Qwen-VL-Chat, §2.1, §5.1).
# Both share one architecture; they differ in training stage (§8.1) and in generation_config.json (§6.3).
_QWEN_VL_7B = {
    "vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "kv_channels": 128, "intermediate_size": 22016, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "seq_length": 2048, "max_position_embeddings": 8192,
    "use_dynamic_ntk": True, "use_logn_attn": True, "initializer_range": 0.02,
    "visual": {"image_size": 448, "patch_size": 14, "width": 1664, "layers": 48, "heads": 16,
               "mlp_ratio": 4.9231, "output_dim": 4096, "image_start_id": 151857},
}
PRESETS = {"Qwen/Qwen-VL": _QWEN_VL_7B, "Qwen/Qwen-VL-Chat": _QWEN_VL_7B}

# generation_config.json per preset (§6.3). Qwen-VL-Chat's top_p: 0.3 per the bf16 file (the Int4 file says
# 0.5, §11). Base Qwen-VL's file is not verified: "raw" format, stop on <|endoftext|> (§6.2), greedy.
GENERATION_CONFIGS = {
    "Qwen/Qwen-VL-Chat": {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
                          "stop_words_ids": [[151645], [151644]], "max_window_size": 6144,
                          "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.3},
    "Qwen/Qwen-VL": {"chat_format": "raw", "eos_token_id": 151643, "pad_token_id": 151643,
                     "stop_words_ids": [[151643]], "max_window_size": 6144,
                     "max_new_tokens": 512, "do_sample": False},
}


# ----------------------------------------------------------------------------------------------------------
# Vision side: position tables (§2.3, §2.5)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE 1-D table: [sin(p*w_0..w_{D/2-1}), cos(p*w_0..)], w_d = 10000^(-d/(D/2)), float32. pos [M] -> [M, dim]"""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim / 2))
    angles = pos.float()[:, None] * omega[None, :]                     # (M, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)              # (M, D)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D table for a grid x grid map, token k = row*grid + col -> [grid^2, dim].

    §2.5 / §10.3: the *column* (x) encoding comes first, the row second, each half dim/2 wide.
    """
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (g, g) each
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)


def resize_pos_table(table: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """`get_abs_pos` (§2.3): a square [L, C] table -> [n_tokens, C], bicubic, align_corners=False, in fp32.

    Used twice: the ViT's learned 16x16 table -> the patch grid, and the Resampler's sin-cos table -> keys.
    """
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(n_tokens))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)                      # (1, C, src, src)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)   # (1, C, tgt, tgt)
    return grid.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).to(table.dtype)             # (tgt^2, C)


# ----------------------------------------------------------------------------------------------------------
# Vision side: ViT blocks (§2.4)


class VisualAttention(nn.Module):
    """Bidirectional multi-head self-attention with the checkpoint's per-head interleaved qkv (§2.4).

    `in_proj` keeps the checkpoint layout: its 3*width outputs are (heads, [q|k|v], head_dim), i.e. each
    head owns one contiguous 3*head_dim slice (Megatron style), *not* [all q | all k | all v] as in
    nn.MultiheadAttention. Keeping the stored layout means weights load as-is; the forward de-interleaves
    with a free view instead of permuting rows at load time.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, probe: dict | None = None) -> torch.Tensor:   # x (N, L, W)
        N, L, W = x.shape
        qkv = self.in_proj(x).view(N, L, self.heads, 3, self.head_dim)   # per-head [q|k|v]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)                   # each (N, heads, L, hd)
        y = F.scaled_dot_product_attention(q, k, v)                      # no mask in the ViT; scale 1/sqrt(hd)
        if probe is not None:                                            # explicit fp32 softmax, one image only
            qi, ki = q[probe["segment"]].float(), k[probe["segment"]].float()
            probe["attn"] = (qi @ ki.transpose(-1, -2) * self.head_dim ** -0.5).softmax(-1).detach()  # (h, L, L)
        return self.out_proj(y.transpose(1, 2).reshape(N, L, W))


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))                       # exact (erf) GELU, §2.4


class VisualBlock(nn.Module):
    """Pre-LN residual block, no layer scale, no drop-path (§2.4). All visual LayerNorms use eps 1e-6."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = VisualAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = VisualMLP(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, probe: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), probe)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------------
# Vision side: the Resampler, the "position-aware VL adapter" (§2.5)


class PackedCrossAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names and packing ([Wq; Wk; Wv] rows),
    written out so the math is visible. q (N, Lq, E), k/v (N, Lk, E) -> (N, Lq, E)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (N, L, E) -> (N, h, L, hd)  # noqa: E731
        q, k, v = split(F.linear(q, wq, bq)), split(F.linear(k, wk, bk)), split(F.linear(v, wv, bv))
        y = F.scaled_dot_product_attention(q, k, v)                      # (N, h, Lq, hd)
        return self.out_proj(y.transpose(1, 2).flatten(2))


class Resampler(nn.Module):
    """One cross-attention layer: n_queries learned queries read the ViT tokens (§2.5).

    The fixed 2-D sin-cos table is added to the queries (at its own grid) and to the keys (resized to the
    patch grid), never to the values. `pos_embed` is not trained but lives in the checkpoint, so it is a
    persistent buffer.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        E, grid = cfg.output_dim, int(math.isqrt(cfg.n_queries))
        if grid * grid != cfg.n_queries:
            raise ValueError(f"n_queries={cfg.n_queries} must be a square (the queries form a grid, §2.5)")
        self.query = nn.Parameter(torch.zeros(cfg.n_queries, E))
        device = torch.get_default_device()
        with torch.device("cpu"):  # on the meta device (checkpoint.on_meta) arange takes a slow reference path;
            table = sincos_2d(E, grid)  # a checkpoint buffer, so loading replaces it anyway
        self.register_buffer("pos_embed", table.to(device))             # (n_queries, E)
        self.kv_proj = nn.Linear(cfg.width, E, bias=False)
        self.attn = PackedCrossAttention(E, cfg.resampler_heads)
        self.ln_q = nn.LayerNorm(E, eps=1e-6)
        self.ln_kv = nn.LayerNorm(E, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                # x (N, L, width)
        pos = self.pos_embed.to(x.dtype)
        kv = self.ln_kv(self.kv_proj(x))                                 # (N, L, E)
        q = (self.ln_q(self.query) + pos).expand(x.shape[0], -1, -1)     # (N, n_queries, E), 16x16 table as is
        k = kv + resize_pos_table(pos, x.shape[1])                       # keys: table resized to the patch grid
        return self.attn(q, k, kv)                                       # values: no position term


class VisionTransformer(nn.Module):
    """`transformer.visual`: patchify -> + resized learned positions -> ln_pre -> blocks -> Resampler ->
    ln_post -> @ proj (§2.6). images (N, 3, S, S), CLIP-normalised -> (N, n_queries, output_dim)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.pos_grid ** 2, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=1e-6)
        self.transformer = nn.ModuleDict(dict(resblocks=nn.ModuleList(VisualBlock(cfg) for _ in range(cfg.layers))))
        self.attn_pool = Resampler(cfg)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(cfg.output_dim, cfg.output_dim))  # [in, out]

    def forward(self, images: torch.Tensor, capture=None) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))               # (N, W, g, g)
        x = x.flatten(2).transpose(1, 2)                                 # (N, g*g, W), token = row*g + col
        x = x + resize_pos_table(self.positional_embedding, x.shape[1])
        x = self.ln_pre(x)
        probe = None
        if capture is not None and capture.vision_block is not None:    # Capture.vision_segment = image index
            probe = {"block": capture.vision_block, "segment": capture.vision_segment}
            capture.vision.append(probe)
        for i, block in enumerate(self.transformer.resblocks):
            x = block(x, probe if i == capture.vision_block else None) if probe else block(x)
        x = self.attn_pool(x)                                            # (N, n_queries, E)
        return self.ln_post(x) @ self.proj                               # no bias; output is in LLM space


# ----------------------------------------------------------------------------------------------------------
# Decoder: Qwen-7B (§5)


def ntk_alpha(seq_len: int, threshold: int) -> float:
    """Dynamic-NTK factor (§5.3): alpha = max(2^ceil(log2(L / threshold) + 1) - 1, 1); 1 for L <= threshold."""
    ctx = math.log2(seq_len / threshold) + 1
    return max(2 ** math.ceil(ctx) - 1, 1)


def rope_inv_freq(head_dim: int, base: float, device=None) -> torch.Tensor:
    """Rotary frequencies base^(-2j/hd), j < hd/2, in float32."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float,
                 inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, head_dim) in float32; angle table [freqs, freqs] (§5.3).
    `inv_freq` (precomputed frequencies) replaces `base` when given."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, base, positions.device)
    freqs = positions.float()[..., None] * inv_freq                      # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]                     # (B, 1, T, hd)
    return emb.cos(), emb.sin()


class QwenVLCache(KVCache):
    """The shared static KV cache plus the dynamic-NTK alpha chosen at prefill (§5.3: alpha is evaluated
    only when there is no past, from the prompt length, and reused by every later step on that cache, so
    cached keys and new queries keep being rotated with the same base). The prefill also stores the rotary
    frequencies it used as a tensor, so a compiled decode step reads them instead of branching on alpha."""

    ntk_alpha: float = 1.0
    inv_freq: torch.Tensor | None = None  # (hd/2,) float32, set at prefill


class QWenAttention(nn.Module):
    """Causal self-attention: fused `c_attn` with bias, contiguous [Q | K | V] (unlike the ViT, §5.2),
    rotate-half RoPE in fp32, optional log-n query scaling, `c_proj` without bias."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.kv_channels
        proj = self.heads * self.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * proj, bias=True)   # always biased (§5.2)
        self.c_proj = nn.Linear(proj, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, logn, mask, cache, layer, start, capture=None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.heads * self.head_dim, dim=-1)
        q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)                # rotation in fp32, cast back (§5.3)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)                # cached keys are already rotated
        if logn is not None:
            q = q * logn.to(q.dtype)                                     # queries only, after RoPE (§5.3)
        if cache is not None:                                            # (B, h, start+T, hd); all
            k, v = cache.update(layer, start, k, v)                      # max_len slots if start is a tensor
        y = attention(q, k, v, mask, is_causal=True)                     # scale 1/sqrt(hd)
        if capture is not None:                                          # only for layers in capture.layers
            capture.record_attention(layer, q, k, start, mask)           # q as attended: rotated, log-n scaled
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class QWenMLP(nn.Module):
    """SwiGLU with Qwen's names: c_proj(w1(x) * silu(w2(x))), so w2 is the gate and w1 the up branch (§5.3)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    """Pre-norm block (§5.3). The shared RMSNorm matches Qwen-7B's: normalise in fp32, cast back, then
    multiply by the weight."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = QWenMLP(cfg)

    def forward(self, x, cos, sin, logn, mask, cache, layer, start, capture=None):
        x = x + self.attn(self.ln_1(x), cos, sin, logn, mask, cache, layer, start, capture)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------------
# The whole model


class QwenVL(nn.Module):
    """Qwen-VL / Qwen-VL-Chat. `embed` splices image features into the token embeddings (§4); `forward`
    runs the decoder on embeddings with explicit 1-D positions and an optional static KV cache."""

    generation = "1"

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.config = config
        t = config.text
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(t.vocab_size, t.hidden_size),
            visual=VisionTransformer(config.vision),
            h=nn.ModuleList(QWenBlock(t) for _ in range(t.num_hidden_layers)),
            ln_f=RMSNorm(t.hidden_size, eps=t.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)   # not tied to wte (§5.2)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Initializers for training from scratch (§2.7); skipped when loading (`checkpoint.on_meta`)."""
        t = self.config.text
        if isinstance(module, (QWenAttention, QWenMLP)):     # LLM: normal(0.02), c_proj scaled by depth
            for name, lin in module.named_children():
                std = t.initializer_range
                if name == "c_proj":
                    std /= math.sqrt(2 * t.num_hidden_layers)
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        elif isinstance(module, QwenVL):
            nn.init.normal_(module.transformer.wte.weight, std=t.initializer_range)
            nn.init.normal_(module.lm_head.weight, std=t.initializer_range)
        elif isinstance(module, VisionTransformer):          # OpenCLIP's: normal(width^-0.5)
            nn.init.normal_(module.positional_embedding, std=module.cfg.width ** -0.5)
            nn.init.normal_(module.proj, std=module.cfg.output_dim ** -0.5)
        elif isinstance(module, Resampler):                  # adapter: trunc_normal(0.02), zero biases
            nn.init.trunc_normal_(module.query, std=0.02)
            nn.init.trunc_normal_(module.kv_proj.weight, std=0.02)
            nn.init.xavier_uniform_(module.attn.in_proj_weight)   # nn.MultiheadAttention's own init
            nn.init.zeros_(module.attn.in_proj_bias)
            nn.init.trunc_normal_(module.attn.out_proj.weight, std=0.02)
            nn.init.zeros_(module.attn.out_proj.bias)

    # -- inputs --------------------------------------------------------------------------------------------
    def image_slots(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool (B, T): True on the n_queries slots strictly between each <img> ... </img> pair (§4).
        Raises if a tag is unpaired or a span does not hold exactly n_queries slots."""
        start_id, n = self.config.vision.image_start_id, self.config.vision.n_queries
        starts = (input_ids == start_id).nonzero()                        # (n_img, 2) [row, col], row-major
        ends = (input_ids == start_id + 1).nonzero()
        if starts.shape != ends.shape or not (ends[:, 0] == starts[:, 0]).all() or \
                not (ends[:, 1] - starts[:, 1] == n + 1).all():
            raise ValueError(f"every <img> ({start_id}) must be followed by exactly {n} slots and </img> "
                             f"({start_id + 1}) in the same row; got <img> at {starts.tolist()}, "
                             f"</img> at {ends.tolist()}")
        slots = torch.zeros_like(input_ids, dtype=torch.bool)
        cols = starts[:, 1:2] + 1 + torch.arange(n, device=input_ids.device)   # (n_img, n)
        slots[starts[:, :1].expand_as(cols), cols] = True
        return slots

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
              capture: Capture | None = None) -> torch.Tensor:
        """input_ids (B, T), images (N, 3, S, S) CLIP-normalised or None -> embeddings (B, T, hidden).

        Image k (row-major order of the <img> tags) overwrites the slots of the k-th span; the tags keep
        their learned embeddings (§4). With images=None the ids are embedded as they are (decode steps);
        a complete image span without images is an error, not silent garbage. `capture.vision_block` records
        that ViT block's attention for image `capture.vision_segment`.
        """
        h = self.transformer.wte(input_ids)                               # (B, T, H)
        has_tag = bool((input_ids == self.config.vision.image_start_id).any())
        if images is None and not has_tag:
            return h
        slots = self.image_slots(input_ids)
        n_spans = int(slots.sum()) // self.config.vision.n_queries
        n_images = 0 if images is None else images.shape[0]
        if n_spans != n_images:
            raise ValueError(f"{n_spans} <img>…</img> spans in input_ids but {n_images} images were given")
        feats = self.transformer.visual(images.to(h.device, h.dtype), capture)   # (N, n_queries, H)
        return h.masked_scatter(slots[..., None], feats.to(h.dtype))

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> QwenVLCache:
        w = self.lm_head.weight
        t = self.config.text
        return QwenVLCache(t.num_hidden_layers, batch_size, t.num_attention_heads, max_len, t.kv_channels,
                           device=device or w.device, dtype=dtype or w.dtype)

    # -- decoder -------------------------------------------------------------------------------------------
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                start: int = 0, pad_mask: torch.Tensor | None = None, capture: Capture | None = None,
                last_only: bool = False) -> torch.Tensor:
        """embeds (B, T, H), positions (B, T) 1-D rotary positions -> logits (B, T, vocab) (B, 1, V if last_only).

        cache/start: write keys and values for slots [start, start+T) and attend to slots [0, start+T).
        pad_mask (B, >= start+T) True on real tokens masks left padding. Without a cache, start must be 0.
        A LongTensor `start` is a static decode step (same shapes every token, for CUDA graphs): attention
        runs over all cache.max_len slots under a mask, and pad_mask should then span the cache.
        """
        static = isinstance(start, torch.Tensor)
        if cache is None and (static or start != 0):
            raise ValueError("start > 0 needs a KVCache holding the earlier tokens")
        positions = positions.to(embeds.device)
        t = self.config.text
        B, T, _ = embeds.shape
        inference = not self.training
        hd = t.kv_channels
        # Dynamic NTK (§5.3): the rotary base grows with the sequence length, but the released code picks
        # alpha only at prefill (no past: the whole sequence is the input, start + T == T) and reuses it on
        # later steps; the cache remembers alpha and the frequencies it gave (a tensor, so later steps -
        # compiled ones included - never branch on it). Full forwards without a cache are prefills.
        if cache is None or (not static and start == 0):
            alpha = ntk_alpha(T, t.seq_length) if inference and t.use_dynamic_ntk else 1.0
            inv_freq = rope_inv_freq(hd, t.rotary_emb_base * alpha ** (hd / (hd - 2)), embeds.device)
            if cache is not None:
                cache.ntk_alpha, cache.inv_freq = alpha, inv_freq
        else:
            inv_freq = getattr(cache, "inv_freq", None)
            if inv_freq is None:  # a cache filled by other means: alpha as stored (1 by default)
                alpha = getattr(cache, "ntk_alpha", 1.0) if inference and t.use_dynamic_ntk else 1.0
                inv_freq = rope_inv_freq(hd, t.rotary_emb_base * alpha ** (hd / (hd - 2)), embeds.device)
        # Rotary angles and log-n use the caller's positions. The released code ignored position_ids and used
        # cache slots 0..kv_len-1 (§5.3); the two agree for unpadded rows, and with left padding
        # `qvl.positions.text_position_ids` gives each row the positions it would have on its own.
        cos, sin = rope_cos_sin(positions, hd, t.rotary_emb_base, inv_freq=inv_freq)   # (B, 1, T, hd)
        # log-n (§5.3): a query at position p >= seq_length is scaled by log(p+1) / log(seq_length) - a
        # torch.where on the position tensor, so it needs no host value either.
        logn = None
        if inference and t.use_logn_attn:
            p1 = positions.float()[:, None, :, None] + 1                 # (B, 1, T, 1)
            logn = torch.where(p1 > t.seq_length, p1.log() / math.log(t.seq_length), torch.ones_like(p1))
        mask = causal_mask(start, T, pad_mask, device=embeds.device, max_len=cache.max_len if static else None)
        x = embeds
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, logn, mask, cache, i, start, capture if capture and i in capture.layers else None)
            if capture is not None and i in capture.hidden_layers:
                capture.hidden[i].append(x.detach())
        if last_only:  # generation needs only the next-token distribution: skip the [T, V] projection
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints in the official layout (§2.7, §5.2): module names already equal the file keys.


def _chat_generation_config(config: QwenVLConfig) -> dict:
    """generation_config.json for the ChatML models (§6.3), with ids taken relative to `<img>` so a tiny
    tokenizer (fewer BPE ranks) gets its own <|endoftext|>, <|im_start|>, <|im_end|> (§3.2 order)."""
    eod = config.vision.image_start_id - SPECIAL_TOKENS.index("<img>")
    gen = dict(GENERATION_CONFIGS["Qwen/Qwen-VL-Chat"])
    gen.update(eos_token_id=eod, pad_token_id=eod, stop_words_ids=[[eod + 2], [eod + 1]])
    return gen


def load_qwen_vl(path, device=None, dtype: torch.dtype | None = None) -> QwenVL:
    """Load a Qwen-VL / Qwen-VL-Chat directory (config.json with `visual`, safetensors) -> QwenVL in eval mode.

    Built on the meta device and filled by `assign_weights`, which raises CheckpointError listing every
    missing, unexpected or shape-mismatched key. `dtype=None` keeps the file's dtype.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    hf = json.loads(config_file.read_text())
    if hf.get("model_type") != "qwen" or "visual" not in hf:
        raise CheckpointError(f"{path}: not a Qwen-VL (gen 1) checkpoint: model_type={hf.get('model_type')!r}, "
                              f"'visual' section {'present' if 'visual' in hf else 'absent'}")
    tensors = open_safetensors_dir(path)
    with on_meta():
        model = QwenVL(QwenVLConfig.from_hf(hf))
    assign_weights(model, tensors, device=device, dtype=dtype)
    return model.eval()


def save_qwen_vl(model: QwenVL, directory, tokenizer=None, generation_config: dict | None = None,
                 max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write `model` as an official-layout directory: config.json (+ `visual`), safetensors,
    generation_config.json (ChatML stop words by default) and, given a tokenizer, qwen.tiktoken."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = generation_config if generation_config is not None else _chat_generation_config(model.config)
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_safetensors(model.state_dict(), directory, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save(directory)
