"""Score a model on the held-out generated set: `python -m qvl.eval MODEL_DIR [--n 500] [--tasks ...] [--json]`.

The eval set is `qvl.data.eval_samples(task, generation, n)`: the first n seeds of the *eval* split, which
no training stage reads (`qvl.data.SPLITS`), the same scenes for every generation. Answers are greedy,
generated in batches through `qvl.load(dir)` (`VLM.prepare` + `VLM.generate`), exactly what a user gets.

Rows of the table:
  color, shape, count, refer, caption, video_direction: exact match (case and a final full stop ignored)
  ground:     mean IoU of the first box (read in the generation's own convention) and % with IoU >= 0.5
  ocr:        exact match, also split by the smallest text height (>= 14 px / < 14 px)
  video_when: % of answers within +-0.5 s of the event, and whether the answered second follows the true one
              at all: the least-squares slope of answered on true seconds (1 = reads the time exactly) and the
              correlation within each verb ("appear" / "disappear"), which an answer by the verb alone cannot
              have (none: no spread) even where its within-0.5-s score beats a model that reads the clip
plus a cost line: vision tokens per image and milliseconds per answer (batched, this machine), and per task
the score of the best *constant* answer (one of the set's most frequent answers, given to every question):
what a model that ignores the image and the question gets, so a score is read against it, not against zero.

`--ablation DIR DIR ...` puts generations side by side on the same held-out seeds: OCR split by text height,
grounding, video timing, vision tokens and milliseconds per image vs resolution, and linear probes on the
vision tokens (is there text under a token, which letter) that show what each vision side hands its decoder.
Video timing is asked again with the same clips sampled at other frame rates than training's 2 fps
(`ABLATION_FPS`): Qwen2.5-VL's temporal position ids count seconds, Qwen2-VL's count frame pairs, so only
an answer read from the former keeps its meaning when the rate changes. `--video-fps F` does the same for a
plain evaluation.

    from qvl.eval import evaluate, format_table
    results = evaluate(reply_fn, "2.5", tasks=("color", "ground"), n=50)   # reply_fn(list[Sample]) -> list[str]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from qvl.data import tasks as T

DEFAULT_TASKS = ("color", "shape", "count", "ground", "refer", "ocr", "caption", "video_direction", "video_when")
MAX_NEW_TOKENS = {"caption": 96, "ground": 64, "ocr": 32}  # others: 24
SMALL_TEXT_PX = 14  # the OCR target is on text >= 14 px tall
CONSTANT_CANDIDATES = 20  # the constant baseline tries the set's this many most frequent answers


def constant_baseline(task: str, samples: Sequence[T.Sample]) -> dict:
    """The best single answer for every question of `samples`, among their most frequent reference answers.
    -> {"answer": str, "score": float}. For "when" the answers are frame times, so a middle time wins (a few
    tenths of the answers fall within +-0.5 s of it); for boxes it is a box that happens to overlap others.
    It is chosen on the very questions it is scored on, so on a few dozen questions it flatters itself."""
    from collections import Counter

    candidates = [a for a, _ in Counter(s.answer for s in samples).most_common(CONSTANT_CANDIDATES)]
    scored = [(sum(T.score(task, a, s.truth) for s in samples) / max(1, len(samples)), a) for a in candidates]
    score, answer = max(scored, key=lambda x: x[0]) if scored else (0.0, "")
    return {"answer": answer, "score": score}


def vlm_reply_fn(vlm, batch_size: int = 16, stats: dict | None = None) -> Callable:
    """reply_fn for a loaded VLM: greedy answers in batches; accumulates cost figures into `stats`."""
    from qvl.generate import trim

    stats = stats if stats is not None else {}

    def reply(samples: Sequence[T.Sample]) -> list[str]:
        out = []
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            t0 = time.perf_counter()
            batch = vlm.prepare([s.prompt() for s in chunk])
            budget = MAX_NEW_TOKENS.get(chunk[0].task, 24)
            tokens = vlm.generate(batch, budget)
            out += [vlm.decode(r) for r in trim(tokens, vlm.stop_ids)]
            stats["seconds"] = stats.get("seconds", 0.0) + time.perf_counter() - t0
            stats["answers"] = stats.get("answers", 0) + len(chunk)
            images = [m.tokens for m in batch.media if m.kind == "image"]
            stats["image_tokens"] = stats.get("image_tokens", 0) + sum(images)
            stats["images"] = stats.get("images", 0) + len(images)
        return out

    reply.stats = stats
    return reply


def tasks_for(generation: str, tasks: Sequence[str] | None) -> list[str]:
    tasks = list(tasks or DEFAULT_TASKS)
    unknown = [t for t in tasks if t not in T.TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {T.TASKS}")
    return [t for t in tasks if not (str(generation) == "1" and t in T.VIDEO_TASKS)]


def _slope_and_r(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Least-squares slope of y on x and Pearson's r; None where x (or, for r, y) does not vary."""
    try:
        slope = statistics.linear_regression(x, y).slope
    except statistics.StatisticsError:  # fewer than two points, or x constant
        return None, None
    try:
        return slope, statistics.correlation(x, y)
    except statistics.StatisticsError:  # y constant: a per-verb constant answer
        return slope, None


def timing(replies: Sequence[str], samples: Sequence[T.Sample]) -> dict:
    """How the answered seconds of "when" questions relate to the true ones: {"answered": how many replies
    name a number, "slope": least-squares slope of answered on true seconds, "mean_error_s": mean |answered -
    true|, "r_<verb>": Pearson's r within the questions about that verb}. A model that answers by the
    question's verb alone ("0.2 seconds" to every "appear") keeps only the slope the verb explains ("disappear"
    comes later: 0.28 for session 21's gen 2.5) and no r (None: no spread), while its within-0.5-s score can
    beat a model that reads the clip."""
    pairs = []  # (verb, true second, answered second)
    for reply, s in zip(replies, samples):
        t = T.answered_seconds(reply)
        if t is not None:
            pairs.append((s.truth["event"], s.truth["time"], t))
    out = {"answered": len(pairs), "slope": _slope_and_r([p[1] for p in pairs], [p[2] for p in pairs])[0],
           "mean_error_s": sum(abs(p[2] - p[1]) for p in pairs) / len(pairs) if pairs else None}
    for verb in sorted({p[0] for p in pairs}):
        sel = [p for p in pairs if p[0] == verb]
        out[f"r_{verb}"] = _slope_and_r([p[1] for p in sel], [p[2] for p in sel])[1]
    return out


def evaluate(reply_fn: Callable, generation: str, tasks: Sequence[str] | None = None, n: int = 500,
             config: T.DataConfig = T.DataConfig(), keep_replies: int = 0,
             transform: Callable[[T.Sample], T.Sample] | None = None) -> dict:
    """-> {task: {"n", "score", ...task extras, "examples": [...]}}; `score` is accuracy or mean IoU.
    `transform` rewrites each held-out sample before it is asked (same truth), e.g. the training's text
    drills, which replace the image by its description: a probe of the decoder alone (with a transform the
    media are not rendered)."""
    results = {}
    for task in tasks_for(generation, tasks):
        samples = T.eval_samples(task, generation, n, config, render_media=transform is None)
        if transform is not None:
            samples = [transform(s) for s in samples]
        replies = reply_fn(samples)
        scores = [T.score(task, r, s.truth) for r, s in zip(replies, samples)]
        res = {"n": len(scores), "score": sum(scores) / max(1, len(scores)),
               "constant": constant_baseline(task, samples)}
        if task in T.VIDEO_TASKS:  # the rate the clips were sampled at (frame counts are rounded: not exactly config's)
            res["sampled_fps"] = sum(s.media["fps"] for s in samples) / max(1, len(samples))
        if task == "ground":
            res["iou>=0.5"] = sum(s >= 0.5 for s in scores) / max(1, len(scores))
        if task == "video_when":
            res["timing"] = timing(replies, samples)
        if task == "ocr":
            for name, keep in ((f">={SMALL_TEXT_PX}px", lambda h: h >= SMALL_TEXT_PX),
                               (f"<{SMALL_TEXT_PX}px", lambda h: h < SMALL_TEXT_PX)):
                sel = [sc for sc, s in zip(scores, samples) if keep(s.truth["min_height"])]
                res[name] = sum(sel) / len(sel) if sel else None
                res[f"n{name}"] = len(sel)
        if keep_replies:
            res["examples"] = [{"reply": r, "answer": s.answer} for r, s in list(zip(replies, samples))[:keep_replies]]
        results[task] = res
    return results


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:5.1f} %"


def format_table(results: dict, cost: dict | None = None, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'task':<16} {'n':>5}  {'score':>9}  {'constant':>9}  details")
    for task, r in results.items():
        const = r.get("constant")
        if task == "ground":
            score, detail = f"{r['score']:.3f} IoU", f"IoU>=0.5: {_pct(r['iou>=0.5'])}"
            base = f"{const['score']:.3f} IoU" if const else "-"
        else:
            score, detail = _pct(r["score"]), ""
            base = _pct(const["score"]) if const else "-"
            if task == "ocr":
                detail = (f">={SMALL_TEXT_PX}px: {_pct(r[f'>={SMALL_TEXT_PX}px'])} (n={r[f'n>={SMALL_TEXT_PX}px']})  "
                          f"<{SMALL_TEXT_PX}px: {_pct(r[f'<{SMALL_TEXT_PX}px'])} (n={r[f'n<{SMALL_TEXT_PX}px']})")
            if task == "video_when":
                detail = f"within +-{T.WHEN_TOLERANCE_S} s"
                if "timing" in r:
                    detail += "  " + format_timing(r["timing"])
        if const and task != "ground":
            detail = (detail + "  " if detail else "") + f"constant: {json.dumps(const['answer'], ensure_ascii=False)}"
        lines.append(f"{task:<16} {r['n']:>5}  {score:>9}  {base:>9}  {detail}")
    if cost:
        lines.append(f"cost: {cost.get('vision_tokens_per_image', 0):.1f} vision tokens per image, "
                     f"{cost.get('ms_per_answer', 0):.1f} ms per answer (batched)")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_timing(t: dict) -> str:
    """"slope 0.72, r appear / disappear 0.65 / 0.66" ("-" where a value is undefined)."""
    verbs = sorted(k[2:] for k in t if k.startswith("r_"))
    within = f", r {' / '.join(verbs)} {' / '.join(_num(t['r_' + v]) for v in verbs)}" if verbs else ""
    return f"slope {_num(t['slope'])}{within}"


def cost_of(stats: dict) -> dict:
    return {"vision_tokens_per_image": stats.get("image_tokens", 0) / max(1, stats.get("images", 0)),
            "ms_per_answer": 1000 * stats.get("seconds", 0.0) / max(1, stats.get("answers", 0))}


def evaluate_dir(model_dir, n: int = 500, tasks=None, batch_size: int = 16, device=None, keep_replies: int = 0,
                 transform=None, config: T.DataConfig = T.DataConfig()):
    """Load a model directory and evaluate it (`transform`: see `evaluate`). -> (results, cost, generation)"""
    import qvl

    vlm = qvl.load(model_dir, device=device)
    fn = vlm_reply_fn(vlm, batch_size)
    results = evaluate(fn, vlm.generation, tasks, n, config, keep_replies=keep_replies, transform=transform)
    return results, cost_of(fn.stats), vlm.generation


# --------------------------------------------------------------------------------------------------
# The ablation: the three tiny generations on the same held-out set
# --------------------------------------------------------------------------------------------------

ABLATION_TASKS = ("ocr", "ground", "video_when")
COST_SIDES = (224, 448, 896)  # square canvases for the vision-cost columns
# "When" again at these sampling rates (training samples ~2 fps, the qwen-vl-utils default). The rate is what
# the two M-RoPE designs disagree on: gen 2.5's temporal ids are seconds (`second_per_grid_t`, the Qwen2.5-VL
# report's "absolute time encoding"), gen 2's are the index of the frame pair, so at 4 fps a gen-2 id means
# half the time it meant in training. 1 fps is floored at qwen-vl-utils' 4 frames, so short clips get more.
ABLATION_FPS = (1.0, 4.0)


def vision_cost(vlm, sides: Sequence[int] = COST_SIDES, repeats: int = 5) -> dict:
    """Vision tokens and milliseconds of the vision tower (ViT + merger / resampler, no decoder) for one square
    image per side, at native resolution (gen 2/2.5: max_pixels raised so nothing is scaled down; gen 1: its
    fixed input). -> {side: {"tokens", "ms"}}; ms is the best of `repeats` runs."""
    import numpy as np
    import torch
    from PIL import Image

    out = {}
    for side in sides:
        img = Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8))
        item = {"type": "image", "image": img, "max_pixels": side * side + 28 * 28}
        batch = vlm.prepare([{"role": "user", "content": [item, {"type": "text", "text": "."}]}])
        v = batch.vision
        if vlm.generation == "1":
            run = lambda: vlm.model.transformer.visual(v["images"])  # noqa: E731
        else:
            run = lambda: vlm.model.visual(v["pixel_values"], v["image_grid_thw"])  # noqa: E731
        times = []
        with torch.inference_mode():
            run()  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        out[side] = {"tokens": batch.media[0].tokens, "ms": 1000 * min(times)}
    return out


def vision_tokens(vlm, sample: T.Sample):
    """The vision tokens the decoder receives for a sample's one image, and their (rows, cols) layout over the
    image. -> (feats [N, hidden] float32, (rows, cols)). Gen 2/2.5: merged 2x2 units in raster order (the
    window reorder is undone after the merger); gen 1: the resampler's queries, which vision pre-training
    tied to an n x n grid of cells (`qvl.train.batching.dense_targets`)."""
    import torch

    batch = vlm.prepare([sample.prompt()])
    v, item = batch.vision, batch.media[0]
    with torch.inference_mode():
        if vlm.generation == "1":
            feats = vlm.model.transformer.visual(v["images"])[0]
            side = int(round(feats.shape[0] ** 0.5))
            grid = (side, side)
        else:
            feats = vlm.model.visual(v["pixel_values"], v["image_grid_thw"])
            _, h, w = item.grid_thw
            m = vlm.config.vision.spatial_merge_size
            grid = (h // m, w // m)
    return feats.float().cpu(), grid


def _fit_linear_probe(x, y, classes: int, steps: int = 100, l2: float = 1e-2, balanced: bool = False):
    """Multinomial logistic regression on standardised features (L-BFGS, L2 on the weights; `balanced` weighs
    each class by the inverse of its frequency). -> predict(x) -> labels"""
    import torch
    import torch.nn.functional as F

    mean, std = x.mean(0), x.std(0) + 1e-6
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")
    xs = (x - mean) / std
    weight = None
    if balanced:
        count = torch.bincount(y, minlength=classes).float()
        weight = torch.where(count > 0, count.sum() / (classes * count.clamp(min=1)), torch.zeros_like(count))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xs), y, weight=weight) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lambda z: lin((z - mean) / std).argmax(-1)


PROBE_CONFIG = T.DataConfig(scene=replace(T.DataConfig().scene, large_prob=1.0))  # every canvas large
PROBE_FIT = 200  # scenes to fit the text probe on; as many again score it


def text_probe(vlm, n_fit: int = PROBE_FIT, n_test: int = PROBE_FIT) -> dict:
    """What the vision tokens hand the decoder about text, whatever the tiny decoder then reads out. Two linear
    probes on the vision tokens of held-out OCR scenes on large canvases (half of them with small text), fit on
    n_fit scenes and scored on the next n_test, with the vision pre-training's per-token targets
    (`qvl.train.batching.dense_targets`): is there text under this token (class-balanced), and which letter.
    Each text token counts toward the height of the word it takes its letter from.
    -> {"found>=14px", "found<14px": share of text tokens detected, "false alarms": share of other tokens
        called text, "letter>=14px", "letter<14px": letter accuracy on text tokens, "chance": the most frequent
        letter's share, "n>=14px", "n<14px": text tokens scored}"""
    import torch

    from qvl.train.batching import N_LETTERS, dense_targets

    samples = T.eval_samples("ocr", vlm.generation, n_fit + n_test, PROBE_CONFIG)
    xs, texts, letters, heights = [], [], [], []
    for s in samples:
        feats, grid = vision_tokens(vlm, s)
        cls, letter, box, _ = dense_targets(s.scene, grid)
        xs.append(feats), texts.append(cls == 1), letters.append(letter)
        # The owning word's height, from its box (normalised by the canvas; NaN off every object).
        heights.append((box[:, 3] - box[:, 1]) * s.scene.height)
    split = sum(len(x) for x in xs[:n_fit])
    x, text, letter, height = (torch.cat(v) for v in (xs, texts, letters, heights))
    fit, test = slice(0, split), slice(split, None)
    found = _fit_linear_probe(x[fit], text[fit].long(), 2, balanced=True)
    has_letter = letter > 0
    fit_l = has_letter.clone()
    fit_l[test] = False
    read = _fit_linear_probe(x[fit_l], letter[fit_l], N_LETTERS)
    with torch.no_grad():
        said_text = found(x[test]).bool()
        right = read(x[test]) == letter[test]
    text, has_letter, height = text[test], has_letter[test], height[test]
    out = {"false alarms": float(said_text[~text].float().mean()) if (~text).any() else None,
           "chance": float(torch.bincount(letter[fit_l]).max() / max(1, int(fit_l.sum())))}
    for name, size in ((f">={SMALL_TEXT_PX}px", height >= SMALL_TEXT_PX), (f"<{SMALL_TEXT_PX}px", height < SMALL_TEXT_PX)):
        on, lt = text & size, has_letter & size
        out[f"found{name}"] = float(said_text[on].float().mean()) if on.any() else None
        out[f"letter{name}"] = float(right[lt].float().mean()) if lt.any() else None
        out[f"n{name}"] = int(on.sum())
    return out


def ablation(model_dirs: Sequence, n: int = 500, device=None, probe_n: int = PROBE_FIT) -> list[dict]:
    """One row per model: small vs normal text OCR, grounding, video timing (also at ABLATION_FPS), vision cost
    vs resolution."""
    import qvl

    rows = []
    for d in model_dirs:
        vlm = qvl.load(d, device=device)
        reply = vlm_reply_fn(vlm)
        results = evaluate(reply, vlm.generation, ABLATION_TASKS, n)
        row = {"model": str(d), "generation": vlm.generation, "results": results}
        if "video_when" in results:
            row["when_at_fps"] = {}
            for fps in ABLATION_FPS:
                config = replace(T.DataConfig(), video_fps=fps)
                when = evaluate(reply, vlm.generation, ["video_when"], n, config)["video_when"]
                row["when_at_fps"][f"{fps:g}"] = {"score": when["score"], "sampled_fps": when["sampled_fps"],
                                                  "slope": when["timing"]["slope"]}
        row.update(text_probe=text_probe(vlm, probe_n, probe_n), vision_cost=vision_cost(vlm))
        rows.append(row)
    return rows


def format_ablation(rows: list[dict]) -> str:
    """A markdown table of `ablation` rows."""
    big = f"<{SMALL_TEXT_PX}px"
    cost_cols = [f"vision {s}² (tokens / ms)" for s in COST_SIDES]
    head = ["generation", "what differs", f"OCR >= {SMALL_TEXT_PX} px", f"OCR < {SMALL_TEXT_PX} px (large canvases)",
            f"text probe >= {SMALL_TEXT_PX} px (found / letter)", f"text probe < {SMALL_TEXT_PX} px (found / letter)",
            "ground mIoU", "IoU >= 0.5", f"video when (±{T.WHEN_TOLERANCE_S} s; slope, r within a verb)",
            *[f"when, clips at {f:g} fps" for f in ABLATION_FPS], *cost_cols]
    differs = {"1": "fixed 224² + resampler, 0-1000 boxes, no video",
               "2": "native res, full-attention ViT, 0-1000 boxes, M-RoPE time = frame index",
               "2.5": "native res, window ViT, absolute-pixel boxes, M-RoPE time = seconds"}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res, g = r["results"], r["generation"]
        ocr, ground, when = res.get("ocr", {}), res.get("ground", {}), res.get("video_when")
        probe = r.get("text_probe", {})
        cells = [g, differs.get(g, ""), _pct(ocr.get(f">={SMALL_TEXT_PX}px")) + f" (n={ocr.get(f'n>={SMALL_TEXT_PX}px', 0)})",
                 _pct(ocr.get(big)) + f" (n={ocr.get('n' + big, 0)})",
                 *[f"{_pct(probe.get('found' + k)).strip()} / {_pct(probe.get('letter' + k)).strip()} (n={probe.get('n' + k, 0)})"
                   for k in (f">={SMALL_TEXT_PX}px", big)],
                 f"{ground.get('score', 0):.3f}", _pct(ground.get("iou>=0.5")),
                 f"{_pct(when['score']).strip()}, {format_timing(when['timing'])}" if when else "no video"]
        at = r.get("when_at_fps", {})
        cells += [f"{_pct(at[f'{f:g}']['score']).strip()} ({at[f'{f:g}']['sampled_fps']:.1f} fps, slope "
                  f"{_num(at[f'{f:g}']['slope'])})" if f"{f:g}" in at else "no video" for f in ABLATION_FPS]
        cells += [f"{c['tokens']} / {c['ms']:.1f}" for c in r["vision_cost"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    consts = []  # "gen 2.5: ocr 2.0 %, ground 0.039, video_when 36.5 %"
    for r in rows:
        scores = {t: res["constant"]["score"] for t, res in r["results"].items() if "constant" in res}
        parts = [f"{t} {v:.3f}" if t == "ground" else f"{t} {_pct(v).strip()}" for t, v in scores.items()]
        if parts:
            consts.append(f"gen {r['generation']}: " + ", ".join(parts))
    if consts:
        lines.append("\nThe best constant answer on these seeds (what a model that looks at nothing scores): "
                     + "; ".join(consts) + ".")
    probed = [r for r in rows if "text_probe" in r]
    if probed:
        notes = ", ".join(f"gen {r['generation']} {_pct(r['text_probe']['false alarms']).strip()} / "
                          f"{_pct(r['text_probe']['chance']).strip()}" for r in probed)
        lines.append("\nText probe: linear read-outs from each vision token (is there text under it, class-balanced; "
                     "which letter), fit on held-out large-canvas OCR scenes and scored on as many others. "
                     f"Other tokens called text / the most frequent letter's share: {notes}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qvl.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="+", help="one model directory, or several with --ablation")
    ap.add_argument("--ablation", action="store_true",
                    help="the generations side by side: OCR by text size, grounding, video timing, vision cost")
    ap.add_argument("--n", type=int, default=500, help="samples per task (first n eval seeds)")
    ap.add_argument("--probe-n", type=int, default=PROBE_FIT,
                    help="--ablation: scenes to fit the text probes on, and as many to score them on")
    ap.add_argument("--tasks", nargs="+", default=None, help=f"subset of {' '.join(DEFAULT_TASKS)}")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--examples", type=int, default=0, help="keep this many replies per task (JSON)")
    ap.add_argument("--video-fps", type=float, default=None, metavar="F",
                    help=f"sample the video clips at F frames per second (default {T.DataConfig().video_fps:g}, "
                         "as in training)")
    args = ap.parse_args(argv)
    if args.video_fps is not None and not args.video_fps > 0:
        ap.error(f"--video-fps must be > 0, got {args.video_fps:g}")
    if args.video_fps is not None and args.ablation:
        ap.error("--video-fps is for a plain evaluation; --ablation asks 'when' at its own rates (ABLATION_FPS)")
    config = T.DataConfig() if args.video_fps is None else replace(T.DataConfig(), video_fps=args.video_fps)
    import torch

    if (args.device or "cpu") == "cpu" and not torch.cuda.is_available():
        torch.set_num_threads(max(1, torch.get_num_threads()))
    missing = [d for d in args.model_dir if not (Path(d) / "config.json").is_file()]
    if missing:  # one line, not a traceback
        print(f"qvl.eval: {missing[0]}: not a model directory (no config.json)", file=sys.stderr)
        return 2
    if args.ablation:
        rows = ablation(args.model_dir, args.n, args.device, args.probe_n)
        print(json.dumps(rows, indent=2) if args.json else format_ablation(rows))
        return 0
    for model_dir in args.model_dir:
        results, cost, generation = evaluate_dir(model_dir, args.n, args.tasks, args.batch_size, args.device,
                                                 args.examples, config=config)
        if args.json:
            print(json.dumps({"model": str(model_dir), "generation": generation, "results": results,
                              "cost": cost}, indent=2))
        else:
            print(format_table(results, cost, f"{model_dir} (gen {generation}), held-out seeds"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
