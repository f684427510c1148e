"""qvl-tiny: one small model per generation, same decoder and comparable budgets, trained here from scratch.

    tok_dir = build_tokenizers(out / "tokenizer")          # Qwen2-family BPE + gen-1 tiktoken ranks
    tok = load_tokenizer("2.5", tok_dir)
    model = new_model("2.5", tok, seed=0)                    # Qwen2_5_VL with a tiny config, initialised
    save_model(model, out / "model", tok_dir)                # official layout; qvl.load / transformers open it

Sizes (why these): the prototypes (tiny_training_notes.md) showed a 4-layer decoder cannot look an object up
and copy its box; "a deeper, narrower decoder (6-8 layers)" is the lever they name, so all three generations
get the same 8 x 256 decoder (head_dim 64, 4 query heads). The vision side is the prototypes' 4 blocks x 128.
Gen 1 keeps its own shapes: a fixed square input (224 px instead of 448, stage 1 at 112 instead of 224,
the paper's 1:2 ratio, §8.1) and a resampler with 64 queries (8 x 8 = one per 28 px cell, the same area per
token as a Qwen2 merge unit). Tied embeddings where the family ties them (Qwen2-VL-2B, Qwen2.5-VL-3B tie;
Qwen-VL never does, §5.2). Vocabularies are padded to a multiple of 64 (the released models pad too, §3.2).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from qvl.config import Qwen2VLConfig, TextConfig, VisionConfig
from qvl.models import qwen_vl as G1

GENERATIONS = ("1", "2", "2.5")
DECODER = dict(hidden=256, layers=8, heads=4, kv_heads=2, intermediate=448, rope_theta=10000.0)
VISION = dict(depth=4, dim=128, heads=4, mlp=512)
GEN1_IMAGE_SIZE = 224
GEN1_QUERIES = 64
TOKENIZER_SAMPLES = 3000  # conversations per generation in the tokenizer corpus
GEN1_RANKS = 1024


def pad_vocab(n: int, multiple: int = 64) -> int:
    return int(math.ceil(n / multiple) * multiple)


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def build_tokenizers(directory, samples: int = TOKENIZER_SAMPLES, vocab: int | None = None,
                     gen1_ranks: int = GEN1_RANKS) -> Path:
    """Train both tokenizers on generated text (train split only) -> DIR/qwen2, DIR/qwen_vl. Reused if present."""
    from qvl.data import tokenizer as TK

    directory = Path(directory)
    if not (directory / "qwen2" / "tokenizer.json").exists():
        tok = TK.train_tokenizer(TK.corpus(samples), vocab or TK.DEFAULT_VOCAB)
        TK.save_tokenizer(tok, directory / "qwen2")
    if not (directory / "qwen_vl" / "qwen.tiktoken").exists():
        TK.save_gen1(TK.train_gen1_ranks(TK.gen1_corpus(samples), gen1_ranks), directory / "qwen_vl")
    return directory


def tokenizer_path(generation: str, directory) -> Path:
    """Where the tokenizer files of a generation live in a build_tokenizers directory or a model directory."""
    directory = Path(directory)
    sub = directory / ("qwen_vl" if generation == "1" else "qwen2")
    return sub if sub.exists() else directory


def load_tokenizer(generation: str, directory):
    """The qvl tokenizer object for a generation (a model dir or a build_tokenizers dir)."""
    path = tokenizer_path(generation, directory)
    if generation == "1":
        from qvl.tokenizer_qwen_vl import QwenVLTokenizer

        tok = QwenVLTokenizer.from_dir(path)
        tok.image_span = GEN1_QUERIES  # tiny models have 64 image slots, not 256 (§3.3)
        return tok
    from qvl.tokenizer import Tokenizer

    return Tokenizer.from_file(path)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def mrope_section(head_dim: int) -> list[int]:
    """t/h/w rotary pairs in the released 1/4 : 3/8 : 3/8 ratio ([16, 24, 24] at head_dim 128, [8, 12, 12] at 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def qwen2_config(generation: str, tokenizer, decoder: dict | None = None, vision: dict | None = None) -> Qwen2VLConfig:
    d, v = {**DECODER, **(decoder or {})}, {**VISION, **(vision or {})}
    text = TextConfig(vocab_size=pad_vocab(len(tokenizer)), hidden_size=d["hidden"],
                      intermediate_size=d["intermediate"], num_hidden_layers=d["layers"],
                      num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"], rope_theta=d["rope_theta"],
                      mrope_section=list(d.get("mrope_section") or mrope_section(d["hidden"] // d["heads"])),
                      max_position_embeddings=4096, tie_word_embeddings=True)
    if generation == "2":
        vision = VisionConfig(depth=v["depth"], dim=v["dim"], num_heads=v["heads"], mlp_dim=v["mlp"],
                              out_dim=d["hidden"], hidden_act="quick_gelu")
    else:  # window attention everywhere except the last block, like blocks 7/15/23/31 of 32 (§8.3)
        vision = VisionConfig(depth=v["depth"], dim=v["dim"], num_heads=v["heads"], mlp_dim=v["mlp"],
                              out_dim=d["hidden"], hidden_act="silu", window_size=112,
                              fullatt_block_indexes=[v["depth"] - 1], tokens_per_second=2)
    ids = tokenizer.ids
    return Qwen2VLConfig(generation=generation, text=text, vision=vision,
                         image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                         vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                         bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"])


def qwen_vl_config(tokenizer, decoder: dict | None = None, vision: dict | None = None) -> G1.QwenVLConfig:
    d, v = {**DECODER, **(decoder or {})}, {**VISION, **(vision or {})}
    # Qwen-7B has no GQA: kv heads = query heads. w1/w2 are each intermediate_size/2 wide (§5.1).
    text = G1.TextConfig(vocab_size=pad_vocab(len(tokenizer)), hidden_size=d["hidden"],
                         num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                         kv_channels=d["hidden"] // d["heads"], intermediate_size=2 * d["intermediate"],
                         seq_length=2048, max_position_embeddings=4096, rotary_emb_base=d["rope_theta"])
    vision = G1.VisionConfig(image_size=GEN1_IMAGE_SIZE, patch_size=14, width=v["dim"], layers=v["depth"],
                             heads=v["heads"], mlp_ratio=v["mlp"] / v["dim"], output_dim=d["hidden"],
                             image_start_id=tokenizer.img_start_id, n_queries=GEN1_QUERIES,
                             pos_grid=GEN1_IMAGE_SIZE // 14)
    return G1.QwenVLConfig(text=text, vision=vision)


def tiny_config(generation: str, tokenizer, decoder: dict | None = None, vision: dict | None = None):
    """decoder/vision: overrides of DECODER / VISION (tests use even smaller models)."""
    if generation == "1":
        return qwen_vl_config(tokenizer, decoder, vision)
    return qwen2_config(generation, tokenizer, decoder, vision)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def init_weights_(model: nn.Module, std: float = 0.02) -> nn.Module:
    """GPT-2 style init: normal(std) for matrices and embeddings, residual output projections scaled by
    1/sqrt(2 * depth), zero biases, unit norms. The vision tower gets fan-in scaling instead (std 0.02 on a
    128-wide ViT makes its output nearly image-independent at init: notes, "between-image std 0.011")."""
    gen = model.generation
    n_layers = model.config.text.num_hidden_layers
    residual_out = ("o_proj", "down_proj", "c_proj", "w2.", "proj.weight", "fc2", "mlp.2")
    with torch.no_grad():
        for name, p in model.named_parameters():
            vision = name.startswith("visual.") or name.startswith("transformer.visual.")
            if p.dim() < 2:
                if "norm" in name or "ln" in name or name.endswith("weight"):
                    p.fill_(1.0) if name.endswith("weight") else p.zero_()
                else:
                    p.zero_()
                continue
            if vision:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in ** -0.5)
            else:
                s = std / math.sqrt(2 * n_layers) if any(k in name for k in residual_out) else std
                p.normal_(0.0, s)
        if gen == "1":  # the resampler keeps the model's own init (trunc-normal queries, xavier in-proj)
            model._init_weights(model.transformer.visual.attn_pool)
    return model


def new_model(generation: str, tokenizer, seed: int = 0, decoder: dict | None = None,
              vision: dict | None = None) -> nn.Module:
    """A freshly initialised tiny model of one generation, fp32."""
    generation = str(generation)
    torch.manual_seed(seed)
    config = tiny_config(generation, tokenizer, decoder, vision)
    if generation == "1":
        model = G1.QwenVL(config)
    else:
        from qvl.checkpoint import model_class

        model = model_class(config)(config)
    return init_weights_(model)


def save_model(model: nn.Module, directory, tokenizer_dir, dtype: torch.dtype | None = None) -> Path:
    """Official layout via qvl's own writers (so `qvl.load` and, for gen 2/2.5, transformers open it).
    `dtype` (e.g. torch.bfloat16) casts a copy for shipping; training checkpoints stay fp32."""
    import copy

    directory = Path(directory)
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    if model.generation == "1":
        tok = load_tokenizer("1", tokenizer_dir)
        G1.save_qwen_vl(model, directory, tokenizer=tok)
    else:
        from qvl.checkpoint import save_pretrained
        from qvl.data.tasks import DataConfig

        cfg = DataConfig()  # the pixel bounds the data uses become the checkpoint's preprocessor defaults
        save_pretrained(model, directory, tokenizer=str(tokenizer_path(model.generation, tokenizer_dir)),
                        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return directory


def load_model(directory, device="cpu", dtype=torch.float32) -> nn.Module:
    """A saved model directory -> model (fp32 on CPU by default, for training)."""
    import json

    directory = Path(directory)
    if json.loads((directory / "config.json").read_text()).get("model_type") == "qwen":
        return G1.load_qwen_vl(directory, device=device, dtype=dtype)
    from qvl.checkpoint import load_model as load_qwen2

    return load_qwen2(directory, device=device, dtype=dtype)


def param_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names by part: `vision` (ViT), `adapter` (merger / resampler), `llm` (decoder + embeddings).

    The papers freeze and unfreeze exactly these parts (§8): Qwen-VL's adapter is the resampler with its
    ln_post and proj; Qwen2-VL's is the MLP merger."""
    groups = {"vision": [], "adapter": [], "llm": []}
    for name, _ in model.named_parameters():
        if model.generation == "1":
            if name.startswith("transformer.visual."):
                tail = name[len("transformer.visual."):]
                groups["adapter" if tail.startswith(("attn_pool.", "ln_post.", "proj")) else "vision"].append(name)
            else:
                groups["llm"].append(name)
        elif name.startswith("visual.merger."):
            groups["adapter"].append(name)
        elif name.startswith("visual."):
            groups["vision"].append(name)
        else:
            groups["llm"].append(name)
    return groups


def count_params(model: nn.Module) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {k: sum(params[n].numel() for n in v) for k, v in param_groups(model).items()}


def graft(model: nn.Module, donor: nn.Module, vision: bool) -> None:
    """Put `donor`'s vision tower (ViT + adapter; `vision=True`) or everything else (the decoder) in place of
    `model`'s own, in place. Raises ValueError when the donor lacks a tensor or holds one of another shape, or
    (decoder) was built with another text config: weights trained at one rotary base are wrong at another."""
    prefix = "transformer.visual." if model.generation == "1" else "visual."
    if not vision and model.config.text != donor.config.text:  # e.g. a rope_theta the weights were not trained at
        diff = [f"{k} {getattr(donor.config.text, k, None)} vs {v}" for k, v in vars(model.config.text).items()
                if getattr(donor.config.text, k, None) != v]
        raise ValueError(f"the donor's decoder config differs from this model's ({', '.join(diff)})")
    own, theirs = model.state_dict(), donor.state_dict()
    keys = [k for k in own if k.startswith(prefix) == vision]
    bad = [k for k in keys if k not in theirs or theirs[k].shape != own[k].shape]
    if not keys or bad:
        part = "vision tower" if vision else "decoder"
        raise ValueError(f"the donor's {part} does not match this model's ({', '.join(bad[:3]) or 'no tensors'})")
    model.load_state_dict({**own, **{k: theirs[k] for k in keys}})
