"""scripts/focus_check.py: the focused stage draws only the asked tasks, with at most the asked number of objects,
on seeds no recipe stage uses; a tiny run trains, probes and reports one JSON line per chunk."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qvl.train import stages as S
from qvl.train import tiny

from test_train import MICRO_DECODER, MICRO_VISION, tok_dir  # noqa: F401  (fixture)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "focus_check.py"
spec = importlib.util.spec_from_file_location("focus_check", SCRIPT)
fc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fc)


def test_focus_stage_draws_only_the_asked_tasks_and_objects():
    base = S.get("stage2")
    stage = fc.focus_stage(base, ["shape"], "answer", 1, chunk_index=2)
    assert stage.weighting == "answer" and stage.train == base.train and stage.lr == base.lr
    samples = [S.sample_at(stage, "2.5", i) for i in range(12)]
    assert {s.task for s in samples} == {"shape"}
    assert all(len(s.scene.shapes) == 1 for s in samples)
    # fresh seeds: inside the stage-2 block but beyond anything the recipe's 24 k stage-2 samples reach
    others = {S.sample_at(base, "2.5", i).seed for i in range(12)}
    assert not others & {s.seed for s in samples}
    assert all(s.seed >= base.seed_offset + 5_000_000 for s in samples)


def test_a_tiny_focused_run_reports_each_chunk(tmp_path, tok_dir, capsys):
    tok = tiny.load_tokenizer("2.5", tok_dir)
    model = tiny.new_model("2.5", tok, decoder=MICRO_DECODER, vision=MICRO_VISION)
    tiny.save_model(model, tmp_path / "init", tok_dir)
    assert fc.main(["--init", str(tmp_path / "init"), "--out", str(tmp_path / "run"), "--tasks", "color",
                    "--max-objects", "1", "--chunk", "4", "--chunks", "1", "--batch", "2", "--n", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["chunk"] for x in lines] == [0, 1]
    assert set(lines[1]["probe"]) == {"color"} and 0.0 <= lines[1]["probe"]["color"]["score"] <= 1.0
    assert (tmp_path / "run" / "c1" / "model" / "config.json").is_file()


def test_scene_overrides_shrink_the_canvases_and_bad_ones_fail_in_one_line():
    assert fc.parse_overrides("max_side=168,large_prob=0,min_objects=2") == \
        {"max_side": 168, "large_prob": 0, "min_objects": 2}
    stage = fc.focus_stage(S.get("stage2"), ["count"], "token", None, chunk_index=1,
                           scene={"max_side": 168, "large_prob": 0.0})
    for i in range(10):
        s = S.sample_at(stage, "2.5", i)
        assert max(s.scene.width, s.scene.height) <= 168
    with pytest.raises(SystemExit, match="key=value"):
        fc.parse_overrides("max_side")
