"""qvl vs transformers 4.57.6 on the same random weights: vision towers, prefill, decode.

    python benchmarks/bench_models.py                      # CPU fp32, short config (truncated depths)
    python benchmarks/bench_models.py --device cuda --dtype bf16 --full   # GPU, full-size random weights

Every (case, implementation) runs in a fresh subprocess, so peak memory is that implementation's
alone: on CPU the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs
just before the timed call; ru_maxrss is the fallback), on CUDA torch.cuda.max_memory_allocated.
Both sides build the same transformers model with the same seed; qvl gets its tensors through
`qvl.checkpoint.assign_weights`, i.e. the production key mapping.

Cases
  vision   Qwen2.5-VL-3B and Qwen2-VL-2B vision towers at 448², 1008², 1344² (one image).
  decode   prefill of --prompt tokens, then --new decode steps, on the Qwen2-VL-2B and
           Qwen2.5-VL-3B decoder shapes (full vocabulary; layers truncated unless --full).
           GB/s = bytes of weights read per token (decoder layers + lm_head) x tokens/s.
           qvl+compile: `generate(compile=True)`, i.e. static decode steps (slot tensor, whole-cache
           attention) compiled with mode="reduce-overhead" on CUDA (one CUDA graph replayed per token);
           the untimed warm-up call pays the compilation.

Targets (docs): vision <= 0.8x transformers' time and <= its peak memory; decode >= 1.3x its tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Published shapes (config.json of the Hub checkpoints; qvl.config PRESETS hold the same numbers).
VISION = {
    "2.5": dict(name="Qwen2.5-VL-3B vision", depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2),
    "2": dict(name="Qwen2-VL-2B vision", depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536),
}
TEXT = {
    "2": dict(name="Qwen2-VL-2B decoder", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "2.5": dict(name="Qwen2.5-VL-3B decoder", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.04e12), ("L4", 0.3e12)]


# ---------------------------------------------------------------------------------------------
# Building both models from one seed
# ---------------------------------------------------------------------------------------------


def hf_model(gen: str, text: dict, vision: dict, device, dtype):
    import torch
    import transformers as tf

    common = dict(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                  rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, attn_implementation="sdpa",
                  image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                  vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645)
    vision = {k: v for k, v in vision.items() if k != "name"}
    text = {k: v for k, v in text.items() if k != "name"}
    if gen == "2":
        config, cls = tf.Qwen2VLConfig(vision_config=vision, **common, **text), tf.Qwen2VLForConditionalGeneration
    else:
        config, cls = tf.Qwen2_5_VLConfig(vision_config=vision, **common, **text), tf.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).eval()


def to_qvl(hf, device, dtype):
    """The qvl model holding the transformers model's tensors (Hub/transformers key layout)."""
    import torch

    from qvl.checkpoint import _to_qvl_tensor, assign_weights, hub_to_qvl, model_class
    from qvl.config import Qwen2VLConfig

    config = Qwen2VLConfig.from_hf(hf.config.to_dict())
    with torch.device("meta"):
        model = model_class(config)(config)
    assign_weights(model, hf.state_dict(), rename=hub_to_qvl, transform=_to_qvl_tensor, device=device, dtype=dtype)
    return model.eval()


def build(impl: str, gen: str, text: dict, vision: dict, device, dtype):
    import gc

    hf = hf_model(gen, text, vision, device, dtype)
    if impl == "transformers":
        return hf
    model = to_qvl(hf, device, dtype)
    del hf
    gc.collect()
    return model


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _hwm_kb() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_kb() -> int:
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class PeakMemory:
    """Extra memory at the peak of a block, over what was resident / allocated when it started (MB)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_kb() * 1024
            try:  # reset the kernel's high-water mark so the peak is this block's
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.reset = True
            except OSError:
                self.reset = False
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            hwm = _hwm_kb() if self.reset else None
            peak = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        self.mb = max(peak - self.base, 0) / 2**20


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_vision(impl, gen, size, args, device, dtype) -> dict:
    import torch

    vision = dict(VISION[gen])
    if not args.full:
        vision["depth"] = args.vision_depth
        if gen == "2.5":  # keep one full-attention block, the last, as in every group of 8
            vision["fullatt_block_indexes"] = [args.vision_depth - 1]
    text = dict(TEXT[gen], num_hidden_layers=1, vocab_size=1024)  # the decoder is not exercised here
    model = build(impl, gen, text, vision, device, dtype)
    tower = model.model.visual if impl == "transformers" else model.visual

    def inputs(px):
        g = px // 14
        grid = torch.tensor([[1, g, g]], device=device)
        pixels = torch.randn(g * g, 1176, generator=torch.Generator().manual_seed(px)).to(device, dtype)
        return pixels, grid

    def call(pixels, grid):
        if impl == "transformers":
            return tower(pixels, grid_thw=grid)
        return tower(pixels, grid)

    with torch.inference_mode():
        call(*inputs(448))  # warm-up (allocator, kernels, caches)
        pixels, grid = inputs(size)
        times = []
        for r in range(args.repeats):
            _sync(device)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                out = call(pixels, grid)
                _sync(device)
                times.append(time.perf_counter() - t0)
            peak = mem.mb if r == 0 else max(peak, mem.mb)
    return dict(seconds=min(times), peak_mb=peak, out_shape=list(out.shape), depth=vision["depth"])


def run_decode(impl, gen, args, device, dtype, compile_=False) -> dict:
    import torch

    text = dict(TEXT[gen])
    if not args.full:
        text["num_hidden_layers"] = args.text_layers
    vision = dict(VISION[gen], depth=1, fullatt_block_indexes=[0]) if gen == "2.5" else dict(VISION[gen], depth=1)
    model = build(impl, gen, text, vision, device, dtype)
    V = text["vocab_size"]
    ids = torch.randint(0, 151000, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    n = args.new + 1  # the first token comes from the prefill, then `new` decode steps

    def once():
        stamps = []
        if impl == "transformers":
            class Clock:  # a streamer that only records when each token is handed out
                def put(self, value):
                    stamps.append(time.perf_counter())

                def end(self):
                    pass

            with torch.inference_mode():
                t0 = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, streamer=Clock(), pad_token_id=151643)
                _sync(device)
            stamps = stamps[1:]  # the first put() is the prompt
        else:
            from qvl.generate import Batch, token_steps

            with torch.inference_mode():
                t0 = time.perf_counter()
                for i, tok in enumerate(token_steps(model, Batch(ids, mask), n, compile=compile_, check_every=10**9)):
                    # Only the first token (end of prefill) and the last one are waited for: a sync per token
                    # would stop the host from queueing step i+1 while the GPU runs step i (qvl's loop itself
                    # never syncs with check_every this large). A token is "out" when it is on the host.
                    if i in (0, n - 1):
                        tok.tolist()
                        stamps.append(time.perf_counter())
        return stamps[0] - t0, stamps[-1] - stamps[0]

    once()  # warm-up (and compilation)
    runs = []
    for _ in range(args.repeats):
        with PeakMemory(device) as mem:
            runs.append(once())
    prefill_s = min(r[0] for r in runs)
    decode_s = min(r[1] for r in runs)
    # bytes read per decode token: every decoder layer + the lm_head matrix (tied: the embedding table)
    params = model.model.language_model if impl == "transformers" else model.model
    layer_bytes = sum(p.numel() * p.element_size() for name, p in params.named_parameters() if "layers." in name)
    head_bytes = V * text["hidden_size"] * torch.empty((), dtype=dtype).element_size()
    tok_s = args.new / decode_s
    return dict(prefill_s=prefill_s, prefill_tok_s=args.prompt / prefill_s, decode_tok_s=tok_s,
                gb_s=(layer_bytes + head_bytes) * tok_s / 1e9, peak_mb=mem.mb, layers=text["num_hidden_layers"])


def child(spec: dict) -> dict:
    import torch

    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if spec["kind"] == "vision":
        return run_vision(spec["impl"], spec["gen"], spec["size"], args, args.device, dtype)
    return run_decode(spec["impl"], spec["gen"], args, args.device, dtype, compile_=spec.get("compile", False))


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def spawn(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


BEST = {"seconds": min, "prefill_s": min, "decode_tok_s": max, "prefill_tok_s": max, "gb_s": max, "peak_mb": min}


def compare(specs: dict[str, dict], rounds: int, timeout: float) -> dict[str, dict]:
    """Run every implementation `rounds` times in fresh subprocesses, alternating the order (the machine
    may be shared: whoever runs while a neighbour is busy loses), and keep each one's best numbers."""
    runs: dict[str, list[dict]] = {k: [] for k in specs}
    names = list(specs)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            runs[name].append(spawn(specs[name], timeout))
    out = {}
    for name, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            out[name] = rs[0]
            continue
        out[name] = {k: (BEST[k](x[k] for x in ok) if k in BEST else ok[0][k]) for k in ok[0]}
    return out


def bandwidth(device: str) -> tuple[str, float | None]:
    if not device.startswith("cuda"):
        return "cpu", None
    import torch

    name = torch.cuda.get_device_name()
    for key, bw in BANDWIDTH:
        if all(part in name for part in key.split()):
            return name, bw
    return name, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--full", action="store_true", help="full depths and layer counts (GPU)")
    ap.add_argument("--sizes", default="448,1008,1344")
    ap.add_argument("--gens", default="2.5,2")
    ap.add_argument("--vision-depth", type=int, default=2, help="ViT blocks when not --full (of 32)")
    ap.add_argument("--text-layers", type=int, default=2, help="decoder layers when not --full (of 28 / 36)")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per subprocess (best kept)")
    ap.add_argument("--rounds", type=int, default=2, help="subprocesses per implementation, order alternated")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="also time qvl decode with torch.compile")
    ap.add_argument("--impls", default="transformers,qvl",
                    help="decode rows: transformers, qvl, qvl+compile (static cache steps through "
                         "torch.compile: CUDA graphs via mode='reduce-overhead' on CUDA)")
    ap.add_argument("--skip", default="", help="comma list of case kinds to skip: vision,decode")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    base = {k: v for k, v in vars(args).items() if k not in ("child",)}
    gens, sizes, skip = args.gens.split(","), [int(s) for s in args.sizes.split(",")], args.skip.split(",")
    card, bw = bandwidth(args.device)
    import torch

    print(f"# qvl vs transformers 4.57.6 | device {card} | {args.dtype} | torch {torch.__version__} | "
          f"threads {args.threads or torch.get_num_threads()}")
    if not args.full:
        print(f"# SHORT CONFIG: vision towers truncated to {args.vision_depth} of 32 blocks (Qwen2.5-VL keeps its "
              f"last block full-attention), decoders to {args.text_layers} of 28/36 layers; full vocabulary. "
              "Times are per truncated model; ratios are what the comparison is about.")
    print(f"# best of {args.rounds} rounds (fresh subprocess each, order alternated) x {args.repeats} timed calls; "
          "peak MB = extra resident (CPU) / allocated (CUDA) memory at the peak of the timed call")
    results = {"device": card, "dtype": args.dtype, "full": args.full, "vision": [], "decode": []}

    if "vision" not in skip:
        print("\n| tower | image | qvl s | tf s | time ratio qvl/tf | qvl peak MB | tf peak MB | mem ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for gen in gens:
            for size in sizes:
                r = compare({impl: dict(kind="vision", impl=impl, gen=gen, size=size, args=base)
                             for impl in ("qvl", "transformers")}, args.rounds, args.timeout)
                q, t = r["qvl"], r["transformers"]
                results["vision"].append(dict(gen=gen, size=size, **{k: v for k, v in r.items()}))
                if "error" in q or "error" in t:
                    print(f"| {VISION[gen]['name']} | {size}² | error: {q.get('error') or t.get('error')} |")
                    continue
                print(f"| {VISION[gen]['name']} (depth {q['depth']}) | {size}² | {q['seconds']:.3f} | {t['seconds']:.3f} | "
                      f"{q['seconds'] / t['seconds']:.2f} | {q['peak_mb']:.0f} | {t['peak_mb']:.0f} | "
                      f"{q['peak_mb'] / max(t['peak_mb'], 1e-9):.2f} |", flush=True)

    if "decode" not in skip:
        print(f"\n| decoder | layers | impl | prefill {args.prompt} tok s | prefill tok/s | decode tok/s "
              f"({args.new} steps) | GB/s | % of peak BW | peak MB | decode speed-up vs tf |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for gen in gens:
            impls = [(name.split("+")[0], name.endswith("+compile")) for name in args.impls.split(",")]
            if args.compile and ("qvl", True) not in impls:
                impls.append(("qvl", True))
            rows = compare({impl + (" + compile" if comp else ""): dict(kind="decode", impl=impl, gen=gen,
                                                                        compile=comp, args=base)
                            for impl, comp in impls}, args.rounds, args.timeout)
            results["decode"].append(dict(gen=gen, **rows))
            ref = rows.get("transformers", {}).get("decode_tok_s")
            for label, r in rows.items():
                if "error" in r:
                    print(f"| {TEXT[gen]['name']} | | {label} | error: {r['error']} |")
                    continue
                pct = f"{100 * r['gb_s'] * 1e9 / bw:.0f}%" if bw else "-"
                speed = f"{r['decode_tok_s'] / ref:.2f}x" if ref else "-"
                print(f"| {TEXT[gen]['name']} | {r['layers']} | {label} | {r['prefill_s']:.3f} | {r['prefill_tok_s']:.0f} | "
                      f"{r['decode_tok_s']:.1f} | {r['gb_s']:.2f} | {pct} | {r['peak_mb']:.0f} | {speed} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
