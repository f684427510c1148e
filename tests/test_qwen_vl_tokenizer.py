"""Qwen-VL (gen 1) tokenizer tests: special ids from the reference table (§3.2), round trips, image-path
slots (§3.3), grounding text (§7.1), and the tiny rank-file builder. Reference:
/work/shared/reference/qwen_vl_gen1_and_qwen_vl_utils.md."""

from __future__ import annotations

import base64
import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl.tokenizer_qwen_vl import QwenVLTokenizer, load_ranks, save_ranks, train_bpe

CORPUS = ("Picture 1: <img>images/cat.png</img>\nDescribe the image. The cat sits on the mat; the dog sleeps.\n"
          "Generate the caption in English with grounding: <ref> Woman</ref><box>(451,379),(731,806)</box> and "
          "<ref> her dog</ref><box>(219,424),(576,896)</box>. 1212 1212 1212 猫和狗在一起。\n") * 3


@pytest.fixture(scope="module")
def tok() -> QwenVLTokenizer:
    return QwenVLTokenizer(train_bpe(CORPUS, 400))


def test_tiny_rank_file_structure(tok, tmp_path):
    ranks = tok.ranks
    assert 300 < len(ranks) <= 400
    # ranks 0..255 are the single bytes in GPT-2 / cl100k order: 0 = "!", 188 = 0x00 (§3.1)
    assert ranks[b"!"] == 0 and ranks[b"\x00"] == 188 and ranks[b"~"] == ord("~") - ord("!")
    assert sorted(len(t) for t, r in ranks.items() if r < 256) == [1] * 256
    # every merge is two earlier tokens, so BPE can reach it
    by_rank = sorted(ranks, key=ranks.get)
    for r, t in enumerate(by_rank[256:], start=256):
        assert any(t[:i] in ranks and t[i:] in ranks and max(ranks[t[:i]], ranks[t[i:]]) < r for i in range(1, len(t)))
    save_ranks(ranks, tmp_path / "qwen.tiktoken")
    first = (tmp_path / "qwen.tiktoken").read_text().splitlines()[0]
    assert first == f"{base64.b64encode(b'!').decode()} 0"           # "<base64> <rank>" per line
    assert load_ranks(tmp_path / "qwen.tiktoken") == ranks


def test_special_ids_follow_the_reference_table_for_the_real_rank_count():
    """151,643 ranks (the released file's count; synthetic tokens here) give exactly the §3.2 ids."""
    ranks = {bytes([b]): i for i, b in enumerate(range(256))}
    ranks.update({b"\xff\xfe" + i.to_bytes(3, "big"): i for i in range(256, 151643)})
    t = QwenVLTokenizer(ranks)
    want = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|extra_0|>": 151646,
            "<|extra_204|>": 151850, "<ref>": 151851, "</ref>": 151852, "<box>": 151853, "</box>": 151854,
            "<quad>": 151855, "</quad>": 151856, "<img>": 151857, "</img>": 151858, "<imgpad>": 151859}
    assert {k: t.special_ids[k] for k in want} == want
    assert len(t) == 151860
    assert (t.eod_id, t.im_start_id, t.im_end_id, t.img_start_id, t.img_end_id, t.img_pad_id) == \
        (151643, 151644, 151645, 151857, 151858, 151859)
    ids = t.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645 and t.decode(ids) == "<|im_start|>user<|im_end|>"


def test_special_ids_are_relative_to_the_rank_count(tok):
    n = len(tok.ranks)
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2)
    assert tok.special_ids["<|extra_0|>"] == n + 3 and tok.special_ids["<ref>"] == n + 208
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (n + 214, n + 215, n + 216)
    assert len(tok) == n + 217


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_text_round_trip(text):
    t = _tok()
    assert t.decode(t.encode(text)) == unicodedata.normalize("NFC", text)


_cached = {}


def _tok():  # hypothesis tests cannot take module fixtures
    if "t" not in _cached:
        _cached["t"] = QwenVLTokenizer(train_bpe(CORPUS, 400))
    return _cached["t"]


def test_nfc_and_single_digits(tok):
    assert tok.decode(tok.encode("e\u0301")) == "\u00e9"               # NFC before encoding (§3.1)
    ids = tok.encode(" 1212 and 2024")
    assert [tok.decode([i]) for i in ids] == [" ", "1", "2", "1", "2", " and", " ", "2", "0", "2", "4"]


def test_special_tokens_round_trip_and_can_be_disabled(tok):
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|><|endoftext|>"
    ids = tok.encode(text)
    assert [i for i in ids if i >= tok.eod_id] == [tok.im_start_id, tok.im_end_id, tok.im_start_id, tok.im_end_id,
                                                  tok.eod_id]
    assert tok.decode(ids) == text
    plain = tok.encode(text, allowed_special=set())                    # surface forms become ordinary text
    assert max(plain) < tok.eod_id and tok.decode(plain) == text
    only_img = tok.encode("<ref>x</ref><|im_end|>", allowed_special={"<ref>", "</ref>"})
    assert tok.ref_start_id in only_img and tok.im_end_id not in only_img


def test_image_path_becomes_256_byte_slots(tok):
    path = "images/猫 cat.png"
    raw = path.encode("utf-8")
    ids = tok.encode(f"Picture 1: <img>{path}</img>\nWhat is it?")
    a = ids.index(tok.img_start_id)
    span = ids[a:a + 258]
    # §3.3: <img> + byte values as ids + <imgpad> padding to 256 + </img>
    assert span == [tok.img_start_id] + list(raw) + [tok.img_pad_id] * (256 - len(raw)) + [tok.img_end_id]
    assert tok.decode(ids) == f"Picture 1: <img>{path}</img>\nWhat is it?"
    assert tok.decode(ids, skip_special_tokens=True) == f"Picture 1: {path}\nWhat is it?"
    assert tok.image_paths(ids) == [path]
    two = tok.encode("<img>a.png</img><img>b/c.jpg</img>")
    assert len(two) == 2 * 258 and tok.image_paths(two) == ["a.png", "b/c.jpg"]


def test_image_path_limits(tok):
    full = "x" * 256
    ids = tok.encode(f"<img>{full}</img>")
    assert len(ids) == 258 and tok.img_pad_id not in ids and tok.decode(ids) == f"<img>{full}</img>"
    with pytest.raises(ValueError, match="257 UTF-8 bytes"):
        tok.encode("<img>" + "x" * 257 + "</img>")
    with pytest.raises(ValueError, match="without a closing"):
        tok.encode("<img>a.png")


def test_image_span_follows_the_checkpoint_n_queries(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"visual": {"n_queries": 16}}))
    small = QwenVLTokenizer.from_dir(tmp_path)
    ids = small.encode("<img>a.png</img>")
    assert len(ids) == 18 and ids[1:6] == list(b"a.png") and small.decode(ids) == "<img>a.png</img>"
    (tmp_path / "config.json").unlink()
    assert QwenVLTokenizer.from_dir(tmp_path).image_span == 256


def test_grounding_text_round_trips(tok):
    text = "<ref>击掌</ref><box>(536,509),(588,602)</box> and<ref> her dog</ref><box>(219,424),(576,896)</box>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    tags = [tok.ref_start_id, tok.ref_end_id, tok.box_start_id, tok.box_end_id]
    assert [i for i in ids if i >= tok.eod_id] == tags * 2
    assert tok.decode(ids, skip_special_tokens=True) == "击掌(536,509),(588,602) and her dog(219,424),(576,896)"


def test_chat_prompt_with_picture_round_trips(tok):
    try:
        from qvl.chat import render_qwen_vl
        text = render_qwen_vl([{"role": "user", "content": [{"type": "image", "image": "demo.jpeg"},
                                                            {"type": "text", "text": "What is this?"}]}])
    except (ImportError, AttributeError):  # chat.py not there yet: the same format by hand (§3.4, §6.1)
        text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "Picture 1: <img>demo.jpeg</img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert "Picture 1:" in text and ids.count(tok.img_pad_id) == 256 - len("demo.jpeg")
    assert tok.decode(ids) == text


def test_decode_rejects_ids_outside_the_vocabulary_unless_skipping(tok):
    ids = tok.encode("hi") + [len(tok) + 3]                            # a padded embedding row (§3.2)
    with pytest.raises(ValueError, match="outside"):
        tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
