"""Memory and FLOP arithmetic from configs: no model is built, no tensor is allocated.

* `preset_config(name)`          - a published checkpoint's config (gen 1 `QwenVLConfig` or gen 2/2.5 `Qwen2VLConfig`)
* `kv_cache_bytes(name, n)`      - layers x 2 (K and V) x kv_heads x head_dim x bytes x n tokens
* `attention_flops(lengths, dim)`- the two L^2 matmuls of attention (scores and mixing), summed over segments
* `vision_costs(grid, name)`     - the vision tower's attention FLOPs and activation memory, window vs full
* `parameter_counts(name)`       - parameters per component (vision tower, merger/resampler, embedding, decoder, head)
* `vision_block_kinds(name)`     - "window" / "full" for each ViT block

Names are Hub repo ids with or without "Qwen/": "Qwen2-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct",
"Qwen/Qwen-VL-Chat". A config object (either kind) is accepted wherever a name is.
Multiply-adds count as 2 FLOPs.
"""

from __future__ import annotations

import torch

from qvl import positions
from qvl.config import PRESETS as QWEN2_PRESETS
from qvl.config import Qwen2VLConfig
from qvl.media import MERGE_SIZE, PATCH_SIZE
from qvl.models.qwen_vl import PRESETS as GEN1_PRESETS
from qvl.models.qwen_vl import QwenVLConfig

GiB = 1024**3


def preset_names() -> list[str]:
    """Every published checkpoint qvl knows, gen 1 first, as "Qwen/<name>"."""
    return sorted(GEN1_PRESETS) + [f"Qwen/{n}" for n in QWEN2_PRESETS]


def preset_config(name):
    """Config of a published checkpoint (or the config itself when one is passed)."""
    if isinstance(name, (Qwen2VLConfig, QwenVLConfig)):
        return name
    key = name if name.startswith("Qwen/") else f"Qwen/{name}"
    if key in GEN1_PRESETS:
        return QwenVLConfig.from_name(key)
    return Qwen2VLConfig.from_name(key)


def generation_of(cfg) -> str:
    return "1" if isinstance(cfg, QwenVLConfig) else cfg.generation


def _decoder_shape(cfg) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the language model."""
    t = cfg.text
    if isinstance(cfg, QwenVLConfig):  # gen 1: plain multi-head attention, every head has its own K/V
        return t.num_hidden_layers, t.num_attention_heads, t.kv_channels
    return t.num_hidden_layers, t.num_key_value_heads, t.head_dim


def kv_cache_bytes(name, n_tokens: int, bytes_per_value: int = 2, batch_size: int = 1) -> int:
    """KV-cache size for n_tokens: layers x 2 (K, V) x kv_heads x head_dim x bytes_per_value x tokens x batch.

    bytes_per_value: 2 for bf16/fp16 (how the checkpoints are served), 4 for fp32, 1 for an 8-bit cache.
    """
    layers, kv_heads, head_dim = _decoder_shape(preset_config(name))
    return layers * 2 * kv_heads * head_dim * bytes_per_value * int(n_tokens) * batch_size


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


def vision_block_kinds(name) -> list[str]:
    """"window" or "full" for every ViT block: Qwen2.5-VL attends in windows except in its
    `fullatt_block_indexes`; Qwen2-VL and gen 1 attend over the whole frame in every block."""
    cfg = preset_config(name)
    if isinstance(cfg, QwenVLConfig):
        return ["full"] * cfg.vision.layers
    full = set(cfg.vision.fullatt_block_indexes) if cfg.generation == "2.5" else set(range(cfg.vision.depth))
    return ["full" if i in full else "window" for i in range(cfg.vision.depth)]


def segment_lengths(grid_thw, kind: str = "full", window_size: int = 112) -> list[int]:
    """Lengths (in patches) of the blocks of the block-diagonal ViT attention for one layer kind:
    "full" = one segment per frame (`positions.vision_cu_seqlens`), "window" = one per window
    (`positions.window_index`)."""
    if kind == "full":
        cu = positions.vision_cu_seqlens(grid_thw)
    elif kind == "window":
        cu = positions.window_index(grid_thw, window_size, PATCH_SIZE, MERGE_SIZE)[1]
    else:
        raise ValueError(f"kind must be 'full' or 'window', got {kind!r}")
    return torch.diff(cu.long()).tolist()


def attention_flops(lengths, dim: int) -> int:
    """FLOPs of the two length-squared matmuls of attention, summed over segments:
    scores Q K^T (2 L^2 dim) + mixing P V (2 L^2 dim) = 4 L^2 dim per segment, all heads together."""
    return sum(4 * int(n) ** 2 * dim for n in lengths)


def _vision_shape(cfg) -> tuple[int, int, int]:
    """(dim, heads, mlp_dim) of the ViT."""
    v = cfg.vision
    if isinstance(cfg, QwenVLConfig):
        return v.width, v.heads, v.mlp_hidden
    return v.dim, v.num_heads, v.mlp_dim


def vision_costs(grid_thw, name, bytes_per_value: int = 2) -> dict:
    """Attention FLOPs and activation memory of the vision tower for one grid (t, h, w) in patches.

    Keys:
      patches                      L = t*h*w
      full_segments / window_segments   block lengths of the two attention kinds
      flops_full_layer / flops_window_layer   `attention_flops` of one block of each kind
      flops_all_full               every block full attention (what Qwen2-VL does)
      flops_as_configured          the preset's own mix (Qwen2.5-VL: windows except fullatt blocks)
      hidden_bytes                 one block's hidden states, L x dim
      mlp_bytes                    one block's MLP intermediate, L x mlp_dim
      scores_bytes_full / scores_bytes_window   the heads x sum(L_seg^2) attention matrix an eager
                                   implementation holds in one block (flash attention holds none)
    Gen 1 has a fixed 32x32 grid (448 px) whatever the image; pass grid_thw=(1, 32, 32).
    """
    cfg = preset_config(name)
    dim, heads, mlp_dim = _vision_shape(cfg)
    kinds = vision_block_kinds(cfg)
    full = segment_lengths(grid_thw, "full")
    window = segment_lengths(grid_thw, "window", getattr(cfg.vision, "window_size", 112))
    f_full, f_win = attention_flops(full, dim), attention_flops(window, dim)
    L = sum(full)
    return {
        "patches": L,
        "full_segments": full,
        "window_segments": window,
        "flops_full_layer": f_full,
        "flops_window_layer": f_win,
        "flops_all_full": f_full * len(kinds),
        "flops_as_configured": sum(f_full if k == "full" else f_win for k in kinds),
        "blocks": len(kinds),
        "full_blocks": kinds.count("full"),
        "hidden_bytes": L * dim * bytes_per_value,
        "mlp_bytes": L * mlp_dim * bytes_per_value,
        "scores_bytes_full": heads * sum(n * n for n in full) * bytes_per_value,
        "scores_bytes_window": heads * sum(n * n for n in window) * bytes_per_value,
    }


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _qwen2_counts(cfg: Qwen2VLConfig) -> dict[str, int]:
    v, t = cfg.vision, cfg.text
    gen25 = cfg.generation == "2.5"
    norm = v.dim if gen25 else 2 * v.dim  # RMSNorm (weight) vs LayerNorm (weight + bias)
    mlp = 2 * _linear(v.dim, v.mlp_dim) + _linear(v.mlp_dim, v.dim) if gen25 else _linear(v.dim, v.mlp_dim) + _linear(v.mlp_dim, v.dim)
    block = 2 * norm + _linear(v.dim, 3 * v.dim) + _linear(v.dim, v.dim) + mlp
    merged = v.dim * v.spatial_merge_size**2
    kv = t.num_key_value_heads * t.head_dim
    layer = (
        2 * t.hidden_size  # input and post-attention RMSNorm
        + _linear(t.hidden_size, t.hidden_size) + 2 * _linear(t.hidden_size, kv)  # q, k, v (with bias)
        + _linear(t.hidden_size, t.hidden_size, bias=False)  # o
        + 3 * _linear(t.hidden_size, t.intermediate_size, bias=False)  # gate, up, down
    )
    embed = t.vocab_size * t.hidden_size
    return {
        "vision tower": v.patch_dim * v.dim + v.depth * block,  # patch embedding has no bias
        "merger": norm + _linear(merged, merged) + _linear(merged, v.out_dim),
        "embedding": embed,
        "decoder": t.num_hidden_layers * layer + t.hidden_size,  # + final norm
        "lm_head": 0 if t.tie_word_embeddings else embed,
    }


def _gen1_counts(cfg: QwenVLConfig) -> dict[str, int]:
    v, t = cfg.vision, cfg.text
    w, out = v.width, v.output_dim
    block = 4 * w + _linear(w, 3 * w) + _linear(w, w) + _linear(w, v.mlp_hidden) + _linear(v.mlp_hidden, w)
    tower = 3 * v.patch_size**2 * w + v.pos_grid**2 * w + 2 * w + v.layers * block  # conv, pos table, ln_pre
    resampler = (
        v.n_queries * out + _linear(w, out, bias=False)  # queries, kv projection
        + _linear(out, 3 * out) + _linear(out, out)  # cross-attention
        + 2 * 2 * out  # ln_q, ln_kv
        + 2 * out + out * out  # ln_post, proj
    )
    ffn = t.ffn_dim
    layer = 2 * t.hidden_size + _linear(t.hidden_size, 3 * t.hidden_size) + _linear(t.hidden_size, t.hidden_size, bias=False)
    layer += 2 * _linear(t.hidden_size, ffn, bias=False) + _linear(ffn, t.hidden_size, bias=False)
    embed = t.vocab_size * t.hidden_size
    return {
        "vision tower": tower,
        "resampler": resampler,
        "embedding": embed,
        "decoder": t.num_hidden_layers * layer + t.hidden_size,
        "lm_head": embed,  # gen 1 never ties
    }


def parameter_counts(name) -> dict[str, int]:
    """Parameters per component of a published checkpoint, computed from its config shapes.
    Keys: "vision tower", "merger" (gen 2/2.5) or "resampler" (gen 1), "embedding", "decoder", "lm_head"
    (0 when tied to the embedding), "total"."""
    cfg = preset_config(name)
    counts = _gen1_counts(cfg) if isinstance(cfg, QwenVLConfig) else _qwen2_counts(cfg)
    counts["total"] = sum(counts.values())
    return counts


def summary(grid_thw, prompt_tokens: int, name, bytes_per_value: int = 2) -> dict[str, str]:
    """Readable rows for one image/video on one checkpoint (what the app's Tokens view lists):
    KV cache for the whole prompt, the ViT's per-block hidden states and attention matrices
    (full vs window), and its attention FLOPs as configured vs all-full."""
    c = vision_costs(grid_thw, name, bytes_per_value)
    return {
        "checkpoint": str(name).split("/")[-1] if isinstance(name, str) else generation_of(preset_config(name)),
        "ViT patches": f"{c['patches']:,}",
        "KV cache (prompt)": human_bytes(kv_cache_bytes(name, prompt_tokens, bytes_per_value)),
        "ViT hidden states per block": human_bytes(c["hidden_bytes"]),
        "ViT attention matrix, full": human_bytes(c["scores_bytes_full"]),
        "ViT attention matrix, window": human_bytes(c["scores_bytes_window"]),
        "ViT attention FLOPs as configured": human_count(c["flops_as_configured"], "FLOP"),
        "ViT attention FLOPs if all full": human_count(c["flops_all_full"], "FLOP"),
    }


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (powers of 1024)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def human_count(n: float, unit: str = "") -> str:
    """2_210_000_000 -> '2.21 G' (powers of 1000)."""
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


__all__ = [
    "preset_names", "preset_config", "generation_of", "kv_cache_bytes", "vision_block_kinds", "segment_lengths",
    "attention_flops", "vision_costs", "parameter_counts", "summary", "human_bytes", "human_count",
]
