"""Where does a gen 2 / 2.5 box break on the way from the image to the digits? Three links, measured on held-out
grounding questions about scenes with two or more objects, and a drill that trains the two a box needs.

  tokens  R² of each image token's (row, column) from decoder layer L's attention input (the normed residual
          stream): is the position in the image tokens at all? (M-RoPE gives it; loop.PositionHead asks for it)
  look    per head of layer L, at the states that write the box's four numbers: the attention mass on the named
          object's tokens, and how well the attended position (the attention-weighted mean of the image tokens'
          (row, column)) predicts the object's centre (R², no fit): does a head find the object?
  value   a least-squares map from head h's values at image tokens to their (row, column), applied to the head's
          output at the state writing x1 (the attention-weighted values): R² against the named object's centre.
          The map is linear, so if the values carried the position the same way on every token, the fetched
          output would carry the centre: does what the head fetches say *where*?

The drill (`--train STEPS`) is scripts/decoder_position_check.py's (stage-2-like steps, ViT frozen, the column
loss at layer 1 and the box read-out at the answer) with two more terms for layer L's head h:
  --lookup W  -log(the head's attention mass on the named object) at every state that writes a box number;
  --value W   a linear read-out of (row, column) / 16 from the head's values at every image token, MSE.
docs/training_log.md, session 27: the look-up loss makes the look (mass 0.03 -> 0.8, attended position R² 0.87)
but not the value (R² ~0); the value loss adds it (R² ~0.5); the boxes' digits still do not follow.

    python scripts/box_lookup_check.py assets/models/qvl-tiny-2.5 --layer 3 --head 0
    python scripts/box_lookup_check.py assets/models/qvl-tiny-2.5 --train 1200 --out runs/look \\
        --mrope-section 8,2,22 --lookup 1 --value 1 --answer-layer 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qvl.models.layers import apply_rotary
from qvl.train.batching import Collator, dense_targets, embed_kwargs
from qvl.train.loop import image_token_rc

HERE = Path(__file__).resolve().parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def named_object_tokens(sample, grid: tuple[int, int]) -> torch.Tensor | None:
    """[rows * cols] bool, raster order: the merged tokens that batching.dense_targets gives to the object a
    one-question grounding sample asks for (a shape or a text, found by its box). None for anything else."""
    if len(sample.qas) != 1 or sample.qas[0].task != "ground":
        return None
    scene, box = sample.scene, sample.qas[0].truth["box"]
    _, _, token_box, _ = dense_targets(scene, grid)
    want = torch.tensor([box[0] / scene.width, box[1] / scene.height, box[2] / scene.width, box[3] / scene.height])
    hit = (token_box - want).abs().amax(1) < 1e-5  # NaN rows (background) compare False
    return hit if hit.any() else None


def head_log_attention(attn: nn.Module, x, cos, sin, queries: torch.Tensor, head: int) -> torch.Tensor:
    """Log attention probabilities [Q, S] of query head `head` of a decoder attention module at rows `queries`
    of one sequence, over keys 0..max(queries), causal. x [T, H] is the module's input (already normed), cos /
    sin [T, head_dim] its M-RoPE tables -- the same computation as the module's own softmax(q k^T / sqrt(d))."""
    last = int(queries.max()) + 1
    kv = head // (attn.n_heads // attn.n_kv)  # GQA: the key / value head serving this query head
    k = attn.k_proj(x[:last]).view(last, attn.n_kv, attn.head_dim)[:, kv]  # (S, hd)
    k = apply_rotary(k, cos[:last], sin[:last])
    q = attn.q_proj(x[queries]).view(len(queries), attn.n_heads, attn.head_dim)[:, head]  # (Q, hd)
    q = apply_rotary(q, cos[queries], sin[queries])
    scores = (q @ k.T).float() * attn.head_dim ** -0.5
    future = torch.arange(last, device=x.device)[None, :] > queries[:, None]
    return scores.masked_fill(future, float("-inf")).log_softmax(-1)


def head_values(attn: nn.Module, x, head: int) -> torch.Tensor:
    """[T, head_dim]: the values the query head `head` reads (its key / value head's v_proj of x [T, H])."""
    kv = head // (attn.n_heads // attn.n_kv)
    return attn.v_proj(x).view(len(x), attn.n_kv, attn.head_dim)[:, kv]


class Inputs:
    """Catches decoder layer `layer`'s attention input (x normed, cos, sin) on every forward."""

    def __init__(self, model: nn.Module, layer: int):
        if model.generation == "1":
            raise SystemExit("gen 1 has no M-RoPE grid ids (its resampler tokens are one 1-D run): use gen 2 or 2.5")
        self.attn = model.model.layers[layer].self_attn
        self.x = self.cos = self.sin = None
        self.hook = self.attn.register_forward_pre_hook(self._catch)

    def _catch(self, module, args):
        self.x, self.cos, self.sin = args[:3]


def box_rows(model: nn.Module, batch: dict, samples):
    """Per batch row with one grounding box: (row, the four states writing its numbers, the image token
    positions [N], their (row, column) [N, 2], the named object's mask over them [N], the grid (rows, cols))."""
    ids, at = batch["input_ids"], batch["box_at"]
    img = ids == model.config.image_token_id
    rc_all = image_token_rc(ids, batch["positions"], model.config.image_token_id)
    start = 0
    for row, sample in enumerate(samples):
        idx = img[row].nonzero().squeeze(1)
        rc = rc_all[start:start + len(idx)]
        start += len(idx)
        queries = at[at[:, 0] == row, 1]
        if len(queries) != 4 or len(idx) == 0:
            continue
        grid = (int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1)
        named = named_object_tokens(sample, grid)
        if named is not None and len(named) == len(idx):
            yield row, queries, idx, rc, named, grid


class LookupLosses(nn.Module):
    """The drill's two terms for layer `layer`'s head `head` (see the module docstring). Its `mass` metric is
    exp(-lookup): the geometric mean of the head's mass on the named object over the batch's box-number states."""

    def __init__(self, model: nn.Module, layer: int, head: int, lookup: float, value: float):
        super().__init__()
        self.model = [model]  # not a submodule: its parameters are the drill's own
        self.inputs, self.head, self.lookup, self.value = Inputs(model, layer), head, lookup, value
        self.read = nn.Linear(model.config.text.head_dim, 2)

    def forward(self, batch: dict, samples):
        model, inp = self.model[0], self.inputs
        looks = []
        for row, queries, idx, rc, named, _ in box_rows(model, batch, samples):
            logp = head_log_attention(inp.attn, inp.x[row], inp.cos[row], inp.sin[row], queries, self.head)
            looks.append(-logp[:, idx[named]].logsumexp(1))  # -log(mass on the named object)
        img = batch["input_ids"] == model.config.image_token_id
        zero = self.read.weight.sum() * 0.0
        look = torch.cat(looks).mean() if looks else zero
        value = zero
        if img.any():
            rc = image_token_rc(batch["input_ids"], batch["positions"], model.config.image_token_id)
            value = nn.functional.mse_loss(self.read(head_values(inp.attn, inp.x[img], self.head)), rc.float() / 16.0)
        return self.lookup * look + self.value * value, {"lookup": look.detach(), "mass": (-look).exp().detach(),
                                                          "value_mse": value.detach()}


@torch.no_grad()
def measure(model_dir, n: int = 200, layer: int = 3, head: int = 0, batch_size: int = 8) -> dict:
    """The three links on the first `n` held-out grounding questions (those with two or more objects)."""
    from qvl.data import tasks as T
    from qvl.train import tiny

    probe = _script("position_probe")  # its ridge fit and R²
    model = tiny.load_model(model_dir).eval()
    g = model.generation
    inp = Inputs(model, layer)
    coll = Collator(g, tiny.load_tokenizer(g, model_dir), model.config, loss="assistant", boxes=True)
    samples = [s for s in T.eval_samples("ground", g, n) if len(s.scene.shapes) + len(s.scene.texts) >= 2]
    tok_x, tok_rc, tok_v = [], [], []
    mass, attended, fetched, centre = [[] for _ in range(inp.attn.n_heads)], [], [], []
    for i in range(0, len(samples), batch_size):
        part = samples[i:i + batch_size]
        batch = coll(part)
        model(model.embed(batch["input_ids"], **embed_kwargs(batch["vision"])), batch["positions"])
        for row, queries, idx, rc, named, (rows, cols) in box_rows(model, batch, part):
            x, cos, sin = inp.x[row], inp.cos[row], inp.sin[row]
            values = head_values(inp.attn, x[:int(queries.max()) + 1], head)  # the image comes before the answer
            tok_x.append(x[idx])
            tok_rc.append(rc)
            tok_v.append(values[idx])
            box, scene = part[row].qas[0].truth["box"], part[row].scene
            # the object's centre in token units: token (r, c) covers [c, c + 1) / cols of the width
            centre.append([(box[1] + box[3]) / 2 / scene.height * rows - 0.5,
                           (box[0] + box[2]) / 2 / scene.width * cols - 0.5])
            for h in range(inp.attn.n_heads):
                p = head_log_attention(inp.attn, x, cos, sin, queries, h).exp()  # (4, S)
                mass[h].append(float(p[:, idx[named]].sum(1).mean()))
                if h == head:
                    w = p[0, idx]  # the x1-writing state's weights on the image tokens
                    attended.append((w[:, None] * rc.float()).sum(0) / w.sum())
                    fetched.append(p[0] @ values)
    if not centre:
        raise SystemExit("no held-out grounding question with one box and two or more objects")
    tok_x, tok_rc = torch.cat(tok_x).numpy(), torch.cat(tok_rc).float().numpy()
    test = np.arange(len(tok_x)) % 5 == 0
    tok_v = np.c_[torch.cat(tok_v).numpy(), np.ones(len(tok_rc))]
    value_map = np.linalg.lstsq(tok_v, tok_rc, rcond=None)[0]  # values -> (row, column), fit on every image token
    fetched = np.c_[torch.stack(fetched).numpy(), np.ones(len(fetched))]
    centre = np.array(centre)
    return {"model": str(model_dir), "layer": layer, "head": head, "questions": len(centre),
            "tokens_r2_row_col": probe.ridge_r2(tok_x, tok_rc, test),
            "mass_on_named_per_head": [round(float(np.mean(m)), 3) for m in mass],
            "attended_r2_row_col": [round(v, 3) for v in probe.r2(torch.stack(attended).numpy(), centre)],
            "value_r2_row_col": [round(v, 3) for v in probe.r2(fetched @ value_map, centre)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="gen 2 / 2.5 model or stage directory")
    ap.add_argument("--n", type=int, default=200, help="held-out grounding questions to draw (multi-object ones kept)")
    ap.add_argument("--layer", type=int, default=3, help="decoder layer whose heads are measured / drilled")
    ap.add_argument("--head", type=int, default=0, help="the head the value link (and the drill) is about")
    ap.add_argument("--train", type=int, default=0, metavar="STEPS", help="drill this many steps first (needs --out)")
    ap.add_argument("--out", help="the drill's output folder (OUT/model)")
    ap.add_argument("--lookup", type=float, default=1.0, help="drill: weight of the look-up loss")
    ap.add_argument("--value", type=float, default=0.0, help="drill: weight of the value-position loss")
    ap.add_argument("--answer-layer", type=int, default=5, help="drill: layer of the box read-out at the answer")
    ap.add_argument("--mrope-section", default=None, help="drill: re-lay M-RoPE first, e.g. 8,2,22")
    ap.add_argument("--tasks", nargs="+", default=None, help="drill: these tasks, equally weighted (default: "
                    "decoder_position_check's grounding 50 %%, colour and shape 25 %% each)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--start", type=int, default=7_000_000, help="drill: first train seed")
    a = ap.parse_args(argv)
    if a.n < 1 or a.train < 0 or (a.train and not a.out):
        ap.error("--n must be >= 1, --train >= 0, and --train needs --out")
    model_dir = a.model
    if a.train:
        section = [int(v) for v in a.mrope_section.split(",")] if a.mrope_section else None
        dp = _script("decoder_position_check")
        mix = {t: 1.0 for t in a.tasks} if a.tasks else None
        print(dp.run(a.model, a.out, a.train, batch=a.batch, start=a.start, answer_aux=1.0, mix=mix,
                     answer_layer=a.answer_layer, mrope_section=section,
                     extra=lambda m: LookupLosses(m, a.layer, a.head, a.lookup, a.value)), flush=True)
        model_dir = Path(a.out) / "model"
    print(json.dumps(measure(model_dir, a.n, a.layer, a.head)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
