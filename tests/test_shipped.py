"""The shipped qvl-tiny models (assets/models/qvl-tiny-*): they fit the size budget, open with qvl.load and
answer, and transformers 4.57.6 -- its own tokenizer, chat template, image processor and generate() --
gives the same greedy answers as qvl for the Qwen2-VL and Qwen2.5-VL ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qvl.data import tasks as T

MODELS = Path(os.environ.get("QVL_MODELS", Path(__file__).resolve().parents[1] / "assets" / "models"))
SHIPPED = {g: MODELS / f"qvl-tiny-{g}" for g in ("1", "2", "2.5")}
present = [g for g, d in SHIPPED.items() if (d / "config.json").exists()]
pytestmark = pytest.mark.skipif(not present, reason="assets/models/qvl-tiny-* not trained yet")


def test_shipped_models_fit_the_budget_and_store_half_precision():
    total = sum(f.stat().st_size for g in present for f in SHIPPED[g].rglob("*") if f.is_file())
    assert total <= 40 * 2**20, f"{total / 2**20:.1f} MiB"
    for g in present:
        cfg = json.loads((SHIPPED[g] / "config.json").read_text())
        assert cfg.get("torch_dtype", cfg.get("dtype")) in ("bfloat16", "float16"), g


@pytest.mark.parametrize("generation", present)
def test_shipped_model_answers_a_generated_question(generation):
    import qvl

    vlm = qvl.load(SHIPPED[generation], device="cpu")
    assert vlm.generation == generation
    s = T.eval_samples("count", generation, 1)[0]
    reply = vlm.chat(s.prompt(), max_new_tokens=8)
    assert reply.strip(), "empty answer"


def _hf_inputs(tok, proc, sample: T.Sample):
    """Prompt tensors built by transformers alone: its tokenizer with the checkpoint's chat template, its image
    processor with the checkpoint's preprocessor config, the image pad expanded to grid / merge**2 slots."""
    messages = sample.prompt()
    images = [it["image"] for m in messages for it in m["content"] if isinstance(it, dict) and it.get("type") == "image"]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    vis = proc(images=images, return_tensors="pt")
    pads = [int(g.prod()) // proc.merge_size ** 2 for g in vis["image_grid_thw"]]
    parts = text.split("<|image_pad|>")
    assert len(parts) == len(pads) + 1
    text = parts[0] + "".join("<|image_pad|>" * n + p for n, p in zip(pads, parts[1:]))
    return tok(text, return_tensors="pt"), vis


@pytest.mark.parametrize("generation", [g for g in ("2", "2.5") if g in present])
@pytest.mark.parametrize("task", ["color", "ground", "ocr"])
def test_transformers_gives_the_same_greedy_answers(generation, task):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    import qvl

    directory = SHIPPED[generation]
    cls = (transformers.Qwen2_5_VLForConditionalGeneration if generation == "2.5"
           else transformers.Qwen2VLForConditionalGeneration)
    hf = cls.from_pretrained(str(directory), torch_dtype=torch.float32).eval()
    vlm = qvl.load(directory, device="cpu", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    proc = Qwen2VLImageProcessor.from_pretrained(str(directory))
    for sample in T.eval_samples(task, generation, 2):
        ours = vlm.chat(sample.prompt(), max_new_tokens=24)
        enc, vis = _hf_inputs(tok, proc, sample)
        with torch.no_grad():
            out = hf.generate(**enc, **vis, max_new_tokens=24, do_sample=False)
        # Special tokens kept: Qwen2-VL's boxes live in <|object_ref_start|> / <|box_start|> tokens, which qvl's
        # reply keeps for the grounding parser; the reply ends before the first stop token.
        theirs = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        theirs = theirs.split("<|im_end|>")[0].split("<|endoftext|>")[0]
        assert ours == theirs.strip() or ours == theirs, (ours, theirs)
