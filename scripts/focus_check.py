"""Train one stage of the tiny recipe on chosen tasks, in chunks, and probe held-out questions after each chunk.

The recipe's stage 2 mixes nine tasks; this check asks whether the decoder can learn one skill at all when
that skill is all it sees (a few tasks, fewer objects per scene, another loss weighting), and how many steps it
takes. The probe splits each score by scenes with one object (no look-up needed: read the only shape) and the
rest (find the named object first). docs/training_log.md (session 5) has the numbers.

    python scripts/focus_check.py --init runs/recipe/gen2.5/stage2 --tasks shape --max-objects 1 --lr 3e-4 --out runs/shape1
    python scripts/focus_check.py --init runs/recipe/gen2.5/stage1 --tasks all --weighting answer --chunk 2000 --out runs/w_answer
    python scripts/focus_check.py --init runs/recipe/gen2.5/lm-pretrain --base lm-pretrain --tasks color,shape --out runs/text
    # session 9: a fresh decoder learns to copy from text, then meets the pre-trained ViT in stage 1 (LLM frozen)
    python scripts/focus_check.py --init runs/recipe/gen2.5/lm-pretrain --fresh --base lm-pretrain --tasks color \
        --max-objects 1 --chunk 1600 --chunks 4 --lr 3e-4 --out runs/copy
    python scripts/focus_check.py --init runs/copy/c4 --vision-from runs/recipe/gen2.5/vision-pretrain --base stage1 \
        --tasks color --max-objects 1 --chunk 2000 --chunks 2 --out runs/align

Each chunk is one `qvl.train` run of `--chunk` samples (its own warm-up and cosine schedule) started from the
previous chunk's model, on samples no other chunk or stage sees. `--base lm-pretrain` probes with the scene
written as text (the decoder alone).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from dataclasses import replace
from pathlib import Path

from qvl.data import tasks as T
from qvl.train import stages as S

PROBE_TASKS = ("color", "shape", "count", "ground")


def focus_stage(base: S.Stage, tasks: list[str] | None, weighting: str, max_objects: int | None,
                chunk_index: int, scene: dict | None = None) -> S.Stage:
    """`base` restricted to `tasks` (None = its own mix), with fresh seeds for chunk `chunk_index`;
    `scene`: SceneConfig overrides (e.g. {"max_side": 224, "large_prob": 0.0} for small canvases)."""
    kw = dict(name="focus", weighting=weighting, seed_offset=base.seed_offset + 5_000_000 + chunk_index * 100_000)
    if tasks is not None:
        kw["mix"] = {t: 1.0 for t in tasks}
    overrides = {**(scene or {}), **({"max_objects": max_objects} if max_objects else {})}
    if overrides:
        kw["data"] = {**base.data, "scene": {**base.data.get("scene", {}), **overrides}}
    return replace(base, **kw)


def starting_model(init, out: Path, generation: str, fresh: bool = False, vision_from=None, seed: int = 0) -> Path:
    """The model the first chunk starts from, written to `out` (a stage-like directory): `init` itself, or a
    fresh tiny model with `init`'s tokenizer (`fresh`), and/or with the vision tower (and dense head) of
    `vision_from` put in place of its own -- the join the recipe makes where stage 1 starts (loop.join),
    done by hand so a decoder trained on drills here can meet a pre-trained ViT (training log, session 9)."""
    import shutil

    from qvl.train import tiny
    from qvl.train.loop import HEAD_FILE, model_dir_of

    src = model_dir_of(init)
    model = tiny.new_model(generation, tiny.load_tokenizer(generation, src), seed=seed) if fresh else tiny.load_model(src)
    if vision_from is not None:
        try:
            tiny.graft(model, tiny.load_model(model_dir_of(vision_from)), vision=True)
        except ValueError as e:
            raise SystemExit(f"--vision-from {vision_from}: {e}") from None
        if (Path(vision_from) / HEAD_FILE).exists():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(vision_from) / HEAD_FILE, out / HEAD_FILE)
    tiny.save_model(model, out / "model", src)
    return out


def parse_overrides(text: str) -> dict:
    """"max_side=224,large_prob=0" -> {"max_side": 224, "large_prob": 0.0} (numbers only)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--scene: expected key=value, got {item!r}")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
    return out


def probe(model_dir, generation: str, tasks, n: int, as_text: bool, scene: dict | None = None) -> dict:
    """{task: {"score", "one_object": (sum, n), "top": [(reply, count), ...]}} on the first n held-out seeds
    (`scene`: SceneConfig overrides, to probe on the distribution a chunk trained on)."""
    import qvl
    from qvl import eval as E

    reply = E.vlm_reply_fn(qvl.load(model_dir))
    config = T.DataConfig()
    config = replace(config, scene=replace(config.scene, **(scene or {})))
    out = {}
    for task in tasks:
        samples = T.eval_samples(task, generation, n, config, render_media=not as_text)
        asked = [S.drill(s, s.seed) for s in samples] if as_text else samples
        replies = reply(asked)
        scores = [float(T.score(task, r, s.truth)) for r, s in zip(replies, samples)]
        one = [x for x, s in zip(scores, samples) if s.scene is not None and len(s.scene.shapes) == 1]
        out[task] = {"score": round(sum(scores) / len(scores), 3), "one_object": (round(sum(one), 2), len(one)),
                     "top": collections.Counter(r.strip()[:12] for r in replies).most_common(3)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", required=True, help="model or stage directory to start from")
    ap.add_argument("--out", required=True)
    ap.add_argument("--generation", default="2.5", choices=["1", "2", "2.5"])
    ap.add_argument("--base", default="stage2", choices=list(S.ORDER), help="the stage whose settings are used")
    ap.add_argument("--tasks", default="color,shape", help="comma-separated, or 'all' for the stage's own mix")
    ap.add_argument("--probe-tasks", default=None, help="default: --tasks (or color,shape,count,ground)")
    ap.add_argument("--weighting", default="token", choices=["token", "answer", "sqrt"])
    ap.add_argument("--max-objects", type=int, default=None)
    ap.add_argument("--scene", default="", help="SceneConfig overrides, e.g. max_side=224,large_prob=0")
    ap.add_argument("--probe-scene", default="", help="SceneConfig overrides for the probe's scenes (default none)")
    ap.add_argument("--probe-only", action="store_true", help="probe --init and stop")
    ap.add_argument("--fresh", action="store_true", help="start from a fresh tiny model with --init's tokenizer")
    ap.add_argument("--vision-from", default=None, help="stage or model directory whose ViT replaces the start's")
    ap.add_argument("--chunk", type=int, default=1600, help="samples per chunk")
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--lr", type=float, default=None, help="default: the base stage's")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=64, help="held-out questions per probed task")
    a = ap.parse_args(argv)
    from qvl.train.loop import model_dir_of, train

    base = S.get(a.base)
    tasks = None if a.tasks == "all" else a.tasks.split(",")
    probe_tasks = a.probe_tasks.split(",") if a.probe_tasks else (tasks or list(PROBE_TASKS))
    as_text = base.source == "drills"
    init, out = a.init, Path(a.out)
    scene, probe_scene = parse_overrides(a.scene), parse_overrides(a.probe_scene)
    if a.fresh or a.vision_from:
        init = starting_model(init, out / "c0", a.generation, a.fresh, a.vision_from)
    print(json.dumps({"chunk": 0, "samples": 0, "probe": probe(model_dir_of(init), a.generation, probe_tasks, a.n, as_text,
                                                               probe_scene)}), flush=True)
    if a.probe_only:
        return 0
    for k in range(1, a.chunks + 1):
        t0 = time.time()
        stage = focus_stage(base, tasks, a.weighting, a.max_objects, k, scene)
        summary = train(stage, a.generation, out / f"c{k}", a.chunk, init=init, lr=a.lr, batch_size=a.batch,
                        quiet=True, seed=k, workers=0)
        init = out / f"c{k}"
        print(json.dumps({"chunk": k, "samples": k * a.chunk, "loss": round(summary["final_loss"], 3),
                          "seconds": round(time.time() - t0), "probe": probe(model_dir_of(init), a.generation,
                                                                             probe_tasks, a.n, as_text, probe_scene)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
