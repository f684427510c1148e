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


def test_timing_says_whether_the_answered_second_follows_the_true_one():
    """slope / r against replies whose relation to the true second is known: the truth itself, an affine map
    of it, a per-verb constant (what the shipped models did, session 21), no number at all."""
    def ask(fn):
        return E.evaluate(lambda ss: [fn(s.truth) for s in ss], "2.5", ["video_when"], 30)["video_when"]

    oracle = ask(lambda t: f"{t['time']:.1f} seconds")
    assert oracle["timing"]["slope"] == pytest.approx(1.0, abs=0.02) and oracle["timing"]["answered"] == 30
    assert oracle["timing"]["mean_error_s"] <= 0.05
    assert {k for k in oracle["timing"] if k.startswith("r_")} == {"r_appear", "r_disappear"}
    assert all(oracle["timing"][f"r_{v}"] == pytest.approx(1.0, abs=0.01) for v in ("appear", "disappear"))
    half = ask(lambda t: f"{0.5 * t['time'] + 1:.4f} seconds")["timing"]
    assert half["slope"] == pytest.approx(0.5, abs=1e-3) and half["r_appear"] == pytest.approx(1.0, abs=1e-6)
    by_verb = ask(lambda t: "0.2 seconds" if t["event"] == "appear" else "2.2 seconds")["timing"]
    assert by_verb["r_appear"] is None and by_verb["r_disappear"] is None  # no spread within a verb
    assert by_verb["mean_error_s"] > 0.3
    none = ask(lambda t: "I do not know")["timing"]
    assert none["answered"] == 0 and none["slope"] is None and none["mean_error_s"] is None
    table = E.format_table({"video_when": oracle})
    assert "slope 1.0" in table and "r appear / disappear 1.00 / 1.00" in table


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
    out = subprocess.run([sys.executable, "-m", "qvl.eval", *dirs, "--ablation", "--n", "2", "--probe-n", "3", "--json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [r["generation"] for r in rows] == ["1", "2.5"]
    assert "video_when" not in rows[0]["results"] and "video_when" in rows[1]["results"]
    assert "when_at_fps" not in rows[0] and set(rows[1]["when_at_fps"]) == {f"{f:g}" for f in E.ABLATION_FPS}
    for f, at in rows[1]["when_at_fps"].items():  # frame counts are rounded to even numbers, at least 4
        assert 0 <= at["score"] <= 1 and at["sampled_fps"] == pytest.approx(float(f), rel=0.35)
    for side, c in rows[1]["vision_cost"].items():
        assert c["tokens"] == (int(side) // 28) ** 2 and c["ms"] > 0
    assert {c["tokens"] for c in rows[0]["vision_cost"].values()} == {tiny.GEN1_QUERIES}
    for r in rows:  # three scenes each side of the text probes: there are text tokens to score
        p = r["text_probe"]
        assert p["n>=14px"] + p["n<14px"] > 0 and 0 <= p["chance"] <= 1 and 0 <= p["false alarms"] <= 1
    table = E.format_ablation(rows)
    assert table.count("\n") == 7 and "| 1 |" in table and "| 2.5 |" in table and "Text probe" in table
    const = rows[1]["results"]["video_when"]["constant"]["score"]
    assert f"video_when {100 * const:.1f} %" in table and "best constant answer" in table
    cells = [c.strip() for c in table.splitlines()[2].split("|")]
    assert cells.count("no video") == 1 + len(E.ABLATION_FPS)  # gen 1's "when" cells
    assert "when, clips at 4 fps" in table.splitlines()[0]


def test_other_frame_rates_keep_the_questions_and_change_the_frames():
    """`video_fps` changes only how many frames of the same clip are sampled: the questions and answers stay
    (an oracle still scores 100 %), the frame count follows the rate, and the rate handed to the model is the
    sampled one (frames / clip seconds), which gen 2.5's time ids are built from."""
    from dataclasses import replace

    from qvl.data import tasks as T

    base = T.eval_samples("video_when", "2.5", 8, render_media=False)
    for fps in (1.0, 4.0):
        config = replace(T.DataConfig(), video_fps=fps)
        other = T.eval_samples("video_when", "2.5", 8, config, render_media=False)
        assert [s.answer for s in other] == [s.answer for s in base]
        assert [(s.qas, s.clip) for s in other] == [(s.qas, s.clip) for s in base]
        res = E.evaluate(lambda ss: [s.answer for s in ss], "2.5", ["video_when"], 8, config)
        assert res["video_when"]["score"] == 1.0
        for s, b in zip(other, base):
            seconds = s.clip.n_frames / s.clip.fps
            assert s.media["fps"] == pytest.approx(len(s.media["frame_indices"]) / seconds)
            if fps == 4.0:  # source clips run at >= 4 fps: about twice the frames of the default 2 fps
                assert len(s.media["frame_indices"]) > len(b.media["frame_indices"])
                assert s.media["fps"] == pytest.approx(4.0, rel=0.15)
    oracle = E.evaluate(lambda ss: [s.answer for s in ss], "2.5", ["video_when"], 8)["video_when"]
    assert oracle["sampled_fps"] == pytest.approx(2.0, rel=0.2)


@pytest.mark.parametrize("args, message", [(["--video-fps", "0"], "--video-fps must be > 0"),
                                           (["--video-fps", "4", "--ablation"], "--video-fps is for a plain")])
def test_video_fps_flag_errors_in_one_line(args, message):
    out = subprocess.run([sys.executable, "-m", "qvl.eval", "no-such-dir", *args], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_linear_probe_reads_separable_features_and_not_noise():
    import torch

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (600,), generator=g)
    centres = 3 * torch.randn(7, 16, generator=g)
    x = centres[y] + 0.3 * torch.randn(600, 16, generator=g)
    predict = E._fit_linear_probe(x[:300], y[:300], 7)
    assert (predict(x[300:]) == y[300:]).float().mean() > 0.97
    noise = torch.randn(600, 16, generator=g)  # features that carry nothing about y: held-out accuracy near 1/7
    predict = E._fit_linear_probe(noise[:300], y[:300], 7)
    assert (predict(noise[300:]) == y[300:]).float().mean() < 0.3


def test_text_probe_splits_by_the_height_of_the_word_under_each_token(monkeypatch):
    """Vision tokens that carry the letter under their centre (recomputed here from the scene: the centre's
    position along the word's box) are found and read far above chance; tokens off every word are not
    called text; each text token counts toward the height of its word."""
    import torch

    from qvl.train.batching import LETTERS, N_LETTERS

    seen = {"small": 0, "large": 0}

    def oracle_tokens(vlm, sample):
        sc, rows, cols = sample.scene, 64, 64  # cells of ~10-14 px: a cell on a word mostly has its centre on it
        feats = torch.zeros(rows * cols, N_LETTERS + 1)
        for k in range(rows * cols):
            cx, cy = (k % cols + 0.5) * sc.width / cols, (k // cols + 0.5) * sc.height / rows
            for t in sc.texts:
                x1, y1, x2, y2 = t.box
                if x1 <= cx < x2 and y1 <= cy < y2:
                    ch = t.text[min(int((cx - x1) / max(x2 - x1, 1) * len(t.text)), len(t.text) - 1)]
                    feats[k, 1 + LETTERS.index(ch) if ch in LETTERS else 0] = 1
                    feats[k, N_LETTERS] = 1  # "text here"
                    seen["small" if t.height < E.SMALL_TEXT_PX else "large"] += 1
        return feats, (rows, cols)

    monkeypatch.setattr(E, "vision_tokens", oracle_tokens)
    vlm = type("V", (), {"generation": "2"})()
    out = E.text_probe(vlm, 40, 40)
    assert out["n>=14px"] > 0 and out["n<14px"] > 0 and seen["small"] > 0 and seen["large"] > 0
    # Edge cells (text by overlap, centre off the glyphs) carry no feature here, so scores sit below 1
    # but far above the most frequent letter's share.
    assert out["letter>=14px"] > 0.6 and out["letter<14px"] > 0.45 and out["chance"] < 0.15, out
    assert out["found>=14px"] > 0.6 and out["found<14px"] > 0.45 and out["false alarms"] < 0.05, out


def test_eval_cli_refuses_a_non_model_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qvl.eval", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "no config.json" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("task", ["count", "video_direction"])
def test_constant_baseline_is_the_most_frequent_true_answer(task):
    from collections import Counter

    from qvl.data import tasks as T

    samples = T.eval_samples(task, "2.5", 60, T.DataConfig(), render_media=False)
    truths = Counter(s.truth["answer"] for s in samples)  # counted here, not scored by qvl
    answer, count = truths.most_common(1)[0]
    base = E.constant_baseline(task, samples)
    assert base["score"] == pytest.approx(count / 60)
    assert base["answer"].strip(".") == answer or truths[base["answer"].strip(".")] == count


def test_constant_baseline_for_when_beats_every_single_frequent_answer():
    from qvl.data import tasks as T

    samples = T.eval_samples("video_when", "2.5", 60, T.DataConfig(), render_media=False)
    times = [s.truth["time"] for s in samples]
    base = E.constant_baseline("video_when", samples)
    said = float(base["answer"].split()[0])
    within = sum(abs(said - t) <= T.WHEN_TOLERANCE_S for t in times) / 60  # recomputed from the event times
    assert base["score"] == pytest.approx(within)
    modal = max(set(times), key=times.count)
    assert within >= sum(abs(modal - t) <= T.WHEN_TOLERANCE_S for t in times) / 60 > 0


def test_table_shows_the_constant_column():
    res = E.evaluate(lambda ss: [s.answer for s in ss], "2.5", tasks=["count", "ground"], n=8)
    table = E.format_table(res)
    assert "constant" in table.splitlines()[0]
    assert f"{100 * res['count']['constant']['score']:5.1f} %" in table
    assert 0 <= res["ground"]["constant"]["score"] < 1
