"""qvl.load / VLM.prepare / chat / stream on tiny checkpoints of all three generations.

The transformers model that wrote the gen 2/2.5 directory is the oracle for `chat`: it must produce
the same reply from the same prepared inputs. The prompt layout is checked against the template
written out by hand (reference qwen2 §5.7), the media against `qvl.media` called directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import qvl.grounding as grounding
from qvl import media
from qvl.api import VLM, load
from qvl.generate import generate, trim
from qvl.positions import mrope_position_ids, text_position_ids
from test_generate import build_tokenizer, hf_tiny  # tiny tokenizer + tiny transformers models

torch.set_num_threads(1)  # the test machine's cores are shared

N_NEW = 16
MAX_PIXELS = 16 * 28 * 28  # keeps the test images at <= 16 merged tokens


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module", params=["2", "2.5"])
def pair(request, tokenizer, tmp_path_factory):
    gen = request.param
    hf = hf_tiny(gen, tokenizer, seed=1)
    d = tmp_path_factory.mktemp(f"api{gen}")
    hf.save_pretrained(d)
    tokenizer.save(str(d / "tokenizer.json"))
    (d / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 4 * 28 * 28, "max_pixels": MAX_PIXELS}))
    return gen, hf, load(d, device="cpu")


def _hf_reply(hf, vlm, batch, stop_ids, max_new_tokens=N_NEW):
    """Greedy continuation by transformers from qvl's prepared inputs, decoded like VLM.chat."""
    vision = {k: v for k, v in batch.vision.items() if k != "second_per_grid_ts"}
    if "second_per_grid_ts" in batch.vision and vlm.generation == "2.5":
        vision["second_per_grid_ts"] = torch.tensor(batch.vision["second_per_grid_ts"])
    with torch.no_grad():
        out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **vision,
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                          pad_token_id=vlm.pad_id)
    rows = trim(out[:, batch.input_ids.shape[1]:], stop_ids)
    return [vlm.tokenizer.decode(r) for r in rows]


def test_load_reads_the_directory(pair, tokenizer):
    gen, hf, vlm = pair
    assert isinstance(vlm, VLM) and vlm.generation == gen and vlm.config.generation == gen
    assert vlm.stop_ids == [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    assert vlm.pad_id == tokenizer.token_to_id("<|endoftext|>")
    assert (vlm.min_pixels, vlm.max_pixels) == (4 * 28 * 28, MAX_PIXELS)
    assert next(vlm.model.parameters()).dtype == torch.float32 and not vlm.model.training


def test_load_rejects_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing")


def test_prepare_one_image(pair, tokenizer):
    gen, hf, vlm = pair
    img = _image(100, 150, 0)
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe this image."}]}]
    batch = vlm.prepare(messages)
    # smart_resize(100, 150) under 16*28*28 px: 84 x 112 -> grid (1, 6, 8) -> 12 tokens
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * 12 + "<|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n")
    assert vlm.tokenizer.decode(batch.input_ids[0]) == expected
    assert batch.input_ids.tolist() == [tokenizer.encode(expected, add_special_tokens=False).ids]
    ref = media.process_image(img, max_pixels=MAX_PIXELS)
    assert torch.equal(batch.vision["pixel_values"], ref.pixel_values)
    assert batch.vision["image_grid_thw"].tolist() == [[1, 6, 8]]
    (item,) = batch.media
    assert (item.kind, item.row, item.grid_thw, item.original_size, item.resized_size) == ("image", 0, (1, 6, 8), (100, 150), (84, 112))
    assert set(batch.input_ids[0, item.start:item.end].tolist()) == {vlm.config.image_token_id} and item.tokens == 12
    assert batch.input_ids[0, item.start - 1] == tokenizer.token_to_id("<|vision_start|>")
    pos, deltas = mrope_position_ids(batch.input_ids, batch.vision["image_grid_thw"], None, batch.attention_mask,
                                     image_token_id=vlm.config.image_token_id, video_token_id=vlm.config.video_token_id)
    assert torch.equal(batch.position_ids, pos) and torch.equal(batch.rope_deltas, deltas)
    # per-item max_pixels beats the checkpoint's preprocessor_config
    small = vlm.prepare([{"role": "user", "content": [{"type": "image", "image": img, "max_pixels": 4 * 28 * 28}]}])
    assert small.vision["image_grid_thw"].tolist() == [[1, 2, 4]]  # 28 x 56: the max bound wins (§9.2)


def test_chat_multi_turn_images_in_two_turns_matches_transformers(pair):
    gen, hf, vlm = pair
    a, b = _image(100, 150, 1), _image(60, 60, 2)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                     {"type": "image", "image": b, "max_pixels": 4 * 28 * 28}]},
    ]
    batch = vlm.prepare(messages)
    assert [m.grid_thw for m in batch.media] == [(1, 6, 8), (1, 4, 4)]
    assert batch.media[0].end <= batch.media[1].start  # token order = order of appearance
    text = vlm.tokenizer.decode(batch.input_ids[0])
    assert "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nAnd this one?<|vision_start|>" in text
    reply = vlm.chat(messages, max_new_tokens=N_NEW)
    assert reply == _hf_reply(hf, vlm, batch, vlm.stop_ids)[0]
    assert "".join(vlm.stream(messages, max_new_tokens=N_NEW)) == reply


def test_chat_batch_left_pads_and_matches_single(pair):
    gen, hf, vlm = pair
    conv1 = [{"role": "user", "content": "hi"}]
    conv2 = [{"role": "user", "content": [{"type": "image", "image": _image(80, 50, 3)},
                                          {"type": "text", "text": "What is in the picture?"}]}]
    batch = vlm.prepare([conv1, conv2])
    assert batch.input_ids.shape[0] == 2 and batch.attention_mask[0, 0] == 0 and batch.attention_mask[0, -1] == 1
    assert (batch.input_ids[0][batch.attention_mask[0] == 0] == vlm.pad_id).all()
    (item,) = batch.media
    assert item.row == 1
    assert set(batch.input_ids[1, item.start:item.end].tolist()) == {vlm.config.image_token_id}
    replies = vlm.chat([conv1, conv2], max_new_tokens=N_NEW)
    assert replies == _hf_reply(hf, vlm, batch, vlm.stop_ids)
    assert replies == [vlm.chat(conv1, max_new_tokens=N_NEW), vlm.chat(conv2, max_new_tokens=N_NEW)]


def test_video_from_frames_matches_transformers(pair):
    gen, hf, vlm = pair
    frames = [np.asarray(_image(56, 84, 10 + i)) for i in range(4)]
    messages = [{"role": "user", "content": [{"type": "video", "video": frames, "fps": 2.0},
                                             {"type": "text", "text": "What happens?"}]}]
    batch = vlm.prepare(messages)
    (item,) = batch.media
    assert item.kind == "video" and item.grid_thw[0] == 2 and batch.vision["second_per_grid_ts"] == [1.0]
    reply = vlm.chat(messages, max_new_tokens=N_NEW)
    assert reply == _hf_reply(hf, vlm, batch, vlm.stop_ids)[0]


def test_grounding_maps_onto_the_prepared_image(pair):
    gen, hf, vlm = pair
    batch = vlm.prepare([{"role": "user", "content": [{"type": "image", "image": _image(100, 150, 0)}]}])
    if gen == "2":
        reply = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(500,1000)<|box_end|>"
        want = (15.0, 20.0, 75.0, 100.0)  # /1000 of the original 150 x 100
    else:
        reply = '```json\n[{"bbox_2d": [0, 21, 56, 84], "label": "cat"}]\n```'
        want = (0.0, 25.0, 75.0, 100.0)  # pixels of the 112 x 84 input, scaled to 150 x 100
    (box,) = grounding.parse(reply, vlm.generation, batch)
    assert box.label == "cat" and box.xyxy == pytest.approx(want)


# ------------------------------------------------------------------ gen 1 (Qwen-VL)


@pytest.fixture(scope="module")
def gen1(tmp_path_factory):
    from qvl.models.qwen_vl import QwenVL, QwenVLConfig, TextConfig, VisionConfig, save_qwen_vl
    from qvl.tokenizer_qwen_vl import QwenVLTokenizer, train_bpe

    corpus = "What is in the picture? A cat sits on the mat. The dog and the cat are friends. hello\n" * 4
    tok = QwenVLTokenizer(train_bpe(corpus, 300), image_span=16)
    text = TextConfig(vocab_size=len(tok) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      kv_channels=8, intermediate_size=48)
    vision = VisionConfig(image_size=56, width=24, layers=2, heads=3, mlp_ratio=2.0, output_dim=32,
                          image_start_id=tok.img_start_id, n_queries=16, pos_grid=2)
    torch.manual_seed(0)
    model = QwenVL(QwenVLConfig(text, vision)).eval()
    with torch.no_grad():  # wider than the 0.02 init so greedy decoding is not one repeated token
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
        # the padded vocabulary rows (ids the tokenizer lacks, as in Qwen-VL's 151 936 vs 151 851) give logit 0,
        # below the best real token's, as a trained head's never win
        model.lm_head.weight[len(tok):] = 0
    d = tmp_path_factory.mktemp("gen1")
    save_qwen_vl(model, d, tokenizer=tok)
    return load(d, device="cpu"), tok


def test_gen1_load_prepare_chat(gen1):
    vlm, tok = gen1
    assert vlm.generation == "1"
    assert set(vlm.stop_ids) == {tok.im_end_id, tok.im_start_id, tok.eod_id}
    img = _image(90, 120, 4)
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is in the picture?"}]}]
    batch = vlm.prepare(messages)
    (item,) = batch.media
    assert (item.original_size, item.resized_size, item.tokens) == ((90, 120), (56, 56), 16)
    assert batch.input_ids[0, item.start - 1] == tok.img_start_id and batch.input_ids[0, item.end] == tok.img_end_id
    assert torch.equal(batch.vision["images"][0], media.process_image_gen1(img, image_size=56))
    assert torch.equal(batch.position_ids, text_position_ids(batch.attention_mask))
    reply = vlm.chat(messages, max_new_tokens=N_NEW)
    tokens = trim(generate(vlm.model, vlm.prepare(messages), N_NEW, stop_ids=vlm.stop_ids, pad_id=vlm.pad_id), vlm.stop_ids)[0]
    assert reply == tok.decode(tokens)
    assert "".join(vlm.stream(messages, max_new_tokens=N_NEW)) == reply


def test_gen1_left_padded_batch_equals_full_forward(gen1):
    # Teacher-forced check of the decode positions (slot + rope_delta) against one full forward whose
    # 1-D positions count real tokens only.
    vlm, tok = gen1
    model = vlm.model
    convs = [[{"role": "user", "content": "hello"}],
             [{"role": "user", "content": [{"type": "image", "image": _image(40, 40, 5)},
                                           {"type": "text", "text": "The dog and the cat are friends."}]}]]
    batch = vlm.prepare(convs)
    out = generate(model, batch, 8)
    full_ids = torch.cat([batch.input_ids, out], dim=1)
    full_mask = torch.cat([batch.attention_mask, torch.ones_like(out)], dim=1)
    with torch.no_grad():
        embeds = model.embed(full_ids, **batch.vision)
        logits = model(embeds, text_position_ids(full_mask), None, 0, full_mask.bool())
    T = batch.input_ids.shape[1]
    assert torch.equal(logits[:, T - 1:-1].argmax(-1), out)
    alone = generate(model, vlm.prepare(convs[0]), 8)
    assert torch.equal(alone[0], out[0])


def test_gen1_tiny_model_accepts_a_path_longer_than_its_slots(gen1, tmp_path):
    # 16 slots hold at most 15 path bytes: a longer path is referenced as image-N and still loads.
    vlm, tok = gen1
    path = tmp_path / "a_rather_long_file_name.png"
    _image(60, 80, 6).save(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "hello"}]}]
    batch = vlm.prepare(messages)
    assert tok.image_paths(batch.input_ids[0].tolist()) == ["image-1"]
    assert batch.media[0].original_size == (60, 80)
    assert isinstance(vlm.chat(messages, max_new_tokens=4), str)


def test_stream_does_not_leak_no_grad_into_the_caller(pair):
    gen, hf, vlm = pair
    n = 0
    for _ in vlm.stream([{"role": "user", "content": "hi"}], max_new_tokens=16):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        n += 1
    assert n > 0
