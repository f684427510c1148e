"""benchmarks/vision_profile.py counts the arithmetic it divides by: checked on ops of known size."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vision_profile as VP  # noqa: E402


def test_split_counts_products_and_attention_from_the_recorded_shapes():
    from torch.profiler import ProfilerActivity, profile

    x, w, b = torch.randn(96, 40), torch.randn(24, 40), torch.randn(24)
    q, k, v = torch.randn(1, 3, 50, 16), torch.randn(1, 3, 70, 16), torch.randn(1, 3, 70, 16)
    conv = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False)
    patches = torch.randn(5, 3, 2, 14, 14)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        F.linear(x, w, b)  # addmm: 96 x 40 x 24
        x @ w.T  # mm: the same product
        F.scaled_dot_product_attention(q, k, v)  # 3 heads, 50 queries, 70 keys, d 16
        torch.relu(x)  # neither
        conv(patches)  # one output per patch: 5 x 8 x (3 * 2 * 14 * 14)
    parts = VP.split(prof)
    products = 2 * (2 * 96 * 40 * 24)
    if any(e.name == "aten::mkldnn_convolution" for e in prof.events()):  # how this build runs Conv3d
        products += 2 * 5 * 8 * 3 * 2 * 14 * 14
    assert abs(parts["products"][1] * 1e9 - products) < 1
    assert abs(parts["attention"][1] * 1e9 - 4 * 3 * 50 * 70 * 16) < 1
    assert parts["other"][1] == 0 and parts["other"][0] > 0
    assert VP.matmul_peak(1, n=128, reps=2) > 0
