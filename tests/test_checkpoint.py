"""Checkpoint reading/writing: loud failures, both key layouts, shards, tied heads, config layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _tiny import hf_config, hf_model
from qvl.checkpoint import (CheckpointError, assign_weights, hub_state_dict, load_model, on_meta,
                            open_safetensors_dir, read_config, save_pretrained, write_safetensors)
from qvl.config import Qwen2VLConfig


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Qwen2.5-VL (untied) checkpoint written by transformers."""
    d = tmp_path_factory.mktemp("hf25")
    hf_model("2.5").save_pretrained(d)
    return d


def _copy_with(src, dst, edit):
    """Copy a single-file checkpoint dir, rewriting its tensors with edit(dict) -> dict."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file(edit(dict(tensors)), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_missing_key_is_named(hf_dir, tmp_path):
    d = _copy_with(hf_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.norm\.weight"):
        load_model(d)


def test_unexpected_key_is_named(hf_dir, tmp_path):
    d = _copy_with(hf_dir, tmp_path / "u", lambda t: {**t, "visual.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): visual\.extra\.weight"):
        load_model(d)


def test_shape_mismatch_is_named(hf_dir, tmp_path):
    key = "model.layers.0.mlp.up_proj.weight"
    d = _copy_with(hf_dir, tmp_path / "s", lambda t: {**t, key: torch.zeros(3, 64)})
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): model\.layers\.0\.mlp\.up_proj\.weight: "
                                              r"checkpoint \[3, 64\] vs model \[96, 64\]"):
        load_model(d)


def test_all_problems_reported_together(hf_dir, tmp_path):
    def edit(t):
        t.pop("model.norm.weight")
        return {**t, "bogus": torch.zeros(1), "lm_head.weight": torch.zeros(5, 64)}

    with pytest.raises(CheckpointError) as e:
        load_model(_copy_with(hf_dir, tmp_path / "all", edit))
    msg = str(e.value)
    assert "missing" in msg and "unexpected" in msg and "shape mismatches" in msg


def test_bin_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(Qwen2VLConfig().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match="never loads pickles"):
        load_model(tmp_path)


def test_transformers_nested_key_layout_loads_identically(hf_dir, tmp_path):
    """Keys as re-saved by transformers >= 4.52 (`model.visual.*`, `model.language_model.*`)."""
    def nest(t):
        out = {}
        for k, v in t.items():
            if k.startswith("visual."):
                k = "model." + k
            elif k.startswith("model."):
                k = "model.language_model." + k[len("model."):]
            out[k] = v
        return out

    d = _copy_with(hf_dir, tmp_path / "nested", nest)
    assert any(k.startswith("model.language_model.") for k in open_safetensors_dir(d))
    assert _same_weights(load_model(d), load_model(hf_dir))


def test_patch_embed_is_reshaped_on_load_and_save(hf_dir, tmp_path):
    conv = load_file(hf_dir / "model.safetensors")["visual.patch_embed.proj.weight"]
    assert conv.shape == (32, 3, 2, 14, 14)
    model = load_model(hf_dir)
    assert model.visual.patch_embed.proj.weight.shape == (32, 1176)
    save_pretrained(model, tmp_path)
    assert torch.equal(load_file(tmp_path / "model.safetensors")["visual.patch_embed.proj.weight"], conv)


@pytest.mark.parametrize("with_head", [False, True])
def test_tied_lm_head_with_or_without_copy_in_file(tmp_path, with_head):
    hf = hf_model("2", tie=True)
    hf.save_pretrained(tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    assert "lm_head.weight" not in tensors  # transformers drops the tied copy
    if with_head:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    shutil.copytree(tmp_path / "src", tmp_path / "dst")
    save_file(tensors, tmp_path / "dst" / "model.safetensors", metadata={"format": "pt"})
    m = load_model(tmp_path / "dst")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.equal(m.lm_head.weight, hf.lm_head.weight)


def test_sharded_roundtrip_and_dtype(hf_dir, tmp_path):
    model = load_model(hf_dir, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and not model.lm_head.weight.is_meta
    names = write_safetensors(hub_state_dict(load_model(hf_dir)), tmp_path, max_shard_bytes=100_000)
    assert len(names) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    assert _same_weights(load_model(tmp_path), load_model(hf_dir))


def test_assign_weights_generic_module():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 4)
            self.register_buffer("steps", torch.zeros(2))

    src = M()
    with torch.device("meta"):
        m = M()
    assign_weights(m, {"x." + k: v for k, v in src.state_dict().items()}, rename=lambda k: k[2:])
    assert _same_weights(m, src)


def test_on_meta_builds_without_storage_and_skips_only_the_random_fills():
    with on_meta():
        emb, lin = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)
        ones = torch.ones(2)
    assert all(p.is_meta for p in (*emb.parameters(), *lin.parameters(), ones))
    assert not torch.empty(1).is_meta  # the device context ends with the block
    # outside it nn.init runs as usual (the fills were skipped, not replaced by something that lingers)
    w = torch.zeros(50, 50)
    torch.nn.init.normal_(w)
    assert w.std() > 0.5


def test_on_meta_is_local_to_its_thread():
    built = {}

    def other():
        built["lin"] = torch.nn.Linear(64, 64)

    with on_meta():
        t = threading.Thread(target=other)
        t.start()
        t.join()
    w = built["lin"].weight
    assert not w.is_meta and w.abs().sum() > 0 and w.std() > 0.01  # initialised as usual: kaiming-uniform


@pytest.mark.parametrize("gen", ["1", "2", "2.5"])
def test_loading_does_not_import_torch_dynamo(gen):
    """On meta, nn.Embedding's normal_ (and arange, a scalar multiply) run Python reference kernels whose first
    call imports torch._dynamo, ~1 s of a tiny model's load; a fresh interpreter shows it stays unimported."""
    path = Path(__file__).resolve().parents[1] / "assets" / "models" / f"qvl-tiny-{gen}"
    code = f"import sys, qvl; qvl.load({str(path)!r}); print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


# ---- config.json layouts ----------------------------------------------------------------------


@pytest.mark.parametrize("gen", ["2", "2.5"])
def test_config_reads_transformers_457_output(gen, tmp_path):
    hf_config(gen).save_pretrained(tmp_path)  # 4.57 writes root fields + text_config
    cfg = read_config(tmp_path)
    assert cfg.generation == gen and cfg.text.mrope_section == [2, 3, 3] and cfg.text.hidden_size == 64
    assert cfg.vision.dim == 32 and cfg.vision.out_dim == 64 and cfg.image_token_id == 295
    assert cfg.text.tie_word_embeddings == (gen == "2")
    if gen == "2.5":
        assert cfg.vision.fullatt_block_indexes == [1] and cfg.vision.mlp_dim == 48 and cfg.tokens_per_second == 2


@pytest.mark.parametrize("name", ["Qwen2-VL-2B-Instruct", "Qwen2.5-VL-7B-Instruct"])
def test_config_flat_and_nested_v5_layouts_agree(name):
    flat = Qwen2VLConfig.from_name(name).to_dict()
    text_keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"]
    nested = {k: v for k, v in flat.items() if k not in text_keys + ["rope_scaling", "rope_theta"]}
    nested["text_config"] = {k: flat[k] for k in text_keys}
    nested["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": flat["rope_theta"],
                                                "mrope_section": flat["rope_scaling"]["mrope_section"]}
    a, b = Qwen2VLConfig.from_hf(flat), Qwen2VLConfig.from_hf(nested)
    assert a == b == Qwen2VLConfig.from_name(name)


@pytest.mark.parametrize("name", ["Qwen2-VL-7B-Instruct", "Qwen2.5-VL-3B-Instruct"])
def test_to_dict_is_read_correctly_by_transformers(name):
    """The vision field-name trap (§1.1): transformers must see the same widths qvl means."""
    from transformers import AutoConfig

    cfg = Qwen2VLConfig.from_name(name)
    hf = AutoConfig.for_model(**cfg.to_dict())
    v = hf.vision_config
    text = hf.get_text_config()
    assert (text.hidden_size, text.num_key_value_heads, text.rms_norm_eps) == (cfg.text.hidden_size, cfg.text.num_key_value_heads, 1e-6)
    assert text.rope_scaling["mrope_section"] == [16, 24, 24]
    if cfg.generation == "2":
        assert (v.embed_dim, v.hidden_size, int(v.embed_dim * v.mlp_ratio)) == (1280, cfg.text.hidden_size, 5120)
    else:
        assert (v.hidden_size, v.out_hidden_size, v.intermediate_size, v.tokens_per_second) == (1280, 2048, 3420, 2)
        assert v.fullatt_block_indexes == [7, 15, 23, 31]
