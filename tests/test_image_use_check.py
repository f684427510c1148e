"""scripts/image_use_check.py: the swapped copies keep every word and take another sample's image, and the
answer loss it reports is the plain cross-entropy of a full forward pass over the assistant tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from qvl.data import tasks as T
from qvl.train import tiny
from qvl.train.batching import Collator, embed_kwargs

from test_train import micro_model, tok_dir  # noqa: F401  (fixture)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "image_use_check.py"
spec = importlib.util.spec_from_file_location("image_use_check", SCRIPT)
iu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(iu)


def _images(sample):
    return [it["image"] for m in sample.messages if isinstance(m["content"], list) for it in m["content"]
            if it.get("type") == "image"]


def _texts(sample):
    """Each message with its image items left out."""
    return [(m["role"], [it for it in m["content"] if it.get("type") != "image"] if isinstance(m["content"], list)
             else m["content"]) for m in sample.messages]


def test_swapped_samples_keep_the_text_and_take_the_next_image():
    samples = T.eval_samples("color", "2.5", 4)
    swapped = iu.swap_images(samples)
    for i, (s, w) in enumerate(zip(samples, swapped)):
        assert _texts(w) == _texts(s) and w.qas == s.qas
        assert _images(w)[0] is _images(samples[(i + 1) % 4])[0] and _images(w)[0] is not _images(s)[0]
        assert _images(s)[0] is not _images(samples[(i + 1) % 4])[0]  # the originals are untouched


def test_answer_loss_is_the_cross_entropy_of_a_full_forward(tok_dir):
    model, tok = micro_model("2.5", tok_dir)
    model.eval()
    coll = Collator("2.5", tok, model.config, loss="assistant")
    samples = T.eval_samples("count", "2.5", 3, T.DataConfig(max_pixels=16 * 28 * 28))
    got = iu.answer_loss(model, coll, samples, batch_size=2)
    batch = coll(samples)
    with torch.no_grad():
        logits = model(model.embed(batch["input_ids"], **embed_kwargs(batch["vision"])), batch["positions"])
    want = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert abs(got - float(want)) < 1e-4


def test_image_use_reports_both_losses_per_task(tmp_path, tok_dir):
    model, _ = micro_model("2.5", tok_dir)
    tiny.save_model(model, tmp_path / "m", tok_dir)
    out = iu.image_use(tmp_path / "m", ["color"], 2)
    assert set(out["color"]) == {"own", "shuffled", "gap"}
    assert abs(out["color"]["gap"] - (out["color"]["shuffled"] - out["color"]["own"])) < 2e-3
