"""Chat serialisation: qwen-vl-utils style messages -> prompt text for each Qwen-VL generation.

Messages are what users already write for qwen-vl-utils (gen-1/utils reference §9.8):

    [{"role": "system", "content": "..."},                                     # optional
     {"role": "user", "content": [
         {"type": "image", "image": "file:///a.jpg", "max_pixels": 640 * 28 * 28},
         {"type": "video", "video": "clip.mp4", "fps": 1.0},                   # or a list of frames
         {"type": "image_url", "image_url": "https://..."},                    # or {"url": "..."}
         {"type": "text", "text": "What happens here?"}]},
     {"role": "assistant", "content": "..."}]                                  # plain strings allowed

* `vision_items`   - the media entries in order, with their per-item options (what media.py loads)
* `render_qwen2`   - the Qwen2-VL / Qwen2.5-VL chat template (reference §5.7), one pad per item
* `expand_pads`    - each pad -> t*h*w/4 copies (reference §5.6)
* `render_qwen_vl` - Qwen-VL gen 1 ChatML with `Picture N: <img>src</img>` (gen-1 reference §3.4, §6.1)
* `modality_spans` - which token ranges of a tokenised prompt belong to which image/video
"""

from __future__ import annotations

import re
from typing import Any, Sequence

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# Token ids in the shared Qwen2 vocabulary (reference §1.3) and Qwen-VL gen 1 (gen-1 reference §3.2).
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151655, 151656
GEN1_IMG_START_ID, GEN1_IMG_END_ID = 151857, 151858
GEN1_MAX_SOURCE_BYTES = 255  # 256 slots, but the remote code needs one <imgpad> left (gen-1 §3.3 quirk)

# Keys of a media entry that are the media itself / the item kind, not per-item options.
_SOURCE_KEYS = ("image", "image_url", "video")
_NON_OPTION_KEYS = {"type", "text", *_SOURCE_KEYS}


# ---------------------------------------------------------------------------------------------
# Reading messages
# ---------------------------------------------------------------------------------------------


def _content_items(message: dict) -> list[dict]:
    """A message's content as a list of items; a plain string is one text item."""
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def _item_kind(item: dict) -> str | None:
    """'image', 'video', 'text' or None (ignored), tested in the chat template's order (§5.7):
    an explicit type or the presence of the media key decides."""
    kind = item.get("type")
    if kind in ("image", "image_url") or "image" in item or "image_url" in item:
        return "image"
    if kind == "video" or "video" in item:
        return "video"
    if "text" in item:
        return "text"
    return None


def _source(item: dict) -> Any:
    """The media of an entry: `image` / `image_url` (a string or OpenAI-style {"url": ...}) / `video`."""
    for key in _SOURCE_KEYS:
        if key in item:
            src = item[key]
            return src["url"] if key == "image_url" and isinstance(src, dict) and "url" in src else src
    raise ValueError(f"media entry has no image/image_url/video key: {sorted(item)}")


def _conversations(messages) -> list[list[dict]]:
    """Accept one conversation (list of messages) or a batch of them (list of lists)."""
    if messages and isinstance(messages[0], (list, tuple)):
        return [list(m) for m in messages]
    return [list(messages)]


def vision_items(messages) -> list[dict]:
    """Media entries in order of appearance: [{"type": "image"|"video", "source": ..., "options": {...}}].

    `options` holds every other key of the entry (min_pixels, max_pixels, resized_height,
    resized_width, fps, nframes, min_frames, max_frames, video_start, video_end, total_pixels, ...),
    passed through unchanged for media.py. A batch (list of conversations) gives one flat list, in
    the order the processor consumes grids (reference §5.6).
    """
    out = []
    for conversation in _conversations(messages):
        for message in conversation:
            for item in _content_items(message):
                kind = _item_kind(item)
                if kind in ("image", "video"):
                    options = {k: v for k, v in item.items() if k not in _NON_OPTION_KEYS}
                    out.append({"type": kind, "source": _source(item), "options": options})
    return out


# ---------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL
# ---------------------------------------------------------------------------------------------


# `render_qwen2` written as a Jinja chat template, for tokenizer_config.json: transformers' apply_chat_template
# and serving engines render prompts from it. Same rules in the same order (the tests check both agree, and
# agree with the released checkpoints' template). No whitespace control: the template has no stray spaces, and
# `{%-` would eat the newlines after <|im_end|>.
QWEN2_CHAT_TEMPLATE = (
    "{% set n = namespace(images=0, videos=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set n.images = n.images + 1 %}"
    "{% if add_vision_id %}Picture {{ n.images }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set n.videos = n.videos + 1 %}"
    "{% if add_vision_id %}Video {{ n.videos }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_qwen2(messages: Sequence[dict], add_generation_prompt: bool = True, add_vision_id: bool = False) -> str:
    """The Qwen2-VL / Qwen2.5-VL chat template (identical for both, reference §5.7).

    * default system turn when the first message is not a system message;
    * each message `<|im_start|>{role}\\n{content}<|im_end|>\\n`, content items concatenated with
      no separators; an image is `<|vision_start|><|image_pad|><|vision_end|>` (one pad, expand
      later with `expand_pads`), a video the same with `<|video_pad|>`;
    * `Picture N: ` / `Video N: ` before each item when add_vision_id, N counted over the whole
      conversation per modality;
    * generation prompt `<|im_start|>assistant\\n`.
    """
    parts: list[str] = []
    n_images = n_videos = 0
    for i, message in enumerate(messages):
        if i == 0 and message["role"] != "system":
            parts.append(f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n")
        parts.append(f"{IM_START}{message['role']}\n")
        for item in _content_items(message):
            kind = _item_kind(item)
            if kind == "image":
                n_images += 1
                prefix = f"Picture {n_images}: " if add_vision_id else ""
                parts.append(f"{prefix}{VISION_START}{IMAGE_PAD}{VISION_END}")
            elif kind == "video":
                n_videos += 1
                prefix = f"Video {n_videos}: " if add_vision_id else ""
                parts.append(f"{prefix}{VISION_START}{VIDEO_PAD}{VISION_END}")
            elif kind == "text":
                parts.append(str(item["text"]))
        parts.append(f"{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def expand_pads(text: str, image_tokens: Sequence[int], video_tokens: Sequence[int]) -> str:
    """Replace the i-th `<|image_pad|>` with image_tokens[i] copies and the j-th `<|video_pad|>`
    with video_tokens[j] copies (t*h*w/4 each, reference §5.6). Counts must match exactly.

    For a batch, join the texts' item counts in batch order (the processor's order) and call once
    per text with its own slice.
    """
    pieces = re.split(f"({re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)})", text)
    n_img = pieces.count(IMAGE_PAD)
    n_vid = pieces.count(VIDEO_PAD)
    if n_img != len(image_tokens) or n_vid != len(video_tokens):
        raise ValueError(
            f"the text has {n_img} image and {n_vid} video placeholders, but token counts were given "
            f"for {len(image_tokens)} images and {len(video_tokens)} videos"
        )
    images, videos = iter(image_tokens), iter(video_tokens)
    out = []
    for piece in pieces:
        if piece == IMAGE_PAD:
            out.append(IMAGE_PAD * int(next(images)))
        elif piece == VIDEO_PAD:
            out.append(VIDEO_PAD * int(next(videos)))
        else:
            out.append(piece)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Qwen-VL (gen 1)
# ---------------------------------------------------------------------------------------------


def gen1_image_reference(source: Any, index: int, max_bytes: int = GEN1_MAX_SOURCE_BYTES) -> str:
    """What goes between `<img>` and `</img>` for gen 1: the path or URL itself when it is a string
    that fits the usable byte slots (255 of 256 for the released models, gen-1 §3.3; fewer for a
    tiny model with fewer resampler queries), otherwise the placeholder `image-{index}`.

    index is the 1-based position of the image in `vision_items(messages)`; the gen-1 tokenizer
    and model map a placeholder back to that entry (in-memory PIL/numpy/bytes images, data URLs).
    """
    if isinstance(source, str) and len(source.encode("utf-8")) <= max_bytes:
        return source
    return f"image-{index}"


def render_qwen_vl(messages: Sequence[dict], add_generation_prompt: bool = True,
                   max_source_bytes: int = GEN1_MAX_SOURCE_BYTES) -> str:
    """Qwen-VL (gen 1) ChatML prompt (gen-1 reference §6.1, `make_context` with chat_format chatml).

    * system turn: the given system message, else "You are a helpful assistant.";
    * each message `<|im_start|>{role}\\n{content}<|im_end|>\\n` (make_context's joins give exactly
      this layout);
    * content items in order, as `from_list_format` writes them (§3.4): an image becomes
      `Picture k: <img>{src}</img>\\n` (the web-demo/README form, with a space; k restarts at 1 in
      each message because each query is formatted on its own), text is inserted verbatim;
    * the `<img>..</img>` span is expanded to 256 slots by the gen-1 tokenizer, not here.
    Gen 1 has no video input: a video item raises ValueError.
    """
    parts: list[str] = []
    start = 0
    if messages and messages[0]["role"] == "system":
        if vision_items([messages[0]]):
            raise ValueError("Qwen-VL (gen 1) takes images in user/assistant turns, not in the system message")
        system = "".join(str(it["text"]) for it in _content_items(messages[0]) if _item_kind(it) == "text")
        start = 1
    else:
        system = DEFAULT_SYSTEM
    parts.append(f"{IM_START}system\n{system}{IM_END}\n")
    n_seen = 0  # images so far in the whole conversation = index into vision_items(messages)
    for message in messages[start:]:
        body, k = [], 0
        for item in _content_items(message):
            kind = _item_kind(item)
            if kind == "image":
                k += 1
                n_seen += 1
                body.append(f"Picture {k}: <img>{gen1_image_reference(_source(item), n_seen, max_source_bytes)}</img>\n")
            elif kind == "video":
                raise ValueError("Qwen-VL (gen 1) has no video input; use Qwen2-VL or Qwen2.5-VL for video")
            elif kind == "text":
                body.append(str(item["text"]))
        parts.append(f"{IM_START}{message['role']}\n{''.join(body)}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Token spans per modality (for colouring a token stream)
# ---------------------------------------------------------------------------------------------


def _runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of token_id."""
    runs, start = [], None
    for i, tok in enumerate(ids + [None]):
        if tok == token_id and start is None:
            start = i
        elif tok != token_id and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _split(runs: list[tuple[int, int]], sizes: Sequence[int] | None) -> list[tuple[int, int]]:
    """Cut runs into items of the given token counts (items written back to back share one run)."""
    if sizes is None:
        return runs
    out, sizes = [], list(sizes)
    for start, end in runs:
        while start < end:
            if not sizes:
                raise ValueError("more placeholder tokens than the given item sizes")
            size = int(sizes.pop(0))
            out.append((start, start + size))
            start += size
        if start != end:
            raise ValueError("an item straddles the end of a placeholder run")
    if sizes:
        raise ValueError(f"{len(sizes)} items have no placeholder tokens")
    return out


def modality_spans(
    input_ids,
    *,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    image_tokens: Sequence[int] | None = None,
    video_tokens: Sequence[int] | None = None,
    gen1: bool = False,
) -> list[dict]:
    """Cover one tokenised sequence with spans {"type": "text"|"image"|"video", "index": i,
    "start": s, "end": e} ([start, end) token positions; index = item number within its modality,
    counted from 0, or None for text). Markers like `<|vision_start|>` count as text (§5.6).

    Gen 2/2.5: an item is a run of its pad token; pass image_tokens / video_tokens (per-item counts)
    to split items written back to back. Gen 1 (gen1=True): an image is the 256 slots strictly
    between `<img>` (151857) and `</img>` (151858).
    """
    ids = [int(t) for t in (input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids)]
    visual: list[tuple[int, int, str, int]] = []
    if gen1:
        opens = [i for i, t in enumerate(ids) if t == GEN1_IMG_START_ID]
        closes = [i for i, t in enumerate(ids) if t == GEN1_IMG_END_ID]
        if len(opens) != len(closes):
            raise ValueError(f"{len(opens)} <img> but {len(closes)} </img> tokens")
        visual = [(a + 1, b, "image", k) for k, (a, b) in enumerate(zip(opens, closes))]
    else:
        for kind, tok, sizes in (("image", image_token_id, image_tokens), ("video", video_token_id, video_tokens)):
            visual += [(s, e, kind, k) for k, (s, e) in enumerate(_split(_runs(ids, tok), sizes))]
    visual.sort()
    spans, pos = [], 0
    for start, end, kind, index in visual:
        if start > pos:
            spans.append({"type": "text", "index": None, "start": pos, "end": start})
        spans.append({"type": kind, "index": index, "start": start, "end": end})
        pos = end
    if pos < len(ids):
        spans.append({"type": "text", "index": None, "start": pos, "end": len(ids)})
    return spans
