"""Qwen-VL (gen 1) model tests. There is no transformers class for gen 1 (the release was remote code),
so every oracle here is an independent re-computation written in the test from the reference
(/work/shared/reference/qwen_vl_gen1_and_qwen_vl_utils.md, cited as §n)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qvl.checkpoint import CheckpointError
from qvl.models.qwen2_vl import Capture
from qvl.models.qwen_vl import (
    PRESETS, QwenVL, QwenVLConfig, Resampler, TextConfig, VisionConfig, VisualAttention, load_qwen_vl,
    ntk_alpha, resize_pos_table, save_qwen_vl, sincos_2d)
from qvl.tokenizer_qwen_vl import QwenVLTokenizer, train_bpe

torch.set_num_threads(1)  # the test machine's cores are shared

CORPUS = ("Picture 1: <img>cat.png</img>\nWhat is in the picture? A cat sits on the mat next to the dog. "
          "The dog and the cat are friends. <ref>the cat</ref><box>(120,340),(560,999)</box>\n") * 4


@pytest.fixture(scope="module")
def tok() -> QwenVLTokenizer:
    return QwenVLTokenizer(train_bpe(CORPUS, 320), image_span=16)


def tiny_config(tok: QwenVLTokenizer, **text) -> QwenVLConfig:
    t = dict(vocab_size=len(tok) + 11, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
             intermediate_size=48)
    t.update(text)
    # 56 px / 14 = a 4x4 patch grid; the learned table is 2x2 (interpolated), the queries 4x4 = 16 slots
    vision = VisionConfig(image_size=56, width=24, layers=2, heads=3, mlp_ratio=2.0, output_dim=32,
                          image_start_id=tok.img_start_id, n_queries=16, pos_grid=2)
    return QwenVLConfig(TextConfig(**t), vision)


@pytest.fixture(scope="module")
def model(tok) -> QwenVL:
    torch.manual_seed(0)
    m = QwenVL(tiny_config(tok)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong layout cannot hide behind ones/zeros
        for name, p in m.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", ".bias")) or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


# ---------------------------------------------------------------------------------------------------------
# Vision side


def test_sincos_table_closed_form():
    D, g = 64, 16
    table = sincos_2d(D, g)
    assert table.shape == (g * g, D)
    for row, col in [(0, 0), (0, 5), (3, 0), (7, 11), (15, 15)]:
        # §2.5: token row*g+col = [sin(col w), cos(col w), sin(row w), cos(row w)], w_d = 10000^(-d/(D/4))
        w = [10000 ** (-d / (D / 4)) for d in range(D // 4)]
        want = ([math.sin(col * x) for x in w] + [math.cos(col * x) for x in w]
                + [math.sin(row * x) for x in w] + [math.cos(row * x) for x in w])
        torch.testing.assert_close(table[row * g + col], torch.tensor(want), atol=1e-5, rtol=0)


def test_position_table_resize_is_bicubic_interpolate():
    table = torch.randn(16 * 16, 5)
    # oracle: channel-first view built from the transpose (a different route than the model's permute)
    grid = table.t().reshape(1, 5, 16, 16)
    want = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False).reshape(5, 32 * 32).t()
    torch.testing.assert_close(resize_pos_table(table, 32 * 32), want)
    assert resize_pos_table(table, 256) is table  # same grid: the table itself (§2.3)
    half = resize_pos_table(table.bfloat16(), 1024)
    assert half.dtype == torch.bfloat16  # interpolated in fp32, cast back
    torch.testing.assert_close(half.float(), F.interpolate(
        table.bfloat16().float().t().reshape(1, 5, 16, 16), size=(32, 32), mode="bicubic",
        align_corners=False).reshape(5, -1).t().bfloat16().float())


def test_vit_attention_interleaved_qkv_equals_plain_attention():
    torch.manual_seed(1)
    width, heads = 24, 3
    hd = width // heads
    attn = VisualAttention(width, heads)
    x = torch.randn(2, 10, width)
    # de-interleave by row index: head h owns rows [3*hd*h, 3*hd*(h+1)) = [q_h | k_h | v_h] (§2.4)
    W, b = attn.in_proj.weight.detach(), attn.in_proj.bias.detach()
    idx = lambda j: torch.cat([torch.arange(3 * hd * h + j * hd, 3 * hd * h + (j + 1) * hd)  # noqa: E731
                               for h in range(heads)])
    mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([W[idx(j)] for j in range(3)]))
        mha.in_proj_bias.copy_(torch.cat([b[idx(j)] for j in range(3)]))
        mha.out_proj.weight.copy_(attn.out_proj.weight)
        mha.out_proj.bias.copy_(attn.out_proj.bias)
    want, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_resampler_equals_multihead_attention(tok):
    torch.manual_seed(2)
    pool = Resampler(VisionConfig(width=24, output_dim=256, n_queries=16))  # 256 // 128 = 2 heads of 128 (§2.1)
    with torch.no_grad():
        for name, p in pool.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith(("ln_q.weight", "ln_kv.weight")) else 0.0))
    x = torch.randn(2, 36, 24)                                   # a 6x6 patch grid, keys need a 4x4 -> 6x6 table
    mha = torch.nn.MultiheadAttention(256, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(pool.attn.in_proj_weight)
        mha.in_proj_bias.copy_(pool.attn.in_proj_bias)
        mha.out_proj.weight.copy_(pool.attn.out_proj.weight)
        mha.out_proj.bias.copy_(pool.attn.out_proj.bias)
    table = sincos_2d(256, 4)                                    # fixed 4x4 table (§2.5)
    torch.testing.assert_close(pool.pos_embed, table)
    kv = F.layer_norm(x @ pool.kv_proj.weight.t(), (256,), pool.ln_kv.weight, pool.ln_kv.bias, 1e-6)
    q = F.layer_norm(pool.query, (256,), pool.ln_q.weight, pool.ln_q.bias, 1e-6) + table
    key_table = F.interpolate(table.t().reshape(1, 256, 4, 4), size=(6, 6), mode="bicubic",
                              align_corners=False).reshape(256, 36).t()
    want, _ = mha(q.expand(2, -1, -1), kv + key_table, kv, need_weights=False)  # values: no position term
    torch.testing.assert_close(pool(x), want, atol=1e-5, rtol=1e-5)


def test_vision_tower_runs_at_224_and_448_with_the_same_weights():
    torch.manual_seed(3)
    from qvl.models.qwen_vl import VisionTransformer
    v = VisionTransformer(VisionConfig(image_size=224, width=16, layers=1, heads=2, mlp_ratio=2.0, output_dim=32,
                                       n_queries=16, pos_grid=16)).eval()
    with torch.no_grad():
        assert v(torch.randn(1, 3, 224, 224)).shape == (1, 16, 32)  # 16x16 grid: table used as is
        assert v(torch.randn(2, 3, 448, 448)).shape == (2, 16, 32)  # 32x32 grid: table interpolated


def test_vision_tower_equals_a_recomputation_from_the_reference(model):
    """§2.3-§2.6 written out with other primitives: unfold+matmul patches, nn.MultiheadAttention blocks."""
    torch.manual_seed(8)
    v, cfg = model.transformer.visual, model.config.vision
    images = torch.randn(2, 3, 56, 56)
    sd = {k: t.detach() for k, t in v.state_dict().items()}
    patches = F.unfold(images, kernel_size=14, stride=14).transpose(1, 2)           # (N, 16, 3*14*14)
    x = patches @ sd["conv1.weight"].reshape(cfg.width, -1).t()                     # conv without bias
    table = sd["positional_embedding"].t().reshape(1, cfg.width, 2, 2)
    x = x + F.interpolate(table, size=(4, 4), mode="bicubic", align_corners=False).reshape(cfg.width, 16).t()
    ln = lambda t, pre: F.layer_norm(t, t.shape[-1:], sd[pre + ".weight"], sd[pre + ".bias"], 1e-6)  # noqa: E731
    x = ln(x, "ln_pre")
    hd = cfg.width // cfg.heads
    for i in range(cfg.layers):
        b = f"transformer.resblocks.{i}."
        W, bias = sd[b + "attn.in_proj.weight"], sd[b + "attn.in_proj.bias"]
        rows = lambda j: torch.cat([torch.arange(3 * hd * h + j * hd, 3 * hd * h + (j + 1) * hd)  # noqa: E731
                                    for h in range(cfg.heads)])
        h_in = ln(x, b + "ln_1")
        y, _ = F.multi_head_attention_forward(
            h_in.transpose(0, 1), h_in.transpose(0, 1), h_in.transpose(0, 1), cfg.width, cfg.heads,
            torch.cat([W[rows(j)] for j in range(3)]), torch.cat([bias[rows(j)] for j in range(3)]),
            None, None, False, 0.0, sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"], need_weights=False)
        x = x + y.transpose(0, 1)
        h_in = ln(x, b + "ln_2")
        g = h_in @ sd[b + "mlp.c_fc.weight"].t() + sd[b + "mlp.c_fc.bias"]
        gelu = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))                         # exact GELU
        x = x + gelu @ sd[b + "mlp.c_proj.weight"].t() + sd[b + "mlp.c_proj.bias"]
    E = cfg.output_dim
    kv = ln(x @ sd["attn_pool.kv_proj.weight"].t(), "attn_pool.ln_kv")
    q = ln(sd["attn_pool.query"], "attn_pool.ln_q") + sincos_2d(E, 4)
    y, _ = F.multi_head_attention_forward(
        q[:, None].expand(-1, 2, -1), (kv + sincos_2d(E, 4)).transpose(0, 1), kv.transpose(0, 1), E, 1,
        sd["attn_pool.attn.in_proj_weight"], sd["attn_pool.attn.in_proj_bias"], None, None, False, 0.0,
        sd["attn_pool.attn.out_proj.weight"], sd["attn_pool.attn.out_proj.bias"], need_weights=False)
    want = ln(y.transpose(0, 1), "ln_post") @ sd["proj"]
    with torch.no_grad():
        torch.testing.assert_close(v(images), want, atol=1e-5, rtol=1e-5)
    norms = [m for m in v.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * cfg.layers + 4 and all(m.eps == 1e-6 for m in norms)  # every visual LN (§2.1)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint layout, written from §2.7 / §5.2 (not from the model)


def official_shapes(layers_vit=48, layers_llm=32) -> dict[str, tuple]:
    W, M, E, H, F_, V = 1664, 8192, 4096, 4096, 11008, 151936
    s = {"conv1.weight": (W, 3, 14, 14), "positional_embedding": (256, W), "ln_pre.weight": (W,), "ln_pre.bias": (W,),
         "attn_pool.query": (256, E), "attn_pool.pos_embed": (256, E), "attn_pool.kv_proj.weight": (E, W),
         "attn_pool.ln_q.weight": (E,), "attn_pool.ln_q.bias": (E,), "attn_pool.ln_kv.weight": (E,),
         "attn_pool.ln_kv.bias": (E,), "attn_pool.attn.in_proj_weight": (3 * E, E),
         "attn_pool.attn.in_proj_bias": (3 * E,), "attn_pool.attn.out_proj.weight": (E, E),
         "attn_pool.attn.out_proj.bias": (E,), "ln_post.weight": (E,), "ln_post.bias": (E,), "proj": (E, E)}
    for i in range(layers_vit):
        b = f"transformer.resblocks.{i}."
        s.update({b + "ln_1.weight": (W,), b + "ln_1.bias": (W,), b + "ln_2.weight": (W,), b + "ln_2.bias": (W,),
                  b + "attn.in_proj.weight": (3 * W, W), b + "attn.in_proj.bias": (3 * W,),
                  b + "attn.out_proj.weight": (W, W), b + "attn.out_proj.bias": (W,),
                  b + "mlp.c_fc.weight": (M, W), b + "mlp.c_fc.bias": (M,),
                  b + "mlp.c_proj.weight": (W, M), b + "mlp.c_proj.bias": (W,)})
    out = {"transformer.visual." + k: v for k, v in s.items()}
    out.update({"transformer.wte.weight": (V, H), "transformer.ln_f.weight": (H,), "lm_head.weight": (V, H)})
    for n in range(layers_llm):
        b = f"transformer.h.{n}."
        out.update({b + "ln_1.weight": (H,), b + "attn.c_attn.weight": (3 * H, H), b + "attn.c_attn.bias": (3 * H,),
                    b + "attn.c_proj.weight": (H, H), b + "ln_2.weight": (H,), b + "mlp.w1.weight": (F_, H),
                    b + "mlp.w2.weight": (F_, H), b + "mlp.c_proj.weight": (H, F_)})
    return out


@pytest.mark.parametrize("name", ["Qwen/Qwen-VL", "Qwen/Qwen-VL-Chat"])
def test_meta_model_has_the_official_keys_and_shapes(name):
    with torch.device("meta"):
        m = QwenVL(QwenVLConfig.from_name(name))
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = official_shapes()
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want
    n = sum(p.numel() for p in m.parameters())
    assert 9.5e9 < n < 9.75e9  # "ViT 1.9B + adapter 0.08B + LLM 7.7B = 9.6B" (§1)


def test_config_json_round_trip():
    official = dict(PRESETS["Qwen/Qwen-VL-Chat"], model_type="qwen", architectures=["QWenLMHeadModel"],
                    some_future_key=1)
    cfg = QwenVLConfig.from_hf(official)
    assert cfg.vision.grid == 32 and cfg.vision.mlp_hidden == 8192 and cfg.vision.resampler_heads == 32
    assert cfg.text.ffn_dim == 11008
    hf = cfg.to_hf()
    assert hf["visual"] == PRESETS["Qwen/Qwen-VL-Chat"]["visual"]  # no qvl-only keys at default values
    assert all(hf[k] == v for k, v in official.items() if k not in ("visual", "some_future_key"))
    assert QwenVLConfig.from_hf(hf) == cfg
    small = QwenVLConfig(vision=VisionConfig(n_queries=16, pos_grid=2))
    assert QwenVLConfig.from_hf(json.loads(json.dumps(small.to_hf()))) == small


# ---------------------------------------------------------------------------------------------------------
# Splicing and decoding


def prompt_ids(tok, paths=("a.png",), text="What is this?"):
    pictures = "".join(f"Picture {i + 1}: <img>{p}</img>\n" for i, p in enumerate(paths))
    return tok.encode(f"<|im_start|>user\n{pictures}{text}<|im_end|>\n<|im_start|>assistant\n")


def test_embed_puts_image_features_into_the_slots_in_order(model, tok):
    ids = torch.tensor([prompt_ids(tok, ("a.png", "b.png"))])
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        e = model.embed(ids, images)
        feats = model.transformer.visual(images)
        plain = model.transformer.wte(ids)
    starts = (ids[0] == tok.img_start_id).nonzero().flatten().tolist()
    assert len(starts) == 2
    for k, a in enumerate(starts):
        torch.testing.assert_close(e[0, a + 1:a + 17], feats[k])     # 16 slots strictly between the tags
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    for a in starts:
        keep[a + 1:a + 17] = False
    torch.testing.assert_close(e[0, keep], plain[0, keep])           # tags and text keep their embeddings


def test_embed_errors_are_loud(model, tok):
    ids = torch.tensor([prompt_ids(tok, ("a.png", "b.png"))])
    with pytest.raises(ValueError, match="2 <img>"):
        model.embed(ids, torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match="2 <img>"):
        model.embed(ids)                                              # forgot the images
    short = torch.tensor([[tok.img_start_id, 5, 6, tok.img_end_id]])
    with pytest.raises(ValueError, match="exactly 16 slots"):
        model.embed(short, torch.randn(1, 3, 56, 56))
    assert model.embed(torch.tensor([[5, 6, 7]])).shape == (1, 3, 32)


def reference_decoder(model, embeds, base=10000.0, logn=False):
    """§5.3 written out: RMSNorm (fp32, then weight), contiguous [Q|K|V], rotate-half RoPE on positions 0..T-1,
    optional log-n query scaling past 2048, causal softmax / sqrt(hd), SwiGLU c_proj(w1 x * silu(w2 x))."""
    t = model.config.text
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    B, T, _ = embeds.shape
    nh, hd = t.num_attention_heads, t.kv_channels
    inv = torch.tensor([1 / base ** (2 * j / hd) for j in range(hd // 2)])
    scale = torch.tensor([math.log(p + 1) / math.log(2048) if logn and p + 1 > 2048 else 1.0 for p in range(T)])
    ang = torch.arange(T)[:, None].float() * inv                                     # (T, hd/2)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):                                                                     # (B, nh, T, hd)
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    causal = torch.ones(T, T).tril().bool()
    x = embeds
    for n in range(t.num_hidden_layers):
        b = f"transformer.h.{n}."
        h = rms(x, sd[b + "ln_1.weight"]) @ sd[b + "attn.c_attn.weight"].t() + sd[b + "attn.c_attn.bias"]
        q, k, v = (h[..., j * nh * hd:(j + 1) * nh * hd].reshape(B, T, nh, hd).transpose(1, 2) for j in range(3))
        q = rope(q) * scale[:, None]
        scores = (q @ rope(k).transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + y @ sd[b + "attn.c_proj.weight"].t()
        h = rms(x, sd[b + "ln_2.weight"])
        up, gate = h @ sd[b + "mlp.w1.weight"].t(), h @ sd[b + "mlp.w2.weight"].t()
        x = x + (up * gate * torch.sigmoid(gate)) @ sd[b + "mlp.c_proj.weight"].t()
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].t()


def test_decoder_equals_a_recomputation_from_the_reference(model, tok):
    ids = torch.tensor([prompt_ids(tok)])
    with torch.no_grad():
        e = model.embed(ids, torch.randn(1, 3, 56, 56))
        torch.testing.assert_close(model(e, torch.arange(ids.shape[1])[None]), reference_decoder(model, e),
                                   atol=1e-5, rtol=1e-5)


def test_kv_cache_decode_equals_full_forward(model, tok):
    ids = torch.tensor([prompt_ids(tok) + [40, 41, 42, 43, 44, 45]])
    T = ids.shape[1]
    pos = torch.arange(T)[None]
    with torch.no_grad():
        e = model.embed(ids, torch.randn(1, 3, 56, 56))
        full = model(e, pos)
        cache = model.make_cache(1, T + 4)
        steps = [model(e[:, :T - 6], pos[:, :T - 6], cache, 0)]
        steps += [model(e[:, t:t + 1], pos[:, t:t + 1], cache, t) for t in range(T - 6, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_single_rows(model, tok):
    from qvl.positions import text_position_ids
    a, b = prompt_ids(tok, text="cat?"), prompt_ids(tok, text="What is the dog doing next to the cat?")
    T = max(len(a), len(b))
    ids = torch.tensor([[tok.eod_id] * (T - len(a)) + a, [tok.eod_id] * (T - len(b)) + b])
    mask = torch.tensor([[0] * (T - len(a)) + [1] * len(a), [0] * (T - len(b)) + [1] * len(b)]).bool()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        batched = model(model.embed(ids, images), text_position_ids(mask), pad_mask=mask)
        for r, row in enumerate((a, b)):
            one = model(model.embed(torch.tensor([row]), images[r:r + 1]), torch.arange(len(row))[None])
            torch.testing.assert_close(batched[r, T - len(row):], one[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Dynamic NTK and log-n (§5.3): inference only, and only past seq_length = 2048


def test_ntk_alpha_values():
    assert [ntk_alpha(L, 2048) for L in (1, 1000, 2048)] == [1, 1, 1]
    assert ntk_alpha(2049, 2048) == 3 and ntk_alpha(3000, 2048) == 3 and ntk_alpha(4096, 2048) == 3
    assert ntk_alpha(4097, 2048) == 7


@pytest.fixture(scope="module")
def long_models(tok):
    """The same weights four ways: both scalings on, NTK only, log-n only, neither (1 layer, width 16)."""
    out = {}
    for ntk, logn in [(True, True), (True, False), (False, True), (False, False)]:
        torch.manual_seed(4)
        m = QwenVL(tiny_config(tok, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, use_dynamic_ntk=ntk, use_logn_attn=logn)).eval()
        with torch.no_grad():  # large weights: peaked attention, so a wrong rotary base shows in the logits
            for name, p in m.transformer.h.named_parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if "ln_" in name else 0.5 * torch.randn_like(p))
            m.transformer.wte.weight.normal_()
        out[ntk, logn] = m
    return out


def test_ntk_and_logn_change_nothing_up_to_2048(long_models):
    torch.manual_seed(5)
    ids = torch.randint(0, 300, (1, 2048))
    with torch.no_grad():
        outs = [m(m.embed(ids), torch.arange(2048)[None]) for m in long_models.values()]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_ntk_and_logn_change_outputs_past_2048(long_models):
    torch.manual_seed(6)
    T = 2100
    ids, pos = torch.randint(0, 300, (1, T)), torch.arange(T)[None]
    with torch.no_grad():
        out = {k: m(m.embed(ids), pos) for k, m in long_models.items()}
        plain = out[False, False]
        # log-n scales only queries at p + 1 > 2048: earlier rows are untouched, later rows change
        assert torch.equal(out[False, True][:, :2047], plain[:, :2047])
        assert (out[False, True][:, 2048:] - plain[:, 2048:]).abs().amax(-1).min() > 0
        # NTK (alpha = 3 at L = 2100) changes the rotary base, hence every row past position 0
        assert (out[True, False][:, 1:] - plain[:, 1:]).abs().amax(-1).min() > 0
        # both are inference-only: in training mode all four agree
        m = long_models[True, True].train()
        try:
            assert torch.equal(m(m.embed(ids), pos), plain)
        finally:
            m.eval()


def test_long_forward_equals_reference_with_ntk_base_and_logn(long_models):
    """L = 2100: alpha = 3, base' = 10000 * 3^(hd / (hd - 2)), queries past 2048 scaled by log(p+1)/log(2048)."""
    torch.manual_seed(9)
    T = 2100
    m = long_models[True, True]
    hd = m.config.text.kv_channels
    with torch.no_grad():
        e = m.embed(torch.randint(0, 300, (1, T)))
        want = reference_decoder(m, e, base=10000 * 3 ** (hd / (hd - 2)), logn=True)
        torch.testing.assert_close(m(e, torch.arange(T)[None]), want, atol=1e-4, rtol=1e-4)


def test_decode_past_2048_reuses_the_prefill_alpha(long_models):
    """§5.3: alpha is picked at prefill (2040 tokens: alpha 1) and reused while decoding past 2048, so the
    cached run equals a full forward *without* NTK but with log-n."""
    torch.manual_seed(7)
    T, P = 2060, 2040
    ids, pos = torch.randint(0, 300, (1, T)), torch.arange(T)[None]
    m = long_models[True, True]
    with torch.no_grad():
        e = m.embed(ids)
        cache = m.make_cache(1, T)
        steps = [m(e[:, :P], pos[:, :P], cache, 0)[:, -1:]]
        steps += [m(e[:, t:t + 1], pos[:, t:t + 1], cache, t) for t in range(P, T - 1)]
        want = long_models[False, True](e, pos)[:, P - 1:T - 1]
    assert cache.ntk_alpha == 1
    torch.testing.assert_close(torch.cat(steps, 1), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Attention capture


def test_capture_records_attention_to_the_image_slots(model, tok):
    ids = torch.tensor([prompt_ids(tok)])
    T = ids.shape[1]
    a = int((ids[0] == tok.img_start_id).nonzero()) + 1
    cap = Capture(layers=[1], key_span=(a, a + 16), vision_block=0)
    with torch.no_grad():
        e = model.embed(ids, torch.randn(1, 3, 56, 56), capture=cap)
        cache = model.make_cache(1, T + 2)
        plain = model(e, torch.arange(T)[None], cache, 0)
        with_cap = model(e, torch.arange(T)[None], model.make_cache(1, T + 2), 0, capture=cap)
        model(e[:, -1:], torch.tensor([[T]]), cache, T, capture=cap)  # one decode step
    assert torch.equal(plain, with_cap)                             # recording changes nothing
    assert list(cap.attn) == [1] and [x.shape for x in cap.attn[1]] == [(1, 4, T, 16), (1, 4, 1, 16)]
    assert 0 < cap.attn[1][1].sum(-1).max() <= 1 + 1e-6             # a share of one softmax row
    assert cap.vision[0]["attn"].shape == (3, 16, 16) and cap.vision[0]["block"] == 0
    torch.testing.assert_close(cap.vision[0]["attn"].sum(-1), torch.ones(3, 16))


# ---------------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_and_reload_is_bit_identical(model, tok, tmp_path):
    save_qwen_vl(model, tmp_path, tokenizer=tok)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                                     "qwen.tiktoken"}
    back = load_qwen_vl(tmp_path)
    assert back.config == model.config and back.generation == "1" and not back.training
    sd, sd2 = model.state_dict(), back.state_dict()
    assert list(sd) == list(sd2)
    assert all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["stop_words_ids"] == [[tok.im_end_id], [tok.im_start_id]] and gen["eos_token_id"] == tok.eod_id
    tok2 = QwenVLTokenizer.from_dir(tmp_path)
    assert tok2.image_span == 16 and tok2.encode(CORPUS) == tok.encode(CORPUS)
    ids = torch.tensor([prompt_ids(tok2)])
    img = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(back(back.embed(ids, img), torch.arange(ids.shape[1])[None]),
                           model(model.embed(ids, img), torch.arange(ids.shape[1])[None]))
    half = load_qwen_vl(tmp_path, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16


def test_sharded_save_reloads(model, tmp_path):
    save_qwen_vl(model, tmp_path, max_shard_bytes=100_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = load_qwen_vl(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_loading_fails_loudly_on_wrong_keys(model, tmp_path):
    save_qwen_vl(model, tmp_path)
    good = load_file(tmp_path / "model.safetensors")

    def broken(change):
        sd = dict(good)
        change(sd)
        save_file(sd, tmp_path / "model.safetensors")

    broken(lambda sd: sd.pop("transformer.h.1.mlp.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): transformer\.h\.1\.mlp\.w2\.weight"):
        load_qwen_vl(tmp_path)
    broken(lambda sd: sd.update({"transformer.h.0.attn.c_proj.bias": torch.zeros(32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): transformer\.h\.0\.attn\.c_proj\.bias"):
        load_qwen_vl(tmp_path)
    broken(lambda sd: sd.update({"transformer.visual.proj": torch.zeros(32, 31)}))
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): transformer\.visual\.proj"):
        load_qwen_vl(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(CheckpointError, match="not a Qwen-VL"):
        load_qwen_vl(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_qwen_vl(tmp_path)
