"""The trainer: one function, `train(...)`, for every stage of every generation.

    AdamW (betas 0.9/0.95, decoupled weight decay on matrices only), linear warm-up then cosine to
    `min_lr`, gradient clipping at 1.0 (Qwen-VL's stage-1 settings, §8.1), bf16 autocast on CUDA,
    a plain-text progress bar with samples/s, resumable checkpoints (model + dense head + optimiser +
    step + RNG + data position), a loss curve (CSV + PNG) per stage, and the finished model written in
    the official layout (`OUT/model`).

Data: `StageData` is an IterableDataset that renders batches in DataLoader worker processes (so a GPU
run is not bound by PIL). Batch k of rank r holds samples (k * world + r) * B ... + B - 1 of the stage's
deterministic stream, so ranks read disjoint shards, and resuming at step k only needs k.

Distributed: launched by `torchrun --nproc_per_node N`, the model is wrapped in DDP (gloo on CPU, nccl on
CUDA; every rank computes its own shard's gradients, DDP averages them); `fsdp=True` shards parameters with
FSDP2 (`torch.distributed.fsdp.fully_shard`) per decoder layer instead. Rank 0 writes everything.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from qvl.data.world import KINDS
from qvl.train import stages as S
from qvl.train import tiny
from qvl.train.batching import (IGNORE, MAX_COUNT, N_COUNTS, N_DENSE_CLASSES, N_LETTERS, Collator, embed_kwargs,
                                to_device)

STATE_FILE = "state.pt"
SHOWN_METRICS = ("dense_acc", "obj_acc", "kind_acc", "letter_acc", "patch_obj_acc", "count_acc", "reward_acc", "margin",
                 "pos_mse", "box_mse")  # on the progress line
HEAD_FILE = "dense_head.safetensors"
POSITION_HEAD_FILE = "position_head.safetensors"
ANSWER_HEAD_FILE = "answer_head.safetensors"


# --------------------------------------------------------------------------------------------------
# Dense vision head (vision pre-training stand-in, and stage 2's auxiliary loss)
# --------------------------------------------------------------------------------------------------


def pool_objects(x: torch.Tensor, obj: torch.Tensor, n_obj: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each object's tokens. x [N, H], obj [N] (object index, -1 for none) -> (pooled [S', H], seen [n_obj]):
    rows for the objects that own at least one token (a larger neighbour can take all of a small shape's cells)."""
    on = obj >= 0
    sums = x.new_zeros(n_obj, x.shape[-1]).index_add_(0, obj[on], x[on])
    counts = torch.bincount(obj[on], minlength=n_obj)
    seen = counts > 0
    return sums[seen] / counts[seen, None], seen


class DenseHead(nn.Module):
    """Per vision token: class (background / text / colour x shape), letter under it, its object's box.
    Lives next to the model (not in the official checkpoint): a training-only probe, like a CLIP head."""

    def __init__(self, hidden: int, patch_dim: int | None = None, count: bool = False):
        super().__init__()
        self.trunk = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU())
        self.cls = nn.Linear(hidden, N_DENSE_CLASSES)
        self.letter = nn.Linear(hidden, N_LETTERS)
        self.box = nn.Linear(hidden, 4)
        # Per shape: its colour x kind from the mean of its tokens (after the trunk's LayerNorm, linearly -- the
        # way an attention head reads a set of tokens). A solid shape's interior tokens look alike whatever its
        # outline, so the per-token target above asks each of them to find the outline; this one only asks
        # that the shape's tokens together name it. Measured on held-out images (scripts/dense_check.py,
        # session 11): vision-pretrain's kind right on 42 % of shape tokens without it, 49 % with it (64 % per
        # shape), 93 % (96 % per shape) with it and the small-canvas first phase (stages.SHAPE_SCENES).
        self.obj = nn.Linear(hidden, N_DENSE_CLASSES - 2)
        # Gen 1: the same targets on the ViT's patch tokens (before the resampler). Measured: with the loss on
        # the 64 resampler outputs alone, object accuracy stayed at 0 % through 6 k images -- at init every
        # query attends to all patches alike, so no query output is about one place and the ViT gets no
        # spatial signal. A 16 x 16 patch-level loss trains the ViT directly, as for gen 2/2.5.
        self.patch = DenseHead(patch_dim) if patch_dim else None
        # Optional (Stage.count_weight): every token of an image names how many shapes the image holds, in all,
        # per colour, per kind -- read linearly from the normed token, like `obj`. The count questions ask for
        # one of these numbers; the shipped models answer them as an estimate of how much is there (n or n + 1,
        # docs/training_log.md session 20), not an enumeration; with the count in every token, the answer would
        # be a look-up like colour. Measured (session 25): the tiny ViT reaches 54 % on the total count per token,
        # and the decoder's count answers stay the same estimate (64.5 -> 66 %) while colour drops 9 points.
        self.count = nn.Linear(hidden, N_COUNTS * (MAX_COUNT + 1)) if count else None

    @classmethod
    def for_model(cls, model: nn.Module, count: bool = False) -> "DenseHead":
        return cls(model.config.text.hidden_size, model.config.vision.width if model.generation == "1" else None,
                   count)

    def forward(self, feats, cls, letter, box, obj=None, obj_cls=None, count=None, count_weight=0.0):
        """feats [N, H] -> (loss, metrics). Letter loss only on text tokens, box loss only on object tokens;
        with obj [N] (batch shape index per token, -1 off shapes) and obj_cls [S], the per-shape loss; with
        count [N, N_COUNTS] and a head built with `count`, the per-token count loss times count_weight."""
        normed = self.trunk[0](feats.float())
        h = self.trunk[1:](normed)
        logits = self.cls(h)
        # ~88 % of tokens are background: a plain mean over tokens is minimised by "background everywhere"
        # and the object classes crawl (measured: object accuracy 16 % after 40 steps overfitting one batch,
        # 64 % with this balance). So background and object tokens each get half of the class loss.
        owned = cls > 0
        loss = F.cross_entropy(logits[~owned], cls[~owned]) if (~owned).any() else 0.0 * logits.sum()
        if owned.any():
            loss = loss + F.cross_entropy(logits[owned], cls[owned])
        pred = logits.argmax(-1)
        metrics = {"dense_acc": (pred == cls).float().mean().detach()}
        shape = cls > 1
        if shape.any():  # colour x shape right on shape tokens: the number the decoder later needs
            metrics["obj_acc"] = (pred[shape] == cls[shape]).float().mean().detach()
        text = cls == 1
        if text.any():
            lt = self.letter(h[text])
            loss = loss + F.cross_entropy(lt, letter[text])
            metrics["letter_acc"] = (lt.argmax(-1) == letter[text]).float().mean().detach()
        else:
            loss = loss + 0.0 * self.letter.weight.sum()
        if owned.any():
            loss = loss + 2.0 * F.l1_loss(torch.sigmoid(self.box(h[owned])), box[owned])
        else:
            loss = loss + 0.0 * self.box.weight.sum()
        if obj is not None and (obj >= 0).any():
            pooled, seen = pool_objects(normed, obj, len(obj_cls))
            lo = self.obj(pooled)
            loss = loss + F.cross_entropy(lo, obj_cls[seen])
            k = len(KINDS)
            metrics["kind_acc"] = (lo.argmax(-1) % k == obj_cls[seen] % k).float().mean().detach()
        else:
            loss = loss + 0.0 * self.obj.weight.sum()
        if self.count is not None:
            if count is not None and count_weight > 0:
                lc = self.count(normed).view(-1, N_COUNTS, MAX_COUNT + 1)  # [N, N_COUNTS, classes]
                loss = loss + count_weight * F.cross_entropy(lc.flatten(0, 1), count.flatten())
                metrics["count_acc"] = (lc[:, 0].argmax(-1) == count[:, 0]).float().mean().detach()
            else:
                loss = loss + 0.0 * self.count.weight.sum()
        return loss, metrics


# --------------------------------------------------------------------------------------------------
# Decoder position head (an auxiliary loss for gens 2 / 2.5: each image token's row and column)
# --------------------------------------------------------------------------------------------------


def image_token_rc(input_ids: torch.Tensor, positions: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """input_ids [B, T], M-RoPE positions [3, B, T] -> (row, column) of every image token [N, 2], in the order
    of `input_ids[input_ids == image_token_id]`. An image's tokens share one t id, the running position where
    the image starts; its h and w ids add the token's row and column to it (qvl.positions)."""
    img = input_ids == image_token_id
    return torch.stack([(positions[1] - positions[0])[img], (positions[2] - positions[0])[img]], -1)


class PositionHead(nn.Module):
    """A linear read-out of (row, column) / 16 from decoder layer `layer`'s output at every image token, MSE.

    Why: a gen 2 / 2.5 vision token holds no absolute position (its ViT has rotary positions only), and the
    tiny decoders trained without this read a token's row (from the causal order) but never its column, so
    their boxes stayed at a constant guess. M-RoPE gives the decoder the column, but only where the width
    channels turn: at rope_theta 10^4 they turn 0.047 rad across 16 columns, at 100 about 0.9 rad. Measured
    (scripts/decoder_position_check.py, docs/training_log.md session 14): this loss at theta 100 puts the
    column into the residual stream from layer 1 on (probe R² 0.40-0.49; <= 0.06 at 10^4 or without it); in
    the full recipe's stage 2 (session 15), 0.54-0.58 in every layer from 1 on. It does not make boxes by
    itself: the answer must also look the position up (scripts/decoder_position_check.py --answer-aux).
    Training-only, like DenseHead: not part of the checkpoint."""

    SCALE = 16.0  # about [0, 1] on stage-2 images (<= 16 merged tokens a side)

    def __init__(self, hidden: int, layer: int):
        super().__init__()
        self.layer = layer
        self.proj = nn.Linear(hidden, 2)

    def forward(self, hidden: torch.Tensor, rc: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] at image tokens, rc [N, 2] their (row, column) -> MSE loss."""
        return F.mse_loss(self.proj(hidden.float()), rc.float() / self.SCALE)


class AnswerBoxHead(nn.Module):
    """A linear read-out of a box from the answer itself: decoder layer `layer`'s output at the state that writes
    the first digit of box number k (x1, y1, x2, y2) predicts that number over its side, MSE (targets from
    batching.Collator.box_batch).

    Why: the position loss (PositionHead) put each image token's column into the decoder, yet the boxes stayed
    at a constant guess -- a probe of the answer found no trace of the shape's position in the states that write
    the digits (scripts/position_probe.py `answer`, R² <= 0.1). With this read-out on 1 200 steps of one-shape
    grounding drills those states fetched it (R² x1 / y1 0.76 / 0.87) and box centres beat a constant guess for
    the first time (docs/training_log.md, sessions 15-16); in the recipe, a ground phase with as much one-shape
    grounding (24 000 samples) did the same for one-shape scenes, not yet with several shapes (session 17). It
    asks for the number directly, a regression target with a gradient at every digit-writing state, where the LM
    loss gives one only through the right first digit.
    A video "when" answer adds a fifth number, its seconds (batching.TIME_K): the same missing fetch, of a video
    token's time (docs/training_log.md, sessions 21-22).
    Works for every generation (it needs no M-RoPE). Training-only, not part of the checkpoint."""

    def __init__(self, hidden: int, layer: int):
        super().__init__()
        self.layer = layer
        self.proj = nn.Linear(hidden, 5)  # x1 y1 x2 y2, and a "when" answer's seconds (batching.TIME_K)

    def forward(self, hidden: torch.Tensor, k: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """hidden [K, H] at the digit-writing states, k [K] which number, target [K] -> MSE loss."""
        pred = self.proj(hidden.float()).gather(1, k[:, None]).squeeze(1)
        return F.mse_loss(pred, target.float())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h if model.generation == "1" else model.model.layers


def load_head(head: nn.Module | None, init, name: str) -> None:
    """Load a training-only head from the init stage directory, where an earlier stage left one."""
    file = Path(init) / name if init is not None else None
    if head is not None and file is not None and file.exists():
        from safetensors.torch import load_file

        missing, unexpected = head.load_state_dict(load_file(str(file)), strict=False)
        # only the count read-out (Stage.count_weight) may start at this stage or be left behind by it
        wrong = [k for k in missing + unexpected if not k.startswith("count.")]
        if wrong:
            raise RuntimeError(f"{file}: does not fit the {type(head).__name__}: {', '.join(wrong)}")


def vision_module(model: nn.Module) -> nn.Module:
    return model.transformer.visual if model.generation == "1" else model.visual


def run_vision(model: nn.Module, vision: dict) -> None:
    """The vision tower alone on a batch's `embed_kwargs` (no decoder): what the dense head's hooks read."""
    if model.generation == "1":
        vision_module(model)(vision["images"])
    elif "pixel_values" in vision:
        model.visual(vision["pixel_values"], vision["image_grid_thw"])


# --------------------------------------------------------------------------------------------------
# The training module: model (+ head, + frozen reference for DPO) -> loss
# --------------------------------------------------------------------------------------------------


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def labelled_logits(model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor, select: torch.Tensor):
    """The model's logits at the positions where `select` [B, T] is True only -> [N, V].

    A pre-hook on `lm_head` keeps only those rows of the final hidden states, so the [B*T, vocab]
    projection (and its backward) is computed for the labelled positions alone -- in stage 2 about 40 of
    ~200 real tokens per row, in SFT about 18. The model code is untouched (both generations end in
    `lm_head(...)`)."""
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: (args[0][select],))
    try:
        return model(embeds, positions)
    finally:
        hook.remove()


def labelled_lm_loss(model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor,
                     labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions; equals lm_loss(model(...), labels). With `weights`
    [B, T] (the Collator's `label_weights`): the weighted sum over labelled positions / the sum of weights."""
    select = labels != IGNORE
    logits = labelled_logits(model, embeds, positions, select)
    if logits.shape[0] == 0:  # no targets in this batch: a zero that still reaches every parameter
        return logits.sum() * 0.0
    if weights is None:
        return F.cross_entropy(logits.float(), labels[select])
    w = weights[select]
    return (F.cross_entropy(logits.float(), labels[select], reduction="none") * w).sum() / w.sum()


class TrainModule(nn.Module):
    """Computes one stage's loss for a batch. DDP wraps this module, so every gradient flows through it."""

    def __init__(self, model: nn.Module, stage: S.Stage, head: DenseHead | None = None, ref: nn.Module | None = None,
                 position_head: PositionHead | None = None, answer_head: AnswerBoxHead | None = None):
        super().__init__()
        self.model, self.stage, self.head, self.position_head = model, stage, head, position_head
        self.answer_head = answer_head
        self._ref = [ref]  # a list: the frozen reference is not a submodule (DDP must not sync or wrap it)

    def forward(self, batch: dict):
        if self.stage.loss == "dpo":
            from qvl.train.dpo import dpo_loss, sequence_logps

            policy = sequence_logps(self.model, batch)
            with torch.no_grad():
                ref = sequence_logps(self._ref[0], batch)
            lengths = (batch["labels"] != IGNORE).sum(1)
            return dpo_loss(policy, ref, self.stage.beta, lengths, self.stage.nll_weight)
        model, stage = self.model, self.stage
        feats: list[torch.Tensor] = []
        patch_feats: list[torch.Tensor] = []
        layer_out: dict[int, torch.Tensor] = {}  # decoder layer -> its output, for the read-out heads
        hooks = []
        for h in (self.position_head, self.answer_head):
            if h is not None and h.layer not in layer_out:
                layer_out[h.layer] = None
                hooks.append(decoder_layers(model)[h.layer].register_forward_hook(
                    lambda m, args, o, i=h.layer: layer_out.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
        if self.head is not None:
            hooks.append(vision_module(model).register_forward_hook(lambda m, i, o: feats.append(o)))
            if self.head.patch is not None:  # gen 1: the ViT output the resampler reads [N, g*g, width]
                hooks.append(vision_module(model).attn_pool.register_forward_pre_hook(
                    lambda m, args: patch_feats.append(args[0])))
        try:
            metrics = {}
            vision = embed_kwargs(batch["vision"])
            if stage.lm:
                embeds = model.embed(batch["input_ids"], **vision)
                loss = labelled_lm_loss(model, embeds, batch["positions"], batch["labels"], batch.get("label_weights"))
                metrics["lm_loss"] = loss.detach()
            else:  # vision pre-training: the decoder is not run at all
                loss = torch.zeros((), device=batch["input_ids"].device)
                run_vision(model, vision)
        finally:
            for h in hooks:
                h.remove()
        if self.position_head is not None:
            img = batch["input_ids"] == model.config.image_token_id
            out = layer_out.get(self.position_head.layer)
            if out is not None and img.any():
                rc = image_token_rc(batch["input_ids"], batch["positions"], model.config.image_token_id)
                mse = self.position_head(out[img], rc)
                metrics["pos_mse"] = mse.detach()
            else:  # no image in this batch: keep the head in the graph (DDP expects gradients)
                mse = sum(0.0 * p.sum() for p in self.position_head.parameters())
            loss = loss + stage.position_weight * mse
        if self.answer_head is not None:
            out, at = layer_out.get(self.answer_head.layer), batch.get("box_at")
            if out is not None and at is not None and len(at):
                amse = self.answer_head(out[at[:, 0], at[:, 1]], batch["box_k"], batch["box_target"])
                metrics["box_mse"] = amse.detach()
            else:  # no box in this batch
                amse = sum(0.0 * p.sum() for p in self.answer_head.parameters())
            loss = loss + stage.answer_weight * amse
        if self.head is not None:
            weight = 1.0 if stage.loss == "dense" else stage.dense_weight
            if "dense_cls" in batch and feats:
                f = feats[0].flatten(0, -2)  # gen 1: [N, 64, H] -> [N*64, H]; gen 2: images come first
                d, m = self.head(f, batch["dense_cls"], batch["dense_letter"], batch["dense_box"],
                                 batch.get("dense_obj"), batch.get("dense_obj_cls"), batch.get("dense_count"),
                                 stage.count_weight)
                metrics.update(m, dense_loss=d.detach())
                if self.head.patch is not None and patch_feats:
                    dp, mp = self.head.patch(patch_feats[0].flatten(0, -2), batch["dense_patch_cls"],
                                             batch["dense_patch_letter"], batch["dense_patch_box"],
                                             batch.get("dense_patch_obj"), batch.get("dense_patch_obj_cls"))
                    d = d + dp
                    metrics.update({f"patch_{k}": v for k, v in mp.items()})
            else:  # no image in this batch: keep every head parameter in the graph (DDP expects gradients)
                d = sum(0.0 * p.sum() for p in self.head.parameters())
            loss = loss + weight * d
        return loss, metrics


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def token_estimate(sample) -> float:
    """A cheap estimate of a sample's row length (for bucketing): text characters / 3 plus vision tokens
    from the media sizes (28 px per token side after the 2x2 merge; video: frames / 2 temporal groups)."""
    messages = getattr(sample, "messages", sample if isinstance(sample, list) else [])
    n = 0.0
    for m in messages:
        content = m.get("content", "")
        parts = [content] if isinstance(content, str) else content
        for it in parts:
            if isinstance(it, str):
                n += len(it) / 3
            elif it.get("type") == "text":
                n += len(it.get("text", "")) / 3
            elif it.get("type") in ("image", "video"):
                media = getattr(sample, "media", {}) or {}
                h, w = media.get("resized_size") or media.get("original_size") or (224, 224)
                tokens = h * w / (28 * 28)
                if it.get("type") == "video":
                    tokens = min(max(tokens, 16), it.get("max_pixels", 64 * 784) / 784)
                    tokens *= max(1, len(media.get("frame_indices", ())) // 2)
                n += tokens
    return n


class StageData(IterableDataset):
    """Yields (step, batch) for steps [start, total) of one rank; DataLoader workers take every W-th step,
    which the DataLoader's round-robin turns back into step order.

    Length bucketing (`stage.bucket` = K > 1, image/video/text stages): the samples of K consecutive steps
    (all ranks) are rendered together, sorted by an estimate of their token count, cut into batches in that
    order, and the K batches are dealt to the steps in a shuffled (seeded) order. Rows of a batch then have
    similar lengths, so little of the padded [B, T] is padding (stage 2 at B = 16: ~35 % real tokens
    without, most with). Which samples a step sees depends only on (step, K), so resuming stays exact."""

    def __init__(self, stage: S.Stage, generation: str, collator: Collator, batch_size: int, start: int,
                 total: int, rank: int = 0, world: int = 1, records: list[dict] | None = None,
                 bucket: int | None = None):
        self.stage, self.generation, self.collator = stage, generation, collator
        self.batch_size, self.start, self.total, self.rank, self.world = batch_size, start, total, rank, world
        self.records = records
        self.bucket = stage.bucket if bucket is None else bucket
        if stage.source == "records":  # DPO rows are (chosen, rejected) pairs; records stages are small
            self.bucket = 1
        self._chunk: tuple[int, list] | None = None
        self.samples_total = total * world * batch_size  # all ranks: places a sample in the scene curriculum

    def _chunk_batches(self, chunk: int) -> list[list]:
        """All batches of one chunk of K steps, indexed [(step - chunk * K) * world + rank]."""
        if self._chunk is not None and self._chunk[0] == chunk:
            return self._chunk[1]
        K, B, W = self.bucket, self.batch_size, self.world
        base = chunk * K * W * B
        items = [S.sample_at(self.stage, self.generation, base + j, self.records, self.samples_total)
                 for j in range(K * W * B)]
        order = sorted(range(len(items)), key=lambda j: (token_estimate(items[j]), j))
        batches = [[items[j] for j in order[i * B:(i + 1) * B]] for i in range(K * W)]
        # deal whole steps (W batches of neighbouring lengths each) in a seeded random order
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(chunk))
        batches = [batches[int(p) * W + r] for p in perm for r in range(W)]
        self._chunk = (chunk, batches)
        return batches

    def samples(self, step: int) -> list:
        if self.bucket > 1:
            out = self._chunk_batches(step // self.bucket)[(step % self.bucket) * self.world + self.rank]
        else:
            base = (step * self.world + self.rank) * self.batch_size
            out = [S.sample_at(self.stage, self.generation, base + j, self.records, self.samples_total)
                   for j in range(self.batch_size)]
        if self.stage.source != "records":
            return out
        cfg = self.stage.data_config()
        if self.stage.loss == "dpo":  # chosen rows first, then rejected rows, same prompts
            return ([S.record_sample(r, self.generation, r["chosen"], cfg) for r in out]
                    + [S.record_sample(r, self.generation, r["rejected"], cfg) for r in out])
        return [S.record_sample(r, self.generation, r["answer"], cfg) for r in out]

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # workers render; the main process computes
        for step in range(self.start + w, self.total, n):
            yield step, self.collator(self.samples(step))


# --------------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str | None, d: Dist) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    return torch.device(device)


def set_trainable(model: nn.Module, parts) -> dict[str, int]:
    """requires_grad = True exactly on the stage's parts; -> trainable parameter count per part."""
    groups = tiny.param_groups(model)
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for part in parts:
        for name in groups[part]:
            params[name].requires_grad_(True)
    return {part: sum(params[n].numel() for n in groups[part]) for part in parts}


def make_optimizer(module: nn.Module, stage: S.Stage, lr: float) -> torch.optim.AdamW:
    """Weight decay on matrices only (norms, biases, embeddings-as-vectors excluded); vision side may get a
    higher learning rate (`stage.vision_lr_scale`)."""
    groups: dict[tuple, list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decay = stage.weight_decay if p.dim() >= 2 else 0.0
        scale = stage.vision_lr_scale if "visual" in name else 1.0
        groups.setdefault((decay, scale), []).append(p)
    param_groups = [{"params": ps, "weight_decay": d, "lr": lr * s, "base_lr": lr * s} for (d, s), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, total: int, warmup: float, floor: float) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine from 1 down to `floor`."""
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def model_dir_of(path) -> Path:
    """A stage output directory (holding model/) or a model directory itself."""
    path = Path(path)
    return path / "model" if (path / "model" / "config.json").exists() else path


def join(vision_stage, lm_stage, out) -> Path:
    """Where stage 1 starts: the vision stand-in (a stage directory) with the LM stand-in's decoder put in its
    place -- the papers' "initialised from the pre-trained LLM and the pre-trained ViT" (reference §8) --
    written to OUT as a stage-like directory (model/ and the vision stage's dense head) -> OUT."""
    out = Path(out)
    model = tiny.load_model(model_dir_of(vision_stage))
    lm_dir = model_dir_of(lm_stage)
    try:
        tiny.graft(model, tiny.load_model(lm_dir), vision=False)
    except ValueError as e:
        raise ValueError(f"{lm_stage}: cannot join it to {vision_stage}: {e}") from None
    tiny.save_model(model, out / "model", lm_dir)
    if (Path(vision_stage) / HEAD_FILE).exists():
        shutil.copy(Path(vision_stage) / HEAD_FILE, out / HEAD_FILE)
    return out


# --------------------------------------------------------------------------------------------------
# Checkpoints, logs, progress
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state_dict(module: nn.Module, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def write_log(out: Path, rows: list[dict], title: str) -> None:
    """loss.csv (every logged step) and loss.png (loss against samples seen, with a running mean)."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "loss.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    try:
        # A bare Figure with no pyplot: switching the global backend here would silently turn off
        # inline plots in a notebook that trains.
        from matplotlib.figure import Figure
    except ImportError:
        return
    x = [r["samples"] for r in rows]
    y = [r["loss"] for r in rows]
    k = max(1, len(y) // 20)
    smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(x, y, alpha=0.35, lw=0.8, label="loss")
    ax.plot(x, smooth, lw=1.5, label=f"running mean ({k})")
    ax.set_xlabel("samples")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png")


class Progress:
    """`name [#####-----] 1200/4000 samples | 14.1 samples/s | loss 1.234 | lr 3.0e-04 | eta 3:20`.
    Redrawn in place on a terminal; one line every `every` steps otherwise (logs stay readable)."""

    def __init__(self, name: str, total_samples: int, every: int = 10, stream=None):
        self.name, self.total, self.every = name, total_samples, every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()

    def update(self, step: int, samples: int, sps: float, loss: float, lr: float, extra: str = "", force=False):
        if not (self.tty or force or step % self.every == 0):
            return
        frac = min(1.0, samples / max(1, self.total))
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        eta = (self.total - samples) / sps if sps > 0 else 0
        line = (f"{self.name} [{bar}] {samples}/{self.total} samples | {sps:.1f} samples/s | loss {loss:.4f} | "
                f"lr {lr:.1e} | eta {int(eta // 60)}:{int(eta % 60):02d}{extra}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")


# --------------------------------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------------------------------


def train(stage: str | S.Stage, generation: str, out, samples: int, *, init=None, tokenizer=None,
          resume: bool = False, device: str | None = None, batch_size: int | None = None, lr: float | None = None,
          workers: int | None = None, seed: int = 0, fsdp: bool = False, save_every: int | None = None,
          stop_after: int | None = None, records: list[dict] | None = None, log_every: int = 10,
          quiet: bool = False, bucket: int | None = None, decoder: dict | None = None) -> dict:
    """Train one stage for `samples` samples (all ranks together) and write OUT/{model, loss.csv, loss.png,
    state.pt, summary.json}. `init` = a model directory (or a stage directory holding model/) to start from;
    without it a fresh tiny model is built with `tokenizer` (a build_tokenizers directory).
    `bucket` overrides the stage's length-bucketing chunk (steps; 1 = off). `decoder` overrides
    `tiny.DECODER` for a fresh model (e.g. {"rope_theta": 100.0}).
    `stop_after` ends this call after that many steps (the schedule still spans all `samples`): with
    `resume=True` a later call continues exactly where it stopped. -> summary dict."""
    stage = S.get(stage) if isinstance(stage, str) else stage
    generation = str(generation)
    out = Path(out)
    d = setup_distributed(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dev = resolve_device(device, d)
    if dev.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):  # a thread count the user set is kept
        # share the cores between local ranks; DataLoader workers mostly sleep in PIL
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", d.world))))
    torch.manual_seed(seed)
    random.seed(seed)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)

    # ---- model, tokenizer, head
    if init is not None:
        init_dir = model_dir_of(init)
        model = tiny.load_model(init_dir)
        tok_dir = init_dir
    else:
        if tokenizer is None:
            raise ValueError("a fresh model needs tokenizer=DIR (see tiny.build_tokenizers) or init=MODEL_DIR")
        tok_dir = Path(tokenizer)
        model = tiny.new_model(generation, tiny.load_tokenizer(generation, tok_dir), seed=seed, decoder=decoder)
    if model.generation != generation:
        raise ValueError(f"init model is generation {model.generation}, asked for {generation}")
    tok = tiny.load_tokenizer(generation, tok_dir)
    head = DenseHead.for_model(model, count=stage.count_weight > 0) if stage.dense else None
    load_head(head, init, HEAD_FILE)
    position_head = None
    if stage.position_weight > 0:
        n_layers = model.config.text.num_hidden_layers
        if generation == "1" or not stage.lm:
            raise ValueError("the position loss needs a decoder run with M-RoPE grid ids: gen 2 / 2.5, an LM stage")
        if not 0 <= stage.position_layer < n_layers:
            raise ValueError(f"position_layer {stage.position_layer}: the decoder has layers 0-{n_layers - 1}")
        position_head = PositionHead(model.config.text.hidden_size, stage.position_layer)
        load_head(position_head, init, POSITION_HEAD_FILE)
    answer_head = None
    if stage.answer_weight > 0:
        n_layers = model.config.text.num_hidden_layers
        if not stage.lm or stage.loss == "dpo":
            raise ValueError("the answer box read-out needs an LM stage with a text or assistant loss")
        if not 0 <= stage.answer_layer < n_layers:
            raise ValueError(f"answer_layer {stage.answer_layer}: the decoder has layers 0-{n_layers - 1}")
        answer_head = AnswerBoxHead(model.config.text.hidden_size, stage.answer_layer)
        load_head(answer_head, init, ANSWER_HEAD_FILE)
    ref = None
    if stage.loss == "dpo":
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        ref.to(dev)
    trainable = set_trainable(model, stage.train)
    if head is not None:
        head.requires_grad_(stage.loss == "dense" or "vision" in stage.train or "adapter" in stage.train)
    module = TrainModule(model, stage, head, ref, position_head, answer_head).to(dev)

    # ---- steps
    B = batch_size or stage.batch_size
    per_step = B * d.world
    total = max(1, samples // per_step)
    opt = make_optimizer(module, stage, lr or stage.lr)
    start = 0
    log: list[dict] = []
    state_file = out / STATE_FILE
    if resume and state_file.exists():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if state["total_steps"] != total or state["stage"] != stage.name:
            raise ValueError(f"{state_file}: a {state['stage']} run of {state['total_steps']} steps; "
                             f"asked for {stage.name} with {total} steps")
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
        set_rng_state(state["rng"])
    wrapped = module
    if d.world > 1:
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            layers = model.transformer.h if generation == "1" else model.model.layers
            for layer in layers:
                fully_shard(layer)
            fully_shard(module)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None)

    collator = Collator(generation, tok, model.config, loss="assistant" if stage.loss == "dpo" else
                        ("text" if stage.loss == "dense" else stage.loss), dense=stage.dense,
                        gen1_image_size=stage.gen1_image_size, weighting=stage.weighting,
                        boxes=answer_head is not None, counts=stage.count_weight > 0)
    if workers is None:
        workers = 4 if dev.type == "cuda" else 1
    data = StageData(stage, generation, collator, B, start, total, d.rank, d.world, records, bucket)
    loader = DataLoader(data, batch_size=None, num_workers=workers, pin_memory=dev.type == "cuda",
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    end = total if stop_after is None else min(total, start + stop_after)
    save_every = save_every or max(50, total // 10)
    progress = Progress(f"gen {generation} {stage.name}", total * per_step, every=log_every,
                        stream=open(os.devnull, "w") if (quiet or not d.main) else None)
    if d.main and not quiet:
        n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(f"gen {generation} {stage.name}: {total} steps x {per_step} samples, trainable {trainable} "
              f"(+head) = {n_train / 1e6:.2f}M, device {dev}, world {d.world}, workers {workers}", flush=True)

    def save(step):
        sd = full_state_dict(module, fsdp and d.world > 1)
        if not d.main:
            return
        # the optimiser state is per rank under FSDP; DDP ranks hold identical copies
        optim = opt.state_dict() if not (fsdp and d.world > 1) else {}
        torch.save({"module": sd, "optimizer": optim, "step": step, "samples": step * per_step, "total_steps": total,
                    "stage": stage.name, "generation": generation, "rng": rng_state(), "log": log},
                   str(state_file) + ".tmp")
        os.replace(str(state_file) + ".tmp", state_file)  # never leave a half-written checkpoint
        write_log(out, log, f"gen {generation} {stage.name}")

    module.train()
    t_window, n_window = time.time(), 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    step = start
    t_start = time.time()
    for step, batch in loader:
        if step >= end:
            break
        batch = to_device(batch, dev)
        f = lr_factor(step, total, stage.warmup, stage.min_lr)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        with autocast:
            loss, metrics = wrapped(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in module.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss = loss.detach()
        n_window += per_step
        now = time.time()
        sps = n_window / max(now - t_window, 1e-9)
        row = {"step": step + 1, "samples": (step + 1) * per_step, "loss": float(loss), "lr": opt.param_groups[0]["lr"],
               "grad_norm": float(gnorm), "samples_per_s": round(sps, 2)}
        row.update({k: float(v) for k, v in metrics.items()})
        log.append(row)
        extra = "".join(f" | {k} {float(v):.3f}" for k, v in metrics.items() if k in SHOWN_METRICS)
        progress.update(step + 1, (step + 1) * per_step, sps, float(loss), row["lr"], extra, force=step + 1 == end)
        if now - t_window > 30:
            t_window, n_window = now, 0
        if (step + 1) % save_every == 0 and step + 1 < end:
            save(step + 1)
        step += 1
    progress.close()
    save(step)
    summary = {"stage": stage.name, "generation": generation, "steps": step, "total_steps": total,
               "samples": step * per_step, "seconds": round(time.time() - t_start, 1),
               "samples_per_s": round((step - start) * per_step / max(time.time() - t_start, 1e-9), 2),
               "final_loss": sum(r["loss"] for r in log[-20:]) / max(1, len(log[-20:])) if log else None,
               "trainable": trainable, "world": d.world}
    # a variant (python -m qvl.train --set, the recipe's flags) says what it changed from the named stage
    named = S.STAGES.get(stage.name, stage)
    changed = {f.name: getattr(stage, f.name) for f in fields(stage)
               if getattr(stage, f.name) != getattr(named, f.name)}
    if changed:
        summary["changed"] = changed
    if d.main and step >= total:
        tiny.save_model(model, out / "model", tok_dir)
        for h, name in ((head, HEAD_FILE), (position_head, POSITION_HEAD_FILE), (answer_head, ANSWER_HEAD_FILE)):
            if h is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in h.state_dict().items()}, str(out / name))
            elif init is not None and (Path(init) / name).exists():  # carry the head on to later stages
                shutil.copy(Path(init) / name, out / name)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if d.world > 1:
        dist.barrier()
    return summary
