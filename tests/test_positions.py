"""qvl.positions against transformers 4.57.6 (the oracle) and hand-worked reference examples."""

import random
import types

import pytest
import torch

from qvl.positions import (
    PAD_POSITION,
    decode_position_ids,
    mrope_position_ids,
    text_position_ids,
    vision_cu_seqlens,
    vision_position_ids,
    window_index,
)

tf_qwen2 = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
tf_qwen25 = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Vision side
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_vit2():
    """Tiny Qwen2-VL ViT (1 block, width 32, 2 heads -> rotary table of 4 row + 4 col freqs)."""
    cfg = Qwen2VLVisionConfig(depth=1, embed_dim=32, num_heads=2, hidden_size=32)
    return tf_qwen2.Qwen2VisionTransformerPretrainedModel(cfg).eval()


@pytest.fixture(scope="module")
def hf_vit25():
    cfg = Qwen2_5_VLVisionConfig(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=32)
    return tf_qwen25.Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()


def _random_grids(rng: random.Random, n: int):
    """n (t, h, w) grids in ViT patches; h, w even (merge size 2), sizes hit the window-edge cases."""
    return [(rng.choice([1, 1, 2, 3]), 2 * rng.randint(1, 13), 2 * rng.randint(1, 13)) for _ in range(n)]


GRID_CASES = [[(1, 10, 12)], [(1, 8, 8)], [(1, 2, 2)], [(2, 4, 6), (1, 16, 2)]] + [
    _random_grids(random.Random(seed), random.Random(seed + 1000).randint(1, 5)) for seed in range(25)
]


@pytest.mark.parametrize("grids", GRID_CASES, ids=str)
def test_vision_position_ids_match_hf_rotary(hf_vit2, grids):
    # HF's rot_pos_emb returns angles [L, 8] = [row * inv_freq(4) | col * inv_freq(4)]; inv_freq[0]
    # is exactly 1.0, so columns 0 and 4 are the row and col ids themselves.
    angles = hf_vit2.rot_pos_emb(torch.tensor(grids))
    ids = vision_position_ids(torch.tensor(grids))
    assert ids.dtype == torch.long and ids.shape == (angles.shape[0], 2)
    assert torch.equal(ids, angles[:, [0, 4]].long())
    # and the whole table, built from our ids with HF's own rotary module
    table = hf_vit2.rotary_pos_emb(int(torch.tensor(grids)[:, 1:].max()))
    torch.testing.assert_close(table[ids].flatten(1), angles, rtol=0, atol=0)
    # list input gives the same
    assert torch.equal(vision_position_ids(grids), ids)


def test_vision_position_ids_merge_block_order():
    # Hand-worked (§3.2): grid (1, 2, 4) = two 2x2 blocks side by side.
    expected = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert vision_position_ids([(1, 2, 4)]).tolist() == [list(p) for p in expected]
    # a 2-frame video repeats the table
    assert vision_position_ids([(2, 2, 4)]).tolist() == [list(p) for p in expected] * 2


@pytest.mark.parametrize("grids", GRID_CASES, ids=str)
def test_vision_cu_seqlens_per_frame(grids):
    # Oracle written from §3.3 with plain loops: one segment of h*w per temporal patch.
    expected = [0]
    for t, h, w in grids:
        for _ in range(t):
            expected.append(expected[-1] + h * w)
    cu = vision_cu_seqlens(torch.tensor(grids))
    assert cu.dtype == torch.int32
    assert cu.tolist() == expected


def test_window_index_worked_example():
    # Reference §3.6: grid (1,10,12) -> LLM grid 5x6 -> windows of 16, 8, 4, 2 merged tokens.
    idx, cu = window_index(torch.tensor([[1, 10, 12]]))
    assert idx.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21,
                            4, 5, 10, 11, 16, 17, 22, 23, 24, 25, 26, 27, 28, 29]  # fmt: skip
    assert cu.tolist() == [0, 64, 96, 112, 120]
    assert cu.dtype == torch.int32 and idx.dtype == torch.long


@pytest.mark.parametrize("grids", GRID_CASES, ids=str)
def test_window_index_matches_hf(hf_vit25, grids):
    ref_idx, ref_cu = hf_vit25.get_window_index(torch.tensor(grids))
    # HF's forward turns the list into int32 and removes zero-length windows (§3.6 step 6)
    ref_cu = torch.unique_consecutive(torch.tensor(ref_cu, dtype=torch.int32))
    idx, cu = window_index(grids)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(cu, ref_cu)
    # it is a permutation, and argsort restores raster order
    n = sum(t * h * w // 4 for t, h, w in grids)
    assert torch.equal(idx[torch.argsort(idx)], torch.arange(n))


def test_window_index_other_window_size(hf_vit25):
    hf_vit25.window_size = 224  # 8x8 merged tokens per window
    try:
        grids = [(1, 20, 34), (2, 16, 16)]
        ref_idx, ref_cu = hf_vit25.get_window_index(torch.tensor(grids))
    finally:
        hf_vit25.window_size = 112
    idx, cu = window_index(grids, window_size=224)
    assert torch.equal(idx, ref_idx)
    assert cu.tolist() == torch.unique_consecutive(torch.tensor(ref_cu)).tolist()


# ---------------------------------------------------------------------------------------------
# M-RoPE: randomised parity with transformers 4.57.6 get_rope_index
# ---------------------------------------------------------------------------------------------

IMG, VID, VS, VE, PAD = 151655, 151656, 151652, 151653, 151643


def hf_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask, spg=None, tps=None):
    """Call 4.57.6's get_rope_index unbound on a stand-in `self` that carries only a real config
    (the method reads nothing else), avoiding building a model."""
    img = torch.tensor(image_grid_thw) if image_grid_thw else None
    vid = torch.tensor(video_grid_thw) if video_grid_thw else None
    if tps is None:
        this = types.SimpleNamespace(config=Qwen2VLConfig())
        return tf_qwen2.Qwen2VLModel.get_rope_index(this, input_ids, img, vid, attention_mask)
    this = types.SimpleNamespace(config=Qwen2_5_VLConfig(vision_config={"tokens_per_second": tps}))
    spg = torch.tensor(spg, dtype=torch.float32) if spg is not None else None
    return tf_qwen25.Qwen2_5_VLModel.get_rope_index(this, input_ids, img, vid, spg, attention_mask)


def random_prompt_batch(rng: random.Random, *, max_images=8, max_videos=2, batch=None):
    """A left-padded batch of prompts mixing text, images and videos (grids in ViT patches).

    Text is random ids below 151643, sometimes with stray vision markers as plain text; every
    visual item is `<|vision_start|> pad x t*h*w/4 <|vision_end|>` as the processor writes it.
    """
    batch = batch or rng.choice([1, 1, 2, 3, 4])
    rows, images, videos = [], [], []
    for _ in range(batch):
        row = [rng.randrange(0, 151643) for _ in range(rng.randint(2, 6))]  # >= 2 real tokens
        n_img, n_vid = rng.randint(0, max_images), rng.randint(0, max_videos)
        kinds = ["i"] * n_img + ["v"] * n_vid
        rng.shuffle(kinds)
        for kind in kinds:
            if kind == "i":
                g = (1, 2 * rng.randint(1, 8), 2 * rng.randint(1, 8))
                images.append(g)
            else:  # a few temporal patches, some long enough that time dominates the extent
                g = (rng.randint(1, 6), 2 * rng.randint(1, 4), 2 * rng.randint(1, 4))
                videos.append(g)
            row += [VS] + [IMG if kind == "i" else VID] * (g[0] * g[1] * g[2] // 4) + [VE]
            row += [rng.randrange(0, 151643) for _ in range(rng.randint(0, 5))]  # interleaved text
        rows.append(row)
    T = max(map(len, rows))
    ids = torch.full((batch, T), PAD)
    mask = torch.zeros(batch, T, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, T - len(row) :] = torch.tensor(row)
        mask[b, T - len(row) :] = 1
    if batch == 1 and rng.random() < 0.5:
        mask = None  # also exercise the no-mask path
    return ids, images, videos, mask


@pytest.mark.parametrize("seed", range(120))
def test_mrope_qwen2_matches_hf(seed):
    rng = random.Random(seed)
    if seed < 10:  # text only
        ids, images, videos, mask = random_prompt_batch(rng, max_images=0, max_videos=0)
    else:
        ids, images, videos, mask = random_prompt_batch(rng)
    ref_pos, ref_delta = hf_rope_index(ids, images, videos, mask)
    pos, delta = mrope_position_ids(ids, images or None, videos or None, mask)
    assert pos.dtype == torch.long and delta.dtype == torch.long
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta.reshape(-1, 1))


@pytest.mark.parametrize("seed", range(120))
def test_mrope_qwen25_matches_hf(seed):
    rng = random.Random(10_000 + seed)
    ids, images, videos, mask = random_prompt_batch(rng, max_videos=3)
    tps = rng.choice([2, 2, 4, 25])
    # 4.57 truncates second_per_grid_t to an integer first (lmms-eval#1393); integer-valued
    # intervals are where it agrees with the float rule, so parity uses only those.
    spg = None if rng.random() < 0.2 else [float(rng.choice([1, 2, 3])) for _ in videos]
    ref_pos, ref_delta = hf_rope_index(ids, images, videos, mask, spg=spg, tps=tps)
    pos, delta = mrope_position_ids(
        ids, torch.tensor(images) if images else None, torch.tensor(videos) if videos else None, mask,
        second_per_grid_ts=spg, tokens_per_second=tps,
    )  # fmt: skip
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta.reshape(-1, 1))


def test_mrope_image_worked_example():
    # Reference §4.3: `a b c <vs> IMG x6 <ve> d e`, grid (1,4,6) -> LLM grid 2x3.
    ids = torch.tensor([[1, 2, 3, VS] + [IMG] * 6 + [VE, 4, 5]])
    pos, delta = mrope_position_ids(ids, [(1, 4, 6)])
    assert pos[:, 0].tolist() == [
        [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9],
        [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9],
        [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9],
    ]
    assert delta.tolist() == [[-3]]


def _video_prompt():
    return torch.tensor([[1, VS] + [VID] * 12 + [VE, 2]])  # `a <vs> VID x12 <ve> b`, grid (3,4,4)


@pytest.mark.parametrize(
    "spg, t_ids, after",
    [
        # interval 2 (reference §4.3 example; release rule of §8: text continues at 6 + 1 = 7)
        (1.0, [2, 4, 6], [7, 8]),
        # the disputed fractional intervals, worked by hand from floor(ti * 2 * spg):
        (0.5, [2, 3, 4], [5, 6]),  # interval 1.0 (4.57 gives 2, 2, 2: int(0.5) = 0)
        (1.5, [2, 5, 8], [9, 10]),  # interval 3.0 (4.57 gives 2, 4, 6: int(1.5) = 1)
        (0.75, [2, 3, 5], [6, 7]),  # interval 1.5 -> floor 0, 1.5, 3.0
        (0.25, [2, 2, 3], [4, 5]),  # interval 0.5 -> 0, 0.5, 1.0; extent max(1, lh-1=1) -> next at 4
    ],
)
def test_mrope_qwen25_video_float_interval(spg, t_ids, after):
    pos, delta = mrope_position_ids(_video_prompt(), None, [(3, 4, 4)], tokens_per_second=2, second_per_grid_ts=[spg])
    assert pos[0, 0, 2:14].tolist() == [t for t in t_ids for _ in range(4)]
    assert pos[1, 0, 2:14].tolist() == [2, 2, 3, 3] * 3
    assert pos[2, 0, 2:14].tolist() == [2, 3, 2, 3] * 3
    assert pos[:, 0, :2].tolist() == [[0, 1]] * 3
    assert pos[:, 0, 14:].tolist() == [after] * 3
    assert delta.tolist() == [[after[-1] + 1 - 16]]


def test_mrope_qwen2_video_ignores_fps():
    # Qwen2-VL: the time id advances by one per temporal patch whatever the fps (§4.3).
    pos, _ = mrope_position_ids(_video_prompt(), None, [(3, 4, 4)], second_per_grid_ts=[0.5])
    assert pos[0, 0, 2:14].tolist() == [2] * 4 + [3] * 4 + [4] * 4
    assert pos[0, 0, 14:].tolist() == [5, 6]


def test_mrope_left_padding_row_equals_unpadded():
    ids = torch.tensor([[1, 2, VS] + [IMG] * 4 + [VE, 3]])
    padded = torch.cat([torch.full((1, 3), PAD), ids], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * ids.shape[1]])
    pos, delta = mrope_position_ids(ids, [(1, 4, 4)])
    ppos, pdelta = mrope_position_ids(padded, [(1, 4, 4)], attention_mask=mask)
    assert torch.equal(ppos[:, :, 3:], pos)
    assert (ppos[:, :, :3] == PAD_POSITION).all()
    assert pdelta.item() == delta.item() - 3  # deltas are relative to the padded length


def test_mrope_errors_are_clear():
    ids = torch.tensor([[1, VS] + [IMG] * 3 + [VE]])
    with pytest.raises(ValueError, match="3 image placeholder tokens but the image grids need 4"):
        mrope_position_ids(ids, [(1, 4, 4)])
    with pytest.raises(ValueError, match="3 image placeholder tokens but the image grids need 0"):
        mrope_position_ids(ids, None)
    with pytest.raises(ValueError, match="0 video placeholder tokens but the video grids need 1"):
        mrope_position_ids(ids, [(1, 2, 6)], [(1, 2, 2)])
    with pytest.raises(ValueError, match="ends inside image"):  # an image cut in two by a video
        mrope_position_ids(torch.tensor([[IMG, VID, IMG]]), [(1, 2, 4)], [(1, 2, 2)])
    with pytest.raises(ValueError, match="not one contiguous run"):  # items of 2 + 1 vs runs 1 + 2
        split = torch.tensor([[IMG, VE, VS, IMG, IMG]])
        mrope_position_ids(split, [(1, 2, 4), (1, 2, 2)])
    with pytest.raises(ValueError, match="not one contiguous run"):
        two_rows = torch.tensor([[1, IMG, IMG], [IMG, IMG, 2]])
        mrope_position_ids(two_rows, [(1, 4, 4)])


# ---------------------------------------------------------------------------------------------
# Decode positions and gen-1 positions
# ---------------------------------------------------------------------------------------------


def test_decode_position_ids_shape_and_values():
    deltas = torch.tensor([[-3], [5]])
    out = decode_position_ids(13, deltas, n=3)
    assert out.shape == (3, 2, 3)
    assert out[0].tolist() == [[10, 11, 12], [18, 19, 20]]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert decode_position_ids(torch.tensor([13, 14]), deltas)[0].tolist() == [[10], [19]]


def test_text_position_ids_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert text_position_ids(mask).tolist() == [
        [PAD_POSITION, PAD_POSITION, 0, 1, 2],
        [0, 1, 2, 3, 4],
    ]
    # A gen-1 image span (<img> + 256 slots + </img>) is just 258 more consecutive ids.
    mask = torch.ones(1, 2 + 258 + 1, dtype=torch.long)
    assert text_position_ids(mask)[0].tolist() == list(range(261))


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis): prefill and decode agree; text continues at max + 1
# ---------------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_segment = st.one_of(
    st.tuples(st.just("text"), st.integers(1, 4)),
    st.tuples(st.just("image"), st.integers(1, 5), st.integers(1, 5)),  # LLM grid (lh, lw)
    st.tuples(st.just("video"), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3),
              st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0])),  # (t, lh, lw, second_per_grid_t)
)  # fmt: skip
_rows = st.lists(st.lists(_segment, min_size=1, max_size=6), min_size=1, max_size=3)


def _build(rows, extra_text=0):
    """Token rows from segment lists (+ extra_text text tokens at the end), left-padded."""
    images, videos, spg, token_rows = [], [], [], []
    for segments in rows:
        row = []
        for seg in segments:
            if seg[0] == "text":
                row += [7] * seg[1]
            elif seg[0] == "image":
                images.append((1, 2 * seg[1], 2 * seg[2]))
                row += [VS] + [IMG] * (seg[1] * seg[2]) + [VE]
            else:
                videos.append((seg[1], 2 * seg[2], 2 * seg[3]))
                spg.append(seg[4])
                row += [VS] + [VID] * (seg[1] * seg[2] * seg[3]) + [VE]
        token_rows.append(row + [9] * extra_text)
    T = max(map(len, token_rows))
    ids = torch.full((len(rows), T), PAD)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(token_rows):
        ids[b, T - len(row) :] = torch.tensor(row)
        mask[b, T - len(row) :] = 1
    return ids, mask, images or None, videos or None, spg or None


@settings(max_examples=60, deadline=None)
@given(rows=_rows, tps=st.sampled_from([None, 2, 4]), k=st.integers(1, 4))
def test_property_decode_continues_prefill(rows, tps, k):
    ids, mask, images, videos, spg = _build(rows)
    pos, delta = mrope_position_ids(ids, images, videos, mask, second_per_grid_ts=spg, tokens_per_second=tps)
    T = ids.shape[1]
    # rope_delta = max id + 1 - padded length (§4.4)
    real_max = pos.masked_fill(~mask.bool(), -1).amax(dim=(0, 2))
    assert torch.equal(delta.reshape(-1), real_max + 1 - T)
    # decoding k tokens one slot after another gives what a prefill of the longer prompt gives
    ids2, mask2, *_ = _build(rows, extra_text=k)
    pos2, _ = mrope_position_ids(ids2, images, videos, mask2, second_per_grid_ts=spg, tokens_per_second=tps)
    # (rows were padded to the same length, so the appended tokens sit in the last k slots)
    assert torch.equal(decode_position_ids(T, delta, n=k), pos2[:, :, T:])


@settings(max_examples=60, deadline=None)
@given(rows=_rows, tps=st.sampled_from([None, 2, 4]))
def test_property_units_start_at_previous_max_plus_one(rows, tps):
    ids, mask, images, videos, spg = _build(rows)
    pos, _ = mrope_position_ids(ids, images, videos, mask, second_per_grid_ts=spg, tokens_per_second=tps)
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        toks, p = ids[b, real].tolist(), pos[:, b, real]  # (3, n)
        running_max = -1
        for j, tok in enumerate(toks):
            first_of_run = tok not in (IMG, VID) or j == 0 or toks[j - 1] != tok
            if first_of_run:  # text tokens and the first token of a visual item
                assert p[:, j].tolist() == [running_max + 1] * 3
            running_max = max(running_max, int(p[:, j].max()))
