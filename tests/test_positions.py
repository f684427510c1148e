"""qvl.positions against transformers 4.57.6 (the oracle) and hand-worked reference examples."""

import random

import pytest
import torch

from qvl.positions import (
    vision_cu_seqlens,
    vision_position_ids,
    window_index,
)

tf_qwen2 = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
tf_qwen25 = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: E402

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
