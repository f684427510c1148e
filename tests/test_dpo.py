"""Rejection sampling and DPO: the loss equals a direct computation; acceptance and pairs are what they claim."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qvl.data import tasks as T
from qvl.train import dpo
from qvl.train import stages as S
from qvl.train import tiny
from qvl.train.batching import IGNORE, Collator

from test_train import micro_model, small, tok_dir  # noqa: F401  (fixture)


def _answer_logp(model, vlm_like, sample, answer, tok):
    """Independent: full forward on prompt+answer, log_softmax, sum over the answer's own tokens (found by
    tokenising the prompt with the generation prompt: everything after it is the answer + <|im_end|>)."""
    coll = Collator("2.5", tok, model.config, loss="assistant")
    prompt_rows, _, _ = coll.encode([sample.prompt()])
    n_prompt = len(prompt_rows[0]) + len(tok.encode("<|im_start|>assistant\n"))
    full = S.record_sample({"task": sample.task, "seed": sample.seed}, "2.5", answer)
    b = coll([full])
    ids = b["input_ids"][0]
    logits = model(model.embed(b["input_ids"], pixel_values=b["vision"]["pixel_values"],
                               image_grid_thw=b["vision"]["image_grid_thw"]), b["positions"])[0]
    logp = torch.log_softmax(logits.double(), -1)
    answer_ids = tok.encode(answer) + [tok.im_end_id]
    assert ids[n_prompt:n_prompt + len(answer_ids)].tolist() == answer_ids
    return sum(logp[t - 1, ids[t]] for t in range(n_prompt, n_prompt + len(answer_ids)))


def test_dpo_loss_equals_a_direct_computation(tok_dir):
    policy, tok = micro_model("2.5", tok_dir, seed=1)
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    samples = [T.make_sample(t, 5 + i, "2.5") for i, t in enumerate(("color", "ground"))]
    chosen = [s.answer for s in samples]
    rejected = ["purple", '```json\n[\n\t{"bbox_2d": [1, 2, 30, 40], "label": "x"}\n]\n```']
    recs = [{"task": s.task, "seed": s.seed} for s in samples]
    coll = Collator("2.5", tok, policy.config, loss="assistant")
    batch = coll([S.record_sample(r, "2.5", a) for r, a in zip(recs, chosen)]
                 + [S.record_sample(r, "2.5", a) for r, a in zip(recs, rejected)])
    beta = 0.3
    loss, metrics = dpo.dpo_loss(dpo.sequence_logps(policy, batch), dpo.sequence_logps(ref, batch), beta)
    direct = []
    for s, yw, yl in zip(samples, chosen, rejected):
        lw = _answer_logp(policy, None, s, yw, tok) - _answer_logp(ref, None, s, yw, tok)
        ll = _answer_logp(policy, None, s, yl, tok) - _answer_logp(ref, None, s, yl, tok)
        direct.append(-F.logsigmoid(beta * (lw - ll)))
    assert loss.item() == pytest.approx(torch.stack(direct).mean().item(), rel=1e-4, abs=1e-5)
    assert 0.0 <= metrics["reward_acc"].item() <= 1.0
    # + the chosen answers' per-token NLL (their tokens: the answer and <|im_end|>), as the dpo stage trains
    lengths = (batch["labels"] != IGNORE).sum(1)
    loss_nll, m = dpo.dpo_loss(dpo.sequence_logps(policy, batch), dpo.sequence_logps(ref, batch), beta, lengths, 0.5)
    nll = [-_answer_logp(policy, None, s, yw, tok) / (len(tok.encode(yw)) + 1) for s, yw in zip(samples, chosen)]
    want = torch.stack(direct).mean() + 0.5 * torch.stack(nll).mean()
    assert loss_nll.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
    assert m["chosen_nll"].item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-4)
    assert S.get("dpo").nll_weight > 0


def test_rejection_sampling_accepts_only_correct_answers():
    qs = dpo.questions("2.5", 24, start=S.get("rs-sft").seed_offset)
    good, bad, stats = dpo.rejection_sample(lambda ss: [s.answer for s in ss], qs)
    assert stats["acceptance_rate"] == 1.0 and not bad and len(good) == 24
    good, bad, stats = dpo.rejection_sample(lambda ss: ["no idea"] * len(ss), qs)
    assert stats["acceptance_rate"] == 0.0 and len(bad) == 24
    assert set(stats["per_task"]) == {s.task for s in qs}
    assert all(T.split_of(s.seed) == "train" for s in qs)


def test_pairs_prefer_the_truth_and_perturbed_boxes_miss():
    qs = dpo.questions("2.5", 40, start=S.get("rs-sft").seed_offset, tasks=["ground", "color"])
    good, bad, _ = dpo.rejection_sample(lambda ss: [s.answer if s.task == "ground" else "wrong" for s in ss], qs)
    pairs = dpo.make_pairs(good, bad, "2.5")
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    for p in pairs:
        s = T.make_sample(p["task"], p["seed"], "2.5")
        assert T.score(p["task"], p["chosen"], s.truth) > 0.9  # boxes: integer rounding of the resized coords
        if p["task"] == "ground":
            assert T.score("ground", p["rejected"], s.truth) < 0.5  # a real mistake, parsable
            assert "bbox_2d" in p["rejected"]


def test_dpo_stage_starts_at_zero_margin_against_the_frozen_reference_and_grows_it(tok_dir, tmp_path):
    from qvl.train.loop import train

    model, _ = micro_model("2.5", tok_dir)
    init = tiny.save_model(model, tmp_path / "init", tok_dir)
    qs = dpo.questions("2.5", 8, start=S.get("rs-sft").seed_offset, tasks=["color", "count"])
    pairs = dpo.make_pairs([], [{"task": s.task, "seed": s.seed, "answer": "zzz", "truth": s.answer} for s in qs], "2.5")
    stage = small(S.get("dpo"), batch_size=2, lr=1e-3)
    summary = train(stage, "2.5", tmp_path / "dpo", 8, init=init, records=pairs, workers=0, quiet=True)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "dpo" / "loss.csv")))
    assert summary["steps"] == 4 and all("margin" in r and "reward_acc" in r for r in rows)
    # first step: policy == reference, so the margin is exactly 0 and the DPO part of the loss log 2
    assert float(rows[0]["margin"]) == pytest.approx(0.0, abs=1e-5)
    nll = float(rows[0]["chosen_nll"])
    assert nll > 0 and float(rows[0]["loss"]) == pytest.approx(0.6931 + stage.nll_weight * nll, abs=1e-3)
    assert float(rows[-1]["margin"]) > 0
