"""Can a decoder read *where* an image token is from M-RoPE alone?

The vision tokens of Qwen2-VL / Qwen2.5-VL carry no absolute position in their content: the ViT has no
position embedding (2-D RoPE only) and a bias-free patch embedding, so on a plain background every token
looks the same wherever it sits. Where an object is can only come from the decoder's M-RoPE ids
(t, h, w), and M-RoPE gives each axis a contiguous block of frequencies: t the fastest, h the middle, w the
slowest (`mrope_section`). At the tiny models' rope_theta 10 000 and head_dim 64, the w block's fastest
frequency is 10000^(-40/64) = 0.0032 rad per column: the widest image turns a key by < 0.1 rad.

This check isolates that. Each row is `text, <|vision_start|>, an H x W grid of identical image tokens with
one marked token, <|vision_end|>, a question token`, with qvl's own M-RoPE ids (`qvl.positions`), and the
decoder must name the marked token's row and column from the question token (two linear read-outs,
cross-entropy). Content says nothing about position, so everything comes from the rotary ids.

    python scripts/mrope_column_check.py --theta 10000      # the tiny models' setting
    python scripts/mrope_column_check.py --theta 100        # every axis gets faster frequencies
    python scripts/mrope_column_check.py --section 32,0,0   # all frequencies on t: plain 1-D RoPE over the raster

Prints row / column accuracy on fresh grids every `--every` steps (chance: 1 / --max-side).
docs/training_log.md (session 6) has the numbers.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from qvl import positions
from qvl.config import TextConfig
from qvl.models.qwen2_vl import Qwen2Model, mrope_cos_sin

TEXT, START, BACKGROUND, MARKED, END, QUESTION = range(6)


def grids(batch: int, lo: int, hi: int, g: torch.Generator):
    """-> input_ids [B, T] (right-padded with TEXT), attention_mask, position_ids [3, B, T], question slot [B],
    row and column of the marked token [B]. Grid sides are drawn from lo..hi (in merged tokens)."""
    hs = torch.randint(lo, hi + 1, (batch,), generator=g)
    ws = torch.randint(lo, hi + 1, (batch,), generator=g)
    T = 3 + 1 + hi * hi + 2
    ids = torch.full((batch, T), TEXT, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.long)
    rows, cols, slots, grid_thw = [], [], [], []
    for b, (h, w) in enumerate(zip(hs.tolist(), ws.tolist())):
        r, c = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
        image = torch.full((h * w,), BACKGROUND, dtype=torch.long)
        image[r * w + c] = MARKED
        row = torch.cat([torch.tensor([TEXT, TEXT, TEXT, START]), image, torch.tensor([END, QUESTION])])
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
        rows.append(r), cols.append(c), slots.append(len(row) - 1), grid_thw.append((1, 2 * h, 2 * w))
    placeholders = ids.masked_fill(ids == MARKED, BACKGROUND)  # every grid token is an image placeholder
    pos, _ = positions.mrope_position_ids(placeholders, grid_thw, attention_mask=mask, image_token_id=BACKGROUND)
    return ids, mask, pos, torch.tensor(slots), torch.tensor(rows), torch.tensor(cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--theta", type=float, default=10000.0)
    ap.add_argument("--section", default="8,12,12", help="mrope_section (t, h, w), sums to head_dim / 2 = 32")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256, help="width; heads = hidden / 64 (head_dim 64 as qvl-tiny)")
    ap.add_argument("--min-side", type=int, default=3)
    ap.add_argument("--max-side", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    heads = a.hidden // 64
    cfg = TextConfig(vocab_size=8, hidden_size=a.hidden, intermediate_size=a.hidden * 7 // 4,
                     num_hidden_layers=a.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                     rope_theta=a.theta,
                     mrope_section=[int(x) for x in a.section.split(",")])
    model = Qwen2Model(cfg)
    readout = torch.nn.Linear(cfg.hidden_size, 2 * a.max_side)  # row logits | column logits
    params = list(model.parameters()) + list(readout.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed)
    held = torch.Generator().manual_seed(a.seed + 1_000_003)
    test = grids(512, a.min_side, a.max_side, held)

    def logits(ids, pos, slots):
        cos, sin = mrope_cos_sin(pos, cfg, torch.float32)
        # right padding sits after the question token, so the plain causal mask is exact
        h = model(model.embed_tokens(ids), cos, sin, None, None, 0)
        out = readout(h[torch.arange(len(slots)), slots])  # (B, 2 * max_side)
        return out[:, :a.max_side], out[:, a.max_side:]

    print(f"theta {a.theta:g}, mrope_section {cfg.mrope_section}, {a.layers} layers x {a.hidden}, grids "
          f"{a.min_side}..{a.max_side} per side; chance {1 / a.max_side:.3f} (a row/column the size of the grid: "
          f"~{2 / (a.min_side + a.max_side):.3f})", flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        ids, mask, pos, slots, rows, cols = grids(a.batch, a.min_side, a.max_side, g)
        lr_rows, lc_cols = logits(ids, pos, slots)
        loss = F.cross_entropy(lr_rows, rows) + F.cross_entropy(lc_cols, cols)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % a.every == 0 or step == a.steps:
            with torch.no_grad():
                ids, mask, pos, slots, rows, cols = test
                pr, pc = logits(ids, pos, slots)
                acc_r = (pr.argmax(-1) == rows).float().mean().item()
                acc_c = (pc.argmax(-1) == cols).float().mean().item()
                off_c = (pc.argmax(-1) - cols).abs().float().mean().item()
            print(f"step {step:5d}  loss {loss.item():.3f}  row acc {acc_r:.3f}  column acc {acc_c:.3f}  "
                  f"mean column error {off_c:.2f}  ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
