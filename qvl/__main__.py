"""Command line: ``python -m qvl inspect MEDIA...``.

Bad input never ends in a traceback: each bad file gets one line on stderr naming the file and the
problem, the batch goes on, and the exit code is 2 if any file failed.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import media

GENERATIONS = ("1", "2", "2.5")


def _size(hw) -> str:
    return f"{hw[0]}x{hw[1]}"  # height x width, as the processors count


def _grid(thw) -> str:
    return "x".join(str(v) for v in thw)


def _format_entry(path: str, acc: dict, generations: tuple[str, ...]) -> str:
    first = next(e for e in acc.values() if "original_size" in e)
    kind = first["kind"]
    lines = [f"{path}  ({kind}, {_size(first['original_size'])} HxW)"]
    if kind == "video":
        v = acc["2.5"]
        stamps = ", ".join(f"{t:.2f}" for t in v["timestamps"][:12])
        more = " ..." if len(v["timestamps"]) > 12 else ""
        lines.append(f"  frames {v['frames']} sampled at {v['sampled_fps']:.3g} fps "
                     f"(second_per_grid_t {v['second_per_grid_t']:.3g} s); timestamps s: {stamps}{more}")
    header = f"  {'gen':<4} {'resized HxW':>12} {'grid t,h,w':>12} {'patches':>8} {'visual':>7} {'LLM tokens':>10}  note"
    lines.append(header)
    for g in generations:
        e = acc[g]
        if e.get("supported") is False:
            lines.append(f"  {g:<4} {'-':>12} {'-':>12} {'-':>8} {'-':>7} {'-':>10}  {e['note']}")
            continue
        lines.append(f"  {g:<4} {_size(e['resized_size']):>12} {_grid(e['grid_thw']):>12} {e['patches']:>8} "
                     f"{e['visual_tokens']:>7} {e['llm_tokens']:>10}  {e.get('note', '')}")
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def cmd_inspect(args: argparse.Namespace) -> int:
    generations = GENERATIONS if args.generation is None else (args.generation,)
    failed = 0
    results = {}
    for path in args.media:
        try:
            acc = media.account(path, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                fps=args.fps, nframes=args.nframes)
        except (media.MediaError, OSError, ValueError) as e:
            failed += 1
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if path not in msg:
                msg = f"{path}: {msg}"
            print(f"error: {msg}", file=sys.stderr)
            continue
        if args.json:
            results[path] = {g: acc[g] for g in generations}
        else:
            print(_format_entry(path, acc, generations))
            print()
    if args.json:
        print(json.dumps(_jsonable(results), indent=2))
    return 2 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qvl", description="qvl: the Qwen-VL family in plain PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="token accounting of images/videos for each generation")
    ins.add_argument("media", nargs="+", help="image or video files")
    ins.add_argument("--generation", choices=GENERATIONS, help="show one generation only")
    ins.add_argument("--min-pixels", type=int, help="lower pixel budget (default: qwen-vl-utils' value)")
    ins.add_argument("--max-pixels", type=int, help="upper pixel budget (default: qwen-vl-utils' value)")
    ins.add_argument("--fps", type=float, help="video sampling rate (default 2.0)")
    ins.add_argument("--nframes", type=int, help="fixed number of video frames (instead of --fps)")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "fps", None) is not None and args.nframes is not None:
        parser.error("give either --fps or --nframes, not both")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
