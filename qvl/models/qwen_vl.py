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

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvl.models.layers import KVCache, RMSNorm, apply_rotary, attention, causal_mask

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:                # x (N, L, W)
        N, L, W = x.shape
        qkv = self.in_proj(x).view(N, L, self.heads, 3, self.head_dim)   # per-head [q|k|v]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)                   # each (N, heads, L, hd)
        y = F.scaled_dot_product_attention(q, k, v)                      # no mask in the ViT; scale 1/sqrt(hd)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
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
        self.register_buffer("pos_embed", sincos_2d(E, grid))            # (n_queries, E)
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
        self.positional_embedding = nn.Parameter(torch.randn(cfg.pos_grid ** 2, cfg.width) * cfg.width ** -0.5)
        self.ln_pre = nn.LayerNorm(cfg.width, eps=1e-6)
        self.transformer = nn.ModuleDict(dict(resblocks=nn.ModuleList(VisualBlock(cfg) for _ in range(cfg.layers))))
        self.attn_pool = Resampler(cfg)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(cfg.output_dim, cfg.output_dim) * cfg.output_dim ** -0.5)  # [in, out]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))               # (N, W, g, g)
        x = x.flatten(2).transpose(1, 2)                                 # (N, g*g, W), token = row*g + col
        x = x + resize_pos_table(self.positional_embedding, x.shape[1])
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        x = self.attn_pool(x)                                            # (N, n_queries, E)
        return self.ln_post(x) @ self.proj                               # no bias; output is in LLM space
