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
    assert out["one_shape_boxes"]["n"] >= 1 and 0 <= out["one_shape_boxes"]["mean_iou"] <= 1
    assert set(out["first_digits"]["layers"]) == {str(i) for i in range(MICRO_DECODER["layers"])}
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


def test_decoder_position_check_drills_gen1_boxes_with_the_vision_side_frozen(tmp_path, tok_dir):  # noqa: F811
    """Gen 1 has no M-RoPE grid: the drill runs without the position loss (and refuses it), trains the decoder
    and leaves the ViT and its resampler as they were."""
    tok = tiny.load_tokenizer("1", tok_dir)
    tiny.save_model(tiny.new_model("1", tok, decoder=MICRO_DECODER, vision=MICRO_VISION), tmp_path / "m", tok_dir)
    with pytest.raises(SystemExit, match="gen 1"):
        dp.run(tmp_path / "m", tmp_path / "bad", steps=1, batch=2, aux=1.0)
    last = dp.run(tmp_path / "m", tmp_path / "out", steps=2, batch=2, aux=0.0, mix={"ground": 1.0}, max_objects=1,
                  answer_aux=1.0, answer_layer=1)
    assert np.isfinite(last["lm_loss"]) and last["aux_mse"] == 0 and last["answer_mse"] > 0
    before = tiny.load_model(tmp_path / "m").state_dict()
    after = tiny.load_model(tmp_path / "out" / "model").state_dict()
    vision = [k for k in before if k.startswith("transformer.visual.")]
    decoder = [k for k in before if k.startswith("transformer.h.")]
    assert vision and decoder
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)


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


def test_snap_boxes_grows_each_answer_box_to_the_token_grid():
    """Each number of a gen-2.5 answer box moves outward to a multiple of 28 (x1, y1 down; x2, y2 up, by less
    than one cell), read back with the notation's own regex; the question is left as it was."""
    import re

    from qvl.data import tasks as T

    for seed in range(6):
        s = T.make_sample("ground", seed, "2.5")
        question = s.messages[0]["content"][-1]["text"]
        before = [int(v) for v in re.search(BOX_TEXT["2.5"], s.messages[-1]["content"]).groups()]
        snapped = dp.snap_boxes(s, 28)
        after = [int(v) for v in re.search(BOX_TEXT["2.5"], snapped.messages[-1]["content"]).groups()]
        assert all(v % 28 == 0 for v in after)
        for k in (0, 1):
            assert after[k] <= before[k] < after[k] + 28
            assert after[k + 2] - 28 < before[k + 2] <= after[k + 2]
        assert snapped.messages[0]["content"][-1]["text"] == question


def test_first_digit_weights_sit_on_the_states_that_write_first_digits(tok_dir):  # noqa: F811
    """Weight W where the next token is a box number's first digit (found with the notation's regex over the
    decoded answer), 1 at every other labelled position, 0 elsewhere."""
    import re

    from qvl.data import tasks as T
    from qvl.train.batching import IGNORE, Collator

    tok = tiny.load_tokenizer("2.5", tok_dir)
    model = tiny.new_model("2.5", tok, decoder=MICRO_DECODER, vision=MICRO_VISION)
    samples = [T.make_sample("ground", 5, "2.5"), T.make_sample("color", 6, "2.5"), T.make_sample("ground", 7, "2.5")]
    b = Collator("2.5", tok, model.config, loss="assistant", boxes=True)(samples)
    w = dp.first_digit_weights(b["labels"], b["box_at"], 5.0)
    firsts = 0
    for r, s in enumerate(samples):
        for box in re.findall(BOX_TEXT["2.5"], s.messages[-1]["content"]):
            firsts += len(box)
    heavy = (w == 5.0).nonzero().tolist()
    assert len(heavy) == firsts == 8
    for r, i in heavy:  # the label there is the first digit of a number written in full after it
        assert tok.decode([int(b["labels"][r, i])]).isdigit()
        assert not tok.decode([int(b["input_ids"][r, i])]).strip().isdigit()
    labelled = b["labels"] != IGNORE
    assert (w[labelled & (w != 5.0)] == 1).all() and (w[~labelled] == 0).all()


def test_logistic_accuracy_reads_a_separable_class_and_not_noise():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(500, 6))
    y = np.argmax(X[:, :3], 1)  # a class the features decide
    test = np.arange(500) % 5 == 0
    assert pp.logistic_accuracy(X, y, test) > 0.9
    assert pp.logistic_accuracy(X, rng.integers(0, 3, size=500), test) < 0.5


def test_one_shape_box_iou_is_one_for_the_true_answers_and_zero_for_moved_ones(monkeypatch):
    """box_errors' mean IoU, with a model that replies with the sample's own answer (boxes in resized pixels,
    mapped back to the original image by qvl.grounding) and one whose boxes moved right by their width."""
    import re

    from qvl import eval as E

    def moved(reply: str) -> str:
        def shift(m):
            x1, y1, x2, y2 = (int(v) for v in m.groups())
            return f'"bbox_2d": [{x2}, {y1}, {2 * x2 - x1}, {y2}]'
        return re.sub(BOX_TEXT["2.5"], shift, reply)

    monkeypatch.setattr(E, "vlm_reply_fn", lambda vlm: lambda samples: [s.truth["answer"] for s in samples])
    right = pp.box_errors(None, "2.5", 30)
    assert right["n"] >= 10 and right["mean_iou"] > 0.9 and right["iou_0.5"] == 1.0
    assert right["centre_error_x"] < 0.02 and right["centre_error_y"] < 0.02
    monkeypatch.setattr(E, "vlm_reply_fn", lambda vlm: lambda samples: [moved(s.truth["answer"]) for s in samples])
    wrong = pp.box_errors(None, "2.5", 30)
    assert wrong["mean_iou"] < 0.05 and wrong["iou_0.5"] == 0.0


def test_first_digit_accuracy_is_transformers_argmax(tmp_path, tok_dir):  # noqa: F811
    """answer_digits' `lm` and `prior` on a micro model, recomputed from transformers 4.57.6's logits: the first
    digit of every box number (found with the notation's regex over the decoded answer tokens) against the argmax
    one position before, over the held-out scenes (every 5th)."""
    import re

    transformers = pytest.importorskip("transformers")
    from qvl.train.batching import IGNORE, Collator

    tok = tiny.load_tokenizer("2.5", tok_dir)
    tiny.save_model(tiny.new_model("2.5", tok, seed=4, decoder=MICRO_DECODER, vision=MICRO_VISION), tmp_path / "m",
                    tok_dir)
    import qvl

    vlm = qvl.load(tmp_path / "m")
    got = pp.answer_digits(vlm, "2.5", 24)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "m"), torch_dtype=torch.float32)
    coll = Collator("2.5", tok, vlm.model.config, loss="assistant")
    right, firsts = [], []
    for j, s in enumerate(pp.one_shape_grounding("2.5", 24)):
        b = coll([s])
        ids = b["input_ids"][0]
        v = b["vision"]
        with torch.no_grad():
            logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=v["pixel_values"],
                        image_grid_thw=v["image_grid_thw"]).logits[0]
        answer = (b["labels"][0] != IGNORE).nonzero()[:, 0] + 1  # the labelled tokens: each label is the next one
        text, owner = "", []
        for i in answer.tolist():
            piece = tok.decode([int(ids[i])])
            text += piece
            owner += [i] * len(piece)
        m = re.search(BOX_TEXT["2.5"], text)
        for k in range(1, 5):
            i = owner[m.start(k)]
            firsts.append((j, int(m[k][0])))
            right.append((j, bool(logits[i - 1].argmax() == ids[i])))
    held = [r for j, r in right if j % 5 == 0]
    assert got["numbers"] == len(firsts) and len(held) >= 8
    assert got["lm"] == round(float(np.mean(held)), 3)
    fit = [d for j, d in firsts if j % 5]
    top = min(d for d in fit if fit.count(d) == max(map(fit.count, fit)))  # ties: the smaller digit
    assert got["prior"] == round(float(np.mean([d == top for j, d in firsts if j % 5 == 0])), 3)
    assert set(got["layers"]) == {str(i) for i in range(MICRO_DECODER["layers"])}
