"""Post-training: rejection sampling and DPO (Qwen2.5-VL's post-training: SFT, rejection sampling, DPO, §8.3).

Rejection sampling: an intermediate model (after SFT) answers questions from *training* seeds that have a
ground truth; an answer is accepted when it scores as correct (exact match, "when" within +-0.5 s, box IoU
>= `ACCEPT_IOU`). Accepted answers -- the model's own words -- become the `rs-sft` stage's data; the
acceptance rate per task is reported.

DPO (Rafailov et al. 2023): for a prompt x with a preferred answer y_w and a dispreferred y_l,

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

with log pi(y|x) the *sum* of the answer tokens' log-probabilities (assistant tokens + <|im_end|>, the same
mask as SFT) and `ref` the frozen starting model. Pairs: (ground truth, the model's own wrong answer), and
for boxes the model got right, (ground truth, the box shifted by half to one box size). Reported: the
implicit reward margin beta * (chosen log-ratio - rejected log-ratio), the fraction of pairs the policy
ranks correctly, and (by the recipe) the eval accuracy before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qvl import grounding
from qvl.data import tasks as T
from qvl.train.batching import IGNORE, embed_kwargs

ACCEPT_IOU = 0.5


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Sum over each row's label tokens of log p(token | prefix). -> [B] (fp32)"""
    from qvl.train.loop import labelled_logits  # the LM head runs on the answer tokens only

    embeds = model.embed(batch["input_ids"], **embed_kwargs(batch["vision"]))
    labels = batch["labels"]
    mask = labels != IGNORE
    logits = labelled_logits(model, embeds, batch["positions"], mask).float()  # [N, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[mask][:, None])[:, 0]
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[mask]
    return torch.zeros(labels.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)


def dpo_loss(policy: torch.Tensor, ref: torch.Tensor, beta: float, lengths: torch.Tensor | None = None,
             nll_weight: float = 0.0):
    """policy/ref: [2B] sequence log-probs, chosen rows first. -> (mean loss, metrics).
    `nll_weight` > 0 adds that many times the chosen answers' mean per-token negative log-likelihood
    (`lengths`: [2B] label-token counts). Plain DPO only needs the chosen answer to gain on the rejected one,
    and it can get there by lowering both: session 13's gen-2.5 DPO lowered the chosen answers' log-prob by
    ~2-3 nats and broke two thirds of its boxes' format (15 / 48 parse, 48 / 48 before). The NLL term keeps the
    chosen answers likely -- "RPO", Pang et al. 2024, Iterative Reasoning Preference Optimization, eq. 3."""
    n = policy.shape[0] // 2
    chosen = policy[:n] - ref[:n]  # log pi(y_w) - log ref(y_w)
    rejected = policy[n:] - ref[n:]
    logits = beta * (chosen - rejected)
    loss = -F.logsigmoid(logits).mean()
    metrics = {"margin": logits.mean().detach(), "reward_acc": (logits > 0).float().mean().detach(),
               "chosen_reward": (beta * chosen).mean().detach(), "rejected_reward": (beta * rejected).mean().detach()}
    if nll_weight:
        nll = -(policy[:n] / lengths[:n].clamp(min=1)).mean()
        loss = loss + nll_weight * nll
        metrics["chosen_nll"] = nll.detach()
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# Rejection sampling and pairs
# --------------------------------------------------------------------------------------------------


def accepted(task: str, reply: str, truth: dict) -> tuple[bool, float]:
    s = T.score(task, reply, truth)
    return (s >= ACCEPT_IOU if task == "ground" else s >= 1.0), s


def questions(generation: str, n: int, start: int, tasks=None) -> list[T.Sample]:
    """n single-turn training questions from seed offset `start` (disjoint from every training stage)."""
    mix = None if tasks is None else {t: 1.0 for t in tasks}
    out = []
    for s in T.iterate(generation, "train", mix=mix, start=start):
        out.append(s)
        if len(out) == n:
            return out
    return out


def rejection_sample(reply_fn, samples: list[T.Sample]) -> tuple[list[dict], list[dict], dict]:
    """Ask, score, keep. -> (accepted records, rejected records, stats with per-task acceptance rates).
    A record: task, seed, the model's `answer` (used for SFT when accepted) and the ground truth `truth`."""
    by_task: dict[str, list[T.Sample]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    good, bad, stats = [], [], {"per_task": {}}
    for task, group in by_task.items():
        replies = reply_fn(group)
        n_ok = 0
        for s, r in zip(group, replies):
            ok, score = accepted(task, r, s.truth)
            rec = {"task": task, "seed": s.seed, "answer": r, "truth": s.answer, "score": score}
            (good if ok else bad).append(rec)
            n_ok += ok
        stats["per_task"][task] = {"asked": len(group), "accepted": n_ok, "rate": n_ok / len(group)}
    total = sum(v["asked"] for v in stats["per_task"].values())
    stats["asked"], stats["accepted"] = total, len(good)
    stats["acceptance_rate"] = len(good) / max(1, total)
    return good, bad, stats


def perturbed_box_answer(sample: T.Sample, rng: np.random.Generator) -> str:
    """The ground-truth box moved by 0.5-1 of its size along x and/or y (clamped into the image)."""
    truth = sample.truth
    x1, y1, x2, y2 = truth["box"]
    w, h = x2 - x1, y2 - y1
    H, W = truth["original_size"]
    dx = rng.choice([-1, 1]) * rng.uniform(0.5, 1.0) * w
    dy = rng.choice([-1, 1]) * rng.uniform(0.5, 1.0) * h if rng.random() < 0.5 else 0.0
    nx1 = float(np.clip(x1 + dx, 0, W - w))
    ny1 = float(np.clip(y1 + dy, 0, H - h))
    box = grounding.Box(nx1, ny1, nx1 + w, ny1 + h, label=truth["label"])
    return grounding.format_boxes([box], sample.generation, truth["original_size"], truth["resized_size"])


def make_pairs(good: list[dict], bad: list[dict], generation: str, seed: int = 0) -> list[dict]:
    """DPO pairs {task, seed, chosen, rejected}: every wrong answer vs the truth, and every accepted box vs a
    perturbed copy of the truth (so grounding gets pairs even when the model is mostly right)."""
    rng = np.random.default_rng(seed)
    pairs = [{"task": r["task"], "seed": r["seed"], "chosen": r["truth"], "rejected": r["answer"]}
             for r in bad if T.normalize(r["answer"]) != T.normalize(r["truth"])]
    for r in good:
        if r["task"] == "ground":
            s = T.make_sample("ground", r["seed"], generation)
            pairs.append({"task": "ground", "seed": r["seed"], "chosen": r["truth"],
                          "rejected": perturbed_box_answer(s, rng)})
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def write_jsonl(path, records: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
