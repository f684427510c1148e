"""Does the tiny decoder learn to copy from a varying distance (an induction head)?

Every row is `x_1 .. x_L SEP x_1 .. x_L` with random tokens x and a random length L, and the loss is on the
copy only, so the only way below the unigram loss (ln V) is to find the token after the previous occurrence
of the current one: the look-up-and-copy step that the recipe's questions (colour of the named shape, box of
the named object, the quoted word) need. With L fixed the copy sits at a fixed distance, which RoPE learns
without any look-up; `--min-len < --max-len` forces the real thing. docs/training_log.md has the numbers.

    python scripts/induction_check.py --vocab 64 --min-len 8 --max-len 40 --steps 3000 --lr 3e-4
    python scripts/induction_check.py --init runs/recipe/gen2.5/lm-pretrain/model   # a trained LM stand-in
    python scripts/induction_check.py --steps 1300 --save runs/copy   # then: python -m qvl.train ... --init runs/copy

Prints the copy loss and the copy accuracy (greedy) averaged over every `--every` steps.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from qvl.train import tiny


def rows(batch: int, vocab: int, lo: int, hi: int, first_id: int, sep_id: int, g: torch.Generator):
    """-> input_ids [B, 2*hi+1] (right-padded with sep), target mask [B, 2*hi+1] (True where the next token
    is part of the copy)."""
    T = 2 * hi + 1
    ids = torch.full((batch, T), sep_id, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.bool)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=g)
    for b, L in enumerate(lengths.tolist()):
        x = torch.randint(first_id, first_id + vocab, (L,), generator=g)
        ids[b, :L], ids[b, L + 1:2 * L + 1] = x, x
        mask[b, L:2 * L] = True  # predicting x_1 .. x_L of the copy, from SEP .. x_{L-1}
    return ids, mask


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="runs/recipe/tokenizer", help="tokenizer dir (built there if missing)")
    ap.add_argument("--init", default=None, help="start from this model directory (default: fresh tiny 2.5)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of a fresh model")
    ap.add_argument("--vocab", type=int, default=64, help="how many distinct tokens the rows draw from")
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=40)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="write the trained model here (qvl layout), e.g. to --init a stage")
    a = ap.parse_args(argv)

    torch.manual_seed(a.seed)
    tok_dir = tiny.build_tokenizers(a.tokenizer)
    if a.init:
        model = tiny.load_model(a.init)
    else:
        tok = tiny.load_tokenizer("2.5", tok_dir)
        model = tiny.new_model("2.5", tok, a.seed, decoder={"layers": a.layers} if a.layers else None)
    vocab_size = model.config.text.vocab_size
    first_id, sep_id = 100, 5
    if first_id + a.vocab > vocab_size:
        raise SystemExit(f"--vocab {a.vocab}: the model has only {vocab_size} tokens")
    if not 1 <= a.min_len <= a.max_len:
        raise SystemExit(f"--min-len {a.min_len} / --max-len {a.max_len}: need 1 <= min <= max")
    params = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed + 1)
    model.train()
    print(f"vocab {a.vocab} (unigram loss {math.log(a.vocab):.2f}), rows of {a.min_len}-{a.max_len} tokens, "
          f"batch {a.batch}, lr {a.lr}, decoder {model.config.text.num_hidden_layers} layers")
    loss_sum = acc_sum = 0.0
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        ids, mask = rows(a.batch, a.vocab, a.min_len, a.max_len, first_id, sep_id, g)
        pos = torch.arange(ids.shape[1]).expand(3, *ids.shape)  # equal t/h/w ids: plain 1-D RoPE
        logits = model(model.embed(ids), pos)[:, :-1]
        target = ids[:, 1:]
        m = mask[:, :-1]
        loss = F.cross_entropy(logits[m], target[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_sum += loss.item()
        acc_sum += (logits[m].argmax(-1) == target[m]).float().mean().item()
        if step % a.every == 0:
            print(f"step {step:5d}  copy loss {loss_sum / a.every:5.2f}  copy acc {100 * acc_sum / a.every:5.1f} %  "
                  f"{time.perf_counter() - t0:6.0f} s", flush=True)
            loss_sum = acc_sum = 0.0
    if a.save:
        tiny.save_model(model.eval(), a.save, tok_dir)
        print(f"saved {a.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
