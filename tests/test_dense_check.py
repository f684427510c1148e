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
