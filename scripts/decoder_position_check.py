"""Can the decoder be taught each image token's column? A focused run with an auxiliary position loss.

Gen 2/2.5 vision tokens carry no absolute position (`scripts/dense_check.py`, box_iou) and the shipped tiny
decoders read a token's row but not its column (`scripts/position_probe.py`). This run asks for the column
directly: from a gen 2 / 2.5 model, N steps of stage-2-like training (ground 50 %, colour 25 %, shape 25 %; ViT
frozen; lr cosine) plus an auxiliary loss -- a linear head on decoder layer L's output at every image token
predicts the token's (row, column) / 16, MSE, weight W. The targets are read from the batch's M-RoPE ids (an
image token's ids are (t, t + row, t + column)). Afterwards run position_probe.py on OUT/model.
docs/training_log.md, session 14: at theta 10^4 the loss raises the row R² and not the column's (<= 0.06); at
theta 100 the column enters the decoder from layer 1 on (R² 0.40-0.45).

    python scripts/decoder_position_check.py runs/recipe/gen2.5/stage2 runs/poscheck --aux 1.0 --layer 1
    python scripts/position_probe.py runs/poscheck/model

Session 15: the column was in the image tokens but the states writing a box did not hold the shape's position
(position_probe.py's `answer` probe). `--tasks ground --max-objects 1` drills one-shape boxes; `--answer-aux W`
adds a read-out of the box at the answer itself (the trainer's loop.AnswerBoxHead; the recipe's --answer-loss).
Gen 1 (no M-RoPE grid) runs the box drill alone: `--aux 0`, no `--mrope-section` (session 33).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import replace
from pathlib import Path

import torch

from qvl.train.batching import IGNORE
from qvl.train.loop import AnswerBoxHead, PositionHead, decoder_layers, image_token_rc, vision_module

MIX = {"ground": 0.5, "color": 0.25, "shape": 0.25}
BBOX = re.compile(r'("bbox_2d": \[)(\d+), (\d+), (\d+), (\d+)(\])')


def snap_boxes(sample, step: int):
    """Grows every gen-2.5 box in the sample's answers (in place; returns the sample) outward to multiples of
    `step` pixels of the resized image (28: the merged-token grid), so that each number is a function of which
    tokens the object covers -- as in mrope_column_check.py --answer digits, where the digits are learnt
    (session 8)."""
    def snap(m):
        x1, y1, x2, y2 = (int(v) for v in m.groups()[1:5])
        return (f"{m[1]}{x1 // step * step}, {y1 // step * step}, {-(-x2 // step) * step}, "
                f"{-(-y2 // step) * step}{m[6]}")

    for message in sample.messages:
        if message["role"] == "assistant":
            message["content"] = BBOX.sub(snap, message["content"])
    return sample


def first_digit_weights(labels: torch.Tensor, box_at: torch.Tensor | None, weight: float) -> torch.Tensor:
    """[B, T] LM loss weights: 1 at every labelled position, `weight` at the states that write a box number's
    first digit (the Collator's `box_at`)."""
    weights = (labels != IGNORE).float()
    if box_at is not None and len(box_at):
        weights[box_at[:, 0], box_at[:, 1]] = weight
    return weights


def run(init, out, steps: int = 300, aux: float = 1.0, layer: int = 1, lr: float = 3e-4, batch: int = 16,
        start: int = 7_000_000, log_every: int = 25, mix: dict | None = None, max_objects: int | None = None,
        answer_aux: float = 0.0, answer_layer: int = 5, mrope_section=None, extra=None,
        digit_weight: float = 1.0, coarse: int = 0) -> dict:
    """Train and save OUT/model -> {"lm_loss", "aux_mse"[, "answer_mse"]} of the last step.

    `answer_aux` > 0 adds a second read-out: from decoder layer `answer_layer`'s state at the position that
    writes each box number's first digit, that number as a fraction of the image side (gen 2: / 1000) -- it
    asks the answer to fetch the named shape's position, which the image tokens hold but the answer's states
    did not (position_probe.py --skip tokens,boxes: R² <= 0.1; docs/training_log.md session 15).

    `digit_weight` != 1 weighs the LM loss at the states that write each box number's first digit by that much
    (the other answer tokens by 1): the first digit says the number's length and its leading digit at once.
    `coarse` > 0 (gen 2.5) trains on boxes grown to multiples of that many pixels (`snap_boxes`)."""
    from qvl.data import tasks as T
    from qvl.train import stages as S
    from qvl.train import tiny
    from qvl.train.batching import Collator, embed_kwargs
    from qvl.train.loop import labelled_lm_loss, model_dir_of

    torch.manual_seed(0)
    mdir = model_dir_of(init)
    model = tiny.load_model(mdir).train()
    if mrope_section:
        model.config.text.mrope_section = list(mrope_section)
    g = model.generation
    if g == "1" and (aux or mrope_section):
        # its 64 resampler tokens are one 1-D run: the box drill alone runs (--aux 0, the answer read-out)
        raise SystemExit("gen 1 has no M-RoPE grid ids: --aux 0 and no --mrope-section")
    tok = tiny.load_tokenizer(g, mdir)
    coll = Collator(g, tok, model.config, loss="assistant", boxes=bool(answer_aux) or digit_weight != 1)
    vision_module(model).requires_grad_(False)  # ViT and adapter
    head = PositionHead(model.config.text.hidden_size, layer)  # the trainer's own read-out of (row, column) / 16
    answer_head = AnswerBoxHead(model.config.text.hidden_size, answer_layer)  # the trainer's box read-out
    extra_fn = extra(model) if extra else None
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters()) + list(answer_head.parameters())
    if isinstance(extra_fn, torch.nn.Module):  # a loss with heads of its own trains them too
        params += list(extra_fn.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    cfg = S.get("stage2").data_config()
    if max_objects:
        cfg = replace(cfg, scene=replace(cfg.scene, max_objects=max_objects))
    stream = T.iterate(g, "train", mix=mix or MIX, config=cfg, start=start)
    grabbed: list[torch.Tensor] = []
    at_answer: list[torch.Tensor] = []
    wanted = [(layer, grabbed)] * bool(aux) + [(answer_layer, at_answer)] * bool(answer_aux)
    hooks = [decoder_layers(model)[i].register_forward_hook(
        lambda m, args, o, keep=keep: keep.append(o[0] if isinstance(o, tuple) else o)) for i, keep in wanted]
    t0, last = time.time(), {}
    try:
        for step in range(steps):
            warm = min(1.0, (step + 1) / max(1, steps // 20))
            for group in opt.param_groups:  # cosine to a tenth, after a short warm-up
                group["lr"] = lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
            samples = [next(stream) for _ in range(batch)]
            if coarse:
                samples = [snap_boxes(x, coarse) for x in samples]
            b = coll(samples)
            grabbed.clear()
            at_answer.clear()
            embeds = model.embed(b["input_ids"], **embed_kwargs(b["vision"]))
            at = b.get("box_at")
            weights = first_digit_weights(b["labels"], at, digit_weight) if digit_weight != 1 else None
            lm = labelled_lm_loss(model, embeds, b["positions"], b["labels"], weights)
            if aux:
                rc = image_token_rc(b["input_ids"], b["positions"], model.config.image_token_id)
                img = b["input_ids"] == model.config.image_token_id
                mse = head(grabbed[0][img], rc) if len(rc) else lm * 0.0
            else:
                mse = lm * 0.0
            amse = (answer_head(at_answer[0][at[:, 0], at[:, 1]], b["box_k"], b["box_target"])
                    if answer_aux and at is not None and len(at) else lm * 0.0)
            xloss, xmetrics = extra_fn(b, samples) if extra_fn else (0.0, {})
            opt.zero_grad()
            (lm + aux * mse + answer_aux * amse + xloss).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            last = {"lm_loss": round(lm.item(), 4), "aux_mse": round(mse.item(), 4)}
            if answer_aux:
                last["answer_mse"] = round(amse.item(), 4)
            last.update({k: round(float(v), 4) for k, v in xmetrics.items()})
            if step % log_every == 0 or step == steps - 1:
                more = "".join(f" {k} {v:.4f}" for k, v in xmetrics.items())
                print(f"step {step} lm {last['lm_loss']:.3f} aux {last['aux_mse']:.4f} "
                      f"answer {last.get('answer_mse', 0):.4f}{more} ({time.time() - t0:.0f} s)", flush=True)
    finally:
        for h in hooks:
            h.remove()
    tiny.save_model(model.eval(), Path(out) / "model", mdir)
    return last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("init", help="gen 2 / 2.5 model or stage directory to start from")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the position loss (0: the control run)")
    ap.add_argument("--layer", type=int, default=1, help="decoder layer whose output predicts (row, column)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tasks", nargs="+", default=None, help=f"train on these tasks, equally weighted (default {MIX})")
    ap.add_argument("--max-objects", type=int, default=None, help="shapes per scene at most (default: stage 2's)")
    ap.add_argument("--start", type=int, default=7_000_000, help="first train seed (a continuation takes new scenes)")
    ap.add_argument("--answer-aux", type=float, default=0.0, help="weight of the box read-out at the answer's digits")
    ap.add_argument("--answer-layer", type=int, default=5, help="decoder layer whose answer states predict the box")
    ap.add_argument("--digit-weight", type=float, default=1.0, help="LM loss weight of each box number's first digit")
    ap.add_argument("--coarse", type=int, default=0, help="gen 2.5: train on boxes grown to multiples of N px")
    ap.add_argument("--mrope-section", default=None, help="T,H,W rotary pairs per M-RoPE axis (e.g. 8,2,22)")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.batch < 1 or a.aux < 0:
        ap.error("--steps and --batch must be >= 1 and --aux >= 0")
    mix = {t: 1.0 for t in a.tasks} if a.tasks else None
    print(run(a.init, a.out, a.steps, a.aux, a.layer, a.lr, a.batch, mix=mix, max_objects=a.max_objects,
              start=a.start, answer_aux=a.answer_aux, answer_layer=a.answer_layer, digit_weight=a.digit_weight,
              coarse=a.coarse,
              mrope_section=[int(x) for x in a.mrope_section.split(",")] if a.mrope_section else None), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
