"""qvl.data: the generated world, clips, tasks and the tiny tokenizer.

The checks are independent of the generator's own bookkeeping wherever possible: boxes are re-measured
from rendered pixels, words are recognised by template matching against fresh renders, video
visibility and motion are read back from frames, grounding answers are parsed with `qvl.grounding`,
the 2.5 resized size comes from `qvl.media.process_image` on the actual image, and the saved tokenizer
is loaded by transformers.
"""

from __future__ import annotations

import itertools
import json
import re
import numpy as np
import pytest
from PIL import Image

from qvl import grounding
from qvl.chat import IMAGE_PAD, VIDEO_PAD, render_qwen2, render_qwen_vl
from qvl.data import tasks as T
from qvl.data import video as V
from qvl.data import world as W

GENS = ("1", "2", "2.5")


def color_mask(img: Image.Image, rgb, tol: int = 30) -> np.ndarray:
    a = np.asarray(img).astype(int)
    return (np.abs(a - np.array(rgb)).max(axis=-1) <= tol)


def bbox_of(mask: np.ndarray):
    """(x1, y1, x2, y2) pixel edges of the True pixels, or None."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def classify_shape(mask: np.ndarray) -> str:
    """Tell the kind from a few probe points of its filled mask (mask cropped to the shape's box)."""
    h, w = mask.shape

    def on(u, v):
        return bool(mask[int(round(v * (h - 1))), int(round(u * (w - 1)))])

    corners = [on(0.03, 0.03), on(0.97, 0.03), on(0.03, 0.97), on(0.97, 0.97)]
    if all(corners):
        return "square"
    if corners == [False, False, True, True]:
        return "triangle"
    if on(0.5, 0.5) and not on(0.5, 0.95):
        return "star"  # the notch between the star's two legs
    return "circle" if on(0.2, 0.2) else "cross"


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------


def test_scene_is_deterministic_by_seed():
    for seed in (0, 1, 12345):
        a, b = W.make_scene(seed), W.make_scene(seed)
        assert a == b
        assert W.render(a).tobytes() == W.render(b).tobytes()
    assert len({W.make_scene(s) for s in range(20)}) == 20
    s1, s2 = T.make_sample("ground", 77, "2.5"), T.make_sample("ground", 77, "2.5")
    assert s1.messages[1:] == s2.messages[1:] and s1.truth == s2.truth
    assert np.array_equal(np.asarray(s1.messages[0]["content"][0]["image"]),
                          np.asarray(s2.messages[0]["content"][0]["image"]))


def test_scene_variety():
    scenes = [W.make_scene(s) for s in range(300)]
    sides = [v for s in scenes for v in (s.width, s.height)]
    assert min(sides) >= 112 and max(sides) <= 896
    assert sum(s.large for s in scenes) > 20  # some large canvases...
    small = [t for s in scenes if s.large for t in s.texts if t.size <= 13]
    assert small  # ...with small text on them
    ratios = [max(s.width, s.height) / min(s.width, s.height) for s in scenes]
    assert max(ratios) > 2.5
    assert {t.script for s in scenes for t in s.texts} == set(W.SCRIPTS)
    assert {sh.kind for s in scenes for sh in s.shapes} == set(W.KINDS)
    assert {sh.color for s in scenes for sh in s.shapes} == set(W.COLORS)
    for s in scenes:  # nothing overlaps, everything is inside the canvas
        boxes = [o.box for o in s.shapes] + [t.box for t in s.texts]
        for a, b in itertools.combinations(boxes, 2):
            assert not W.overlaps(a, b, margin=0)
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height


def test_curriculum_knob_limits_objects():
    cfg = T.DataConfig(scene=W.SceneConfig(max_objects=1))
    for s in itertools.islice(T.iterate("2", config=cfg, render_media=False), 60):
        if s.scene is not None:
            assert len(s.scene.shapes) <= 1


def test_shape_boxes_and_kinds_match_rendered_pixels():
    n_checked = 0
    for seed in range(60):
        scene = W.make_scene(seed, W.SceneConfig(max_objects=6))
        img = W.render(scene)
        for color in {s.color for s in scene.shapes}:
            mask = color_mask(img, W.COLORS[color])
            own = [s.box for s in scene.shapes if s.color == color]
            inside = np.zeros_like(mask)
            for x1, y1, x2, y2 in own:
                inside[y1:y2, x1:x2] = True
            assert not (mask & ~inside).any(), f"seed {seed}: {color} pixels outside its shapes' boxes"
        for s in scene.shapes:
            x1, y1, x2, y2 = s.box
            assert x2 - x1 == y2 - y1
            m = color_mask(img, W.COLORS[s.color])
            window = np.zeros_like(m)
            window[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = True  # neighbours are >= 4 px away
            assert bbox_of(m & window) == s.box, f"seed {seed}: {s}"
            if x2 - x1 >= 24:  # probe points need a few pixels of resolution
                assert classify_shape(m[y1:y2, x1:x2]) == s.kind, f"seed {seed}: {s}"
                n_checked += 1
    assert n_checked > 50


def test_fonts_cover_every_word():
    from fontTools.ttLib import TTFont

    chars = {c for ws in W.WORDS.values() for w in ws for c in w} | set("0123456789")
    for name in W.FONTS:
        cmap = TTFont(str(W.font_dir() / name)).getBestCmap()
        missing = sorted(c for c in chars if ord(c) not in cmap)
        assert not missing, f"{name} lacks {missing}"


def _binarise(region: np.ndarray) -> np.ndarray:
    """Ink = darker than the midpoint between the region's darkest and brightest grey."""
    grey = region.astype(float).mean(axis=-1)
    return grey < (grey.min() + grey.max()) / 2


def _template(word: str, font: str, size: int) -> np.ndarray:
    """The word rendered on its own through a different Pillow path (getmask), cropped to its ink."""
    m = W.get_font(font, size).getmask(word, mode="L")
    ink = np.array(m, dtype=np.uint8).reshape(m.size[1], m.size[0]) >= 128
    ys, xs = np.nonzero(ink)
    return ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _match(a: np.ndarray, b: np.ndarray) -> float:
    """Best IoU of two binary masks over +-1 px shifts (the two renders may differ by sub-pixel origin)."""
    h, w = max(a.shape[0], b.shape[0]) + 2, max(a.shape[1], b.shape[1]) + 2
    pa = np.zeros((h, w), bool)
    pa[1:a.shape[0] + 1, 1:a.shape[1] + 1] = a
    best = 0.0
    for dy in range(3):
        for dx in range(3):
            pb = np.zeros((h, w), bool)
            pb[dy:dy + b.shape[0], dx:dx + b.shape[1]] = b
            best = max(best, (pa & pb).sum() / max(1, (pa | pb).sum()))
    return best


def test_text_is_rendered_in_its_box_and_readable():
    cfg = W.SceneConfig(text_prob=1.0, max_texts=2, large_prob=0.3)
    n = 0
    for seed in range(40):
        scene = W.make_scene(seed, cfg)
        img = np.asarray(W.render(scene))
        dark = img.max(axis=-1) < 140  # text is dark, shapes and backgrounds are not
        inside = np.zeros(dark.shape, bool)
        for t in scene.texts:
            x1, y1, x2, y2 = t.box
            inside[y1:y2, x1:x2] = True
        assert not (dark & ~inside).any(), f"seed {seed}: dark pixels outside the text boxes"
        for t in scene.texts:
            x1, y1, x2, y2 = t.box
            got = bbox_of(dark[y1:y2, x1:x2])
            assert got is not None, f"seed {seed}: no ink for {t.text!r}"
            # the box is the extent of any coverage; clearly dark pixels reach within 2 px of each edge
            assert got[0] <= 2 and got[1] <= 2 and got[2] >= x2 - x1 - 2 and got[3] >= y2 - y1 - 2, (t, got)
            # template "OCR": the ink matches this word better than any other word in the font and size
            ink = _binarise(img[y1:y2, x1:x2])
            ys, xs = np.nonzero(ink)
            ink = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            candidates = {w for ws in W.WORDS.values() for w in ws} | {t.text, t.text + "1", t.text[::-1]}
            scores = {w: _match(ink, _template(w, t.font, t.size)) for w in candidates}
            best = max(scores, key=scores.get)
            assert best == t.text or scores[best] == scores[t.text], (t, best)
            assert scores[t.text] > 0.6, (t, scores[t.text])
            n += 1
    assert n > 40


# --------------------------------------------------------------------------------------------------
# Tasks and grounding
# --------------------------------------------------------------------------------------------------


def _sample_image(s):
    return s.messages[0]["content"][0]["image"]


@pytest.mark.parametrize("generation", GENS)
def test_grounding_answers_parse_back_to_the_box(generation):
    from qvl.media import process_image

    for seed in range(25):
        s = T.make_sample("ground", seed, generation)
        img, item = _sample_image(s), s.messages[0]["content"][0]
        h, w = s.truth["original_size"]
        assert (img.height, img.width) == (h, w)
        resized = process_image(img, min_pixels=item["min_pixels"], max_pixels=item["max_pixels"]).resized_size
        assert tuple(resized) == tuple(s.truth["resized_size"])
        boxes = grounding.parse(s.answer, generation, original_size=(h, w), resized_size=resized)
        assert len(boxes) == 1 and boxes[0].label == s.truth["label"]
        # rounding to the convention's grid: 0.5 unit, plus 1 unit where 1000 is clamped to 999 (gen 1/2)
        if generation == "2.5":
            tol_x, tol_y = 0.5 * w / resized[1], 0.5 * h / resized[0]
        else:
            tol_x, tol_y = 1.0 * w / 1000, 1.0 * h / 1000
        for got, want, tol in zip(boxes[0].xyxy, s.truth["box"], (tol_x, tol_y, tol_x, tol_y)):
            assert abs(got - want) <= tol + 1e-6, (seed, boxes[0], s.truth["box"])
        assert T.score("ground", s.answer, s.truth) > 0.75
        # the box is where the named thing is in the pixels (independently of the answer text)
        label = s.truth["label"]
        color = next((c for c in W.COLORS if label.startswith(c + " ")), None)
        if color is not None:
            x1, y1, x2, y2 = s.truth["box"]
            assert color_mask(img, W.COLORS[color])[y1:y2, x1:x2].mean() > 0.3


def test_grounding_is_the_same_question_on_the_same_image_for_every_generation():
    for seed in range(10):
        samples = [T.make_sample("ground", seed, g) for g in GENS]
        assert len({s.qas[0].question for s in samples}) == 1
        assert len({s.truth["box"] for s in samples}) == 1
        assert len({_sample_image(s).tobytes() for s in samples}) == 1


def _region_of_question(q: str, generation: str, truth_sizes):
    if generation == "2.5":
        coords = json.loads(re.search(r"\[[^\]]*\]", q).group())
        return grounding.to_original((None, "box", coords), "2.5", *truth_sizes)
    return grounding.parse(q, generation, original_size=truth_sizes[0])[0]


@pytest.mark.parametrize("generation", GENS)
def test_referring_question_box_names_the_answer(generation):
    for seed in range(20):
        s = T.make_sample("refer", seed, generation)
        sizes = (s.media["original_size"], s.media["resized_size"])
        box = _region_of_question(s.qas[0].question, generation, sizes)
        assert T.iou(box.xyxy, s.truth["box"]) > 0.75
        things = {sh.box: f"a {sh.name}" if sh.color[0] not in "aeiou" else f"an {sh.name}" for sh in s.scene.shapes}
        things.update({t.box: f'the text "{t.text}"' for t in s.scene.texts})
        assert things[s.truth["box"]] == s.answer


def test_every_task_scores_its_own_answer_and_rejects_wrong_ones():
    for task in T.TASKS:
        for seed in range(8):
            s = T.make_sample(task, seed, "2.5")
            got = T.score(task, s.answer, s.truth)
            assert got == 1.0 or (task == "ground" and got > 0.75), (task, seed, s.answer)
            assert T.score(task, "  " + s.answer.upper() + ". ", s.truth) >= got - 1e-9 or task == "ground"
            assert T.score(task, "", s.truth) == 0.0
    color = T.make_sample("color", 3, "2")
    wrong = next(c for c in W.COLORS if c != color.truth["answer"])
    assert T.score("color", wrong, color.truth) == 0.0
    assert T.score("color", color.answer.replace(color.truth["answer"], wrong), color.truth) == 0.0
    count = T.make_sample("count", 3, "2")
    assert T.score("count", str(int(count.answer) + 1), count.truth) == 0.0
    when = T.make_sample("video_when", 3, "2.5")
    t = when.truth["time"]
    assert T.score("video_when", f"{t + 0.4:.2f} seconds", when.truth) == 1.0
    assert T.score("video_when", f"{t + 0.6:.2f} seconds", when.truth) == 0.0
    g = T.make_sample("ground", 3, "2")
    other = grounding.Box(0, 0, 5, 5, label="x")
    wrong_answer = grounding.format_boxes([other], "2", g.truth["original_size"])
    assert T.score("ground", wrong_answer, g.truth) < 0.1


def test_caption_lists_shapes_left_to_right_and_reads_the_text():
    for seed in range(30):
        s = T.make_sample("caption", seed, "2")
        names = re.findall(r"\ban? (\w+ \w+)", s.answer.split(" The text")[0])
        assert len(names) == len(s.scene.shapes)
        centres = []
        for name in names:  # locate each named shape in the pixels
            color, kind = name.split()
            assert kind in W.KINDS
            m = color_mask(_sample_image(s), W.COLORS[color])
            centres.append(np.nonzero(m)[1].mean())
        unique_colors = len({n.split()[0] for n in names}) == len(names)
        if unique_colors:
            assert centres == sorted(centres)
        for t in s.scene.texts:
            assert f'"{t.text}"' in s.answer


def test_ocr_answers_are_the_scene_words_in_reading_order():
    for seed in range(30):
        s = T.make_sample("ocr", seed, "2.5")
        words = s.answer.split(" ")
        assert sorted(words) == sorted(t.text for t in s.scene.texts)
        tops = [next(t.box for t in s.scene.texts if t.text == w)[1] for w in words]
        assert all(b >= a - max(t.height for t in s.scene.texts) for a, b in zip(tops, tops[1:]))
        assert s.truth["min_height"] == min(t.box[3] - t.box[1] for t in s.scene.texts)


def test_chat_samples_render_for_every_generation():
    for seed in range(6):
        for g in GENS:
            s = T.make_sample("count", seed, g, turns=3)
            assert [m["role"] for m in s.messages] == ["user", "assistant"] * len(s.qas)
            assert len(s.qas) == 3 and len({q.question for q in s.qas}) == 3
            text = render_qwen_vl(s.messages, add_generation_prompt=False) if g == "1" else \
                render_qwen2(s.messages, add_generation_prompt=False)
            for qa in s.qas:
                assert qa.question in text and qa.answer in text
            if g == "1":
                assert text.count("<img>") == 1
            else:
                assert text.count(IMAGE_PAD) == 1
            prompt = s.prompt(1)
            assert prompt[-1]["role"] == "user" and len(prompt) == 3
    v = T.make_sample("video_direction", 0, "2.5")
    assert render_qwen2(v.messages).count(VIDEO_PAD) == 1
    with pytest.raises(ValueError, match="video"):
        T.make_sample("video_when", 0, "1")


# --------------------------------------------------------------------------------------------------
# Splits and the iterator
# --------------------------------------------------------------------------------------------------


def test_train_and_eval_seed_ranges_are_disjoint():
    (a0, a1), (b0, b1) = T.SPLITS["train"], T.SPLITS["eval"]
    assert a1 <= b0 or b1 <= a0
    train = [s.seed for s in itertools.islice(T.iterate("2.5", "train", render_media=False), 50)]
    held = [s.seed for s in itertools.islice(T.iterate("2.5", "eval", render_media=False), 50)]
    assert all(T.split_of(x) == "train" for x in train) and all(T.split_of(x) == "eval" for x in held)
    assert not set(train) & set(held)
    assert all(T.split_of(s.seed) == "eval" for s in T.eval_samples("count", "2", 5, render_media=False))
    # resuming continues the same stream
    resumed = next(T.iterate("2.5", "train", start=10, render_media=False))
    assert resumed.seed == train[10]


def test_task_mix_weights_and_gen1_has_no_video():
    mix = {"count": 3.0, "ocr": 1.0, "video_when": 1.0}
    got = [s.task for s in itertools.islice(T.iterate("2", mix=mix, render_media=False), 400)]
    frac = got.count("count") / len(got)
    assert 0.5 < frac < 0.7 and set(got) == set(mix)
    got1 = {s.task for s in itertools.islice(T.iterate("1", render_media=False), 200)}
    assert not got1 & set(T.VIDEO_TASKS)
    multi = [len(s.qas) for s in itertools.islice(
        T.iterate("2", config=T.DataConfig(max_turns=3), render_media=False), 60)]
    assert set(multi) == {1, 2, 3}


# --------------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------------


def test_video_events_and_motion_match_the_frames():
    n_events = 0
    for seed in range(8):
        clip = V.make_clip(seed)
        assert clip.fps in V.ClipConfig().fps_choices and 2.0 <= clip.duration <= 6.2
        frames = V.frames(clip)
        for i, t in enumerate(clip.tracks):
            boxes = []
            for f, img in enumerate(frames):
                m = color_mask(img, W.COLORS[t.color])
                seen = bbox_of(m)
                assert (seen is not None) == V.visible(t, f), (seed, t.name, f)
                if seen is not None:
                    assert seen == V.box_at(t, f, clip.fps)
                    boxes.append(seen)
            first_seen = next(f for f, img in enumerate(frames) if color_mask(img, W.COLORS[t.color]).any())
            dx = (boxes[-1][0] - boxes[0][0], boxes[-1][1] - boxes[0][1])
            expect = {"left": (dx[0] < 0 and dx[1] == 0), "right": (dx[0] > 0 and dx[1] == 0),
                      "up": (dx[1] < 0 and dx[0] == 0), "down": (dx[1] > 0 and dx[0] == 0)}
            assert expect[t.direction], (seed, t, dx)
            for e in V.events(clip):
                if e.track == i and e.kind == "appear":
                    assert e.time == first_seen / clip.fps
                    n_events += 1
                if e.track == i and e.kind == "disappear":
                    assert e.time == (first_seen + len(boxes)) / clip.fps
    assert n_events >= 3


def test_video_sample_frames_and_answers():
    for seed in range(6):
        s = T.make_sample("video_when", seed, "2.5")
        item = s.messages[0]["content"][0]
        assert len(item["video"]) == len(s.media["frame_indices"])
        assert item["fps"] == pytest.approx(len(item["video"]) / s.clip.duration)
        assert abs(float(s.answer.split()[0]) - s.truth["time"]) <= 0.05
        d = T.make_sample("video_direction", seed, "2")
        assert d.answer in V.DIRECTIONS


def test_mp4_written_with_pyav_decodes_with_the_runtime_decoder(tmp_path):
    from qvl.media import process_video

    clip = V.make_clip(4, V.ClipConfig(max_seconds=2.5, max_side=160))
    path = tmp_path / "clip.mp4"
    V.write_mp4(clip, path)
    out = process_video(str(path), fps=2.0)
    assert out.total_frames == clip.n_frames
    assert out.video_fps == pytest.approx(clip.fps, rel=1e-3)
    assert tuple(out.original_size) == (clip.height, clip.width)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from qvl.data import tokenizer as TK

    texts = list(TK.chat_texts(300, ("2", "2.5")))
    tok = TK.train_tokenizer(TK.corpus(300), vocab_size=1200)
    directory = TK.save_tokenizer(tok, tmp_path_factory.mktemp("tok"))
    return TK, tok, directory, texts


ODD_TEXT = ("Ünïcödé ☃ 猫 مرحبا 🙂 \t tabs\r\nand\x00nul 12345 ½ ⅞ ٣", "<|im_start|><|im_start|>x<|box_end|>")


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(trained):
    TK, tok, _, texts = trained
    assert 256 + len(TK.SPECIAL_TOKENS) < tok.get_vocab_size() <= 1200
    for text in texts + list(ODD_TEXT):
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    first = tok.token_to_id("<|endoftext|>")
    for i, name in enumerate(TK.SPECIAL_TOKENS):
        assert tok.token_to_id(name) == first + i  # after the learned vocabulary, in the released order
        assert tok.encode(f"a{name}b").ids[1:-1] == [first + i]
    assert first + len(TK.SPECIAL_TOKENS) == tok.get_vocab_size()
    # generated text is mostly whole words, not characters
    n_tokens = sum(len(tok.encode(t).ids) for t in texts)
    assert n_tokens < 0.35 * sum(len(t) for t in texts)


def test_tokenizer_splits_digits_one_per_token(trained):
    _, tok, _, texts = trained
    # ASCII digits are their own characters in byte-level pieces; no learned piece holds two of them
    for piece in tok.get_vocab():
        assert sum(ch in "0123456789" for ch in piece) <= 1, piece
    ids = tok.encode("[1234, 56]").ids
    assert [tok.decode([i]) for i in ids] == ["[", "1", "2", "3", "4", ",", " ", "5", "6", "]"]
    for text in texts[:50]:
        for i in tok.encode(text).ids:
            piece = tok.decode([i])
            assert sum(ch in "0123456789" for ch in piece) <= 1, piece


def test_transformers_loads_the_saved_tokenizer_and_encodes_identically(trained):
    transformers = pytest.importorskip("transformers")
    _, tok, directory, texts = trained
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert type(hf).__name__ == "Qwen2TokenizerFast"
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
    for text in texts[:150] + list(ODD_TEXT):
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text).ids
        assert hf.decode(ids) == text
    assert len(hf) == tok.get_vocab_size()
    for name in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|box_start|>"):
        assert hf.convert_tokens_to_ids(name) == tok.token_to_id(name)


def test_gen1_tiktoken_builds_and_round_trips(tmp_path):
    from qvl.data import tokenizer as TK
    from qvl.tokenizer_qwen_vl import QwenVLTokenizer

    ranks = TK.train_gen1_ranks(TK.gen1_corpus(60), 330)
    assert len(ranks) == 330
    TK.save_gen1(ranks, tmp_path)
    qt = QwenVLTokenizer.from_dir(tmp_path)
    for s in itertools.islice(T.iterate("1", render_media=False), 20):
        text = render_qwen_vl(s.messages, add_generation_prompt=False)
        ids = qt.encode(text)
        assert qt.decode(ids) == text
        assert ids.count(qt.img_start_id) == 1
    assert len(qt.encode("2024")) == 4


def test_colour_and_shape_answers_put_the_asked_word_right_before_the_answer_word():
    """The answer restates what the question names, immediately before the word it asks for ("The star red.",
    "A red star."): the token that predicts the answer is the key itself, so no head has to fetch it from the
    question first (docs/training_log.md, session 12). The score reads the one colour / kind the reply names."""
    for seed in range(20):
        c = T.make_sample("color", seed, "2.5")
        shape = next(s for s in c.scene.shapes if s.color == c.truth["answer"] and f" {s.kind}" in c.qas[0].question)
        assert c.answer.split()[-2:] == [shape.kind, c.truth["answer"] + "."]
        s = T.make_sample("shape", seed, "2.5")
        named = next(x for x in s.scene.shapes if x.kind == s.truth["answer"] and x.color in s.qas[0].question)
        assert s.answer.split()[-2:] == [named.color, s.truth["answer"] + "."]
    c = T.make_sample("color", 1, "2.5")
    other = next(x for x in W.COLORS if x != c.truth["answer"])
    assert T.score("color", c.truth["answer"], c.truth) == 1.0  # a bare answer (older models) still counts
    assert T.score("color", f"The {other} star {c.truth['answer']}.", c.truth) == 0.0  # two colours named
    assert T.score("shape", "A red triangle star.", {"answer": "star"}) == 0.0
    assert T.score("shape", "Star", {"answer": "star"}) == 1.0


def test_count_questions_mostly_name_what_is_there():
    """Three in four kind / colour count questions name one that is in the scene (drawn from all names, two in
    three answers were 0 and the models learnt to say 0: docs/training_log.md, session 13). The answer is
    recounted here from the scene; `score` reads the one number a reply names."""
    plural = {p: k for k, p in W.PLURALS.items()}
    named, present = 0, 0
    for seed in range(400):
        s = T.make_sample("count", seed, "2.5", render_media=False)
        q = s.qas[0].question
        word = q.split()[2]  # "How many stars are there?" / "How many red shapes ..." / "How many shapes ..."
        if word in plural:
            n = sum(x.kind == plural[word] for x in s.scene.shapes)
        elif word in W.COLORS:
            n = sum(x.color == word for x in s.scene.shapes)
        else:
            assert q == "How many shapes are there?", q
            n = len(s.scene.shapes)
        assert s.answer == s.truth["answer"] == str(n), (seed, q)
        if word in plural or word in W.COLORS:
            named, present = named + 1, present + (n > 0)
    # 3/4 drawn from what is there, plus the 1/4 drawn from all names that happen to be there
    assert 0.75 <= present / named <= 0.95, present / named
    assert T.score("count", "2", {"answer": "2"}) == 1.0
    assert T.score("count", "There are 2.", {"answer": "2"}) == 1.0
    assert T.score("count", "2 3", {"answer": "2"}) == 0.0
    assert T.score("count", "12", {"answer": "2"}) == 0.0
    assert T.score("count", "two", {"answer": "2"}) == 0.0
