"""`qvl.load(path)` -> a `VLM`: one object with the model, its tokenizer and the chat glue.

    vlm = qvl.load("Qwen/Qwen2.5-VL-3B-Instruct directory")
    batch = vlm.prepare(messages)            # token ids, pixels, grids, positions, media spans
    reply = vlm.chat(messages)               # greedy by default; temperature/top_k/top_p/... to sample
    for piece in vlm.stream(messages): ...   # text as it is generated

`load` reads config.json's `model_type` ("qwen2_vl", "qwen2_5_vl", or Qwen-VL's "qwen") and
dispatches to the generation's loader; it also reads the stop ids (generation_config.json) and the
image pixel bounds (preprocessor_config.json). Everything else is plain functions elsewhere:
media loading in `qvl.media`, templates in `qvl.chat`, positions in `qvl.positions`, the decode
loop in `qvl.generate`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Iterator

import torch

from qvl import chat as chat_format
from qvl import media
from qvl.generate import Batch, MediaItem, generate, prompt_positions, stream, trim

# Options a media entry may carry, per loader (anything else in the entry is ignored).
_IMAGE_OPTIONS = set(inspect.signature(media.process_image).parameters) - {"src"}
_VIDEO_OPTIONS = set(inspect.signature(media.process_video).parameters) - {"src"}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _gen1_source_bytes(tokenizer) -> int:
    # A path must leave one slot for the <imgpad> that ends it (gen-1 §3.3); tiny models have
    # fewer than 256 slots, longer paths become the placeholder image-N.
    return tokenizer.image_span - 1


def encode(conversations, generation: str, tokenizer, config, *, add_generation_prompt: bool = True,
           add_vision_id: bool = False, min_pixels: int | None = None, max_pixels: int | None = None):
    """Conversations -> (token id rows, media items per row, vision kwargs for `model.embed`), unpadded.

    Needs no weights: the trainer's collator calls it too, so training and inference build the
    prompt the same way. min/max_pixels are image defaults that an item's own options override.
    """
    if generation == "1":
        return _encode_gen1(conversations, tokenizer, config, add_generation_prompt)
    return _encode_qwen2(conversations, tokenizer, config, add_generation_prompt, add_vision_id,
                         min_pixels, max_pixels)


def _encode_qwen2(conversations, tok, cfg, add_generation_prompt, add_vision_id, min_pixels, max_pixels):
    image_defaults = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    rows, media_rows = [], []
    images, videos = [], []
    for conv in conversations:
        counts = {"image": [], "video": []}
        loaded = []
        for entry in chat_format.vision_items(conv):
            opts = entry["options"]
            if entry["type"] == "image":
                kw = {**image_defaults, **{k: v for k, v in opts.items() if k in _IMAGE_OPTIONS}}
                x = media.process_image(entry["source"], **kw)
                images.append(x)
                n = x.image_tokens
            else:
                kw = {k: v for k, v in opts.items() if k in _VIDEO_OPTIONS}
                x = media.process_video(entry["source"], **kw)
                videos.append(x)
                n = x.video_tokens
            counts[entry["type"]].append(n)
            loaded.append((entry["type"], x))
        text = chat_format.render_qwen2(conv, add_generation_prompt, add_vision_id)
        ids = tok.encode(chat_format.expand_pads(text, counts["image"], counts["video"]))
        spans = chat_format.modality_spans(
            ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            image_tokens=counts["image"], video_tokens=counts["video"],
        )
        spans = [s for s in spans if s["type"] != "text"]
        items = []
        for s, (kind, x) in zip(spans, loaded):  # spans are in token order = order of appearance
            info = {}
            if kind == "video":
                info = {"timestamps": x.timestamps, "frame_indices": x.frame_indices,
                        "sampled_fps": x.sampled_fps, "second_per_grid_t": x.second_per_grid_t}
            items.append(MediaItem(kind, 0, s["start"], s["end"], tuple(x.grid_thw),
                                   tuple(x.original_size), tuple(x.resized_size), info))
        rows.append(ids)
        media_rows.append(items)
    vision = {}
    if images:
        vision["pixel_values"] = torch.cat([x.pixel_values for x in images])
        vision["image_grid_thw"] = torch.tensor([x.grid_thw for x in images], dtype=torch.long)
    if videos:
        vision["pixel_values_videos"] = torch.cat([x.pixel_values for x in videos])
        vision["video_grid_thw"] = torch.tensor([x.grid_thw for x in videos], dtype=torch.long)
        vision["second_per_grid_ts"] = [x.second_per_grid_t for x in videos]
    return rows, media_rows, vision


def _encode_gen1(conversations, tok, cfg, add_generation_prompt):
    size = cfg.vision.image_size
    rows, media_rows, pixels = [], [], []
    for conv in conversations:
        items = []
        for entry in chat_format.vision_items(conv):
            if entry["type"] != "image":
                raise ValueError("Qwen-VL (gen 1) has no video input; use Qwen2-VL or Qwen2.5-VL for video")
            img = media.load_image(entry["source"])
            pixels.append(media.process_image_gen1(img, image_size=size))
            items.append(MediaItem("image", 0, 0, 0, None, (img.height, img.width), (size, size)))
        # The <img>…</img> reference in the text becomes n_queries slots in the tokenizer (gen-1 §3.3).
        ids = tok.encode(chat_format.render_qwen_vl(conv, add_generation_prompt, _gen1_source_bytes(tok)))
        opens = [i for i, t in enumerate(ids) if t == tok.img_start_id]
        closes = [i for i, t in enumerate(ids) if t == tok.img_end_id]
        for it, a, b in zip(items, opens, closes):
            it.start, it.end = a + 1, b  # the slots strictly between the tags
        rows.append(ids)
        media_rows.append(items)
    vision = {"images": torch.stack(pixels)} if pixels else {}
    return rows, media_rows, vision


class VLM:
    """A loaded model of any generation, with its tokenizer, stop ids and media defaults."""

    def __init__(self, model, tokenizer, *, stop_ids, pad_id, min_pixels=None, max_pixels=None,
                 generation_config=None, path=None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.generation = model.generation  # "1", "2" or "2.5"
        self.stop_ids = list(stop_ids)
        self.pad_id = int(pad_id)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels  # image bounds (None = media defaults)
        self.generation_config = generation_config or {}  # the raw generation_config.json, for reference
        self.path = path

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"VLM(generation={self.generation!r}, params={n / 1e6:.1f}M, path={self.path!r})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- prompt -------------------------------------------------------------------------------

    def prepare(self, messages, *, add_generation_prompt: bool = True, add_vision_id: bool = False,
                min_pixels: int | None = None, max_pixels: int | None = None) -> Batch:
        """Messages (one conversation, or a list of conversations) -> a left-padded Batch on the model's device.

        Media are loaded and resized per item: an entry's own min_pixels/max_pixels/fps/nframes/...
        win over this call's min_pixels/max_pixels (images only), which win over the checkpoint's
        preprocessor_config.json, which wins over the qwen-vl-utils defaults in `qvl.media`.
        """
        conversations = chat_format._conversations(messages)
        rows, media_rows, vision = encode(
            conversations, self.generation, self.tokenizer, self.config,
            add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id,
            min_pixels=self.min_pixels if min_pixels is None else min_pixels,
            max_pixels=self.max_pixels if max_pixels is None else max_pixels)
        # Left padding: generation appends on the right, so every row's last token is real.
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        media_items = []
        for b, (ids, items) in enumerate(zip(rows, media_rows)):
            pad = T - len(ids)
            input_ids[b, pad:] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, pad:] = 1
            for it in items:
                it.row, it.start, it.end = b, it.start + pad, it.end + pad
                media_items.append(it)
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        vision = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vision.items()}
        positions, deltas = prompt_positions(self.model, input_ids, attention_mask, vision)
        texts = [self._render(c, add_generation_prompt, add_vision_id) for c in conversations]
        return Batch(input_ids, attention_mask, vision, positions, deltas, media_items, texts)

    def _render(self, conversation, add_generation_prompt, add_vision_id) -> str:
        if self.generation == "1":
            return chat_format.render_qwen_vl(conversation, add_generation_prompt, _gen1_source_bytes(self.tokenizer))
        return chat_format.render_qwen2(conversation, add_generation_prompt, add_vision_id)

    # ---- generation ---------------------------------------------------------------------------

    def _gen_kwargs(self, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        kwargs.setdefault("stop_ids", self.stop_ids)
        kwargs.setdefault("pad_id", self.pad_id)
        return kwargs

    def generate(self, batch: Batch, max_new_tokens: int = 512, **kwargs) -> torch.Tensor:
        """New tokens [B, N] (see `qvl.generate.generate` for the sampling options)."""
        with torch.inference_mode():
            return generate(self.model, batch, max_new_tokens, **self._gen_kwargs(kwargs))

    def chat(self, messages, max_new_tokens: int = 512, **kwargs) -> str | list[str]:
        """The assistant's reply (greedy unless temperature > 0); a list of replies for a batch.

        Special tokens other than the stop token stay in the text, so grounding markup
        (`<|box_start|>`, `<ref>`...) reaches `qvl.grounding.parse`.
        """
        batch = self.prepare(messages)
        kwargs = self._gen_kwargs(kwargs)
        tokens = self.generate(batch, max_new_tokens, **kwargs)
        replies = [self.decode(row) for row in trim(tokens, kwargs["stop_ids"])]
        return replies if _is_batch(messages) else replies[0]

    def decode(self, ids) -> str:
        """Token ids -> text, special tokens kept. Ids of the model's padding rows (beyond the
        tokenizer, reachable only by an untrained model) are dropped, as the Qwen2 tokenizer does."""
        n = len(self.tokenizer)
        return self.tokenizer.decode([int(i) for i in ids if 0 <= int(i) < n])

    def stream(self, messages, max_new_tokens: int = 512, **kwargs) -> Iterator[str]:
        """Text pieces of the reply to one conversation, as they are generated (whole characters only)."""
        batch = self.prepare(messages)
        # no `with` block here: a context manager around a yield would stay active in the caller's
        # code between pieces; `qvl.generate.stream` disables grad per step instead.
        yield from stream(self.model, batch, self.tokenizer, max_new_tokens, **self._gen_kwargs(kwargs))


def _is_batch(messages) -> bool:
    return bool(messages) and isinstance(messages[0], (list, tuple))  # a list of conversations


def load(path, device=None, dtype=None) -> VLM:
    """Load a checkpoint directory of any generation: Qwen-VL ("qwen"), Qwen2-VL, Qwen2.5-VL.

    device defaults to CUDA when available; dtype to bf16 on CUDA and fp32 on CPU.
    """
    from qvl.checkpoint import default_device_dtype

    path = Path(path)
    config = _read_json(path / "config.json")
    if not config:
        raise FileNotFoundError(f"{path}: no config.json")
    model_type = config.get("model_type")
    gen_config = _read_json(path / "generation_config.json")
    device, dtype = default_device_dtype(device, dtype)

    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        from qvl.checkpoint import load_model
        from qvl.tokenizer import Tokenizer

        model = load_model(path, device=device, dtype=dtype)
        tokenizer = Tokenizer.from_file(path)
        stop_ids = _ids(gen_config.get("eos_token_id")) or tokenizer.eos_ids
        pad_id = gen_config.get("pad_token_id", tokenizer.pad_id)
        pre = _read_json(path / "preprocessor_config.json")
        size = pre.get("size") or {}  # newer processors store the bounds as size.{shortest,longest}_edge
        min_pixels = pre.get("min_pixels", size.get("shortest_edge"))
        max_pixels = pre.get("max_pixels", size.get("longest_edge"))
    elif model_type == "qwen":
        from qvl.models.qwen_vl import load_qwen_vl
        from qvl.tokenizer_qwen_vl import QwenVLTokenizer

        model = load_qwen_vl(path, device=device, dtype=dtype)
        tokenizer = QwenVLTokenizer.from_dir(path)
        # ChatML stops on <|im_end|> / <|im_start|> (stop_words_ids) and on eod (eos_token_id), §6.2.
        words = [w[0] for w in gen_config.get("stop_words_ids", []) if len(w) == 1]
        stop_ids = list(dict.fromkeys(words + _ids(gen_config.get("eos_token_id")))) or [
            tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
        pad_id = gen_config.get("pad_token_id", tokenizer.eod_id)
        min_pixels = max_pixels = None  # gen 1 always resizes to a fixed square
    else:
        raise ValueError(f"{path}: model_type {model_type!r} is not a Qwen-VL family model "
                         "(expected 'qwen2_vl', 'qwen2_5_vl' or 'qwen')")
    return VLM(model, tokenizer, stop_ids=stop_ids, pad_id=pad_id, min_pixels=min_pixels,
               max_pixels=max_pixels, generation_config=gen_config, path=str(path))
