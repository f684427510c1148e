"""Where the position that predicts a colour / shape answer looks, and whether it finds the asked shape.

    python scripts/lookup_check.py MODEL_DIR [MODEL_DIR ...] [--task color|shape] [--n 80]

For held-out questions about scenes with two or more shapes (gen 2 / 2.5 models), the reference answer is fed
up to its answer word (teacher forcing: "The star" before "red", "A red" before "star"; nothing for a bare
answer), and at that last position -- the one whose output is the answer word -- the decoder's attention is
read: per layer and head, the mass on the image, on the question's key word (the kind or colour it names) and
the per-token ratio of the asked shape's image tokens to the other shapes' (1 = no preference; a look-up head
is well above 1). The greedy answer word from that position is scored too, by shapes in the scene.
Session 12 (docs/training_log.md): with bare answers no head preferred the asked shape (ratios <= 1.02) and
none read the key word (mass <= 0.03) -- the look-up was never made.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

import numpy as np
import torch

import qvl
from qvl.data import tasks as T
from qvl.generate import prompt_positions, token_steps
from qvl.train.batching import dense_targets
from qvl.viz.app_helpers import LastRowCapture


def asked(sample: T.Sample) -> tuple[int, str]:
    """(index of the asked shape in scene.shapes, the key word the question names)."""
    q, want = sample.qas[0].question, sample.truth["answer"]
    if sample.task == "color":  # "What color is the star?": the one shape of that kind
        hits = [(i, s.kind) for i, s in enumerate(sample.scene.shapes) if re.search(rf"\b{s.kind}\b", q)]
        hits = [(i, k) for i, k in hits if sample.scene.shapes[i].color == want]
    else:  # "What shape is the red object?": the one shape of that colour
        hits = [(i, s.color) for i, s in enumerate(sample.scene.shapes) if re.search(rf"\b{s.color}\b", q)]
        hits = [(i, c) for i, c in hits if sample.scene.shapes[i].kind == want]
    if len(hits) != 1:
        raise ValueError(f"seed {sample.seed}: the question names {len(hits)} shapes")
    return hits[0]


def answer_prefix(answer: str, word: str) -> str:
    """The answer's text before its last `word` ("The star red." -> "The star"; "red" -> "")."""
    cut = answer.rfind(word)
    if cut < 0:
        raise ValueError(f"{word!r} is not in the answer {answer!r}")
    return answer[:cut].rstrip()


def shape_tokens(sample: T.Sample, item) -> np.ndarray:
    """Owner shape index per image token (-1: background / text), on the merged grid of the resized image."""
    _, gh, gw = item.grid_thw
    return np.asarray(dense_targets(sample.scene, (gh // 2, gw // 2))[3])


def forced_batch(vlm, sample: T.Sample, bare: bool = False):
    """The prompt with the reference answer fed up to its answer word -> (Batch, tokens fed after the prompt)
    (`bare`: the model was trained on bare-word answers, so nothing is fed)."""
    batch = vlm.prepare([sample.prompt()])
    prefix = "" if bare else answer_prefix(sample.answer, sample.truth["answer"])
    if not prefix:
        return batch, 0
    extra = torch.tensor([vlm.tokenizer.encode(prefix)], dtype=torch.long)
    batch.input_ids = torch.cat([batch.input_ids, extra], 1)
    batch.attention_mask = torch.cat([batch.attention_mask, torch.ones_like(extra)], 1)
    batch.position_ids, batch.rope_deltas = prompt_positions(vlm.model, batch.input_ids, batch.attention_mask,
                                                             batch.vision)
    return batch, extra.shape[1]


def inspect(vlm, sample: T.Sample, bare: bool = False) -> dict:
    """Attention of the answer-word position (every layer and head) and the greedy answer word there."""
    target, key = asked(sample)
    batch, n_prefix = forced_batch(vlm, sample, bare)
    (item,) = batch.media
    cfg = vlm.config.text
    cap = LastRowCapture(layers=list(range(cfg.num_hidden_layers)), max_calls=1)
    with torch.inference_mode():
        new = [int(t[0]) for t in token_steps(vlm.model, batch, 4, stop_ids=vlm.stop_ids, pad_id=vlm.pad_id,
                                              capture=cap)]
    owner = torch.from_numpy(shape_tokens(sample, item))
    ids = batch.input_ids[0].tolist()
    key_ids = set(vlm.tokenizer.encode(" " + key)) | set(vlm.tokenizer.encode(key))
    key_pos = [i for i in range(item.end, len(ids) - n_prefix) if ids[i] in key_ids]  # in the question
    rows = {}
    for layer, calls in cap.attn.items():
        a = calls[0][0, :, -1, :].float()  # (heads, keys): the last position's attention
        img = a[:, item.start:item.end]
        on = lambda j: img[:, owner == j].mean(dim=1)  # noqa: E731 - mean weight per token of shape j
        others = [on(j) for j in range(len(sample.scene.shapes)) if j != target and (owner == j).any()]
        ratio = on(target) / torch.stack(others).mean(0).clamp_min(1e-9) if others and (owner == target).any() else None
        rows[layer] = {"image": img.sum(1), "key": a[:, key_pos].sum(1), "ratio": ratio}
    return {"right": T.score(sample.task, vlm.decode(new), sample.truth) == 1.0, "shapes": len(sample.scene.shapes),
            "rows": rows}


def check(model_dir, task: str, n: int, bare: bool = False) -> dict:
    from qvl.train.loop import model_dir_of  # a stage directory or a model directory

    vlm = qvl.load(model_dir_of(model_dir))
    if vlm.generation == "1":
        raise SystemExit(f"{model_dir}: gen 1 has no token grid to map shapes onto (its resampler mixes them)")
    found = {what: collections.defaultdict(list) for what in ("image", "key", "ratio")}  # what -> layer -> [per head]
    by_count = collections.defaultdict(list)
    for sample in T.eval_samples(task, vlm.generation, n):
        if len(sample.scene.shapes) < 2:
            continue
        got = inspect(vlm, sample, bare)
        by_count[got["shapes"]].append(got["right"])
        for layer, r in got["rows"].items():
            for what, per_layer in found.items():
                if r[what] is not None:
                    per_layer[layer].append(r[what])
    summary = {"image": lambda x: x.mean(0), "key": lambda x: x.mean(0), "ratio": lambda x: x.median(0).values}
    return {"accuracy": {k: (sum(v), len(v)) for k, v in sorted(by_count.items())},
            **{what: {layer: summary[what](torch.stack(v)).tolist() for layer, v in per_layer.items()}
               for what, per_layer in found.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--task", default="color", choices=["color", "shape"])
    ap.add_argument("--n", type=int, default=80, help="held-out questions drawn (one-shape scenes are skipped)")
    ap.add_argument("--bare", action="store_true", help="models trained on bare-word answers (before session 12)")
    a = ap.parse_args(argv)
    for m in a.models:
        r = check(m, a.task, a.n, a.bare)
        acc = ", ".join(f"{k} shapes {s}/{t}" for k, (s, t) in r["accuracy"].items())
        print(f"{m} ({a.task}): answer word right: {acc}")
        print("layer | per head: mass on image / on the key word / asked-vs-other shape ratio (median)")
        for layer in sorted(r["image"]):
            cells = [f"{i:.2f}/{k:.2f}/{x:.2f}" for i, k, x in zip(r["image"][layer], r["key"][layer],
                                                                    r["ratio"].get(layer, [float("nan")] * 99))]
            print(f"{layer:5d} | " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
