"""scripts/focus_check.py: the focused stage draws only the asked tasks, with at most the asked number of objects,
on seeds no recipe stage uses; a tiny run trains, probes and reports one JSON line per chunk."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from qvl.train import stages as S
from qvl.train import tiny

from test_train import MICRO_DECODER, MICRO_VISION, micro_model, tok_dir  # noqa: F401  (fixture)

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


@pytest.mark.parametrize("generation", ["1", "2.5"])
def test_the_start_can_take_another_models_vision_tower(tmp_path, tok_dir, generation):
    decoder, _ = micro_model(generation, tok_dir, seed=0)
    vision, _ = micro_model(generation, tok_dir, seed=1)
    tiny.save_model(decoder, tmp_path / "dec", tok_dir)
    tiny.save_model(vision, tmp_path / "vis", tok_dir)
    start = fc.starting_model(tmp_path / "dec", tmp_path / "c0", generation, vision_from=tmp_path / "vis")
    got = tiny.load_model(start / "model").state_dict()
    prefix = "transformer.visual." if generation == "1" else "visual."
    n_vision = 0
    for k, v in got.items():
        want = (vision if k.startswith(prefix) else decoder).state_dict()[k]
        n_vision += k.startswith(prefix)
        assert torch.equal(v, want), k
    assert n_vision > 10


def test_a_fresh_start_is_the_recipes_fresh_init(tmp_path, tok_dir):
    trained, _ = micro_model("2.5", tok_dir, seed=3)
    tiny.save_model(trained, tmp_path / "m", tok_dir)
    start = fc.starting_model(tmp_path / "m", tmp_path / "c0", "2.5", fresh=True, seed=5)
    got = tiny.load_model(start / "model").state_dict()
    want = tiny.new_model("2.5", tiny.load_tokenizer("2.5", tok_dir), seed=5).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
