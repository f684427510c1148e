"""Parity of qvl's Qwen2-VL / Qwen2.5-VL with transformers 4.57.6 (the oracle), fp32 on CPU.

Every model under test is a transformers model with random weights, saved by transformers and loaded
through qvl's own `load_model`, so these tests also cover "a checkpoint written by transformers loads".
Positions come from `qvl.positions.mrope_position_ids`; transformers computes its own from input_ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny import IMAGE, VIDEO, VSTART, hf_model, left_pad, pixels, prompt
from qvl import media
from qvl.checkpoint import load_model, save_pretrained
from qvl.models.qwen2_vl import Capture
from qvl.positions import decode_position_ids, mrope_position_ids

GENS = ["2", "2.5"]
TOL = 1e-4


@pytest.fixture(scope="module", params=GENS)
def pair(request, tmp_path_factory):
    """(transformers model, qvl model loaded from transformers' save_pretrained directory)."""
    hf = hf_model(request.param)
    d = tmp_path_factory.mktemp(f"hf{request.param}")
    hf.save_pretrained(d)
    qm = load_model(d)
    assert qm.generation == request.param and isinstance(qm.config.text.vocab_size, int)
    return hf, qm


def mrope(qm, ids, image_grid=None, video_grid=None, mask=None, spg=None):
    cfg = qm.config
    return mrope_position_ids(ids, image_grid, video_grid, mask, second_per_grid_ts=spg,
                              tokens_per_second=cfg.tokens_per_second, image_token_id=IMAGE,
                              video_token_id=VIDEO, vision_start_token_id=VSTART)


def image_inputs(sizes, seed=0):
    """qvl.media on random RGB images of the given (h, w): -> pixel_values, grid LongTensor[N, 3]."""
    rng = np.random.default_rng(seed)
    items = [media.process_image(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
             for h, w in sizes]
    return torch.cat([i.pixel_values for i in items]), torch.tensor([i.grid_thw for i in items])


def odd_video(seed=1):
    """5 frames (odd: the last is repeated to make 3 temporal patches), 112 x 84 px -> grid (3, 8, 6)."""
    frames = np.random.default_rng(seed).integers(0, 256, (5, 112, 84, 3), dtype=np.uint8)
    v = media.process_video(frames, fps=2.0, resized_height=112, resized_width=84)
    assert tuple(v.grid_thw) == (3, 8, 6)
    return v.pixel_values, torch.tensor([v.grid_thw]), float(v.second_per_grid_t)


def compare(hf, qm, ids, mask=None, images=None, video=None):
    """Max |logits diff| at real (unpadded) positions; qvl uses qvl positions + its own embed."""
    kw_hf, kw_q, spg = {}, {}, None
    if images is not None:
        kw_hf.update(pixel_values=images[0], image_grid_thw=images[1])
        kw_q.update(pixel_values=images[0], image_grid_thw=images[1])
    if video is not None:
        kw_hf.update(pixel_values_videos=video[0], video_grid_thw=video[1])
        kw_q.update(pixel_values_videos=video[0], video_grid_thw=video[1])
        spg = [video[2]] * video[1].shape[0]
        if qm.generation == "2.5":
            kw_hf["second_per_grid_ts"] = torch.tensor(spg)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, **kw_hf).logits
        pos, _ = mrope(qm, ids, kw_q.get("image_grid_thw"), kw_q.get("video_grid_thw"), mask, spg)
        out = qm(qm.embed(ids, **kw_q), pos, pad_mask=None if mask is None else mask.bool())
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return (ref - out)[real].abs().max().item()


def test_vision_tower_matches(pair):
    # (1,10,12) -> LLM grid 5x6: partial windows; (1,16,8): window side divisible (full-pad quirk);
    # (3,6,4): a 3-frame video (per-frame attention)
    hf, qm = pair
    grids = torch.tensor([(1, 10, 12), (1, 16, 8), (3, 6, 4), (1, 2, 2)])
    px = pixels(grids.tolist())
    with torch.no_grad():
        ref, out = hf.model.visual(px, grid_thw=grids), qm.visual(px, grids)
    assert out.shape == ref.shape == (sum(t * h * w for t, h, w in grids.tolist()) // 4, 64)
    assert (ref - out).abs().max().item() < TOL


def test_quick_gelu_in_place_sigmoid_keeps_values_and_gradients():
    # QuickGELU runs its sigmoid in place to save a temporary; the value must be the formula's exactly and
    # autograd must still see a correct graph (a training step goes through it)
    from qvl.models.qwen2_vl import QuickGELU

    x = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    expected = x * torch.sigmoid(1.702 * x)
    assert torch.equal(QuickGELU()(x), expected)
    assert torch.autograd.gradcheck(QuickGELU(), (x,))
    with torch.no_grad():  # the fully in-place path
        before = x.detach().clone()
        assert torch.equal(QuickGELU()(x), expected) and torch.equal(x, before)  # the input is left alone


def test_swiglu_in_place_inference_path_equals_the_graph_path():
    # MLP runs silu and the product in place when no graph is recorded; both paths must give the same
    # values, and the graph path must still train (gradients of the plain formula)
    from qvl.models.qwen2_vl import MLP

    torch.manual_seed(0)
    mlp = MLP(8, 24, bias=True).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    with torch.no_grad():
        assert torch.equal(mlp(x), expected)
    assert torch.equal(mlp(x), expected)
    assert torch.autograd.gradcheck(mlp, (x.clone().requires_grad_(),))


def test_text_only(pair):
    hf, qm = pair
    assert compare(hf, qm, torch.tensor([prompt([17])])) < TOL


def test_one_image(pair):
    hf, qm = pair
    images = image_inputs([(140, 168)])  # -> grid (1, 10, 12)
    ids = torch.tensor([prompt([3, ("image", tuple(images[1][0].tolist())), 6])])
    assert compare(hf, qm, ids, images=images) < TOL


def test_three_images_of_different_sizes(pair):
    hf, qm = pair
    images = image_inputs([(140, 168), (56, 56), (224, 84)], seed=2)
    parts = [2]
    for g in images[1].tolist():
        parts += [("image", tuple(g)), 2]
    assert compare(hf, qm, torch.tensor([prompt(parts, seed=1)]), images=images) < TOL


def test_odd_frame_video(pair):
    hf, qm = pair
    video = odd_video()
    ids = torch.tensor([prompt([4, ("video", (3, 8, 6)), 3])])
    assert compare(hf, qm, ids, video=video) < TOL


def test_image_and_video_in_one_prompt(pair):
    hf, qm = pair
    images, video = image_inputs([(84, 112)]), odd_video()
    ids = torch.tensor([prompt([2, ("image", tuple(images[1][0].tolist())), 3, ("video", (3, 8, 6)), 2])])
    assert compare(hf, qm, ids, images=images, video=video) < TOL


def test_left_padded_batch_of_two_prompts(pair):
    hf, qm = pair
    images = image_inputs([(56, 84), (112, 56)], seed=3)
    g0, g1 = (tuple(g) for g in images[1].tolist())
    ids, mask = left_pad([prompt([2, ("image", g0), 9], seed=4), prompt([1, ("image", g1), 2], seed=5)])
    assert mask[1].sum() < mask.shape[1]  # the second row really is padded
    assert compare(hf, qm, ids, mask, images=images) < TOL


def test_kv_cache_decode_equals_full_forward(pair):
    """Prefill a padded prompt into the static cache, then decode token by token with the positions
    generation uses (cache slot + rope delta); every step must equal the full forward's row."""
    _, qm = pair
    images = image_inputs([(56, 84)], seed=6)
    g = tuple(images[1][0].tolist())
    cont = 5
    full_rows = [prompt([3, ("image", g), 4 + cont], seed=7), prompt([2 + cont], seed=8)]
    ids, mask = left_pad(full_rows)
    T = ids.shape[1] - cont
    with torch.no_grad():
        pos, _ = mrope(qm, ids, images[1], None, mask)
        embeds = qm.embed(ids, pixel_values=images[0], image_grid_thw=images[1])
        full = qm(embeds, pos, pad_mask=mask.bool())
        cache = qm.make_cache(2, ids.shape[1] + 3)
        pad = torch.ones(2, ids.shape[1] + 3, dtype=torch.bool)
        pad[:, : ids.shape[1]] = mask.bool()
        p_pos, deltas = mrope(qm, ids[:, :T], images[1], None, mask[:, :T])
        steps = [qm(embeds[:, :T], p_pos, cache, 0, pad)]
        for i in range(T, ids.shape[1]):
            d_pos = decode_position_ids(i, deltas)
            assert torch.equal(d_pos[:, :, 0], pos[:, :, i])  # positions are the generation rule
            steps.append(qm(embeds[:, i : i + 1], d_pos, cache, i, pad))
    out = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (out - full)[real].abs().max().item() < 1e-5


def test_qvl_save_loads_in_transformers(pair, tmp_path):
    """Reverse direction: qvl save_pretrained -> transformers from_pretrained, nothing missing, same logits."""
    from transformers import AutoConfig, GenerationConfig, Qwen2VLImageProcessor

    hf, qm = pair
    save_pretrained(qm, tmp_path, max_shard_bytes=200_000)  # sharded on purpose
    assert (tmp_path / "model.safetensors.index.json").exists()
    cls = type(hf)
    back, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert AutoConfig.from_pretrained(tmp_path).model_type == qm.config.model_type
    gen = GenerationConfig.from_pretrained(tmp_path)
    assert gen.eos_token_id == [151645, 151643] and gen.pad_token_id == 151643
    proc = Qwen2VLImageProcessor.from_pretrained(tmp_path)
    assert (proc.min_pixels, proc.max_pixels, proc.merge_size) == (3136, 12845056, 2)
    images = image_inputs([(84, 112)])
    ids = torch.tensor([prompt([3, ("image", tuple(images[1][0].tolist())), 3])])
    assert compare(back.eval(), qm, ids, images=images) < TOL


def test_capture_matches_eager_attentions_and_hidden_states(pair):
    """Looking inside: recorded attention to the image span equals transformers' eager attentions,
    recorded hidden states equal output_hidden_states, and capturing changes no logits."""
    hf, qm = pair
    images = image_inputs([(56, 84)], seed=9)
    g = tuple(images[1][0].tolist())
    ids = torch.tensor([prompt([3, ("image", g), 5])])
    span = (4, 4 + g[1] * g[2] // 4)
    cap = Capture(layers=[1], heads=[0, 3], key_span=span, query_rows=(span[1], ids.shape[1]), hidden_layers=[0],
                  vision_block=qm.config.vision.depth - 1, vision_segment=0)
    hf.config._attn_implementation = hf.model.language_model.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images[0], image_grid_thw=images[1], output_attentions=True,
                 output_hidden_states=True)
        pos, _ = mrope(qm, ids, images[1])
        plain = qm(qm.embed(ids, images[0], images[1]), pos)
        out = qm(qm.embed(ids, images[0], images[1], capture=cap), pos, capture=cap)
    hf.config._attn_implementation = hf.model.language_model.config._attn_implementation = "sdpa"
    assert torch.equal(plain, out)
    want = ref.attentions[1][:, [0, 3], span[1]:, span[0]:span[1]]
    (got,) = cap.attn[1]
    assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5
    assert (cap.hidden[0][0] - ref.hidden_states[1]).abs().max().item() < TOL
    (v,) = cap.vision
    n = g[1] * g[2]
    assert v["attn"].shape == (qm.config.vision.num_heads, v["rows"].numel(), v["rows"].numel())
    assert torch.allclose(v["attn"].sum(-1), torch.ones(()), atol=1e-5)
    assert v["rows"].max() < n


def test_segments_group_equal_lengths():
    """Batched per-length attention equals one SDPA per segment (the transformers way)."""
    from qvl.models.qwen2_vl import Segments

    cu = torch.tensor([0, 16, 32, 40, 56, 60], dtype=torch.int32)
    q, k, v = torch.randn(3, 60, 2, 8).unbind(0)
    out = Segments(cu, "cpu").attend(q, k, v)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)))
        assert torch.allclose(out[a:b], ref.transpose(0, 1), atol=1e-6)
