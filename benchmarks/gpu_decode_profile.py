"""Where one compiled decode step's time goes on a GPU (qvl only, random weights, no transformers needed).

    python benchmarks/gpu_decode_profile.py                                  # Qwen2-VL-2B, bf16, CUDA
    python benchmarks/gpu_decode_profile.py --preset Qwen2.5-VL-3B-Instruct
    python benchmarks/gpu_decode_profile.py --device cpu --dtype fp32 --layers 2 --vocab 4096 --prompt 64   # try it

`generate(compile=True)` replays one CUDA graph per token (benchmarks/gpu_bench.sh measured 24-35 % of the
H200's bandwidth). This script times --steps decode steps after a --prompt-token prefill, then profiles the
same steps and prints: wall time per token, GPU kernel time per token (their gap is time the GPU waited for
the host), the bytes of weights read per token and the bandwidth both imply, and the kernels that take the
time (name, calls per token, microseconds per token, share). That says whether the step is bound by memory
(kernel time ~ bytes / bandwidth), by launch gaps, or by a few slow kernels.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qvl.checkpoint import model_class  # noqa: E402
from qvl.config import Qwen2VLConfig  # noqa: E402
from qvl.generate import Batch, token_steps  # noqa: E402

BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.04e12}


def build(preset: str, layers: int | None, vocab: int | None, device, dtype):
    overrides = {k: v for k, v in (("num_hidden_layers", layers), ("vocab_size", vocab)) if v}
    config = Qwen2VLConfig.from_name(preset, **overrides)
    config = replace(config, vision=replace(config.vision, depth=1))  # the decoder is what is measured
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config)(config)
    for p in model.parameters():  # small random weights: the logits stay finite in bf16
        p.data.normal_(0.0, 0.02)
    return model.to(dtype).eval(), config


def weight_bytes(model, config) -> int:
    """Bytes read per decoded token: every decoder layer plus the lm_head matrix (tied: the embedding)."""
    layers = sum(p.numel() * p.element_size() for n, p in model.model.named_parameters() if "layers." in n)
    return layers + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="Qwen2-VL-2B-Instruct")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the preset's)")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    cuda = a.device.startswith("cuda")
    model, config = build(a.preset, a.layers, a.vocab, a.device, dtype)
    vocab = config.text.vocab_size
    ids = torch.randint(0, min(vocab, 150000), (1, a.prompt), generator=torch.Generator().manual_seed(1)).to(a.device)
    batch = Batch(ids, torch.ones_like(ids))
    n = a.steps + 1

    def run(prof=None):
        """-> seconds for the decode steps (the first token comes from the prefill and is not counted;
        `prof`, a profiler, records the decode steps only)."""
        with torch.inference_mode():
            t0 = None
            for i, tok in enumerate(token_steps(model, batch, n, compile=True, check_every=10**9)):
                if i == 0:
                    tok.tolist()
                    if prof is not None:
                        prof.start()
                    t0 = time.perf_counter()
            tok.tolist()
            if prof is not None:
                prof.stop()
            return time.perf_counter() - t0

    t = time.perf_counter()
    run()  # compiles (and records the CUDA graph)
    print(f"{a.preset} ({config.text.num_hidden_layers} layers, vocab {vocab}), {a.dtype} on "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}: first call (compile) {time.perf_counter() - t:.1f} s")
    wall = min(run() for _ in range(3)) / a.steps
    nbytes = weight_bytes(model, config)
    peak = next((bw for key, bw in BANDWIDTH.items() if cuda and key in torch.cuda.get_device_name()), None)

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts)
    run(prof)
    kernels = collections.defaultdict(lambda: [0, 0.0])  # name -> [calls, microseconds]
    for e in prof.events():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA if cuda else e.name.startswith("aten::")
        if on_device:
            us = e.device_time_total if cuda else e.self_cpu_time_total
            kernels[e.name][0] += 1
            kernels[e.name][1] += us
    steady = dict(kernels)
    busy = sum(us for _, us in steady.values()) / a.steps  # microseconds of device work per token
    print(f"wall per token {wall * 1e6:.0f} us = {1 / wall:.1f} tok/s; weights read per token {nbytes / 1e9:.2f} GB "
          f"-> {nbytes / wall / 1e9:.0f} GB/s" + (f" = {100 * nbytes / wall / peak:.0f} % of {peak / 1e12:.2f} TB/s" if peak else ""))
    print(f"kernel time per token {busy:.0f} us ({100 * busy / (wall * 1e6):.0f} % of the wall time; the rest is the GPU "
          f"waiting for the host)" + (f"; at {peak / 1e12:.2f} TB/s the weights alone take {nbytes / peak * 1e6:.0f} us"
                                      if peak else ""))
    print(f"\n| kernel | calls / token | us / token | share |\n|---|---:|---:|---:|")
    for name, (calls, us) in sorted(steady.items(), key=lambda kv: -kv[1][1])[:a.top]:
        print(f"| {name[:90]} | {calls / a.steps:.1f} | {us / a.steps:.1f} | {100 * us / a.steps / max(busy, 1e-9):.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
