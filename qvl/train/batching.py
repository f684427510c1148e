"""Samples -> padded training batches: token ids, vision inputs, positions, labels, loss masks, dense targets.

Rendering, tokenising and media processing are *not* re-implemented here: `Collator` calls the same
code `qvl.api.VLM.prepare` runs (`qvl.api.encode`, which needs no weights), so a training batch is
tokenised exactly like an inference prompt. Then it differs from `prepare` in three ways:

* the conversation is rendered with its answers (`add_generation_prompt=False`);
* rows are padded on the *right*: every real token then only ever sees real tokens under the causal
  mask, so the model needs no pad mask (plain causal SDPA), and the M-RoPE ids of the real tokens are
  the ones each row would have alone (`mrope_position_ids` takes the attention mask);
* `labels[b, t]` is the target of position t, i.e. token t+1, or IGNORE.

Which tokens are targets (`loss`):
* "assistant" (SFT, DPO, the text drills): the assistant turns' content and their `<|im_end|>`, nothing
  else -- Qwen-VL's finetune.py masks system/user text and the "assistant\\n" header (§6.4); the model must
  still learn to emit `<|im_end|>`, since generation stops on it.
* "text" (pre-training stages 1 and 2): every text token except the vision placeholders (and the token
  that would have to predict one). Qwen-VL trains its pre-training stages by "minimising the cross-entropy
  of the text tokens" (arXiv 2308.12966 §3.2); the placeholders are overwritten by vision features, so
  predicting them is meaningless. The system/user text of our chat-formatted pre-training samples is
  template text, cheap to learn, and a few tokens of it (which shape is asked about) carry image signal.

Dense vision targets (`dense=True`, the vision pre-training stand-in, see `dense_targets`) are per vision
*token*: per 28x28 merge unit for Qwen2/2.5-VL (the merger's outputs), per resampler query for Qwen-VL
(its 8x8 queries carry a fixed 2-D sin-cos position, §2.5, so query (i, j) is asked about cell (i, j)).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from types import SimpleNamespace

import torch

from qvl.api import encode
from qvl.data.video import ClipConfig
from qvl.data.world import COLORS, KINDS, WORDS
from qvl.generate import prompt_positions

IGNORE = -100
# How the LM loss averages over target tokens (`Stage.weighting`):
#   token   the mean over every target token of the batch (the plain causal-LM loss);
#   answer  each assistant turn weighs the same, its tokens share it (1 / n each);
#   sqrt    "square averaging", 1 / sqrt(n) per token (the InternVL 2.5 report, arXiv 2412.05271, reweights its loss so
#           for responses of varied length). Measured here: with the token mean, a stage-2 batch gives grounding's ~39-token JSON answers
#           52 % of the loss and captions 32 %, while a colour or shape answer (one word + <|im_end|>) gets ~1.5 %
#           per task -- 13 % and 10 % of the samples (docs/training_log.md, session 5).
WEIGHTINGS = ("token", "answer", "sqrt")

# Dense classes: 0 background, 1 text, 2 + colour * len(KINDS) + kind for a shape.
N_DENSE_CLASSES = 2 + len(COLORS) * len(KINDS)
LETTERS = sorted(set("".join(w for ws in WORDS.values() for w in ws)) | set("0123456789"))
N_LETTERS = 1 + len(LETTERS)  # 0 = no letter under this cell
_LETTER_ID = {c: i + 1 for i, c in enumerate(LETTERS)}
_COLOR_ID = {c: i for i, c in enumerate(COLORS)}
_KIND_ID = {k: i for i, k in enumerate(KINDS)}
# Count targets per image: shapes in all, of each colour, of each kind -- what the count questions ask
# (qvl.data.tasks.ask_count), each a class 0..MAX_COUNT (more is clipped; scenes hold at most 4 shapes).
N_COUNTS = 1 + len(COLORS) + len(KINDS)
MAX_COUNT = 4


class Collator:
    """Callable: list[Sample] (or list of message lists) -> batch dict of tensors.

    gen1_image_size overrides Qwen-VL's fixed input size (stage 1 runs at half size, §8.1); gen 2/2.5
    resolution comes from each image item's own min_pixels/max_pixels (the stage's DataConfig)."""

    def __init__(self, generation: str, tokenizer, config, loss: str = "text", dense: bool = False,
                 gen1_image_size: int | None = None, weighting: str = "token", boxes: bool = False,
                 counts: bool = False):
        if loss not in ("text", "assistant"):
            raise ValueError(f"loss must be 'text' or 'assistant', got {loss!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting, self.boxes, self.counts = weighting, boxes, counts
        self.generation, self.tokenizer, self.loss, self.dense = str(generation), tokenizer, loss, dense
        if self.generation == "1" and gen1_image_size:
            config = replace(config, vision=replace(config.vision, image_size=gen1_image_size))
        self.config = config
        self.pad_id = tokenizer.eod_id if self.generation == "1" else tokenizer.pad_id
        self.spec = SimpleNamespace(generation=self.generation, config=config)  # what prompt_positions reads
        self.im_start, self.im_end = tokenizer.im_start_id, tokenizer.im_end_id
        self.header = [self.im_start] + tokenizer.encode("assistant\n")
        if self.generation == "1":
            self.placeholder_ids = None
        else:
            self.placeholder_ids = torch.tensor([config.image_token_id, config.video_token_id])

    # ---- tokens ---------------------------------------------------------------------------------

    def encode(self, conversations):
        """Rows of ids, media items per row, vision kwargs (what VLM.prepare computes, unpadded)."""
        return encode(conversations, self.generation, self.tokenizer, self.config, add_generation_prompt=False)

    def assistant_mask(self, ids: list[int]) -> list[bool]:
        """True on each assistant turn's content tokens and its closing <|im_end|>."""
        mask = [False] * len(ids)
        h = len(self.header)
        i = 0
        while i <= len(ids) - h:
            if ids[i:i + h] == self.header:
                j = i + h
                while j < len(ids) and ids[j] != self.im_end:
                    mask[j] = True
                    j += 1
                if j < len(ids):
                    mask[j] = True  # <|im_end|>
                i = j + 1
            else:
                i += 1
        return mask

    def answer_weights(self, mask: list[bool]) -> list[float]:
        """Per target token: 1 / n (`answer`) or 1 / sqrt(n) (`sqrt`) for a token of an n-token assistant turn,
        so a turn's tokens together weigh 1 (or sqrt(n)) whatever its length; 0 elsewhere."""
        out = [0.0] * len(mask)
        i = 0
        while i < len(mask):
            if not mask[i]:
                i += 1
                continue
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            n = j - i
            w = 1.0 / n if self.weighting == "answer" else n ** -0.5
            out[i:j] = [w] * n
            i = j
        return out

    def text_mask(self, ids: torch.Tensor, items) -> torch.Tensor:
        """True on every token that is not a vision placeholder."""
        if self.generation == "1":
            mask = torch.ones(len(ids), dtype=torch.bool)
            for it in items:
                mask[it.start:it.end] = False  # the slots strictly between <img> and </img>
            return mask
        return ~torch.isin(ids, self.placeholder_ids)

    def __call__(self, samples) -> dict:
        conversations = [s.messages if hasattr(s, "messages") else s for s in samples]
        rows, media_rows, vision = self.encode(conversations)
        B, T = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        targets = torch.zeros((B, T), dtype=torch.bool)  # token t is a target (predicted from t-1)
        weights = torch.zeros((B, T)) if self.weighting != "token" else None
        for b, (ids, items) in enumerate(zip(rows, media_rows)):
            row = torch.tensor(ids, dtype=torch.long)
            input_ids[b, :len(ids)] = row
            attention_mask[b, :len(ids)] = 1
            if self.loss == "assistant":
                mask = self.assistant_mask(ids)
                targets[b, :len(ids)] = torch.tensor(mask)
                if weights is not None:
                    weights[b, :len(ids)] = torch.tensor(self.answer_weights(mask))
            else:
                targets[b, :len(ids)] = self.text_mask(row, items)
        targets[:, 0] = False  # nothing predicts the first token
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        labels[:, :-1] = torch.where(targets[:, 1:], input_ids[:, 1:], IGNORE)
        positions, _ = prompt_positions(self.spec, input_ids, attention_mask, vision)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "positions": positions, "vision": vision}
        if weights is not None and self.loss == "assistant":
            label_weights = torch.zeros((B, T))
            label_weights[:, :-1] = torch.where(targets[:, 1:], weights[:, 1:], 0.0)
            batch["label_weights"] = label_weights
        if self.dense:
            batch.update(self.dense_batch(samples, media_rows))
        if self.boxes:
            batch.update(self.box_batch(input_ids, labels, media_rows))
        return batch

    # ---- box targets at the answer (qvl.train.loop.AnswerBoxHead) ------------------------------------

    def box_batch(self, input_ids: torch.Tensor, labels: torch.Tensor, media_rows) -> dict:
        """Per number of each box the answers write: `box_at` [K, 2] = (row, position of the state that
        predicts the number's first digit), `box_k` [K] = 0-3 (x1 y1 x2 y2), `box_target` [K] = the number over
        the side it measures -- 1000 for gens 1 / 2 (normalised), the resized image's width or height in pixels
        for gen 2.5 (absolute coordinates, §4.2 of the 2.5 report). A video "when" answer ("1.5 seconds") adds
        number k = 4, its seconds / TIME_SCALE: absolute time, as M-RoPE's temporal ids carry it in gen 2.5."""
        at, ks, targets = [], [], []
        for b, items in enumerate(media_rows):
            images = [it for it in items if it.kind == "image"]
            if self.generation == "2.5":
                if len(images) != 1:  # one image whose pixels the numbers count (no box on videos)
                    continue
                _, h, w = images[0].grid_thw
                p = self.config.vision.patch_size
                side = (w * p, h * p, w * p, h * p)
            else:
                side = (1000.0,) * 4
            for box in answer_boxes(input_ids[b], labels[b], self.tokenizer, self.generation):
                for k, (i, value) in enumerate(box):
                    at.append((b, i - 1))
                    ks.append(k)
                    targets.append(value / side[k])
        for b, items in enumerate(media_rows):  # "when" answers: the event's second, number k = 4
            if any(it.kind == "video" for it in items):
                for i, seconds in answer_times(input_ids[b], labels[b], self.tokenizer):
                    at.append((b, i - 1))
                    ks.append(TIME_K)
                    targets.append(seconds / TIME_SCALE)
        return {"box_at": torch.tensor(at, dtype=torch.long).reshape(-1, 2), "box_k": torch.tensor(ks, dtype=torch.long),
                "box_target": torch.tensor(targets, dtype=torch.float32)}

    # ---- dense vision targets ------------------------------------------------------------------

    def token_grids(self, media_rows) -> list[tuple[int, int]]:
        """(rows, cols) of vision tokens per image, in feature order."""
        grids = []
        for items in media_rows:
            for it in items:
                if it.kind != "image":
                    continue
                if self.generation == "1":
                    side = int(round(self.config.vision.n_queries ** 0.5))
                    grids.append((side, side))
                else:
                    _, h, w = it.grid_thw
                    m = self.config.vision.spatial_merge_size
                    grids.append((h // m, w // m))
        return grids

    def dense_batch(self, samples, media_rows) -> dict:
        grids = self.token_grids(media_rows)
        scenes = [s.scene for s in samples if getattr(s, "scene", None) is not None]
        if len(scenes) != len(grids):
            raise ValueError(f"dense targets need one scene per image: {len(scenes)} scenes, {len(grids)} images")
        parts = [dense_targets(sc, g) for sc, g in zip(scenes, grids)]
        if not parts:
            return {}
        classes = [shape_classes(sc) for sc in scenes]
        out = stack_dense(parts, classes)
        if self.counts:  # only a stage with Stage.count_weight reads them
            out["dense_count"] = torch.cat([scene_counts(sc).expand(len(p[0]), -1) for sc, p in zip(scenes, parts)])
        if self.generation == "1":  # also per ViT patch: the resampler's queries start out non-spatial
            side = self.config.vision.image_size // self.config.vision.patch_size
            out.update(stack_dense([dense_targets(sc, (side, side)) for sc in scenes], classes, "dense_patch_"))
        return out


def shape_classes(scene) -> torch.Tensor:
    """Colour x kind class of each shape in `scene.shapes`, counted from 0 (the dense class minus 2)."""
    return torch.tensor([_COLOR_ID[s.color] * len(KINDS) + _KIND_ID[s.kind] for s in scene.shapes], dtype=torch.long)


def scene_counts(scene) -> torch.Tensor:
    """[N_COUNTS]: how many shapes the scene holds, then per colour (COLORS order), then per kind (KINDS)."""
    n = torch.zeros(N_COUNTS, dtype=torch.long)
    n[0] = len(scene.shapes)
    for s in scene.shapes:
        n[1 + _COLOR_ID[s.color]] += 1
        n[1 + len(COLORS) + _KIND_ID[s.kind]] += 1
    return n.clamp_(max=MAX_COUNT)


def dense_targets(scene, grid: tuple[int, int]):
    """Per vision token of one image: class, letter, object box, shape index.
    -> (cls [N], letter [N], box [N, 4], obj [N]).

    Token (i, j) of a rows x cols grid sees the cell [j/cols, (j+1)/cols) x [i/rows, (i+1)/rows) of the image
    (both resizes -- smart_resize and gen 1's square -- scale each axis uniformly). The cell's object is the
    one whose box covers most of it, if that covers >= 25 % of the cell or >= 40 % of the object (so a small
    shape still owns one cell). Box = the object's (x1, y1, x2, y2) / (w, h), in [0, 1]; NaN for background.
    Letter = the character of a word under the cell's centre, assuming evenly spaced glyphs (an approximation:
    the measured prototype's letter head reached 63 % with the same target). Obj = the index in
    `scene.shapes` of the shape that owns the cell, -1 for text and background cells."""
    rows, cols = grid
    H, W = scene.height, scene.width
    ys = np.arange(rows + 1) * H / rows
    xs = np.arange(cols + 1) * W / cols
    cy1, cx1 = np.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    cy2, cx2 = np.meshgrid(ys[1:], xs[1:], indexing="ij")
    cells = np.stack([cx1.ravel(), cy1.ravel(), cx2.ravel(), cy2.ravel()], 1)  # [N, 4]
    objects = [(2 + int(c), s.box, None) for c, s in zip(shape_classes(scene), scene.shapes)]
    objects += [(1, t.box, t.text) for t in scene.texts]
    n = len(cells)
    cls = np.zeros(n, np.int64)
    letter = np.zeros(n, np.int64)
    box = np.full((n, 4), np.nan, np.float32)
    obj = np.full(n, -1, np.int64)
    if objects:
        boxes = np.array([o[1] for o in objects], np.float64)  # [M, 4]
        ix = np.clip(np.minimum(cells[:, None, 2], boxes[None, :, 2]) - np.maximum(cells[:, None, 0], boxes[None, :, 0]), 0, None)
        iy = np.clip(np.minimum(cells[:, None, 3], boxes[None, :, 3]) - np.maximum(cells[:, None, 1], boxes[None, :, 1]), 0, None)
        inter = ix * iy  # [N, M]
        cell_area = ((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1]))[:, None]
        obj_area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None, :]
        owns = (inter >= 0.25 * cell_area) | (inter >= 0.4 * obj_area)
        score = np.where(owns & (inter > 0), inter, -1.0)
        best = score.argmax(1)
        hit = score[np.arange(n), best] > 0
        for k in np.nonzero(hit)[0]:
            c, b, text = objects[best[k]]
            cls[k] = c
            box[k] = (b[0] / W, b[1] / H, b[2] / W, b[3] / H)
            if best[k] < len(scene.shapes):  # shapes come first in `objects`
                obj[k] = best[k]
            if text:
                cx = (cells[k, 0] + cells[k, 2]) / 2
                pos = int((cx - b[0]) / max(b[2] - b[0], 1) * len(text))
                letter[k] = _LETTER_ID.get(text[min(max(pos, 0), len(text) - 1)], 0)
    return torch.from_numpy(cls), torch.from_numpy(letter), torch.from_numpy(box), torch.from_numpy(obj)


def stack_dense(parts, classes, prefix: str = "dense_") -> dict:
    """Concatenate per-image dense targets; shape indices become batch-wide (image i's shapes follow image
    i-1's), with one colour x kind class per batch shape (`{prefix}obj_cls`)."""
    objs, offset = [], 0
    for p, c in zip(parts, classes):
        objs.append(torch.where(p[3] >= 0, p[3] + offset, p[3]))
        offset += len(c)
    return {f"{prefix}cls": torch.cat([p[0] for p in parts]), f"{prefix}letter": torch.cat([p[1] for p in parts]),
            f"{prefix}box": torch.cat([p[2] for p in parts]), f"{prefix}obj": torch.cat(objs),
            f"{prefix}obj_cls": torch.cat(classes)}


def to_device(batch: dict, device) -> dict:
    """Move every tensor (also inside `vision`) to device; lists (second_per_grid_ts) stay."""
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v
    return {k: move(v) for k, v in batch.items()}


def embed_kwargs(vision: dict) -> dict:
    """The model's embed() keywords: `second_per_grid_ts` only feeds the positions."""
    return {k: v for k, v in vision.items() if k != "second_per_grid_ts" and v is not None}


def _answer_text(ids: torch.Tensor, labels: torch.Tensor, tokenizer) -> dict[int, str]:
    """{index: decoded token} of one row's labelled (answer) tokens, in order."""
    return {i: tokenizer.decode([int(ids[i])]) for i in (labels != IGNORE).nonzero().flatten().tolist()}


def _numbers(text: dict[int, str]) -> list[tuple[int, int]]:
    def wordy(i: int, side: int) -> bool:  # does token i's neighbour touch it with a letter or "_"?
        t = text.get(i + side, "")
        c = t[:1] if side > 0 else t[-1:]
        return c.isalpha() or c == "_"

    runs: list[list[int]] = []
    for i, t in text.items():
        if t.strip().isdigit():
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return [(r[0], int("".join(text[i].strip() for i in r))) for r in runs
            if not (wordy(r[0], -1) or wordy(r[-1], 1))]


def answer_numbers(ids: torch.Tensor, labels: torch.Tensor, tokenizer) -> list[tuple[int, int]]:
    """(index of the first digit, value) of each number in one row's labelled (answer) tokens. Qwen tokenizers
    split digits one per token, so a number is a run of consecutive digit tokens (a box's x1 y1 x2 y2 in
    either generation's notation) -- unless a letter or "_" touches it: the "2" of gen 2.5's `"bbox_2d"` key
    is part of a word, not a number."""
    return _numbers(_answer_text(ids, labels, tokenizer))


def answer_times(ids: torch.Tensor, labels: torch.Tensor, tokenizer) -> list[tuple[int, float]]:
    """(index of the first digit, seconds) of each "S.T seconds" time in one row's labelled (answer) tokens --
    the video "when" answers (qvl.data.tasks.ask_video_when); digits are one token each."""
    text = _answer_text(ids, labels, tokenizer)
    out = []
    for i, t in text.items():
        tenth = text.get(i + 2, "")
        if (t.isdigit() and not text.get(i - 1, "")[-1:].isdigit() and text.get(i + 1) == "." and tenth.isdigit()
                and text.get(i + 3, "").startswith(" second")):
            out.append((i, int(t) + int(tenth) / 10))
    return out


TIME_K = 4  # the answer read-out's fifth number (after x1 y1 x2 y2): a "when" answer's seconds
TIME_SCALE = ClipConfig.max_seconds  # the longest clip: the targets fall in [0, 1]

# The token that opens a box in each generation's answer notation (qvl.grounding): the four numbers after it
# are x1, y1, x2, y2.
BOX_MARKERS = {"1": "<box>", "2": "<|box_start|>", "2.5": "bbox"}


def answer_boxes(ids: torch.Tensor, labels: torch.Tensor, tokenizer, generation: str) -> list[list[tuple[int, int]]]:
    """The boxes one row's answers write: per box marker among the labelled tokens, the (first-digit index,
    value) of the four numbers after it (a box cut short by truncation is dropped)."""
    text = _answer_text(ids, labels, tokenizer)
    marker = BOX_MARKERS[str(generation)]
    numbers = _numbers(text)
    boxes = [[n for n in numbers if n[0] > m][:4] for m, t in text.items() if t.strip() == marker]
    return [b for b in boxes if len(b) == 4]
