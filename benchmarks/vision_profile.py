"""Where a vision tower's CPU time goes, qvl vs transformers 4.57.6 on the same random weights.

    python benchmarks/vision_profile.py                       # Qwen2-VL-2B and Qwen2.5-VL-3B at 448² and 1344²
    python benchmarks/vision_profile.py --gens 2 --sizes 1344 --depth 1 --threads 2

For each implementation, one profiled call (after an unprofiled warm-up) is split into matrix products
(addmm / mm / the patch embedding's convolution), attention (the SDPA kernel) and everything else, and the
arithmetic each group did is counted from the recorded input shapes (2·m·k·n for a product, 4·L²·d per head
for attention, summed over segments and windows). Dividing by the group's time gives its achieved GFLOP/s,
printed next to a plain fp32 matrix product on the same threads (this machine's practical peak). When both
towers run their products and attention at that peak, no rewrite of the surrounding code can make one much
faster than the other: the work itself is the same (`bench_models.py` times them end to end).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_models as BM  # noqa: E402

GEMM = {"aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution", "aten::linear"}
ATTENTION = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"}


def matmul_peak(threads: int, n: int = 1024, reps: int = 10) -> float:
    """GFLOP/s of an n x n x n fp32 product on `threads` threads (best of `reps`)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def event_flops(name: str, shapes: list) -> float:
    """Arithmetic of one recorded op from its input shapes (0 where the op is not a product or attention)."""
    try:
        if name == "aten::addmm":  # (bias, [m, k], [k, n])
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2.0 * b * m * k * n
        if name == "aten::mkldnn_convolution":  # Conv3d patch embedding: [N, C, T, H, W] * [O, C, t, h, w]
            x, w = shapes[0], shapes[1]
            return 2.0 * x[0] * w[0] * math.prod(w[1:])  # one output position per patch (stride = kernel)
        if name in ATTENTION:  # q [B, H, Lq, d], k [B, H, Lk, d]: QK^T and PV
            q, k = shapes[0], shapes[1]
            return 4.0 * q[0] * q[1] * q[2] * k[2] * q[3]
    except (IndexError, TypeError, ValueError):
        pass
    return 0.0


def split(prof) -> dict:
    """{group: (seconds, GFLOP)} over the profiled call's top-level aten ops."""
    out = {"products": [0.0, 0.0], "attention": [0.0, 0.0], "other": [0.0, 0.0]}
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        group = "products" if e.name in GEMM else "attention" if e.name in ATTENTION else "other"
        out[group][0] += e.self_cpu_time_total / 1e6
        out[group][1] += event_flops(e.name, e.input_shapes) / 1e9
    return out


def profile_call(fn) -> tuple[float, dict]:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
    return wall, split(prof)


def towers(gen: str, depth: int):
    vision = dict(BM.VISION[gen], depth=depth)
    if gen == "2.5":  # keep one full-attention block, the last, as in every group of 8
        vision["fullatt_block_indexes"] = [depth - 1]
    text = dict(BM.TEXT[gen], num_hidden_layers=1, vocab_size=1024)  # the decoder is not exercised
    hf = BM.hf_model(gen, text, vision, "cpu", torch.float32)
    return hf.model.visual, BM.to_qvl(hf, "cpu", torch.float32).visual


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gens", default="2,2.5")
    ap.add_argument("--sizes", default="448,1344")
    ap.add_argument("--depth", type=int, default=2, help="vision blocks (of 32) to build")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    peak = matmul_peak(a.threads)
    print(f"fp32 1024³ matrix product on {a.threads} thread(s): {peak:.1f} GFLOP/s\n")
    print("| tower | image | impl | wall s | products s (GFLOP/s) | attention s (GFLOP/s) | other s | share in products + attention |")
    print("|---|---|---|---:|---|---|---:|---:|")
    for gen in a.gens.split(","):
        tf_tower, qvl_tower = towers(gen, a.depth)
        for size in map(int, a.sizes.split(",")):
            g = size // 14
            grid = torch.tensor([[1, g, g]])
            pixels = torch.randn(g * g, 1176, generator=torch.Generator().manual_seed(size))
            calls = {"transformers": lambda: tf_tower(pixels, grid_thw=grid), "qvl": lambda: qvl_tower(pixels, grid)}
            with torch.inference_mode():
                for impl, fn in calls.items():
                    wall, parts = profile_call(fn)
                    (ps, pf), (as_, af), (os_, _) = parts["products"], parts["attention"], parts["other"]
                    share = (ps + as_) / max(ps + as_ + os_, 1e-9)
                    name = f"{BM.VISION[gen]['name']} ({a.depth} of 32 blocks)"
                    print(f"| {name} | {size}² | {impl} | {wall:.2f} | {ps:.2f} ({pf / max(ps, 1e-9):.0f}) | "
                          f"{as_:.2f} ({af / max(as_, 1e-9):.0f}) | {os_:.2f} | {100 * share:.0f} % |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
