"""Where does a trained model know an image token's position, and do its boxes use it?

Measurements on held-out generated scenes (numbers in docs/training_log.md: sessions 6 and 14 for
positions, 21 for time):

  tokens  ridge probes from an image token's hidden state to its (row, column) in the merged grid, at the
          decoder's input (the vision tokens themselves) and after chosen decoder layers; R² on held-out
          images (every 5th image). Gen 2/2.5 tokens carry no position in their content (the ViT has no
          position embedding), so anything above ~0 comes from the decoder's rotary ids.
  boxes   grounding on scenes with one shape: the error of the predicted box centre along x and y, as a
          fraction of the image side, next to a constant guess (the mean centre), and the boxes' mean IoU;
          no look-up is needed.
  answer  the same one-shape grounding answers, teacher-forced: ridge probes from the hidden state at the
          position that writes x1's (y1's) first digit to the shape's x1 / width (y1 / height). If the decoder
          holds the column at its image tokens but this R² is ~0, the answer never looks the position up; if
          it is high while the boxes miss, only the read-out into digits is missing.
  digits  the same answers, teacher-forced: how often the model's argmax writes each box number's first digit,
          against always writing the most frequent one, and how well read-outs from each layer's state at that
          position name the digit (logistic) or the number (ridge, and the digit of the number it predicts):
          is the digit in the state and not read, or is the position held too coarsely to give a digit?
  time    the same two questions for video "when" (gens 2 / 2.5), teacher-forced: ridge probes from a video
          token's hidden state to its M-RoPE temporal id (none of it is in the token's content, only in the
          rotary ids), and from the state that writes the answer's first digit to the event's true second —
          beside what the question's verb and the clip's length alone predict (a least-squares fit on both).

    python scripts/position_probe.py assets/models/qvl-tiny-2.5
    python scripts/position_probe.py assets/models/qvl-tiny-1 --n 60 --skip answer,digits,time
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def r2(pred: np.ndarray, y: np.ndarray) -> list[float]:
    """1 - SSE / SST per column of y [N, K]."""
    return [float(v) for v in 1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)]


def ridge_predict(X: np.ndarray, y: np.ndarray, test: np.ndarray, lam: float = 1.0) -> np.ndarray:
    """Standardised ridge regression fit on ~test rows -> its predictions [test rows, K]."""
    train = ~test
    mu, sd = X[train].mean(0), X[train].std(0) + 1e-6
    Xs, y0 = (X - mu) / sd, y[train].mean(0)  # the intercept is the train mean: not shrunk by the ridge
    A = Xs[train].T @ Xs[train] + lam * np.eye(Xs.shape[1])
    return Xs[test] @ np.linalg.solve(A, Xs[train].T @ (y[train] - y0)) + y0


def ridge_r2(X: np.ndarray, y: np.ndarray, test: np.ndarray, lam: float = 1.0) -> list[float]:
    """Standardised ridge regression fit on ~test rows, R² per target column on the test rows."""
    return [round(v, 3) for v in r2(ridge_predict(X, y, test, lam), y[test])]


def token_positions(vlm, generation: str, n: int, per_image: int = 48, seed: int = 0) -> dict:
    """{"input" | layer: [R² row, R² column]} over the image tokens of n held-out colour scenes."""
    from qvl.data import tasks as T
    from qvl.generate import prompt_positions
    from qvl.models.qwen2_vl import Capture

    model = vlm.model
    n_layers = len(model.transformer.h) if generation == "1" else len(model.model.layers)
    layers = sorted({0, 1, n_layers // 2 - 1, n_layers - 1})
    feats: dict = {k: [] for k in ["input", *layers]}
    targets, image_of = [], []
    rng = np.random.default_rng(seed)
    for i, s in enumerate(T.eval_samples("color", generation, n)):
        batch = vlm.prepare([s.prompt()])
        cap = Capture(hidden_layers=layers)
        pos, _ = prompt_positions(model, batch.input_ids, batch.attention_mask, batch.vision)
        with torch.no_grad():  # one pass: the embeddings are the probe's "input" row and the decoder's input
            embeds = model.embed(batch.input_ids, **batch.vision)
            model(embeds, pos, capture=cap, last_only=True)
        item = batch.media[0]
        if item.grid_thw is None:  # gen 1: a square of resampler queries
            H = W = int(round((item.end - item.start) ** 0.5))
        else:
            H, W = item.grid_thw[1] // 2, item.grid_thw[2] // 2  # merged tokens, row-major
        pick = rng.choice(item.end - item.start, size=min(per_image, item.end - item.start), replace=False)
        targets.append(np.stack([pick // W / max(H - 1, 1), pick % W / max(W - 1, 1)], 1))
        image_of += [i] * len(pick)
        feats["input"].append(embeds[0, item.start + pick].float().numpy())
        for layer in layers:
            feats[layer].append(cap.hidden[layer][0][0, item.start + pick].float().numpy())
    y, test = np.concatenate(targets), np.array(image_of) % 5 == 0
    return {str(k): ridge_r2(np.concatenate(v), y, test) for k, v in feats.items()}


def one_shape_grounding(generation: str, n: int) -> list:
    """Held-out grounding samples on scenes with one shape, asking for the shape (not a word)."""
    from qvl.data import tasks as T

    cfg = T.DataConfig()
    cfg = replace(cfg, scene=replace(cfg.scene, max_objects=1))
    return [s for s in T.eval_samples("ground", generation, n, config=cfg)
            if s.truth["label"] not in {t.text for t in s.scene.texts}]


def box_errors(vlm, generation: str, n: int) -> dict:
    """Centre errors (fraction of width / height) of one-shape grounding answers vs a constant guess; their mean
    IoU with the true box and the share at IoU >= 0.5 (an unparsed reply counts 0)."""
    from qvl import eval as E
    from qvl import grounding
    from qvl.data import tasks as T

    samples = one_shape_grounding(generation, n)
    replies = E.vlm_reply_fn(vlm)(samples)
    true, pred, ious = [], [], []
    for reply, s in zip(replies, samples):
        t = s.truth
        (h, w), b = t["original_size"], t["box"]
        true.append(((b[0] + b[2]) / 2 / w, (b[1] + b[3]) / 2 / h))
        boxes = [x for x in grounding.parse(reply, generation, original_size=t["original_size"],
                                            resized_size=t["resized_size"]) if isinstance(x, grounding.Box)]
        p = boxes[0].xyxy if boxes else None
        pred.append(((p[0] + p[2]) / 2 / w, (p[1] + p[3]) / 2 / h) if p else (np.nan, np.nan))
        ious.append(T.iou(p, b) if p else 0.0)
    true, pred, ious = np.array(true), np.array(pred), np.array(ious)
    err = np.nanmean(np.abs(pred - true), 0)
    const = np.abs(true - true.mean(0)).mean(0)
    return {"n": len(samples), "parsed": round(float(np.mean(~np.isnan(pred[:, 0]))), 3),
            "centre_error_x": round(float(err[0]), 3), "centre_error_y": round(float(err[1]), 3),
            "constant_guess_x": round(float(const[0]), 3), "constant_guess_y": round(float(const[1]), 3),
            "mean_iou": round(float(ious.mean()), 3), "iou_0.5": round(float((ious >= 0.5).mean()), 3)}


def _teacher_forcing(vlm, generation: str, what: str):
    """(decoder, its layer indices, an assistant-loss Collator, {layer: []}) for the teacher-forced answer probes."""
    from qvl.train.batching import Collator

    if generation == "1":
        raise SystemExit(f"{what}: gen 2 / 2.5 only")
    model = vlm.model
    layers = list(range(len(model.model.layers)))
    return model, layers, Collator(generation, vlm.tokenizer, model.config, loss="assistant"), {k: [] for k in layers}


def answer_positions(vlm, generation: str, n: int) -> dict:
    """{layer: [R² x1, R² y1]} at the positions writing x1's and y1's first digit (teacher-forced)."""
    from qvl.models.qwen2_vl import Capture
    from qvl.train.batching import answer_boxes, embed_kwargs

    model, layers, coll, feats = _teacher_forcing(vlm, generation, "answer")
    targets = []
    for s in one_shape_grounding(generation, n):
        b = coll([s])
        written = answer_boxes(b["input_ids"][0], b["labels"][0], vlm.tokenizer, generation)[0]
        starts = [written[0][0], written[1][0]]  # first-digit positions of x1, y1
        cap = Capture(hidden_layers=layers)
        with torch.no_grad():
            model(model.embed(b["input_ids"], **embed_kwargs(b["vision"])), b["positions"], capture=cap)
        (h, w), box = s.truth["original_size"], s.truth["box"]  # the box in original pixels
        # the state that *writes* a digit is the one before it
        for layer in layers:
            feats[layer].append(np.concatenate([cap.hidden[layer][0][0, i - 1].float().numpy() for i in starts]))
        targets.append((box[0] / w, box[1] / h))
    y = np.array(targets)
    test = np.arange(len(y)) % 5 == 0
    H = model.config.text.hidden_size
    # x1 from the state before x1's first digit, y1 from the one before y1's
    lam = float(len(y))  # one state per scene and as many features as scenes: a ridge this strong does not overfit
    return {str(k): [ridge_r2(np.stack(v)[:, :H], y[:, :1], test, lam)[0],
                     ridge_r2(np.stack(v)[:, H:], y[:, 1:], test, lam)[0]] for k, v in feats.items()}


def logistic_accuracy(X: np.ndarray, y: np.ndarray, test: np.ndarray, decay: float = 1e-2) -> float:
    """Held-out accuracy of a multinomial logistic read-out (standardised features, L2 `decay`, LBFGS) fit on
    ~test rows."""
    train = ~test
    mu, sd = X[train].mean(0), X[train].std(0) + 1e-6
    Xs = torch.tensor((X - mu) / sd, dtype=torch.float32)
    classes = np.unique(y[train])
    target = torch.tensor(np.searchsorted(classes, y[train]))
    lin = torch.nn.Linear(X.shape[1], len(classes))
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(Xs[train]), target) + decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = classes[lin(Xs[test]).argmax(1).numpy()]
    return round(float((pred == y[test]).mean()), 3)


def answer_digits(vlm, generation: str, n: int, coarse: int = 0) -> dict:
    """The first digit of each box number, teacher-forced on one-shape grounding answers, at the state that
    writes it: `lm` the model's own accuracy; `prior` always the fit half's most frequent first digit; per
    decoder layer, `probe` a logistic read-out of the digit from that state, `ridge_r2` a ridge read-out of the
    number / its side and `via_ridge` the first digit of the number that read-out predicts; `number_lm` the share
    of numbers whose every digit is the model's argmax given the digits before. Every 5th scene is held out of
    the fits. If `probe` is well above `lm`, the state says the digit and the LM head does not read it; if
    `via_ridge` stays near `prior` while `ridge_r2` is high, the position is held too coarsely for a digit.
    `coarse` > 0: the answers' boxes grown to that grid first (decoder_position_check.py --coarse)."""
    from qvl.models.qwen2_vl import Capture
    from qvl.train.batching import answer_boxes, embed_kwargs

    model, layers, coll, feats = _teacher_forcing(vlm, generation, "digits")
    digit, lm_right, number_right, value, side, scene_of = [], [], [], [], [], []
    snap = _script("decoder_position_check").snap_boxes if coarse else None
    for j, s in enumerate(one_shape_grounding(generation, n)):
        b = coll([snap(s, coarse) if coarse else s])
        ids = b["input_ids"][0]
        cap = Capture(hidden_layers=layers)
        with torch.no_grad():
            logits = model(model.embed(b["input_ids"], **embed_kwargs(b["vision"])), b["positions"], capture=cap)[0]
        best = logits.argmax(-1)
        h, w = s.truth["resized_size"] if generation == "2.5" else (1000, 1000)
        for k, (i, v) in enumerate(answer_boxes(ids, b["labels"][0], vlm.tokenizer, generation)[0]):
            digits = len(str(v))
            digit.append(int(str(v)[0]))
            lm_right.append(bool(best[i - 1] == ids[i]))  # the state that writes a token is the one before it
            number_right.append(bool((best[i - 1:i - 1 + digits] == ids[i:i + digits]).all()))
            value.append(v)
            side.append(w if k % 2 == 0 else h)
            scene_of.append(j)
            for layer in layers:
                feats[layer].append(cap.hidden[layer][0][0, i - 1].float().numpy())
    y, v, sides = np.array(digit), np.array(value, dtype=float), np.array(side, dtype=float)
    test = np.array(scene_of) % 5 == 0
    prior = np.bincount(y[~test], minlength=10).argmax()
    out = {"numbers": len(y), "lm": round(float(np.mean(np.array(lm_right)[test])), 3),
           "number_lm": round(float(np.mean(np.array(number_right)[test])), 3),
           "prior": round(float((y[test] == prior).mean()), 3), "layers": {}}
    frac = (v / sides)[:, None]
    for layer, f in feats.items():
        X = np.stack(f)
        pred = ridge_predict(X, frac, test, float(len(y)) / 4)
        # the predicted fractions turned back into numbers, and their first digits
        guess = np.clip(np.rint(pred[:, 0] * sides[test]), 0, None).astype(int)
        via = np.array([int(str(g)[0]) for g in guess])
        out["layers"][str(layer)] = {"probe": logistic_accuracy(X, y, test),
                                     "ridge_r2": round(r2(pred, frac[test])[0], 3),
                                     "via_ridge": round(float((via == y[test]).mean()), 3)}
    return out


def answer_start(ids: list[int], coll) -> int:
    """Index of the last assistant turn's first content token (the start of the Collator's last assistant-mask
    run); the hidden state at index - 1 writes it."""
    mask = coll.assistant_mask(ids)
    return max(i for i in range(1, len(mask)) if mask[i] and not mask[i - 1])


def answer_times(vlm, generation: str, n: int, per_video: int = 48, seed: int = 0) -> dict:
    """{"tokens": {"input" | layer: R² of the temporal id}, "answer": {layer: R² of the event's second},
    "verb_and_length": R² of the event's second from the verb and the clip's length alone} over n held-out "when"
    questions, teacher-forced; every 5th video is held out of the fit."""
    from qvl.data import tasks as T
    from qvl.models.qwen2_vl import Capture
    from qvl.train.batching import Collator, embed_kwargs

    if generation == "1":
        raise SystemExit("time: gens 2 / 2.5 only (gen 1 has no video)")
    model, tok = vlm.model, vlm.tokenizer
    layers = list(range(len(model.model.layers)))
    coll = Collator(generation, tok, model.config, loss="assistant")
    rng = np.random.default_rng(seed)
    tokens: dict = {k: [] for k in ["input", *layers]}
    answer: dict = {k: [] for k in layers}
    t_ids, video_of, seconds, prior = [], [], [], []
    for i, s in enumerate(T.eval_samples("video_when", generation, n)):
        b = coll([s])
        start = answer_start(b["input_ids"][0].tolist(), coll)
        cap = Capture(hidden_layers=layers)
        with torch.no_grad():
            embeds = model.embed(b["input_ids"], **embed_kwargs(b["vision"]))
            model(embeds, b["positions"], capture=cap)
        video = (b["input_ids"][0] == model.config.video_token_id).nonzero()[:, 0]
        pick = video[rng.choice(len(video), size=min(per_video, len(video)), replace=False)]
        t = b["positions"][0, 0]  # (L,) the temporal row of the M-RoPE ids
        t_ids.append((t[pick] - t[video[0]]).float().numpy())
        video_of += [i] * len(pick)
        tokens["input"].append(embeds[0, pick].float().numpy())
        for layer in layers:
            h = cap.hidden[layer][0][0]
            tokens[layer].append(h[pick].float().numpy())
            answer[layer].append(h[start - 1].float().numpy())  # the state that writes the first digit
        seconds.append(s.truth["time"])
        appear, span = float(s.truth["event"] == "appear"), float(t[video[-1]] - t[video[0]])
        prior.append([1.0, appear, span, appear * span])
    y, test = np.concatenate(t_ids)[:, None], np.array(video_of) % 5 == 0
    ys, test_s = np.array(seconds)[:, None], np.arange(len(seconds)) % 5 == 0
    X = np.array(prior)
    w = np.linalg.lstsq(X[~test_s], ys[~test_s], rcond=None)[0]
    baseline = 1 - ((X[test_s] @ w - ys[test_s]) ** 2).sum() / ((ys[test_s] - ys[test_s].mean()) ** 2).sum()
    return {"tokens": {str(k): ridge_r2(np.concatenate(v), y, test)[0] for k, v in tokens.items()},
            "answer": {str(k): ridge_r2(np.stack(v), ys, test_s, float(len(ys)))[0] for k, v in answer.items()},
            "verb_and_length": round(float(baseline), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=120, help="held-out scenes per measurement")
    ap.add_argument("--skip", default="", help="tokens, boxes, answer, digits and/or time")
    ap.add_argument("--coarse", type=int, default=0, help="digits: teacher-force boxes grown to multiples of N px")
    a = ap.parse_args(argv)
    import qvl

    vlm = qvl.load(a.model)
    out = {"model": a.model, "generation": vlm.generation}
    if "tokens" not in a.skip:
        out["r2_row_column"] = token_positions(vlm, vlm.generation, a.n)
    if "boxes" not in a.skip:
        out["one_shape_boxes"] = box_errors(vlm, vlm.generation, a.n)
    if "answer" not in a.skip:
        out["r2_answer_x1_y1"] = answer_positions(vlm, vlm.generation, a.n)
    if "digits" not in a.skip:
        out["first_digits"] = answer_digits(vlm, vlm.generation, a.n, a.coarse)
    if "time" not in a.skip:
        out["r2_time"] = answer_times(vlm, vlm.generation, a.n)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
