"""scripts/dense_check.py: colour and kind are scored apart on shape tokens only, and a stage directory
without a dense head is refused in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from qvl.data.world import KINDS
from qvl.train import tiny
from qvl.train.batching import N_DENSE_CLASSES
from qvl.train.loop import HEAD_FILE, DenseHead

from test_train import micro_model, tok_dir  # noqa: F401  (fixture)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dense_check.py"
spec = importlib.util.spec_from_file_location("dense_check", SCRIPT)
dc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dc)

K = len(KINDS)


def shape_class(colour: int, kind: int) -> int:
    return 2 + colour * K + kind


def test_colour_and_kind_are_scored_apart_on_shape_tokens():
    cls = torch.tensor([0, 1, shape_class(3, 1), shape_class(0, 4), shape_class(2, 2)])
    logits = torch.zeros(5, N_DENSE_CLASSES)
    logits[0, shape_class(1, 1)] = 5.0  # background token: not counted whatever it says
    logits[1, shape_class(1, 1)] = 5.0  # text token: not counted
    logits[2, shape_class(3, 2)] = 5.0  # right colour, wrong kind
    logits[2, 0] = 9.0  # a larger background logit does not count: only shape classes compete
    logits[3, shape_class(5, 4)] = 5.0  # wrong colour, right kind
    logits[4, shape_class(2, 2)] = 5.0  # both right
    assert dc.colour_kind_hits(logits, cls) == (3, 2, 2)


def test_object_kind_counts_the_kind_whatever_the_colour():
    obj_cls = torch.tensor([1 * K + 2, 4 * K + 0, 0 * K + 3])
    logits = torch.zeros(3, N_DENSE_CLASSES - 2)
    logits[0, 6 * K + 2] = 5.0  # wrong colour, right kind: counts
    logits[1, 4 * K + 1] = 5.0  # right colour, wrong kind: does not
    logits[2, 0 * K + 3] = 5.0  # both right
    assert dc.object_kind_hits(logits, obj_cls) == (3, 2)


def test_shape_boxes_average_each_shapes_tokens_and_score_iou():
    # two shapes: tokens 1-2 belong to shape 0, token 3 to shape 1; tokens 0 and 4 are background / text
    obj = torch.tensor([-1, 0, 0, 1, -1])
    box = torch.tensor([[0.0, 0, 0, 0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0, 1, 1]])
    pred = torch.tensor([[0.9, 0.9, 1.0, 1.0], [0.0, 0.0, 0.4, 0.5], [0.0, 0.0, 0.6, 0.5], [0.5, 0.5, 1.0, 0.75],
                         [0.0, 0.0, 1.0, 1.0]])
    p, t = dc.shape_boxes(pred, box, obj)
    assert torch.allclose(p, torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 0.75]]))
    assert torch.equal(t, torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]))
    # shape 0 exact (IoU 1), shape 1 covers half of its box (IoU 0.5)
    assert dc.mean_iou(p, t) == pytest.approx(0.75)
    assert dc.shape_boxes(pred, box, torch.full((5,), -1))[0].shape == (0, 4)


def test_check_scores_a_stage_and_refuses_one_without_a_head(tok_dir, tmp_path):  # noqa: F811
    model, _ = micro_model("2.5", tok_dir)
    tiny.save_model(model, tmp_path / "stage" / "model", tok_dir)
    with pytest.raises(SystemExit, match="no dense_head.safetensors"):
        dc.check(tmp_path / "stage", n=2)
    from safetensors.torch import save_file

    head = DenseHead.for_model(model)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "stage" / HEAD_FILE))
    out = dc.check(tmp_path / "stage", n=4, batch=2)
    assert out["tokens"] > 0 and 0.0 <= out["colour"] <= 1.0 and 0.0 <= out["kind"] <= 1.0
    assert out["shapes"] > 0 and 0.0 <= out["object_kind"] <= 1.0
    assert 0.0 <= out["box_iou"] <= 1.0 and 0.0 < out["box_iou_const"] <= 1.0
    # a head saved before the per-shape readout existed: scored per token, "object_kind" None
    save_file({k: v.contiguous() for k, v in head.state_dict().items() if not k.startswith("obj.")},
              str(tmp_path / "stage" / HEAD_FILE))
    assert dc.check(tmp_path / "stage", n=4, batch=2)["object_kind"] is None
