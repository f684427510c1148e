"""scripts/lookup_check.py: the reference answer is fed exactly up to its answer word, with the positions the
model would give the whole conversation, and the attention it reads is split over the right tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import qvl
from qvl.data import tasks as T
from qvl.train import tiny

from test_train import micro_model, tok_dir  # noqa: F401  (fixture)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lookup_check.py"
spec = importlib.util.spec_from_file_location("lookup_check", SCRIPT)
lc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lc)


def test_answer_prefix_stops_right_before_the_answer_word():
    assert lc.answer_prefix("The star red.", "red") == "The star"
    assert lc.answer_prefix("A red star.", "star") == "A red"
    assert lc.answer_prefix("red", "red") == ""
    with pytest.raises(ValueError):
        lc.answer_prefix("A red star.", "blue")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, tok_dir):  # noqa: F811
    model, _ = micro_model("2.5", tok_dir)
    d = tmp_path_factory.mktemp("lookup") / "m"
    tiny.save_model(model, d, tok_dir)
    return qvl.load(d)


@pytest.mark.parametrize("task", ["color", "shape"])
def test_forced_batch_is_the_start_of_the_whole_conversation(vlm, task):
    sample = next(s for s in T.eval_samples(task, "2.5", 20) if len(s.scene.shapes) >= 2)
    batch, n = lc.forced_batch(vlm, sample)
    # The oracle: the whole conversation, answer included, as prepare() encodes and positions it.
    whole = vlm.prepare([sample.messages], add_generation_prompt=False)
    T_ = batch.input_ids.shape[1]
    assert n > 0 and torch.equal(batch.input_ids[0], whole.input_ids[0, :T_])
    assert torch.equal(batch.position_ids[..., :T_], whole.position_ids[..., :T_])
    assert vlm.decode(whole.input_ids[0, T_:T_ + 2]).strip().startswith(sample.truth["answer"])
    bare, n_bare = lc.forced_batch(vlm, sample, bare=True)
    assert n_bare == 0 and bare.input_ids.shape[1] == T_ - n


def test_asked_shape_and_attention_split(vlm):
    sample = next(s for s in T.eval_samples("color", "2.5", 20) if len(s.scene.shapes) >= 2)
    i, key = lc.asked(sample)
    assert sample.scene.shapes[i].color == sample.truth["answer"] and key in sample.qas[0].question
    got = lc.inspect(vlm, sample)
    cfg = vlm.config.text
    assert sorted(got["rows"]) == list(range(cfg.num_hidden_layers))
    for r in got["rows"].values():
        assert r["image"].shape == (cfg.num_attention_heads,)
        assert torch.all((r["image"] >= 0) & (r["image"] + r["key"] <= 1 + 1e-5))  # disjoint parts of one row
        assert r["key"].min() > 0  # the question's key word is found and attended to at all
