"""Reading and writing checkpoints: safetensors only, never pickles.

Generic part (used by every generation):
  * `CheckpointError`       - raised with the full list of what is wrong, never a silent skip
  * `open_safetensors_dir`  - lazy mapping over a single-file or sharded safetensors directory
  * `on_meta`               - build a model on the meta device, its random initialisers skipped
  * `assign_weights`        - fill a meta-device model from such a mapping (`load_state_dict(assign=True)` style)
  * `write_safetensors`     - one file, or shards + `model.safetensors.index.json`
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint directory or file that qvl will not load, with the reason spelled out."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class LazyTensors(Mapping):
    """key -> tensor over one or more safetensors files; a tensor is read only when indexed."""

    def __init__(self, files: dict[str, Path]):
        from safetensors import safe_open

        self._where: dict[str, str] = {}  # key -> file name
        self._handles = {}
        for name, path in files.items():
            handle = safe_open(str(path), framework="pt", device="cpu")
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape without reading the data."""
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())


def open_safetensors_dir(path) -> LazyTensors:
    """Open `model.safetensors`, a sharded `model.safetensors.index.json` set, or a single file."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file; qvl never loads pickled weights")
        return LazyTensors({path.name: path})
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in {INDEX_FILE} are missing: {missing}")
        return LazyTensors({n: path / n for n in names})
    if (path / SINGLE_FILE).exists():
        return LazyTensors({SINGLE_FILE: path / SINGLE_FILE})
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return LazyTensors({found[0]: path / found[0]})
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle weight files found ({', '.join(pickles)}); qvl never loads pickles "
            "(they can run arbitrary code). Convert the checkpoint to safetensors first.")
    if found:
        raise CheckpointError(f"{path}: several .safetensors files but no {INDEX_FILE}: {found}")
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


# ---------------------------------------------------------------------------------------------
# Assigning into a model built on the meta device
# ---------------------------------------------------------------------------------------------


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped by identity: [[name, alias, ...], ...] (tied weights share one group)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        if _is_persistent(model, name):
            groups.setdefault(id(b), []).append(name)
    return list(groups.values())


def _is_persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf not in module._non_persistent_buffers_set


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        requires_grad = module._parameters[leaf].requires_grad
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad)
    else:
        module._buffers[leaf] = value


class on_meta(TorchFunctionMode):
    """`with on_meta(): model = Model(config)` builds the model on the meta device (shapes, no storage) and
    skips its random initialisers, since `assign_weights` replaces every tensor anyway.

    Why skip them: on meta, `normal_` (nn.Embedding's initialiser) runs a Python reference kernel whose first
    call imports torch._dynamo -- about 1 s, most of what `qvl.load` took for a tiny model (1.2 -> 0.15 s on
    this CPU). A torch-function mode, like `torch.device`, is thread-local: a model built at the same time in
    another thread is initialised as usual."""

    # nn.init's functions dispatch to a mode themselves (and then call the Tensor method with modes off)
    RANDOM_FILLS = (torch.Tensor.normal_, torch.Tensor.uniform_, nn.init.normal_, nn.init.uniform_,
                    nn.init.trunc_normal_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_)

    def __init__(self):
        super().__init__()
        self.device = torch.device("meta")

    def __enter__(self):
        self.device.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.device.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.RANDOM_FILLS:
            return args[0] if args else kwargs["tensor"]  # the tensor, left as it is
        return func(*args, **kwargs)


def assign_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                   rename: Callable[[str], str] | None = None,
                   transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                   device=None, dtype: torch.dtype | None = None) -> None:
    """Replace every parameter / persistent buffer of `model` with the checkpoint tensor.

    rename(file_key) -> model_key maps checkpoint names to module names; transform(model_key, tensor)
    may reshape a tensor (e.g. Conv3d -> Linear); `shape(key)` on the mapping, when present, lets
    shapes be checked before any data is read. Floating tensors are cast to `dtype`, all are moved to
    `device`. Tied parameters (same Parameter under several names) need only one of their names in the
    file; extra copies are accepted and ignored. Raises CheckpointError listing *all* missing keys,
    unexpected keys and shape mismatches, before anything is assigned.
    """
    rename = rename or (lambda k: k)
    groups = _tied_groups(model)
    group_of = {name: i for i, names in enumerate(groups) for name in names}
    expected = dict(model.state_dict(keep_vars=True))
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}

    source: dict[int, str] = {}  # group -> file key to read
    unexpected, mismatched = [], []
    for file_key in tensors:
        key = rename(file_key)
        if key not in group_of:
            unexpected.append(file_key if key == file_key else f"{file_key} (as {key})")
            continue
        source.setdefault(group_of[key], file_key)
    missing = [names[0] for i, names in enumerate(groups) if i not in source]
    for i, file_key in source.items():
        key = groups[i][0]
        want = tuple(expected[key].shape)
        if hasattr(tensors, "shape"):  # check shapes without reading: run the transform on meta
            t = torch.empty(tensors.shape(file_key), device="meta")
        else:
            t = tensors[file_key]
        got = tuple((transform(key, t) if transform else t).shape)
        if got != want:
            mismatched.append(f"{file_key}: checkpoint {list(got)} vs model {list(want)}")
    if missing or unexpected or mismatched:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if mismatched:
            lines.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(lines))

    for i, file_key in source.items():
        names = groups[i]
        t = tensors[file_key]
        if transform is not None:
            t = transform(names[0], t)
        t = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        _set_tensor(model, names[0], t)
        first = model.get_parameter(names[0]) if names[0] in param_names else model.get_buffer(names[0])
        for name in names[1:]:  # re-tie: every alias gets the very same Parameter object
            _set_tensor(model, name, first)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    left += [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise CheckpointError(f"tensors still on the meta device after loading: {left}")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_safetensors(state_dict: Mapping[str, torch.Tensor], directory,
                      max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards + index when the
    total exceeds `max_shard_bytes`. Tensors sharing storage (tied weights) are cloned, since
    safetensors refuses aliases. Returns the file names written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata=meta)
        if (directory / INDEX_FILE).exists():
            os.remove(directory / INDEX_FILE)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


# ---------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL: the one remap table, load_model, save_pretrained
# ---------------------------------------------------------------------------------------------

# Checkpoint key -> qvl module name, first matching rule wins. qvl keeps the Hub names
# (`visual.*`, `model.*`, `lm_head.*`), so the Hub layout maps to itself; checkpoints re-saved by
# transformers >= 4.52 nest everything under `model.` (reference §2.1).
KEY_RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.language_model\."), "model."),
]
# Tensors stored differently in qvl: the Conv3d patch embedding [D, 3, 2, 14, 14] is a Linear [D, 1176]
# in qvl (kernel == stride, so the two are the same product; see models/qwen2_vl.py PatchEmbed).
PATCH_EMBED = "visual.patch_embed.proj.weight"

# What save_pretrained writes next to the weights (reference §1.3, §5.3)
EOS_TOKEN_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>
PAD_TOKEN_ID = 151643
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja")


def _ensure_chat_template(path: Path) -> None:
    """Give a tokenizer_config.json without a chat template (qvl-tiny's) the Qwen2-VL one, so transformers and
    serving engines render the same prompts qvl does. A template already there is left alone."""
    if not path.exists() or (path.parent / "chat_template.json").exists() or (path.parent / "chat_template.jinja").exists():
        return
    cfg = json.loads(path.read_text())
    if not cfg.get("chat_template"):
        from .chat import QWEN2_CHAT_TEMPLATE

        cfg["chat_template"] = QWEN2_CHAT_TEMPLATE
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def hub_to_qvl(key: str) -> str:
    for pattern, replacement in KEY_RENAMES:
        key, n = pattern.subn(replacement, key)
        if n:
            break
    return key


def _to_qvl_tensor(key: str, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if key == PATCH_EMBED else t


def read_config(path) -> "Qwen2VLConfig":
    """The model config of a checkpoint directory (its config.json)."""
    from .config import Qwen2VLConfig

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return Qwen2VLConfig.from_hf(json.loads(file.read_text()))
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def model_class(config):
    """The qvl model class for a config (Qwen2VL or Qwen2_5_VL)."""
    from .models.qwen2_5_vl import Qwen2_5_VL
    from .models.qwen2_vl import Qwen2VL

    return {"2": Qwen2VL, "2.5": Qwen2_5_VL}[config.generation]


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA, fp32 on CPU unless asked otherwise."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_model(path, device=None, dtype=None):
    """Qwen2-VL / Qwen2.5-VL from a Hub-layout directory (config.json + safetensors, single or sharded).

    The model is built on the meta device and each tensor is read from disk once, cast and moved
    straight to `device`; both key layouts are accepted; anything missing, unexpected or mis-shaped
    raises CheckpointError listing all of it.
    """
    config = read_config(path)
    device, dtype = default_device_dtype(device, dtype)
    with on_meta():
        model = model_class(config)(config)
    assign_weights(model, open_safetensors_dir(path), rename=hub_to_qvl, transform=_to_qvl_tensor,
                   device=device, dtype=dtype)
    return model.eval()


def hub_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under Hub names and shapes (Conv3d patch weight restored; tied lm_head omitted,
    as transformers does)."""
    v = model.config.vision
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and model.config.text.tie_word_embeddings:
            continue
        if key == PATCH_EMBED:
            t = t.reshape(t.shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        out[key] = t
    return out


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    added = json.loads(tokenizer_json.read_text()).get("added_tokens", [])
    return {t["content"]: t["id"] for t in added}


def save_pretrained(model, directory, tokenizer=None, max_shard_bytes: int = 5 * 1024**3,
                    min_pixels: int = 3136, max_pixels: int = 12845056,
                    eos_token_id: list[int] | None = None, pad_token_id: int | None = None) -> None:
    """Write a directory transformers 4.57 and qvl both load: config.json (flat Hub layout),
    safetensors under Hub names, generation_config.json, preprocessor_config.json, and the
    tokenizer files when `tokenizer` is given (a directory to copy from, or an object with
    `save_pretrained(dir)` / a `tokenizers.Tokenizer`). eos/pad default to the Qwen2 ids, or to the
    ids of <|im_end|> / <|endoftext|> in the given tokenizer."""
    import shutil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": dtype}, indent=2) + "\n")
    write_safetensors(hub_state_dict(model), directory, max_shard_bytes)

    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            src = Path(tokenizer)
            for name in TOKENIZER_FILES:
                if (src / name).exists() and src.resolve() != directory.resolve():
                    shutil.copy(src / name, directory / name)
        elif hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(directory))
        elif hasattr(tokenizer, "save"):  # a tokenizers.Tokenizer
            tokenizer.save(str(directory / "tokenizer.json"))
        else:
            raise TypeError(f"cannot save tokenizer of type {type(tokenizer).__name__}")
        _ensure_chat_template(directory / "tokenizer_config.json")
        if (directory / "tokenizer.json").exists():
            ids = _special_ids(directory / "tokenizer.json")
            if eos_token_id is None and "<|im_end|>" in ids:
                eos_token_id = [ids["<|im_end|>"]] + ([ids["<|endoftext|>"]] if "<|endoftext|>" in ids else [])
            if pad_token_id is None and "<|endoftext|>" in ids:
                pad_token_id = ids["<|endoftext|>"]
    generation = {"bos_token_id": config.bos_token_id,
                  "eos_token_id": eos_token_id if eos_token_id is not None else EOS_TOKEN_IDS,
                  "pad_token_id": pad_token_id if pad_token_id is not None else PAD_TOKEN_ID}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    v = config.vision
    processor = "Qwen2VLProcessor" if config.generation == "2" else "Qwen2_5_VLProcessor"
    preprocessor = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor,
                    "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": v.patch_size,
                    "temporal_patch_size": v.temporal_patch_size, "merge_size": v.spatial_merge_size,
                    "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True, "do_normalize": True,
                    "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 3}
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
