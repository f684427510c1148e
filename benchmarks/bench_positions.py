"""M-RoPE position ids: qvl.positions.mrope_position_ids vs transformers 4.57.6 get_rope_index.

Run on demand (not a test):  .venv/bin/python benchmarks/bench_positions.py [--threads N]
Prints a markdown table of median wall times and the qvl / transformers ratio. Both are checked to
agree on every case before timing. Default 1 intra-op thread: these are sub-millisecond integer ops,
where a second thread only adds synchronisation (on a loaded 2-core box it made both sides 10x slower).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import types

import torch

from qvl.positions import mrope_position_ids

IMG, VID, VS, VE, PAD = 151655, 151656, 151652, 151653, 151643


def prompt(rng: random.Random, n_images=8, n_videos=1):
    """One chat-like prompt: system/user text, n images of assorted sizes, n videos, question."""
    ids, images, videos = [rng.randrange(151643) for _ in range(20)], [], []
    for _ in range(n_images):  # images of ~200-900 LLM tokens (e.g. 640x480 -> grid (1, 34, 46))
        g = (1, 2 * rng.randint(12, 24), 2 * rng.randint(12, 24))
        images.append(g)
        ids += [VS] + [IMG] * (g[0] * g[1] * g[2] // 4) + [VE] + [rng.randrange(151643) for _ in range(8)]
    for _ in range(n_videos):  # 16 frames at 2 fps of a 336x602 video -> grid (8, 24, 42), 2016 tokens
        g = (8, 24, 42)
        videos.append(g)
        ids += [VS] + [VID] * (g[0] * g[1] * g[2] // 4) + [VE]
    ids += [rng.randrange(151643) for _ in range(30)]
    return ids, images, videos


def batch(rng, n):
    rows, images, videos = zip(*(prompt(rng) for _ in range(n)))
    T = max(map(len, rows))
    ids = torch.full((n, T), PAD)
    mask = torch.zeros(n, T, dtype=torch.long)
    for b, row in enumerate(rows):  # left padding
        ids[b, T - len(row) :] = torch.tensor(row)
        mask[b, T - len(row) :] = 1
    return ids, mask, [g for gs in images for g in gs], [g for gs in videos for g in gs]


def median_times(fns, repeat):
    """Median wall time of each fn, run alternately so that load from other processes on a shared
    machine hits all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    torch.set_num_threads(parser.parse_args().threads)

    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    # get_rope_index reads only self.config, so a stand-in self avoids building a model
    hf2 = types.SimpleNamespace(config=Qwen2VLConfig())
    hf25 = types.SimpleNamespace(config=Qwen2_5_VLConfig(vision_config={"tokens_per_second": 2}))

    rng = random.Random(0)
    rows = []
    for label, n, repeat in (("1 prompt: 8 images + 1 video", 1, 50), ("batch of 16 such prompts", 16, 10)):
        ids, mask, images, videos = batch(rng, n)
        img, vid = torch.tensor(images), torch.tensor(videos)
        spg = torch.full((len(videos),), 1.0)
        cases = {
            "Qwen2-VL": (
                lambda: Qwen2VLModel.get_rope_index(hf2, ids, img, vid, mask),
                lambda: mrope_position_ids(ids, img, vid, mask),
            ),
            "Qwen2.5-VL": (
                lambda: Qwen2_5_VLModel.get_rope_index(hf25, ids, img, vid, spg, mask),
                lambda: mrope_position_ids(ids, img, vid, mask, second_per_grid_ts=spg, tokens_per_second=2),
            ),
        }
        for model, (hf_fn, qvl_fn) in cases.items():
            (p_hf, d_hf), (p_q, d_q) = hf_fn(), qvl_fn()
            assert torch.equal(p_hf, p_q) and torch.equal(d_hf.reshape(-1, 1), d_q), "results differ"
            t_hf, t_q = median_times([hf_fn, qvl_fn], repeat)
            rows.append((model, label, tuple(ids.shape), t_hf, t_q))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median wall time\n")
    print("| model | case | input_ids [B, T] | transformers 4.57.6 | qvl | qvl / transformers |")
    print("|---|---|---|---:|---:|---:|")
    for model, label, shape, t_hf, t_q in rows:
        print(f"| {model} | {label} | {list(shape)} | {t_hf * 1e3:.2f} ms | {t_q * 1e3:.2f} ms | {t_q / t_hf:.3f}x |")


if __name__ == "__main__":
    main()
