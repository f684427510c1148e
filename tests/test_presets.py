"""Published sizes: qvl's meta-device model has exactly the checkpoint's key names and shapes.

The expected names/shapes come from transformers' own model for the same config, built on the meta
device, with its state-dict names mapped back to the Hub layout (what the official repos contain).
"""

from __future__ import annotations

import pytest
import torch

from qvl.checkpoint import hub_state_dict, model_class
from qvl.config import PRESETS, Qwen2VLConfig


def hub_names_from_transformers(cfg: Qwen2VLConfig) -> dict[str, tuple[int, ...]]:
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    hf_cfg = AutoConfig.for_model(**cfg.to_dict())
    cls = Qwen2VLForConditionalGeneration if cfg.generation == "2" else Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        hf = cls(hf_cfg)
    out = {}
    for k, v in hf.state_dict().items():
        # transformers >= 4.52 module names -> Hub checkpoint names (reference §2.1)
        if k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        out[k] = tuple(v.shape)
    if hf_cfg.tie_word_embeddings:  # a tied head is not stored separately
        out.pop("lm_head.weight")
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_checkpoint_layout(name):
    cfg = Qwen2VLConfig.from_name(name)
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    ours = {k: tuple(v.shape) for k, v in hub_state_dict(model).items()}
    theirs = hub_names_from_transformers(cfg)
    assert sorted(set(ours) ^ set(theirs)) == []
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}
    # spot-check shapes the reference spells out (§2.1)
    assert ours["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert ours["visual.merger.mlp.2.weight"] == (cfg.text.hidden_size, 5120)
    assert ours["model.embed_tokens.weight"] == (cfg.text.vocab_size, cfg.text.hidden_size)


def test_preset_table_values():
    """A few numbers from the published configs (reference §1.2) and the verified flags."""
    c = Qwen2VLConfig.from_name("Qwen/Qwen2-VL-2B-Instruct")
    assert (c.text.hidden_size, c.text.num_hidden_layers, c.text.num_key_value_heads, c.text.tie_word_embeddings) == (1536, 28, 2, True)
    assert c.text.head_dim == 128 and c.vision.head_dim == 80 and c.text.max_position_embeddings == 32768
    c = Qwen2VLConfig.from_name("Qwen2.5-VL-3B-Instruct")
    assert (c.vision.mlp_dim, c.vision.fullatt_block_indexes, c.tokens_per_second) == (3420, [7, 15, 23, 31], 2)
    assert c.text.max_position_embeddings == 128000
    unverified = {n for n, p in PRESETS.items() if not p["verified"]}
    assert unverified == {"Qwen2-VL-72B-Instruct", "Qwen2.5-VL-32B-Instruct", "Qwen2.5-VL-72B-Instruct"}
    assert not Qwen2VLConfig.from_name("Qwen2-VL-72B-Instruct").verified


def test_parameter_counts_of_small_presets():
    """Total parameters as listed on the model cards (2.21B, 3.75B, 8.29B)."""
    expect = {"Qwen2-VL-2B-Instruct": 2.21e9, "Qwen2.5-VL-3B-Instruct": 3.75e9, "Qwen2-VL-7B-Instruct": 8.29e9,
              "Qwen2.5-VL-7B-Instruct": 8.29e9}
    for name, n in expect.items():
        cfg = Qwen2VLConfig.from_name(name)
        with torch.device("meta"):
            model = model_class(cfg)(cfg)
        total = sum(p.numel() for p in model.parameters())  # tied weights counted once
        assert abs(total - n) / n < 0.005, (name, total)
