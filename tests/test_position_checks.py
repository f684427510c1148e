"""scripts/mrope_column_check.py and scripts/position_probe.py: the synthetic grids put the marked token at the
(row, column) the M-RoPE ids say, the check trains and reports; the ridge probe scores a linear target near 1
and noise near 0; the probe script runs end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qvl.train import tiny

from test_train import MICRO_DECODER, MICRO_VISION, tok_dir  # noqa: F401  (fixture)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mc = _load("mrope_column_check")
pp = _load("position_probe")


def test_grid_rows_put_the_marked_token_where_its_ids_say():
    ids, mask, pos, slots, rows, cols = mc.grids(16, 3, 7, torch.Generator().manual_seed(3))
    for b in range(16):
        n = int(mask[b].sum())
        assert ids[b, slots[b]] == mc.QUESTION and slots[b] == n - 1
        assert ids[b, 3] == mc.START and ids[b, n - 2] == mc.END
        first = 4  # the first grid token; its (h, w) ids are the grid's origin
        marked = int((ids[b] == mc.MARKED).nonzero())
        # written independently of qvl.positions: h and w ids advance by the token's row and column
        assert pos[1, b, marked] - pos[1, b, first] == rows[b]
        assert pos[2, b, marked] - pos[2, b, first] == cols[b]
        assert pos[0, b, marked] == pos[0, b, first]  # one image: a single time id
        grid = (ids[b] == mc.BACKGROUND) | (ids[b] == mc.MARKED)
        height = int(pos[1, b, grid].max() - pos[1, b, grid].min()) + 1
        assert marked - first == rows[b] * (int(grid.sum()) // height) + cols[b]  # raster order


def test_column_check_trains_and_reports(capsys):
    assert mc.main(["--steps", "2", "--every", "1", "--hidden", "64", "--layers", "1", "--batch", "4",
                    "--max-side", "4"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step")]
    assert len(lines) == 2 and "column acc" in lines[-1]


def test_digit_answers_follow_the_question_and_spell_the_cell_centre():
    ids, mask, pos, slots, rows, cols = mc.grids(8, 3, 12, torch.Generator().manual_seed(5), answer=True)
    for b in range(8):
        n = int(mask[b].sum())
        answer = ids[b, slots[b] + 1:n].tolist()
        # written out by hand: the merged cell's centre, 28 px per cell, x then y
        x, y = 28 * int(cols[b]) + 14, 28 * int(rows[b]) + 14
        assert answer == [mc.DIGIT0 + int(c) for c in f"{x}"] + [mc.COMMA] + [mc.DIGIT0 + int(c) for c in f"{y}"] + [mc.EOS]
        # answer tokens are text after the image: all three ids equal and counting up by one
        assert (pos[:, b, slots[b] + 1:n] == pos[0, b, slots[b] + 1:n]).all()
        assert (pos[0, b, slots[b] + 1:n].diff() == 1).all()


def test_exact_xy_scores_each_coordinate_separately():
    ids, mask, pos, slots, rows, cols = mc.grids(6, 3, 12, torch.Generator().manual_seed(7), answer=True)
    idx, target, valid = mc.answer_slots(ids, mask, slots)
    assert mc.exact_xy(target.clone(), target, valid) == (1.0, 1.0)
    pred = target.clone()
    pred[0, 0] = mc.DIGIT0 if target[0, 0] != mc.DIGIT0 else mc.DIGIT0 + 1  # row 0: first x digit wrong
    last_y = int(valid[1].nonzero().max()) - 1  # row 1: the last y digit (before EOS) wrong
    pred[1, last_y] = mc.COMMA
    pred[2, -1] = mc.QUESTION if not valid[2, -1] else pred[2, -1]  # a wrong guess on padding counts for nothing
    x, y = mc.exact_xy(pred, target, valid)
    assert abs(x - 5 / 6) < 1e-6 and abs(y - 5 / 6) < 1e-6


def test_column_check_digit_answers_train_and_report(capsys):
    assert mc.main(["--answer", "digits", "--steps", "2", "--every", "1", "--hidden", "64", "--layers", "1",
                    "--batch", "4", "--max-side", "4"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step")]
    assert len(lines) == 2 and "x (column) exact" in lines[-1]


def test_ridge_r2_scores_a_linear_target_high_and_noise_low():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 8))
    y = np.stack([X @ rng.normal(size=8), rng.normal(size=600)], 1)
    test = np.arange(600) % 5 == 0
    r2 = pp.ridge_r2(X, y, test)
    assert r2[0] > 0.99 and abs(r2[1]) < 0.1


def test_ridge_r2_does_not_shrink_the_mean_away():
    """A strong ridge (as the answer probe uses) on an uninformative X scores ~0, not the large negative R² of
    a fit whose intercept is pulled to 0; an informative X still scores high."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 64))
    y = np.stack([5.0 + 0.1 * rng.normal(size=400), 5.0 + X[:, 0] + 0.1 * rng.normal(size=400)], 1)
    r2 = pp.ridge_r2(X, y, np.arange(400) % 5 == 0, lam=400.0)
    assert abs(r2[0]) < 0.15 and r2[1] > 0.4


def test_answer_numbers_find_each_box_number_in_each_notation(tok_dir):  # noqa: F811
    """The positions the answer probe reads: the first digit of each number in the answer and its value,
    checked against the numbers written in the answer text (gen 2.5's "bbox_2d" key holds none)."""
    import re

    from qvl.data import tasks as T
    from qvl.train.batching import Collator, answer_numbers

    for g in ("2", "2.5"):
        tok = tiny.load_tokenizer(g, tok_dir)
        model = tiny.new_model(g, tok, decoder=MICRO_DECODER, vision=MICRO_VISION)
        s = T.make_sample("ground", 4, g)
        b = Collator(g, tok, model.config, loss="assistant")([s])
        ids = b["input_ids"][0]
        found = answer_numbers(ids, b["labels"][0], tok)
        numbers = re.findall(NUMBER, s.messages[-1]["content"])
        assert len(found) == len(numbers) >= 4
        for (i, value), number in zip(found, numbers):
            assert value == int(number) and tok.decode(ids[i:i + len(number)].tolist()) == number
            assert not tok.decode([int(ids[i - 1])]).strip().isdigit()


def test_position_probe_runs_on_a_tiny_model(tmp_path, tok_dir, capsys):
    tok = tiny.load_tokenizer("2.5", tok_dir)
    tiny.save_model(tiny.new_model("2.5", tok, decoder=MICRO_DECODER, vision=MICRO_VISION), tmp_path / "m", tok_dir)
    assert pp.main([str(tmp_path / "m"), "--n", "10"]) == 0  # 10: two held-out "when" videos for the R² of time
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["r2_row_column"]) >= {"input", "0"}
    assert all(len(v) == 2 for v in out["r2_row_column"].values())
    assert out["one_shape_boxes"]["n"] >= 1
    assert set(out["r2_answer_x1_y1"]) == {str(i) for i in range(MICRO_DECODER["layers"])}
    assert set(out["r2_time"]["tokens"]) == {"input", *(str(i) for i in range(MICRO_DECODER["layers"]))}
    assert set(out["r2_time"]["answer"]) == {str(i) for i in range(MICRO_DECODER["layers"])}
    assert np.isfinite(out["r2_time"]["verb_and_length"])


def test_time_probe_reads_the_state_before_the_answers_first_digit(tok_dir):  # noqa: F811
    """answer_start finds the answer's first token in a collated "when" sample: from there the ids decode to
    the answer text the sample holds, and the token before it is the end of the assistant header."""
    from qvl.data import tasks as T
    from qvl.train.batching import Collator

    for g in ("2", "2.5"):
        tok = tiny.load_tokenizer(g, tok_dir)
        model = tiny.new_model(g, tok, decoder=MICRO_DECODER, vision=MICRO_VISION)
        s = T.make_sample("video_when", 3, g)
        coll = Collator(g, tok, model.config, loss="assistant")
        ids = coll([s])["input_ids"][0].tolist()
        i = pp.answer_start(ids, coll)
        answer = s.truth["answer"]
        assert tok.decode(ids[i:]).startswith(answer) and answer[0].isdigit()
        assert tok.decode(ids[i - 3:i]) == "<|im_start|>assistant\n"


dp = _load("decoder_position_check")


def test_image_token_rows_and_columns_follow_the_merged_grid(tok_dir):  # noqa: F811
    """The targets read from the M-RoPE ids equal the row-major (row, column) of each image's merged grid,
    computed here from image_grid_thw alone."""
    from qvl.data import tasks as T
    from qvl.train.batching import Collator
    from qvl.train.loop import image_token_rc

    tok = tiny.load_tokenizer("2.5", tok_dir)
    model = tiny.new_model("2.5", tok, decoder=MICRO_DECODER, vision=MICRO_VISION)
    coll = Collator("2.5", tok, model.config, loss="assistant")
    samples = [T.make_sample(t, s, "2.5") for t, s in (("ground", 1), ("color", 2), ("count", 3))]
    b = coll(samples)
    expected = []
    for _, h, w in b["vision"]["image_grid_thw"].tolist():
        rows, cols = h // 2, w // 2  # the 2x2 merge
        expected += [[i // cols, i % cols] for i in range(rows * cols)]
    got = image_token_rc(b["input_ids"], b["positions"], model.config.image_token_id)
    assert got.tolist() == expected
    assert len({c for _, c in expected}) > 2  # several columns, so a swapped axis would fail


def test_decoder_position_check_trains_and_saves(tmp_path, tok_dir):  # noqa: F811
    tok = tiny.load_tokenizer("2.5", tok_dir)
    tiny.save_model(tiny.new_model("2.5", tok, decoder=MICRO_DECODER, vision=MICRO_VISION), tmp_path / "m", tok_dir)
    last = dp.run(tmp_path / "m", tmp_path / "out", steps=2, batch=2, layer=0, mix={"ground": 1.0}, max_objects=1,
                  answer_aux=1.0, answer_layer=1)
    assert np.isfinite(last["lm_loss"]) and last["aux_mse"] > 0 and last["answer_mse"] > 0
    assert (tmp_path / "out" / "model" / "config.json").is_file()


# A number as the answer text writes it: digits with no letter or "_" touching them (not the 2 of "bbox_2d").
NUMBER = r"(?<![A-Za-z_\d])\d+(?![A-Za-z_\d])"
# Each generation's box notation, written out here: x1 y1 x2 y2 (gens 1 / 2 in 0-1000, 2.5 in resized pixels).
BOX_TEXT = {"1": r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>", "2": r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>",
            "2.5": r'"bbox_2d": \[(\d+), (\d+), (\d+), (\d+)\]'}


@pytest.mark.parametrize("g", ["1", "2", "2.5"])
def test_box_targets_are_each_answer_box_number_over_its_side(g, tok_dir):  # noqa: F811
    """The Collator's targets for the answer read-out: per box an answer writes (found here with each notation's
    own regex, over every assistant turn), x1 y1 x2 y2 over the side each measures -- 1000 for gens 1 / 2, the
    resized width / height from the sample's own sizes for 2.5 -- at the state right before the number's first
    digit; questions without a box (colour, count: a number that is no box) add nothing."""
    import re

    from qvl.data import tasks as T
    from qvl.data.tasks import DataConfig
    from qvl.train.batching import Collator

    tok = tiny.load_tokenizer(g, tok_dir)
    model = tiny.new_model(g, tok, decoder=MICRO_DECODER, vision=MICRO_VISION)
    samples = [T.make_sample("ground", 5, g), T.make_sample("count", 6, g), T.make_sample("color", 7, g)]
    multi = T.iterate(g, "train", mix={"ground": 1.0, "count": 1.0}, config=DataConfig(max_turns=3), start=100)
    samples += [next(multi) for _ in range(24)]
    b = Collator(g, tok, model.config, loss="assistant", boxes=True)(samples)
    expected = []
    for r, s in enumerate(samples):
        h, w = s.media["resized_size"] if g == "2.5" else (1000, 1000)
        for m in s.messages:
            if m["role"] == "assistant":
                for box in re.findall(BOX_TEXT[g], m["content"]):
                    expected += [(r, int(v), side) for v, side in zip(box, (w, h, w, h))]
    assert len(expected) >= 4 * 10 and not [e for e in expected if e[0] in (1, 2)]
    assert {len([e for e in expected if e[0] == r]) for r in range(len(samples))} > {4}  # some rows: 2+ boxes
    got = list(zip(b["box_at"].tolist(), b["box_k"].tolist(), b["box_target"].tolist()))
    assert len(got) == len(expected)
    for ((row, at), k, target), (r, value, side) in zip(got, expected):
        assert row == r and abs(target - value / side) < 1e-6
        digits = str(value)
        assert tok.decode(b["input_ids"][row, at + 1:at + 1 + len(digits)].tolist()) == digits
        assert not tok.decode([int(b["input_ids"][row, at])]).strip().isdigit()
    assert b["box_k"].tolist() == [0, 1, 2, 3] * (len(got) // 4)
