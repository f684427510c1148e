"""Configs for Qwen2-VL and Qwen2.5-VL: three small dataclasses, the Hub `config.json` mapping, presets.

* `VisionConfig`   - the ViT + merger (names are qvl's own: `dim` is the ViT width, `out_dim` the LLM width)
* `TextConfig`     - the Qwen2 decoder (names as in the Hub config.json)
* `Qwen2VLConfig`  - both, plus the special token ids and `generation` ("2" or "2.5")

`Qwen2VLConfig.from_hf(dict)` reads both the flat Hub layout and the nested transformers-5 layout
(`text_config`, `rope_parameters`); `to_dict()` writes the flat Hub layout that transformers 4.57 reads.
`Qwen2VLConfig.from_name("Qwen/Qwen2.5-VL-3B-Instruct")` builds a published size from `PRESETS`.

Field-name trap (reference §1.1): in a Qwen2-VL vision_config `embed_dim` is the ViT width and
`hidden_size` is the merger output (= LLM width); in Qwen2.5-VL `hidden_size` is the ViT width and
`out_hidden_size` the merger output. qvl's `dim` / `out_dim` avoid the ambiguity.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

MODEL_TYPES = {"2": "qwen2_vl", "2.5": "qwen2_5_vl"}
ARCHITECTURES = {"2": "Qwen2VLForConditionalGeneration", "2.5": "Qwen2_5_VLForConditionalGeneration"}


@dataclass
class VisionConfig:
    depth: int = 32
    dim: int = 1280  # ViT width (Qwen2-VL `embed_dim`, Qwen2.5-VL `hidden_size`)
    num_heads: int = 16  # head dim = 1280 / 16 = 80
    mlp_dim: int = 5120  # Qwen2-VL: dim * mlp_ratio(4); Qwen2.5-VL: `intermediate_size` 3420
    out_dim: int = 1536  # merger output = LLM hidden size (Qwen2-VL `hidden_size`, 2.5 `out_hidden_size`)
    hidden_act: str = "quick_gelu"  # Qwen2-VL "quick_gelu" (absent on the Hub), Qwen2.5-VL "silu"
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # Qwen2.5-VL only (§3.6): window attention everywhere except these blocks
    window_size: int = 112  # pixels: 112 // 2 // 14 = 4x4 merged tokens per window
    fullatt_block_indexes: list[int] = field(default_factory=list)
    tokens_per_second: float | None = None  # Qwen2.5-VL video temporal position scale (2 on the Hub)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_dim(self) -> int:  # one flattened pixel_values row: 3 * 2 * 14 * 14 = 1176
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class TextConfig:
    vocab_size: int = 151936  # includes padding rows beyond the tokenizer (§1.3)
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6  # the checkpoints' value; transformers' class default 1e-5 is wrong (§1.4)
    rope_theta: float = 1e6
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])  # t, h, w; sums to head_dim/2
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:  # no head_dim key in Qwen2/2.5 configs: always H / heads (§1.2)
        return self.hidden_size // self.num_attention_heads


@dataclass
class Qwen2VLConfig:
    generation: str = "2"  # "2" = Qwen2-VL, "2.5" = Qwen2.5-VL
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    verified: bool = True  # False for presets whose config.json the reference could not check (§1.2)

    def __post_init__(self):
        if self.generation not in MODEL_TYPES:
            raise ValueError(f"generation must be '2' or '2.5', got {self.generation!r}")
        if sum(self.text.mrope_section) * 2 != self.text.head_dim:
            raise ValueError(f"mrope_section {self.text.mrope_section} must sum to head_dim/2 = {self.text.head_dim // 2}")
        if self.vision.out_dim != self.text.hidden_size:
            raise ValueError(f"vision out_dim {self.vision.out_dim} != text hidden_size {self.text.hidden_size}")

    @property
    def model_type(self) -> str:
        return MODEL_TYPES[self.generation]

    @property
    def tokens_per_second(self) -> float | None:
        """What `qvl.positions.mrope_position_ids` needs: None selects Qwen2-VL's interval of 1."""
        return self.vision.tokens_per_second if self.generation == "2.5" else None

    # ---- Hub config.json ------------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2VLConfig":
        """Build from a config.json dict: flat Hub layout, transformers-4.57 (root + text_config) or
        transformers-5 nested layout (text_config + rope_parameters). Unknown keys are ignored."""
        model_type = d.get("model_type", "")
        gen = {v: k for k, v in MODEL_TYPES.items()}.get(model_type)
        if gen is None:
            raise ValueError(f"not a Qwen2-VL / Qwen2.5-VL config: model_type={model_type!r}")
        t = {**d, **d.get("text_config", {})}  # text fields: nested wins over root (§1.1)
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        text = TextConfig(
            vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])),  # transformers' fallback (§1.4)
            max_position_embeddings=t.get("max_position_embeddings", 32768),
            # a tie flag only inside text_config is forwarded to the root (§1.1); transformers defaults to True
            tie_word_embeddings=d.get("tie_word_embeddings", t.get("tie_word_embeddings", True)),
        )
        v = d["vision_config"]
        if gen == "2":
            dim = v.get("embed_dim", 1280)
            vision = VisionConfig(depth=v.get("depth", 32), dim=dim, num_heads=v.get("num_heads", 16),
                                  mlp_dim=int(dim * v.get("mlp_ratio", 4)), out_dim=v.get("hidden_size", text.hidden_size),
                                  hidden_act=v.get("hidden_act", "quick_gelu"))
        else:
            vision = VisionConfig(depth=v.get("depth", 32), dim=v["hidden_size"], num_heads=v.get("num_heads", 16),
                                  mlp_dim=v["intermediate_size"], out_dim=v.get("out_hidden_size", text.hidden_size),
                                  hidden_act=v.get("hidden_act", "silu"), window_size=v.get("window_size", 112),
                                  fullatt_block_indexes=list(v.get("fullatt_block_indexes", [])),
                                  tokens_per_second=v.get("tokens_per_second", 2))
        vision = replace(vision, patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
                         spatial_merge_size=v.get("spatial_merge_size", 2),
                         in_channels=v.get("in_channels", v.get("in_chans", 3)))
        ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                 "vision_end_token_id", "bos_token_id", "eos_token_id") if d.get(k) is not None}
        if isinstance(ids.get("eos_token_id"), list):
            ids["eos_token_id"] = ids["eos_token_id"][0]
        return cls(generation=gen, text=text, vision=vision, **ids)

    def to_dict(self) -> dict:
        """The flat Hub layout (what the official config.json files look like)."""
        t, v = self.text, self.vision
        common = {"depth": v.depth, "num_heads": v.num_heads, "hidden_act": v.hidden_act, "in_channels": v.in_channels,
                  "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
                  "temporal_patch_size": v.temporal_patch_size}
        if self.generation == "2":  # mlp_ratio may be fractional for custom sizes: fc1 width = dim * mlp_ratio
            vision = {**common, "embed_dim": v.dim, "hidden_size": v.out_dim, "mlp_ratio": v.mlp_dim / v.dim}
        else:
            vision = {**common, "hidden_size": v.dim, "out_hidden_size": v.out_dim, "intermediate_size": v.mlp_dim,
                      "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                      "tokens_per_second": v.tokens_per_second if v.tokens_per_second is not None else 2}
        vision["model_type"] = self.model_type
        return {
            "architectures": [ARCHITECTURES[self.generation]],
            "model_type": self.model_type,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "hidden_act": "silu",
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "sliding_window": t.max_position_embeddings,
            "use_sliding_window": False,
            "tie_word_embeddings": t.tie_word_embeddings,
            "use_cache": True,
            "vocab_size": t.vocab_size,
            "vision_config": vision,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path) -> "Qwen2VLConfig":
        return cls.from_hf(json.loads(Path(path).read_text()))

    @classmethod
    def from_name(cls, name: str, **text_overrides) -> "Qwen2VLConfig":
        """A published size by repo id, e.g. "Qwen/Qwen2-VL-2B-Instruct" (the "Qwen/" prefix is optional)."""
        key = name.split("/")[-1]
        if key not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        p = PRESETS[key]
        gen = p["generation"]
        text = TextConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                          num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                          tie_word_embeddings=p["tie"], max_position_embeddings=32768 if gen == "2" else 128000)
        text = replace(text, **text_overrides)
        if gen == "2":  # every Qwen2-VL size shares the same ViT; only the merger output changes (§1.2)
            vision = VisionConfig(depth=32, dim=1280, num_heads=16, mlp_dim=5120, out_dim=text.hidden_size,
                                  hidden_act="quick_gelu")
        else:
            vision = VisionConfig(depth=32, dim=1280, num_heads=16, mlp_dim=3420, out_dim=text.hidden_size,
                                  hidden_act="silu", window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                                  tokens_per_second=2)
        return cls(generation=gen, text=text, vision=vision, verified=p["verified"])

    def as_plain_dict(self) -> dict:
        """All qvl fields (for logging / debugging); use `to_dict` for a transformers-readable config."""
        return asdict(self)


# Published sizes (reference §1.2). Shared by every size: rope_theta 1e6, rms_norm_eps 1e-6,
# mrope_section [16,24,24], head_dim 128, one ViT (depth 32, width 1280, 16 heads).
# verified=False: the reference had no copy of the config.json; the values are the Qwen2 / Qwen2.5
# LLM shapes these models reuse. Check rms_norm_eps, vocab_size and tie_word_embeddings against the real file.
# https://huggingface.co/Qwen/<name>/blob/main/config.json
PRESETS: dict[str, dict] = {
    "Qwen2-VL-2B-Instruct":    dict(generation="2", hidden=1536, layers=28, heads=12, kv=2, intermediate=8960, vocab=151936, tie=True, verified=True),
    "Qwen2-VL-7B-Instruct":    dict(generation="2", hidden=3584, layers=28, heads=28, kv=4, intermediate=18944, vocab=152064, tie=False, verified=True),
    "Qwen2-VL-72B-Instruct":   dict(generation="2", hidden=8192, layers=80, heads=64, kv=8, intermediate=29568, vocab=152064, tie=False, verified=False),
    "Qwen2.5-VL-3B-Instruct":  dict(generation="2.5", hidden=2048, layers=36, heads=16, kv=2, intermediate=11008, vocab=151936, tie=True, verified=True),
    "Qwen2.5-VL-7B-Instruct":  dict(generation="2.5", hidden=3584, layers=28, heads=28, kv=4, intermediate=18944, vocab=152064, tie=False, verified=True),
    "Qwen2.5-VL-32B-Instruct": dict(generation="2.5", hidden=5120, layers=64, heads=40, kv=8, intermediate=27648, vocab=152064, tie=False, verified=False),
    "Qwen2.5-VL-72B-Instruct": dict(generation="2.5", hidden=8192, layers=80, heads=64, kv=8, intermediate=29568, vocab=152064, tie=False, verified=False),
}
