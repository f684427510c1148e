"""qvl.eval: an oracle scores 100 %, a random model ~0, the table has the right rows, the CLI runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qvl import eval as E
from qvl.train import tiny

from test_train import micro_model, tok_dir  # noqa: F401  (fixture)


@pytest.mark.parametrize("generation", ["1", "2", "2.5"])
def test_oracle_scores_100_percent(generation):
    res = E.evaluate(lambda ss: [s.answer for s in ss], generation, n=12)
    expected = [t for t in E.DEFAULT_TASKS if not (generation == "1" and t.startswith("video"))]
    assert list(res) == expected
    for task, r in res.items():
        if task == "ground":  # the answer's integer coordinates round the true box: IoU just under 1
            assert r["score"] > 0.9
        else:
            assert r["score"] == pytest.approx(1.0), task
    assert res["ground"]["iou>=0.5"] == 1.0
    table = E.format_table(res)
    for task in expected:
        assert task in table


def test_wrong_answers_score_zero_and_ocr_is_split_by_height():
    res = E.evaluate(lambda ss: ["nothing"] * len(ss), "2.5", tasks=["ocr", "ground", "video_when"], n=30)
    assert all(r["score"] == 0 for r in res.values())
    ocr = res["ocr"]
    assert ocr["n>=14px"] + ocr["n<14px"] == 30


def test_random_model_eval_via_cli(tok_dir, tmp_path):
    model, _ = micro_model("2.5", tok_dir)
    tiny.save_model(model, tmp_path / "m", tok_dir)
    out = subprocess.run([sys.executable, "-m", "qvl.eval", str(tmp_path / "m"), "--n", "3", "--json",
                          "--tasks", "color", "ground", "video_when"], capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert set(d["results"]) == {"color", "ground", "video_when"}
    assert d["results"]["color"]["score"] <= 1 / 3 + 1e-9  # a random micro model is (nearly) never right
    assert d["cost"]["vision_tokens_per_image"] > 0 and d["cost"]["ms_per_answer"] > 0
