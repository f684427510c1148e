"""Tiny random Qwen2-VL / Qwen2.5-VL configs and helpers shared by the model tests.

Special token ids live inside a 300-token vocabulary so the models stay tiny (a 151k vocab would
dominate the runtime). Everything here is CPU + fp32 and seeded.
"""

from __future__ import annotations

import torch

VOCAB = 300
BOS, EOS, VSTART, VEND, IMAGE, VIDEO = 290, 291, 292, 293, 295, 296
SPECIAL = dict(bos_token_id=BOS, eos_token_id=EOS, vision_start_token_id=VSTART, vision_end_token_id=VEND,
               image_token_id=IMAGE, video_token_id=VIDEO)
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})  # head_dim 16 -> sections sum to 8


def hf_config(generation: str, tie: bool | None = None):
    """A transformers 4.57 config (Hub-style kwargs). Qwen2-VL ties lm_head, Qwen2.5-VL does not."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    tie = (generation == "2") if tie is None else tie
    if generation == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cls = Qwen2VLConfig
    else:  # block 1 is full attention, 0 and 2 use windows
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                      tokens_per_second=2)
        cls = Qwen2_5_VLConfig
    text = dict(TEXT, tie_word_embeddings=tie)
    return cls(vision_config=vision, text_config=dict(text), **text, **SPECIAL)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that every layer matters (transformers' std-0.02 init makes logits ~0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
            elif "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def hf_model(generation: str, tie: bool | None = None, seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2VLForConditionalGeneration if generation == "2" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(hf_config(generation, tie)).eval()
    return randomize_(model, seed)


def pixels(grids, seed: int = 0) -> torch.Tensor:
    """Random normalised pixel rows for a list of (t, h, w) grids -> [sum t*h*w, 1176]."""
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 14 * 14, generator=g)


def prompt(parts, seed: int = 0) -> list[int]:
    """parts: ints = that many random text tokens; ("image", (t,h,w)) / ("video", (t,h,w)) = a vision block."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for p in parts:
        if isinstance(p, int):
            ids += torch.randint(0, 280, (p,), generator=g).tolist()
        else:
            kind, (t, h, w) = p
            ids += [VSTART] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // 4) + [VEND]
    return ids


def left_pad(rows: list[list[int]], pad: int = EOS):
    """-> input_ids [B, T], attention_mask [B, T] (left padding, as used for generation)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask
