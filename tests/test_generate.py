"""Generation: greedy parity with transformers 4.57.6, KV-cache decode vs full forward, sampling
processors vs transformers' warpers, streaming detokenisation.

The tiny checkpoints are built by transformers itself (random init, `save_pretrained`) with a tiny
byte-level BPE tokenizer.json trained here that carries the Qwen2 special tokens by name; qvl then
loads the directory with `qvl.api.load`, so the parity tests also cover the loader.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl import generate as G
from qvl.api import load
from qvl.positions import mrope_position_ids

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
CORPUS = [
    "You are a helpful assistant.", "Describe this image.", "What is in the picture?",
    "system user assistant", "héllo wörld, naïve café", "你好，世界。图片里有什么？", "🙂 🐈 emoji ✓",
    "The quick brown fox jumps over the lazy dog 0123456789",
]
VOCAB = 384  # model vocabulary: larger than the tokenizer, like the real checkpoints (padding rows)
N_NEW = 32


def build_tokenizer():
    """A ~330-entry byte-level BPE with NFC normaliser and the Qwen2 special tokens as added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def hf_tiny(gen: str, tok, seed: int = 0):
    """A random tiny transformers Qwen2-VL / Qwen2.5-VL with the tokenizer's special ids."""
    import transformers as tf

    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=1024,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=(gen == "2"),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    if gen == "2":
        vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
        config, cls = tf.Qwen2VLConfig(vision_config=vision, **common), tf.Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                      tokens_per_second=2, in_channels=3)
        config, cls = tf.Qwen2_5_VLConfig(vision_config=vision, **common), tf.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).eval()
    # transformers' init (std 0.02) makes a tiny model repeat one token forever, which would make
    # "32 identical tokens" a weak check. Wider weights give varied, well-separated greedy choices.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module", params=["2", "2.5"])
def pair(request, tokenizer, tmp_path_factory):
    """(generation, transformers model, qvl VLM loaded from the directory transformers saved)."""
    gen = request.param
    hf = hf_tiny(gen, tokenizer)
    d = tmp_path_factory.mktemp(f"tiny{gen}")
    hf.save_pretrained(d)
    tokenizer.save(str(d / "tokenizer.json"))
    return gen, hf, load(d, device="cpu", dtype=torch.float32)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def _image_prompt(tok, grid, question: str) -> list[int]:
    n = grid[0] * grid[1] * grid[2] // 4
    pad = "<|image_pad|>" * n
    return _ids(tok, f"<|im_start|>user\n<|vision_start|>{pad}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")


def _left_pad(rows, pad_id):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


def _case(name, tok):
    """input_ids, attention_mask, vision inputs for one parity case."""
    g = torch.Generator().manual_seed(1)
    if name == "text":
        rows = [_ids(tok, "<|im_start|>user\nWhat is in the picture? 你好<|im_end|>\n<|im_start|>assistant\n")]
        vision = {}
    elif name == "image":
        grid = (1, 4, 6)  # a 56x84 image: 24 patches, 6 merged tokens
        rows = [_image_prompt(tok, grid, "Describe this image.")]
        vision = {"pixel_values": torch.randn(24, 1176, generator=g), "image_grid_thw": torch.tensor([grid])}
    else:  # two prompts of different length, left-padded; the image is in the second one
        grid = (1, 6, 4)
        rows = [_ids(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
                _image_prompt(tok, grid, "What is in the picture? The quick brown fox")]
        vision = {"pixel_values": torch.randn(24, 1176, generator=g), "image_grid_thw": torch.tensor([grid])}
    ids, mask = _left_pad(rows, tok.token_to_id("<|endoftext|>"))
    return ids, mask, vision


@pytest.mark.parametrize("case", ["text", "image", "batch"])
def test_greedy_matches_transformers(pair, tokenizer, case):
    gen, hf, vlm = pair
    ids, mask, vision = _case(case, tokenizer)
    pad = tokenizer.token_to_id("<|endoftext|>")
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, **vision, max_new_tokens=N_NEW, eos_token_id=None,
                          do_sample=False, pad_token_id=pad)[:, ids.shape[1]:]
    batch = G.Batch(ids, mask, dict(vision))
    ours = G.generate(vlm.model, batch, N_NEW, pad_id=pad)
    assert ours.shape == (ids.shape[0], N_NEW)
    assert ours.tolist() == ref.tolist()
    if case == "batch":  # the padded row generates what it generates alone
        alone = G.generate(vlm.model, G.Batch(ids[:1, mask[0].argmax():], mask[:1, mask[0].argmax():]), N_NEW)
        assert alone[0].tolist() == ours[0].tolist()


def test_stop_ids_end_rows_and_pad_after(pair, tokenizer):
    gen, hf, vlm = pair
    ids, mask, vision = _case("batch", tokenizer)
    kw = dict(repetition_penalty=1.5)
    free = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), 12, **kw)
    row1 = free[1].tolist()
    # stop on a token row 1 produces after a few others (row 0 stops wherever that id shows up)
    k = next(k for k in range(1, len(row1)) if row1[k] not in row1[:k])
    stop = row1[k]
    out = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), 12, stop_ids=[stop], pad_id=-1, **kw)
    for b in range(2):
        row, ref = out[b].tolist(), free[b].tolist()
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row[:cut] == ref[:cut] and all(t == -1 for t in row[cut:])
    assert G.trim(out, [stop])[1] == row1[:k]
    assert G.trim(out, [stop], keep_stop=True)[1] == row1[: k + 1]


def _full_positions(model, ids, mask, vision):
    """Positions of a prompt + continuation computed in one go (the continuation is plain text)."""
    cfg = model.config
    return mrope_position_ids(ids, vision.get("image_grid_thw"), None, mask, tokens_per_second=cfg.tokens_per_second,
                              image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)[0]


def test_kv_cache_decode_equals_full_forward(pair, tokenizer):
    gen, hf, vlm = pair
    model = vlm.model
    ids, mask, vision = _case("batch", tokenizer)
    B, T = ids.shape
    n = 6
    cont = torch.randint(0, 300, (B, n), generator=torch.Generator().manual_seed(3))  # teacher-forced tokens
    with torch.no_grad():
        cache = model.make_cache(B, T + n)
        pad_mask = torch.cat([mask.bool(), torch.ones(B, n, dtype=torch.bool)], dim=1)
        batch = G.Batch(ids, mask, dict(vision))
        step_logits = [G.prefill(model, batch, cache, pad_mask)]
        for i in range(n - 1):
            pos = G._decode_positions(model, T + i, batch.rope_deltas)
            step_logits.append(G.decode_one(model, cont[:, i:i + 1], pos, cache, T + i, pad_mask))
        full_ids = torch.cat([ids, cont], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(cont)], dim=1)
        pos = _full_positions(model, full_ids, full_mask, vision)
        embeds = model.embed(full_ids, **vision)
        full = model(embeds, pos, None, 0, full_mask.bool())  # no cache
    for i, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, full[:, T - 1 + i], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ sampling processors vs transformers


def _hf_warpers():
    from transformers.generation import logits_process as lp

    return lp


@pytest.mark.parametrize("seed", range(4))
def test_processors_match_transformers(seed):
    lp = _hf_warpers()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 97, generator=g) * 3
    logits[0, :10] = 1.0  # ties at the boundary
    input_ids = torch.randint(0, 97, (5, 12), generator=g)
    seen = torch.zeros(5, 97, dtype=torch.bool).scatter_(1, input_ids, True)

    for k in (1, 3, 10, 96, 200):
        ref = lp.TopKLogitsWarper(k)(input_ids, logits.clone())
        assert torch.equal(G.apply_top_k(logits, k), ref), k
    for p in (0.05, 0.3, 0.8, 0.95, 0.999):
        ref = lp.TopPLogitsWarper(p)(input_ids, logits.clone())
        assert torch.equal(G.apply_top_p(logits, p), ref), p
    for t in (0.3, 0.7, 1.5):
        ref = lp.TemperatureLogitsWarper(t)(input_ids, logits.clone())
        torch.testing.assert_close(G.process_logits(logits, temperature=t), ref, rtol=0, atol=0)
    for pen in (1.05, 1.3, 0.8):
        ref = lp.RepetitionPenaltyLogitsProcessor(pen)(input_ids, logits.clone())
        assert torch.equal(G.apply_repetition_penalty(logits, seen, pen), ref), pen

    # The whole chain in transformers' order: repetition penalty, temperature, top-k, top-p.
    chain = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.7),
                                    lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.9)])
    ours = G.process_logits(logits, seen, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2)
    assert torch.equal(ours, chain(input_ids, logits.clone()))


def test_sampling_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    draws = G.sample(logits, temperature=1.0, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    # 40k draws: the standard error is at most 0.0025, so 0.01 is 4 sigma
    assert torch.allclose(freq, probs, atol=0.01), freq
    again = G.sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)  # seeded -> reproducible
    assert torch.equal(G.sample(logits[:3]), torch.zeros(3, dtype=torch.long))  # greedy


def test_sampled_generation_is_seeded_and_top_k_1_is_greedy(pair, tokenizer):
    gen, hf, vlm = pair
    ids, mask, vision = _case("image", tokenizer)
    kw = dict(temperature=0.9, top_p=0.9, repetition_penalty=1.1)
    a = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), 8, seed=5, **kw)
    b = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), 8, seed=5, **kw)
    assert torch.equal(a, b)
    greedy = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), 8)
    top1 = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), 8, temperature=0.7, top_k=1, seed=1)
    assert torch.equal(greedy, top1)


# ------------------------------------------------------------------ streaming


def _wrap(tok):
    from qvl.tokenizer import Tokenizer

    return Tokenizer(tok)


def test_stream_pieces_are_whole_characters(tokenizer):
    tk = _wrap(tokenizer)
    text = "你好，世界 🙂🐈 naïve café ✓ <|im_start|>ok"
    ids = tk.encode(text)
    # some token must end inside a multi-byte character, or the test proves nothing
    assert any(_splits_char(tk.token_bytes(i)) for i in ids)
    stream = G.TextStream(tk)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tk.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def _splits_char(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_stream_concat_equals_decode_property(text):
    tk = _wrap(_TOK)
    ids = tk.encode(text)
    stream = G.TextStream(tk)
    out = "".join(stream.push(i) for i in ids) + stream.flush()
    assert out == tk.decode(ids)


_TOK = build_tokenizer()


def test_stream_of_broken_bytes_matches_decode(tokenizer):
    # A generation can stop in the middle of a character: the tail comes out as U+FFFD, like decode.
    tk = _wrap(tokenizer)
    ids = tk.encode("🐈")
    assert len(ids) > 1
    stream = G.TextStream(tk)
    out = "".join(stream.push(i) for i in ids[:-1]) + stream.flush()
    assert out == tk.decode(ids[:-1])


def test_stream_equals_generate_then_decode(pair, tokenizer):
    gen, hf, vlm = pair
    ids, mask, vision = _case("image", tokenizer)
    tokens = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), 24)[0].tolist()
    stop = tokens[10]
    pieces = list(G.stream(vlm.model, G.Batch(ids, mask, dict(vision)), vlm.tokenizer, 24, stop_ids=[stop]))
    assert "".join(pieces) == vlm.tokenizer.decode(tokens[: tokens.index(stop)])
    with pytest.raises(ValueError):
        next(G.stream(vlm.model, G.Batch(*_case("batch", tokenizer)[:2]), vlm.tokenizer, 4))


def test_token_bytes_cover_the_vocabulary(tokenizer):
    tk = _wrap(tokenizer)
    for i in range(len(tk)):
        b = tk.token_bytes(i)
        if not _splits_char(b):
            assert b.decode("utf-8") == tk.decode([i])
    assert tk.im_end_id == tokenizer.token_to_id("<|im_end|>")
    assert tk.eos_ids == [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    assert math.isclose(len(tk), tokenizer.get_vocab_size())


def test_capture_is_forwarded_to_prefill_and_every_decode_step(pair, tokenizer):
    from qvl.models.qwen2_vl import Capture

    gen, hf, vlm = pair
    ids, mask, vision = _case("image", tokenizer)
    cap = Capture(layers=[1], vision_block=0)
    n = 5
    out = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), n, capture=cap)
    assert torch.equal(out, G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), n))  # capture changes nothing
    T = ids.shape[1]
    shapes = [tuple(a.shape) for a in cap.attn[1]]
    # prefill: all T query rows over T keys; then one row per decode step over the growing cache
    assert shapes == [(1, 4, T, T)] + [(1, 4, 1, T + i + 1) for i in range(n - 1)]
    assert len(cap.vision) == 1 and cap.vision[0]["block"] == 0  # the ViT ran once, at prefill
    for a in cap.attn[1]:
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


# ------------------------------------------------------------------ static decode steps (CUDA-graph ready)


def _static_decode(model, batch, cont, extra_slots=5):
    """Prefill, then teacher-force `cont` through static steps (slot tensor, whole-cache attention) on a
    cache longer than needed whose unwritten slots hold garbage. -> logits [B, n, V], the cache"""
    B, T = batch.input_ids.shape
    n = cont.shape[1]
    cache = model.make_cache(B, T + n + extra_slots)
    for t in cache.k + cache.v:  # stale keys/values must be masked, not merely zero
        t.normal_(0, 10, generator=torch.Generator().manual_seed(5))
    pad_mask = torch.cat([batch.attention_mask.bool(), torch.ones(B, n + extra_slots, dtype=torch.bool)], dim=1)
    steps = [G.prefill(model, batch, cache, pad_mask)]
    slot = torch.tensor([T])
    for i in range(n - 1):
        pos = G._decode_positions(model, slot, batch.rope_deltas)
        steps.append(G.decode_one(model, cont[:, i:i + 1], pos, cache, slot, pad_mask))
        slot += 1
    return torch.stack(steps, dim=1), cache


def test_static_decode_equals_full_forward(pair, tokenizer):
    gen, hf, vlm = pair
    model = vlm.model
    ids, mask, vision = _case("batch", tokenizer)  # left-padded, an image in the second row
    T, n = ids.shape[1], 6
    cont = torch.randint(0, 300, (ids.shape[0], n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        steps, _ = _static_decode(model, G.Batch(ids, mask, dict(vision)), cont)
        full_ids, full_mask = torch.cat([ids, cont], dim=1), torch.cat([mask, torch.ones_like(cont)], dim=1)
        full = model(model.embed(full_ids, **vision), _full_positions(model, full_ids, full_mask, vision), None, 0,
                     full_mask.bool())
    # fp32 logits up to ~10, summed in another order (a static step attends over the whole cache): up to 1.8e-5
    # apart on this VM's CPU (2026-12); decode positions one slot off move them by ~8 (measured)
    torch.testing.assert_close(steps, full[:, T - 1:T - 1 + n], atol=5e-5, rtol=1e-4)


def _gen1_model(**text):
    from qvl.models.qwen_vl import QwenVL, QwenVLConfig, TextConfig, VisionConfig

    t = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
             intermediate_size=48)
    vision = VisionConfig(image_size=56, width=24, layers=1, heads=3, mlp_ratio=2.0, output_dim=32,
                          image_start_id=290, n_queries=16, pos_grid=2)
    torch.manual_seed(0)
    model = QwenVL(QwenVLConfig(TextConfig(**t, **text), vision)).eval()
    with torch.no_grad():
        for p in model.transformer.h.parameters():
            p.normal_(0.0, 0.3)  # peaked attention: a wrong mask or rotary base shows in the logits
    return model


def _gen1_batch():
    """Two left-padded gen-1 prompts; the longer one holds an <img> span (16 slots)."""
    a = [5, 6, 7, 8]
    b = [9, 10, 290] + [11] * 16 + [291, 12, 13, 14]
    ids, mask = _left_pad([a, b], 0)
    return G.Batch(ids, mask, {"images": torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))})


def test_static_decode_equals_full_forward_gen1():
    from qvl.positions import text_position_ids

    model = _gen1_model()
    batch = _gen1_batch()
    T, n = batch.input_ids.shape[1], 6
    cont = torch.randint(20, 280, (2, n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        steps, _ = _static_decode(model, batch, cont)
        full_ids = torch.cat([batch.input_ids, cont], dim=1)
        full_mask = torch.cat([batch.attention_mask, torch.ones_like(cont)], dim=1)
        full = model(model.embed(full_ids, batch.vision["images"]), text_position_ids(full_mask), None, 0,
                     full_mask.bool())
    # fp32 logits up to ~10, summed in another order (a static step attends over the whole cache): up to 1.8e-5
    # apart on this VM's CPU (2026-12); decode positions one slot off move them by ~8 (measured)
    torch.testing.assert_close(steps, full[:, T - 1:T - 1 + n], atol=5e-5, rtol=1e-4)


def test_static_decode_keeps_prefill_ntk_and_applies_logn_gen1():
    """seq_length 16, a 23-slot prompt: alpha = 3 is fixed at prefill and log-n scales every decode query.
    The static steps (slot tensor, alpha's frequencies read from the cache) equal the int-slot steps."""
    model = _gen1_model(seq_length=16)
    batch = _gen1_batch()
    T, n = batch.input_ids.shape[1], 6
    cont = torch.randint(20, 280, (2, n), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        static, cache = _static_decode(model, batch, cont, extra_slots=0)
        assert cache.ntk_alpha == 3
        ref_cache = model.make_cache(2, T + n)
        pad_mask = torch.cat([batch.attention_mask.bool(), torch.ones(2, n, dtype=torch.bool)], dim=1)
        ref = [G.prefill(model, G.Batch(batch.input_ids, batch.attention_mask, batch.vision), ref_cache, pad_mask)]
        for i in range(n - 1):
            pos = G._decode_positions(model, T + i, batch.rope_deltas)
            ref.append(G.decode_one(model, cont[:, i:i + 1], pos, ref_cache, T + i, pad_mask))
        plain = _gen1_model(seq_length=16, use_dynamic_ntk=False, use_logn_attn=False)
        other, _ = _static_decode(plain, G.Batch(batch.input_ids, batch.attention_mask, batch.vision), cont)
    torch.testing.assert_close(static, torch.stack(ref, dim=1), atol=1e-5, rtol=1e-5)
    assert (static[:, 1:] - other[:, 1:]).abs().amax() > 1e-3  # the scalings are really in effect


def _eager_compiled_step(monkeypatch):
    """Swap generate's compiled step for a fullgraph trace with the eager backend (fast on CPU), and make
    any recompilation an error: the proof that every decode step presents identical inputs."""
    torch._dynamo.reset()
    monkeypatch.setitem(G._COMPILED, "default", torch.compile(G.decode_one, backend="eager", fullgraph=True))
    return torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True)


def test_compiled_decode_never_recompiles(pair, tokenizer, monkeypatch):
    from torch._dynamo.utils import counters

    gen, hf, vlm = pair
    ids, mask, vision = _case("batch", tokenizer)
    want = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), 8)
    counters.clear()
    with _eager_compiled_step(monkeypatch):
        got = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), 8, compile=True)
        again = G.generate(vlm.model, G.Batch(ids, mask, dict(vision)), 8, compile=True)  # reuses cache and graph
    torch._dynamo.reset()
    assert got.tolist() == want.tolist() and again.tolist() == want.tolist()
    assert counters["stats"]["unique_graphs"] == 1  # 14 steps, one trace, no graph break (fullgraph)


def test_compiled_decode_never_recompiles_gen1(monkeypatch):
    from torch._dynamo.utils import counters

    model = _gen1_model(seq_length=16)  # NTK and log-n active while decoding
    want = G.generate(model, _gen1_batch(), 6)
    counters.clear()
    with _eager_compiled_step(monkeypatch):
        got = G.generate(model, _gen1_batch(), 6, compile=True)
    torch._dynamo.reset()
    assert got.tolist() == want.tolist()
    assert counters["stats"]["unique_graphs"] == 1
