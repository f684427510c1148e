"""Does a model's answer depend on the image at all? Its answer loss with the right image vs another one.

For each task, n held-out samples are scored twice with the same text: once with their own image, once with
the image of another sample of the same task (a cyclic shift, so every image is used once and never with its
own question). The gap `shuffled - own` (nats per answer token) is how much the image tells the model: 0
means the answers are priors that ignore the image, however good the text around them is. Session 9 used it
to find where in the recipe the image starts to count (docs/training_log.md).

    python scripts/image_use_check.py assets/models/qvl-tiny-2.5
    python scripts/image_use_check.py runs/recipe/gen2.5/stage1 --tasks caption,color --n 64
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from qvl.data import tasks as T
from qvl.train import tiny
from qvl.train.batching import IGNORE, Collator, embed_kwargs
from qvl.train.loop import labelled_lm_loss, model_dir_of


def _image_items(messages: list[dict]) -> list[dict]:
    return [it for m in messages if isinstance(m["content"], list) for it in m["content"] if it.get("type") == "image"]


def swap_images(samples: list, shift: int = 1) -> list:
    """Copies of `samples` whose images are those of the sample `shift` places on (cyclically); text unchanged."""
    out = []
    for i, s in enumerate(samples):
        donor = _image_items(samples[(i + shift) % len(samples)].messages)
        messages = [{**m, "content": [dict(it) for it in m["content"]] if isinstance(m["content"], list)
                     else m["content"]} for m in s.messages]
        mine = _image_items(messages)
        if len(mine) != len(donor):
            raise ValueError("samples must hold the same number of images to swap them")
        for item, other in zip(mine, donor):
            item["image"] = other["image"]
        out.append(replace(s, messages=messages))
    return out


@torch.no_grad()
def answer_loss(model, collator: Collator, samples: list, batch_size: int = 8) -> float:
    """Mean cross-entropy per assistant token (content and <|im_end|>) over `samples`."""
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = collator(samples[i:i + batch_size])
        embeds = model.embed(batch["input_ids"], **embed_kwargs(batch["vision"]))
        n = int((batch["labels"] != IGNORE).sum())
        total += float(labelled_lm_loss(model, embeds, batch["positions"], batch["labels"])) * n
        count += n
    return total / max(count, 1)


def image_use(model_dir, tasks, n: int, generation: str | None = None) -> dict:
    """{task: {"own": loss, "shuffled": loss, "gap": shuffled - own}} on the first n held-out seeds."""
    model_dir = model_dir_of(model_dir)
    model = tiny.load_model(model_dir).eval()
    generation = generation or model.generation
    collator = Collator(generation, tiny.load_tokenizer(generation, model_dir), model.config, loss="assistant")
    out = {}
    for task in tasks:
        samples = T.eval_samples(task, generation, n)
        own = answer_loss(model, collator, samples)
        shuffled = answer_loss(model, collator, swap_images(samples))
        out[task] = {"own": round(own, 3), "shuffled": round(shuffled, 3), "gap": round(shuffled - own, 3)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="model or stage directories")
    ap.add_argument("--tasks", default="caption,color,shape,count,ground")
    ap.add_argument("--n", type=int, default=64, help="held-out samples per task")
    a = ap.parse_args(argv)
    for m in a.models:
        print(json.dumps({"model": m, "image_use": image_use(m, a.tasks.split(","), a.n)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
