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


def test_ablation_cli_on_two_generations(tok_dir, tmp_path):
    """--ablation: one row per model, vision token counts equal qvl's own accounting of a square image
    (gen 2/2.5: (side / 28)^2 at native resolution; gen 1: its fixed 64 queries), the generation's own
    columns filled (gen 1 has no video)."""
    dirs = []
    for g in ("1", "2.5"):
        model, _ = micro_model(g, tok_dir)
        tiny.save_model(model, tmp_path / g, tok_dir)
        dirs.append(str(tmp_path / g))
    out = subprocess.run([sys.executable, "-m", "qvl.eval", *dirs, "--ablation", "--n", "2", "--json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [r["generation"] for r in rows] == ["1", "2.5"]
    assert "video_when" not in rows[0]["results"] and "video_when" in rows[1]["results"]
    for side, c in rows[1]["vision_cost"].items():
        assert c["tokens"] == (int(side) // 28) ** 2 and c["ms"] > 0
    assert {c["tokens"] for c in rows[0]["vision_cost"].values()} == {tiny.GEN1_QUERIES}
    table = E.format_ablation(rows)
    assert table.count("\n") == 3 and "| 1 |" in table and "| 2.5 |" in table
    assert "no video" in table.splitlines()[2]


def test_eval_cli_refuses_a_non_model_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qvl.eval", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "no config.json" in out.stderr and "Traceback" not in out.stderr
