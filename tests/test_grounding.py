"""Grounding formats of the three generations: worked examples, round trips, robustness."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl import grounding as G
from qvl.grounding import Box, Point

# ------------------------------------------------------------------ worked examples (reference §7)


def test_gen1_readme_example_and_reference_truncation():
    # Qwen-VL README: <ref>击掌</ref><box>(536,509),(588,602)</box>; drawn with int(x/1000*w).
    text = "<ref>击掌</ref><box>(536,509),(588,602)</box>"
    (b,) = G.parse(text, "1", original_size=(480, 640))  # (h, w)
    assert b.label == "击掌" and b.convention == "1" and b.raw == (536, 509, 588, 602)
    # 536/1000*640 = 343.04, 509/1000*480 = 244.32, 588*0.64 = 376.32, 602*0.48 = 288.96
    assert b.xyxy == pytest.approx((343.04, 244.32, 376.32, 288.96))
    assert b.as_int() == (343, 244, 376, 288)


def test_gen1_caption_with_several_refs_and_boxes():
    text = (
        "<ref> Woman</ref><box>(451,379),(731,806)</box> and<ref> her dog</ref>"
        "<box>(219,424),(576,896)</box><box>(1,2),(3,4)</box> then <box>(10,10),(20,20)</box>"
    )
    boxes = G.parse(text, "1", original_size=(1000, 1000))
    assert [b.label for b in boxes] == ["Woman", "her dog", "her dog", None]
    assert boxes[0].xyxy == (451, 379, 731, 806)


def test_gen2_tokens_and_reversed_corners():
    text = (
        "The cat <|object_ref_start|>cat<|object_ref_end|><|box_start|>(500,600),(100,200)<|box_end|>"
        " is here."
    )
    (b,) = G.parse(text, "2", original_size=(200, 300))
    # x: 100*0.3=30, 500*0.3=150 (swapped back into order); y: 200*0.2=40, 600*0.2=120
    assert b.xyxy == pytest.approx((30, 40, 150, 120))
    assert b.label == "cat" and b.raw == (500, 600, 100, 200)


def test_gen25_cookbook_example_1024_to_1036():
    # A 1024x1024 image is resized to 1036x1036 (§7.3): outputs reach ~995.
    text = '```json\n[\n\t{"bbox_2d": [0, 0, 995, 518], "label": "sky"}\n]\n```'
    (b,) = G.parse(text, "2.5", original_size=(1024, 1024), resized_size=(1036, 1036))
    assert b.xyxy == pytest.approx((0, 0, 995 * 1024 / 1036, 518 * 1024 / 1036))
    assert b.label == "sky" and b.convention == "2.5"


def test_gen25_points_json_xml_and_plain_boxes():
    text = '[{"point_2d": [100, 50], "label": "eye"}, {"bbox_2d": [1, 2, 3, 4]}]'
    p, b = G.parse(text, "2.5", original_size=(100, 200), resized_size=(50, 100))
    assert isinstance(p, Point) and p.xy == (200, 100) and p.label == "eye"
    assert isinstance(b, Box) and b.label is None and b.xyxy == (2, 4, 6, 8)

    xml = '<points x1="10" y1="20" x2="30" y2="40" alt="two cups">cups</points>'
    pts = G.parse(xml, "2.5", original_size=(100, 100), resized_size=(100, 100))
    assert [(q.x, q.y, q.label) for q in pts] == [(10, 20, "cups"), (30, 40, "cups")]

    plain = "12,34,56,78 red car\n5,6,7,8 bus"
    cars = G.parse(plain, "2.5", original_size=(100, 100), resized_size=(100, 100))
    assert [(c.xyxy, c.label) for c in cars] == [((12, 34, 56, 78), "red car"), ((5, 6, 7, 8), "bus")]


def test_gen25_malformed_and_truncated_json_keeps_what_reads():
    text = (
        "Sure! Here you go:\n```json\n[\n"
        "  {'bbox_2d': [10, 20, 30, 40], 'label': 'a'},\n"  # single quotes
        '  {"bbox_2d": [1, 2, 3, 4], "label": "b",},\n'  # trailing comma
        '  {"bbox_2d": [5, 6, 7, 8], "label": "c\\"q"},\n'  # escaped quote
        '  {"bbox_2d": [50, 60, 70'  # truncated mid-list
    )
    boxes = G.parse_raw(text, "2.5")
    assert [(lab, c) for lab, _, c in boxes] == [
        ("a", (10, 20, 30, 40)),
        ("b", (1, 2, 3, 4)),
        ('c"q', (5, 6, 7, 8)),
    ]


def test_gen25_truncated_after_complete_coords():
    text = '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "dog"}, {"bbox_2d": [9, 9, 10, 10], "label": "ca'
    boxes = G.parse_raw(text, "2.5")
    assert boxes[0] == ("dog", "box", (1, 2, 3, 4))
    assert boxes[1][2] == (9, 9, 10, 10)  # coordinates are complete, the label is not: keep the box


def test_clamped_to_image():
    (b,) = G.parse("<|box_start|>(0,0),(1000,1200)<|box_end|>", "2", original_size=(10, 20))
    assert b.xyxy == (0, 0, 20, 10)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no boxes here",
        "<box>(1,2)</box>",
        "<ref>x</ref><box>(a,b),(c,d)</box>",
        "```json\n[{]]]```",
        '{"bbox_2d": [1, 2, 3]}',
        '{"bbox_2d": "1,2,3,4"}',
        '{"bbox_2d": [true, 2, 3, 4]}',
        '[{"point_2d": [NaN, 1]}]',
        "{{{{",
        "<points x1='a' y1='b'>x</points>",
        "\x00\uffff<|box_start|>",
    ],
)
@pytest.mark.parametrize("gen", G.GENERATIONS)
def test_garbage_gives_empty_list(text, gen):
    assert G.parse(text, gen, original_size=(10, 10), resized_size=(28, 28)) == []


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        G.parse("x", "3", original_size=(1, 1))
    with pytest.raises(ValueError):
        G.parse('{"bbox_2d": [1,2,3,4]}', "2.5", original_size=(10, 10))  # needs resized_size
    with pytest.raises(ValueError):
        G.format_box(Point(1, 2), "1", (10, 10))


def test_parse_with_batch_uses_latest_image():
    class Item:
        def __init__(self, kind, o, r):
            self.kind, self.original_size, self.resized_size = kind, o, r

    class FakeBatch:
        media = [Item("image", (100, 100), (112, 112)), Item("video", (5, 5), (28, 28)), Item("image", (200, 400), (196, 392))]

    (b,) = G.parse('{"bbox_2d": [0, 0, 392, 196]}', "2.5", FakeBatch())
    assert b.xyxy == (0, 0, 400, 200)
    (b,) = G.parse('{"bbox_2d": [0, 0, 112, 112]}', "2.5", FakeBatch(), image=0)
    assert b.xyxy == (0, 0, 100, 100)


# ------------------------------------------------------------------ formatting + rounding


def test_format_each_generation():
    box = Box(64.0, 48.0, 320.0, 240.0, "dog")
    assert G.format_box(box, "1", (480, 640)) == "<ref>dog</ref><box>(100,100),(500,500)</box>"
    assert (
        G.format_box(box, "2", (480, 640))
        == "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>"
    )
    # (480, 640) resized to (476, 644): x * 644/640, y * 476/480, rounded to nearest.
    assert G.format_box(box, "2.5", (480, 640), (476, 644)) == '{"bbox_2d": [64, 48, 322, 238], "label": "dog"}'
    txt = G.format_boxes([box, Point(10, 20, "nose")], "2.5", (480, 640), (476, 644))
    assert txt.startswith("```json\n[") and txt.endswith("]\n```")
    assert [it[1] for it in G.parse_raw(txt, "2.5")] == ["box", "point"]
    assert G.format_box(Box(0, 0, 1, 1), "1", (10, 10)) == "<box>(0,0),(100,100)</box>"


def test_format_rounding_half_even_and_clamp():
    # With a 1000-pixel side one pixel is one unit: 12.5 -> 12, 13.5 -> 14 (Python round, half to even).
    assert G.from_original(Box(12.5, 13.5, 999.6, 1000), "2", (1000, 1000)) == (12, 14, 999, 999)
    # gen 2.5: the far edge may equal the resized width/height, but not exceed it.
    assert G.from_original(Box(0, 0, 640, 480), "2.5", (480, 640), (476, 644)) == (0, 0, 644, 476)


def test_strip_markup():
    assert G.strip("<ref>a dog</ref><box>(1,2),(3,4)</box> runs", "1") == "a dog runs"
    t = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>!"
    assert G.strip(t, "2") == "cat!"


# ------------------------------------------------------------------ properties

coord = st.integers(min_value=0, max_value=999)
# Labels are always present in the lists below: in gen 1/2 an unlabelled box right after a labelled
# one reads as a second box of the same ref (see test_gen1_caption_with_several_refs_and_boxes).
label = (
    st.text(alphabet=st.characters(blacklist_characters="<>\x00", blacklist_categories=("Cs",)), min_size=1, max_size=12)
    .map(str.strip)
    .filter(bool)
)
size = st.tuples(st.integers(1, 5000), st.integers(1, 5000))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(label, coord, coord, coord, coord), min_size=1, max_size=4), st.sampled_from(["1", "2"]), size)
def test_gen12_units_survive_parse_then_format(items, gen, orig):
    # Raw model units -> original pixels -> units again is the identity (for ordered corners).
    boxes = [Box(min(a, c), min(b, d), max(a, c), max(b, d), lab) for lab, a, b, c, d in items]
    text = G.format_boxes(boxes, gen, (1000, 1000))  # 1000x1000: pixels == units
    parsed = G.parse(text, gen, original_size=orig)
    assert [p.label for p in parsed] == [b.label for b in boxes]
    back = [G.from_original(p, gen, orig) for p in parsed]
    assert back == [tuple(int(v) for v in b.xyxy) for b in boxes]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(label, st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=4),
    st.sampled_from(G.GENERATIONS),
    size,
    size,
)
def test_format_then_parse_within_quantisation(items, gen, orig, resized):
    h, w = orig
    boxes = [Box(min(a, c) * w, min(b, d) * h, max(a, c) * w, max(b, d) * h, lab) for lab, a, b, c, d in items]
    text = G.format_boxes(boxes, gen, orig, resized)
    parsed = G.parse(text, gen, original_size=orig, resized_size=resized)
    assert len(parsed) == len(boxes)
    # Half a unit of the convention, in original pixels.
    tol_x = (w / resized[1] if gen == "2.5" else w / 1000) / 2 + 1e-6 * w
    tol_y = (h / resized[0] if gen == "2.5" else h / 1000) / 2 + 1e-6 * h
    for p, b in zip(parsed, boxes):
        assert p.label == b.label and p.convention == gen
        # gen 1/2 clamp at unit 999, i.e. up to one more unit short of the far edge
        extra_x = w / 1000 if gen != "2.5" else 0
        extra_y = h / 1000 if gen != "2.5" else 0
        for got, want, tol, extra in zip(p.xyxy, b.xyxy, (tol_x, tol_y) * 2, (extra_x, extra_y) * 2):
            assert math.isclose(got, want, abs_tol=tol + extra)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.sampled_from(G.GENERATIONS))
def test_never_raises_on_arbitrary_text(text, gen):
    out = G.parse(text, gen, original_size=(50, 60), resized_size=(56, 56))
    assert all(isinstance(o, (Box, Point)) for o in out)
    for o in out:
        for v, hi in zip(o.xyxy if isinstance(o, Box) else o.xy, (60, 50, 60, 50)):
            assert 0 <= v <= hi


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='{}[]",:\'0123456789 bbox_2dpointlael\n`json', max_size=120))
def test_json_fuzz_near_valid(text):
    G.parse(text, "2.5", original_size=(10, 10), resized_size=(28, 28))
