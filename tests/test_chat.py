"""qvl.chat against the Qwen2-VL chat template rendered by transformers' jinja machinery and
against transformers 4.57.6 Qwen2VLProcessor placeholder expansion + tokenisation."""

import random

import numpy as np
import pytest
import torch

from qvl.chat import (
    expand_pads,
    modality_spans,
    render_qwen2,
    render_qwen_vl,
    vision_items,
)

transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import Qwen2TokenizerFast  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor  # noqa: E402
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor  # noqa: E402

# The Qwen2-VL / Qwen2.5-VL chat template, written as jinja from its description (reference §5.7):
# default system turn, `<|im_start|>{role}\n...<|im_end|>\n`, items concatenated with no separator,
# optional `Picture N: ` / `Video N: ` counters, generation prompt `<|im_start|>assistant\n`.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """Byte-level BPE with no merges (every byte is a token) + the Qwen2 special tokens."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_tokenizer):
    return Qwen2TokenizerFast(tokenizer_object=tiny_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


class _StubVideoProcessor:
    """Stands in for Qwen2VLVideoProcessor (needs torchvision, absent here): returns given grids.
    The code under comparison is the processor's placeholder expansion and tokenisation."""

    merge_size = 2

    def __call__(self, videos, **kwargs):
        return {"video_grid_thw": torch.tensor(videos)}


class _Processor(Qwen2VLProcessor):
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def hf_processor(hf_tokenizer):
    images = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)  # small grids
    return _Processor(image_processor=images, tokenizer=hf_tokenizer, video_processor=_StubVideoProcessor())


# ---------------------------------------------------------------------------------------------
# Random conversations
# ---------------------------------------------------------------------------------------------

_WORDS = ["Describe", "this", "image.", "ÄÖ", "框", "\n", " ", "a\nb", "{{ x }}", "<b>", "  two  ", "Picture 1:"]


def _text(rng):
    return "".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 4)))


def _media_item(rng, kind):
    if kind == "image":
        form = rng.randrange(4)
        if form == 0:
            return {"type": "image", "image": f"file:///tmp/img{rng.randrange(99)}.jpg"}
        if form == 1:
            return {"type": "image", "image": "https://x.org/a.png", "min_pixels": 3136, "max_pixels": 50176}
        if form == 2:
            return {"type": "image_url", "image_url": {"url": "https://x.org/b.png"}}
        return {"image": f"/data/{rng.randrange(9)}.png"}  # no "type": the key alone decides
    form = rng.randrange(3)
    if form == 0:
        return {"type": "video", "video": "file:///v.mp4", "fps": rng.choice([0.5, 1.0, 2.0])}
    if form == 1:
        return {"type": "video", "video": [f"f{i}.jpg" for i in range(4)], "sample_fps": 1.0}
    return {"video": "clip.mp4", "nframes": 8, "max_pixels": 100352}


def random_conversation(rng):
    messages = []
    if rng.random() < 0.4:
        sys_content = _text(rng) if rng.random() < 0.5 else [{"type": "text", "text": _text(rng)}]
        messages.append({"role": "system", "content": sys_content})
    for turn in range(rng.randint(1, 3)):
        if rng.random() < 0.25:
            messages.append({"role": "user", "content": _text(rng)})
        else:
            items = []
            for _ in range(rng.randint(0, 5)):
                r = rng.random()
                if r < 0.4:
                    items.append(_media_item(rng, "image"))
                elif r < 0.55:
                    items.append(_media_item(rng, "video"))
                else:
                    items.append({"type": "text", "text": _text(rng)})
            messages.append({"role": "user", "content": items})
        if turn < 2 or rng.random() < 0.5:
            reply = _text(rng) if rng.random() < 0.7 else [{"type": "text", "text": _text(rng)}]
            messages.append({"role": "assistant", "content": reply})
    return messages


# ---------------------------------------------------------------------------------------------
# render_qwen2 == jinja template
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(80))
def test_render_qwen2_matches_template(hf_tokenizer, seed):
    rng = random.Random(seed)
    messages = random_conversation(rng)
    gen, vid = rng.random() < 0.7, rng.random() < 0.4
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=QWEN2_VL_TEMPLATE, tokenize=False, add_generation_prompt=gen, add_vision_id=vid
    )
    assert render_qwen2(messages, add_generation_prompt=gen, add_vision_id=vid) == expected


@pytest.mark.parametrize("seed", range(80))
def test_qvl_jinja_template_renders_like_render_qwen2(hf_tokenizer, seed):
    """QWEN2_CHAT_TEMPLATE (what qvl writes into tokenizer_config.json) through transformers' own renderer."""
    from qvl.chat import QWEN2_CHAT_TEMPLATE

    rng = random.Random(1000 + seed)
    messages = random_conversation(rng)
    gen, vid = rng.random() < 0.7, rng.random() < 0.4
    got = hf_tokenizer.apply_chat_template(messages, chat_template=QWEN2_CHAT_TEMPLATE, tokenize=False,
                                           add_generation_prompt=gen, add_vision_id=vid)
    assert got == render_qwen2(messages, add_generation_prompt=gen, add_vision_id=vid)


def test_render_qwen2_single_image_literal():
    # The full single-image prompt quoted in reference §5.7.
    messages = [{"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "Describe this image."}]}]
    assert render_qwen2(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_qwen2_vision_ids_count_across_turns():
    img = {"type": "image", "image": "a.jpg"}
    vid = {"type": "video", "video": "v.mp4"}
    messages = [
        {"role": "user", "content": [img, vid, img]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [img, vid]},
    ]
    text = render_qwen2(messages, add_vision_id=True)
    for label in ("Picture 1: ", "Video 1: ", "Picture 2: ", "Picture 3: ", "Video 2: "):
        assert label in text
    assert text.index("Picture 2: ") < text.index("Picture 3: ") < text.index("Video 2: ")


# ---------------------------------------------------------------------------------------------
# vision_items
# ---------------------------------------------------------------------------------------------


def test_vision_items_order_and_options():
    frames = ["f0.jpg", "f1.jpg"]
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "compare"},
            {"type": "image", "image": "a.jpg", "max_pixels": 1003520},
            {"type": "video", "video": "v.mp4", "fps": 1.0, "max_frames": 16},
            {"type": "image_url", "image_url": {"url": "https://x.org/b.png"}},
        ]},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": [{"video": frames, "sample_fps": 2.0}, {"image_url": "https://x.org/c.png"}]},
    ]  # fmt: skip
    assert vision_items(messages) == [
        {"type": "image", "source": "a.jpg", "options": {"max_pixels": 1003520}},
        {"type": "video", "source": "v.mp4", "options": {"fps": 1.0, "max_frames": 16}},
        {"type": "image", "source": "https://x.org/b.png", "options": {}},
        {"type": "video", "source": frames, "options": {"sample_fps": 2.0}},
        {"type": "image", "source": "https://x.org/c.png", "options": {}},
    ]
    # a batch of conversations gives one flat list, in batch order
    batch = vision_items([messages[:2], messages[3:]])
    assert [it["source"] for it in batch] == ["a.jpg", "v.mp4", "https://x.org/b.png", frames, "https://x.org/c.png"]


@pytest.mark.parametrize("seed", range(20))
def test_vision_items_agree_with_rendered_pads(seed):
    messages = random_conversation(random.Random(seed))
    items = vision_items(messages)
    text = render_qwen2(messages)
    assert text.count("<|image_pad|>") == sum(it["type"] == "image" for it in items)
    assert text.count("<|video_pad|>") == sum(it["type"] == "video" for it in items)


# ---------------------------------------------------------------------------------------------
# expand_pads + tokenisation == Qwen2VLProcessor
# ---------------------------------------------------------------------------------------------


def _random_image(rng):
    h, w = rng.randint(20, 300), rng.randint(20, 300)
    return Image.fromarray(np.full((h, w, 3), rng.randrange(256), dtype=np.uint8))


@pytest.mark.parametrize("seed", range(30))
def test_expand_pads_matches_processor(hf_processor, tiny_tokenizer, seed):
    rng = random.Random(100 + seed)
    conversations = [random_conversation(rng) for _ in range(rng.choice([1, 1, 2, 3]))]
    texts = [render_qwen2(m) for m in conversations]
    items = [vision_items(m) for m in conversations]
    n_img = sum(it["type"] == "image" for its in items for it in its)
    n_vid = sum(it["type"] == "video" for its in items for it in its)
    images = [_random_image(rng) for _ in range(n_img)] or None
    videos = [[rng.randint(1, 4), 2 * rng.randint(1, 6), 2 * rng.randint(1, 6)] for _ in range(n_vid)] or None
    out = hf_processor(images=images, videos=videos, text=texts)

    img_tokens = (out["image_grid_thw"].prod(-1) // 4).tolist() if images else []
    vid_tokens = (out["video_grid_thw"].prod(-1) // 4).tolist() if videos else []
    i = v = 0
    for b, text in enumerate(texts):
        ni, nv = text.count("<|image_pad|>"), text.count("<|video_pad|>")
        expanded = expand_pads(text, img_tokens[i : i + ni], vid_tokens[v : v + nv])
        i, v = i + ni, v + nv
        ids = tiny_tokenizer.encode(expanded).ids
        assert ids == out["input_ids"][b]

        # the spans of the token stream line up with the items and cover it exactly
        spans = modality_spans(
            ids, image_token_id=tiny_tokenizer.token_to_id("<|image_pad|>"),
            video_token_id=tiny_tokenizer.token_to_id("<|video_pad|>"),
            image_tokens=img_tokens[i - ni : i], video_tokens=vid_tokens[v - nv : v],
        )  # fmt: skip
        assert spans[0]["start"] == 0 and spans[-1]["end"] == len(ids)
        assert all(a["end"] == b_["start"] for a, b_ in zip(spans, spans[1:]))
        assert [s["end"] - s["start"] for s in spans if s["type"] == "image"] == img_tokens[i - ni : i]
        assert [s["end"] - s["start"] for s in spans if s["type"] == "video"] == vid_tokens[v - nv : v]


def test_expand_pads_mismatch_raises():
    with pytest.raises(ValueError, match="1 image and 0 video"):
        expand_pads("<|image_pad|>", [4, 4], [])


def test_modality_spans_back_to_back_items():
    IMG = 151655
    ids = [1, IMG, IMG, IMG, IMG, IMG, 2]  # two images (1 + 4 tokens) with no separator
    spans = modality_spans(ids, image_tokens=[1, 4])
    assert [(s["type"], s["index"], s["start"], s["end"]) for s in spans] == [
        ("text", None, 0, 1), ("image", 0, 1, 2), ("image", 1, 2, 6), ("text", None, 6, 7),
    ]  # fmt: skip
    # without sizes, one run is one item
    assert len([s for s in modality_spans(ids) if s["type"] == "image"]) == 1


def test_modality_spans_gen1():
    ids = [5, 151857] + [65] * 5 + [151859] * 251 + [151858, 7]
    spans = modality_spans(ids, gen1=True)
    assert [(s["type"], s["start"], s["end"]) for s in spans] == [("text", 0, 2), ("image", 2, 258), ("text", 258, 260)]


# ---------------------------------------------------------------------------------------------
# Qwen-VL gen 1
# ---------------------------------------------------------------------------------------------


def _make_context_oracle(query, history=(), system="You are a helpful assistant."):
    """Gen-1 `make_context` layout as described in the gen-1 reference §6.1 (turn pairs)."""
    raw = f"<|im_start|>system\n{system}<|im_end|>"
    for q, a in history:
        raw += f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>"
    return raw + f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"


def _from_list_format_oracle(items):
    """Gen-1 `from_list_format` (§3.4, the `Picture k: ` form with a space)."""
    out, k = "", 0
    for it in items:
        if "image" in it:
            k += 1
            out += f"Picture {k}: <img>{it['image']}</img>\n"
        else:
            out += it["text"]
    return out


def test_render_qwen_vl_single_turn_literal():
    messages = [{"role": "user", "content": [{"type": "image", "image": "assets/demo.jpeg"}, {"type": "text", "text": "这是什么?"}]}]
    assert render_qwen_vl(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <img>assets/demo.jpeg</img>\n这是什么?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_qwen_vl_multi_turn_matches_make_context():
    q1 = [{"image": "a.jpg"}, {"image": "https://x.org/b.png"}, {"text": "Compare."}]
    q2 = [{"text": "And this? "}, {"image": "c.jpg"}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", **q1[0]}, {"type": "image", **q1[1]}, {"type": "text", **q1[2]}]},
        {"role": "assistant", "content": "Both are cats."},
        {"role": "user", "content": [{"type": "text", **q2[0]}, {"type": "image", **q2[1]}]},
    ]
    expected = _make_context_oracle(
        _from_list_format_oracle(q2), [(_from_list_format_oracle(q1), "Both are cats.")], system="Be brief."
    )
    assert render_qwen_vl(messages) == expected
    # without the generation prompt the text ends after the last turn's <|im_end|>\n
    assert render_qwen_vl(messages, add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]


def test_render_qwen_vl_in_memory_images_get_placeholders():
    pil = Image.new("RGB", (8, 8))
    long_url = "https://x.org/" + "a" * 300
    messages = [
        {"role": "user", "content": [{"type": "image", "image": pil}, {"type": "image", "image": "ok.png"}]},
        {"role": "assistant", "content": "..."},
        {"role": "user", "content": [{"type": "image", "image": long_url}, {"type": "text", "text": "?"}]},
    ]
    text = render_qwen_vl(messages)
    # index = position in vision_items(messages), 1-based; numbering of "Picture k" restarts per turn
    assert "Picture 1: <img>image-1</img>\nPicture 2: <img>ok.png</img>\n" in text
    assert "Picture 1: <img>image-3</img>\n?" in text
    assert vision_items(messages)[2]["source"] == long_url


def test_render_qwen_vl_rejects_video():
    with pytest.raises(ValueError, match="no video"):
        render_qwen_vl([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}])
