"""Qwen2.5-VL in plain PyTorch: what changes relative to Qwen2-VL, and only that.

Paper: "Qwen2.5-VL Technical Report" (arXiv:2502.13923). Behaviour follows transformers'
models/qwen2_5_vl/modeling_qwen2_5_vl.py (4.57), the project reference notes (shared/reference/qwen2_qwen25_qwen3_vl.md) §3.4-§3.6, cited as §n below.

Differences from Qwen2-VL (everything else is imported from qwen2_vl.py unchanged):
  * ViT blocks use RMSNorm and a SwiGLU MLP *with* biases (§3.4); the merger norm is an RMSNorm (§3.5)
  * window attention (112 px windows) in every block except `fullatt_block_indexes` (§3.6)
  * video temporal positions are scaled by tokens_per_second (handled by the caller through
    `qvl.positions.mrope_position_ids(..., tokens_per_second=config.tokens_per_second)`)
The decoder is Qwen2-VL's, parameter for parameter.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import positions
from ..config import VisionConfig
from .layers import RMSNorm
from .qwen2_vl import MLP, Capture, PatchEmbed, PatchMerger, Qwen2VL, Segments, VisionBlock, _vision_probe, vision_rotary


def rms_norm(dim: int) -> RMSNorm:
    return RMSNorm(dim, eps=1e-6)


def vision_swiglu(cfg: VisionConfig) -> MLP:
    """The ViT MLP: the decoder's SwiGLU, with biases on all three projections (§3.4)."""
    return MLP(cfg.dim, cfg.mlp_dim, bias=True)


class WindowVisionTransformer(nn.Module):
    """pixel_values [L, 1176] + grid_thw [N, 3] -> merged features [L/4, H] in placeholder-token order.

    The sequence is put into window order once before block 0 and restored once after the merger
    (§3.6, §7.5): window blocks attend within 8x8-patch windows, the full-attention blocks within
    whole frames, which stay contiguous in window order because time is the outermost loop.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg, norm=rms_norm, mlp=vision_swiglu) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm=rms_norm)

    def forward(self, pixel_values: torch.Tensor, grid_thw, capture: Capture | None = None) -> torch.Tensor:
        cfg = self.cfg
        x = self.patch_embed(pixel_values)
        # rotary tables in the original merge-block order, then permuted *with* the tokens (§3.6 step 2-3)
        pos = positions.vision_position_ids(grid_thw, cfg.spatial_merge_size)
        cos, sin = vision_rotary(pos.to(x.device), cfg.head_dim)
        index, cu_windows = positions.window_index(grid_thw, cfg.window_size, cfg.patch_size, cfg.spatial_merge_size)
        unit = cfg.spatial_merge_size**2  # 4 patch rows = one merged token
        order = (index[:, None] * unit + torch.arange(unit)).flatten()  # (L,) original row of each window-order row
        order_dev = order.to(x.device)
        x, cos, sin = x[order_dev], cos[order_dev], sin[order_dev]
        frames = Segments(positions.vision_cu_seqlens(grid_thw), x.device)
        windows = Segments(cu_windows, x.device)
        full = set(cfg.fullatt_block_indexes)
        probe = None
        if capture is not None and capture.vision_block is not None:
            probe = _vision_probe(capture, order, frames if capture.vision_block in full else windows)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in full else windows, probe if probe and i == capture.vision_block else None)
        y = self.merger(x)  # (L/4, H), still in window order
        return y[torch.argsort(index).to(y.device)]  # back to raster (placeholder) order


class Qwen2_5_VL(Qwen2VL):
    """Qwen2VL with the windowed tower; `embed`, `forward` and `make_cache` are inherited as is."""

    generation = "2.5"
    vision_tower = WindowVisionTransformer
