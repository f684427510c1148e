"""Does the vision side know each shape's colour *and* its kind? A stage's dense head, per shape token.

The dense head (qvl.train.loop.DenseHead) names one colour x kind class per vision token. Its `obj_acc` in
loss.csv counts both at once; this splits them on held-out images: the share of shape tokens whose predicted
colour is right, and whose predicted kind is right (chance 1 / 5). Session 10 found colour at 99.6 % and kind
at 42 % after vision-pretrain -- the decoder cannot copy a kind the vision tokens do not carry
(docs/training_log.md). Heads with the per-shape readout (session 11) are also scored per shape: the kind
named by the head's linear readout of the mean of each shape's tokens ("object_kind"; None for older heads).
And per shape, where it is: the head's box read-out averaged over the shape's tokens, mean IoU with the true
box ("box_iou"), next to a constant guess, the mean true box ("box_iou_const"). Session 14 found gen 2/2.5's
tokens at the constant guess: a ViT with rotary positions only has no absolute position in its tokens.

    python scripts/dense_check.py runs/recipe/gen2.5/vision-pretrain runs/recipe/gen2.5/stage2 --n 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qvl.data import tasks as T
from qvl.data.world import KINDS
from qvl.train import stages as S
from qvl.train import tiny
from qvl.train.batching import Collator, embed_kwargs
from qvl.train.loop import HEAD_FILE, DenseHead, model_dir_of, pool_objects, run_vision, vision_module


def colour_kind_hits(logits: torch.Tensor, cls: torch.Tensor) -> tuple[int, int, int]:
    """Dense-class logits [N, C] and targets [N] -> (shape tokens, colour right, kind right), counted on the
    tokens whose target is a shape (class 2 + colour * len(KINDS) + kind), the prediction taken among the
    shape classes only (so "background" never counts as a wrong colour)."""
    shape = cls > 1
    pred = logits[shape][:, 2:].argmax(-1)
    true = cls[shape] - 2
    k = len(KINDS)
    return int(shape.sum()), int((pred // k == true // k).sum()), int((pred % k == true % k).sum())


def object_kind_hits(logits: torch.Tensor, obj_cls: torch.Tensor) -> tuple[int, int]:
    """Per-shape readout logits [S, colours x kinds] and each shape's class [S] -> (shapes, kind right)."""
    k = len(KINDS)
    return len(obj_cls), int((logits.argmax(-1) % k == obj_cls % k).sum())


def shape_boxes(pred: torch.Tensor, box: torch.Tensor, obj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token predicted boxes [N, 4], target boxes [N, 4] (a token's shape's box) and batch shape index [N]
    (-1 off shapes) -> (each shape's mean predicted box [S, 4], its true box [S, 4])."""
    shapes = [s for s in obj.unique().tolist() if s >= 0]
    if not shapes:
        return pred.new_zeros(0, 4), box.new_zeros(0, 4)
    return (torch.stack([pred[obj == s].mean(0) for s in shapes]),
            torch.stack([box[obj == s][0] for s in shapes]))


def mean_iou(pred: torch.Tensor, true: torch.Tensor) -> float:
    return sum(T.iou(p.tolist(), t.tolist()) for p, t in zip(pred, true)) / max(len(true), 1)


def check(stage_dir, n: int = 64, batch: int = 8) -> dict:
    """{"tokens", "colour", "kind", "shapes", "object_kind", "box_iou", "box_iou_const"} for a stage directory
    holding model/ and the dense head."""
    stage_dir = Path(stage_dir)
    if not (stage_dir / HEAD_FILE).exists():
        raise SystemExit(f"{stage_dir}: no {HEAD_FILE} (only dense stages and those after them keep one)")
    model = tiny.load_model(model_dir_of(stage_dir)).eval()
    head = DenseHead.for_model(model).eval()
    from safetensors.torch import load_file

    missing, unexpected = head.load_state_dict(load_file(str(stage_dir / HEAD_FILE)), strict=False)
    if unexpected or any(not k.startswith(("obj.", "patch.obj.")) for k in missing):
        raise SystemExit(f"{stage_dir}: {HEAD_FILE} does not match the dense head (missing {missing}, unexpected {unexpected})")
    per_shape = not missing  # heads saved before session 11 have no per-shape readout
    g = model.generation
    coll = Collator(g, tiny.load_tokenizer(g, model_dir_of(stage_dir)), model.config, loss="text", dense=True)
    # count questions draw the fullest scenes; vision-pretrain's resolution, held-out seeds
    samples = T.eval_samples("count", g, n, S.get("vision-pretrain").data_config())
    tokens = colour = kind = shapes = shape_kind = 0
    pred_boxes, true_boxes = [], []
    for i in range(0, n, batch):
        b = coll(samples[i:i + batch])
        feats: list[torch.Tensor] = []
        hook = vision_module(model).register_forward_hook(lambda m, a, o: feats.append(o))
        try:
            with torch.no_grad():
                run_vision(model, embed_kwargs(b["vision"]))
                normed = head.trunk[0](feats[0].flatten(0, -2).float())
                h = head.trunk[1:](normed)
                logits = head.cls(h)
                shape_pred, shape_true = shape_boxes(torch.sigmoid(head.box(h)), b["dense_box"], b["dense_obj"])
                pred_boxes.append(shape_pred)
                true_boxes.append(shape_true)
                pooled, seen = pool_objects(normed, b["dense_obj"], len(b["dense_obj_cls"]))
                obj_logits = head.obj(pooled)
        finally:
            hook.remove()
        t, c, k = colour_kind_hits(logits, b["dense_cls"])
        tokens, colour, kind = tokens + t, colour + c, kind + k
        s, sk = object_kind_hits(obj_logits, b["dense_obj_cls"][seen])
        shapes, shape_kind = shapes + s, shape_kind + sk
    pred, true = torch.cat(pred_boxes), torch.cat(true_boxes)
    return {"tokens": tokens, "colour": round(colour / max(tokens, 1), 3), "kind": round(kind / max(tokens, 1), 3),
            "shapes": shapes, "object_kind": round(shape_kind / max(shapes, 1), 3) if per_shape else None,
            "box_iou": round(mean_iou(pred, true), 3),
            "box_iou_const": round(mean_iou(true.mean(0, keepdim=True).expand_as(true), true), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stages", nargs="+", help="stage directories (model/ + dense head)")
    ap.add_argument("--n", type=int, default=64, help="held-out images")
    a = ap.parse_args(argv)
    for d in a.stages:
        print(json.dumps({"stage": d, **check(d, a.n)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
