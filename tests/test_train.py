"""qvl.train: every stage trains exactly the parts it claims, labels mask the right tokens, resume is exact.

Models here are micro versions of the tiny configs (decoder 2 x 64, ViT 2 x 32) on small canvases, so
the whole file runs in well under a minute on 2 shared cores.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qvl.data import iterate
from qvl.data import tasks as T
from qvl.train import stages as S
from qvl.train import tiny
from qvl.train.batching import IGNORE, Collator
from qvl.train.loop import DenseHead, TrainModule, make_optimizer, set_trainable, train

MICRO_DECODER = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
MICRO_VISION = dict(depth=2, dim=32, heads=2, mlp=64)
SMALL_DATA = dict(max_pixels=16 * 28 * 28, video_min_pixels=4 * 28 * 28, video_max_pixels=4 * 28 * 28,
                  clip=dict(max_side=140, max_seconds=2.5), scene=dict(max_side=168, large_prob=0.0, max_objects=3))


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """Small tokenizers trained on generated text (a couple of seconds)."""
    return tiny.build_tokenizers(tmp_path_factory.mktemp("tok"), samples=200, vocab=700, gen1_ranks=300)


def micro_model(generation, tok_dir, seed=0):
    tok = tiny.load_tokenizer(generation, tok_dir)
    return tiny.new_model(generation, tok, seed=seed, decoder=MICRO_DECODER, vision=MICRO_VISION), tok


def small(stage: S.Stage, **kw) -> S.Stage:
    data = {**SMALL_DATA, **{k: v for k, v in stage.data.items() if k != "scene"}}
    data["scene"] = {**SMALL_DATA["scene"], **stage.data.get("scene", {})}
    data["max_pixels"] = min(data["max_pixels"], SMALL_DATA["max_pixels"])
    return replace(stage, data=data, **kw)


def fixed_batch(stage, generation, model, tok, n=3):
    coll = Collator(generation, tok, model.config, loss="text" if stage.loss == "dense" else stage.loss,
                    dense=stage.dense, gen1_image_size=56)  # gen 1: 4 x 4 patches keep the test fast
    return coll([S.sample_at(stage, generation, i) for i in range(n)])


# --------------------------------------------------------------------------------------------------
# Stages: gradients reach exactly the trained parts; loss falls when overfitting one batch
# --------------------------------------------------------------------------------------------------

CASES = [("vision-pretrain", "2.5"), ("vision-pretrain", "1"), ("lm-colour", "2.5"), ("lm-pretrain", "2.5"), ("stage1", "2.5"), ("stage2", "2.5"),
         ("stage3", "2.5"), ("stage2", "2"), ("stage1", "1"), ("stage3", "1")]


@pytest.mark.parametrize("name,generation", CASES)
def test_stage_overfits_and_trains_exactly_its_parts(name, generation, tok_dir):
    stage = small(S.get(name))
    model, tok = micro_model(generation, tok_dir)
    batch = fixed_batch(stage, generation, model, tok)
    head = DenseHead.for_model(model) if stage.dense else None
    set_trainable(model, stage.train)
    module = TrainModule(model, stage, head)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = make_optimizer(module, stage, 3e-3)
    losses = []
    for _ in range(20):
        loss, _ = module(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    if "llm" in stage.train or stage.loss == "dense":
        assert losses[-1] < 0.7 * losses[0], losses
    else:  # through a frozen random decoder the image can only nudge the loss
        assert losses[-1] < losses[0] - 0.02 and losses[-1] <= min(losses) + 1e-3, losses
    groups = tiny.param_groups(model)
    for part, names in groups.items():
        changed = [n for n in names if not torch.equal(before[n], dict(model.named_parameters())[n])]
        if part in stage.train:
            # everything in a trained part moves (a vision-only stage never runs the decoder, and vice versa)
            assert len(changed) == len(names), (part, sorted(set(names) - set(changed))[:5])
        else:
            assert not changed, (part, changed[:5])


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", ["1", "2", "2.5"])
def test_sft_mask_is_exactly_the_assistant_tokens(generation, tok_dir):
    """Independent check: the supervised tokens of a multi-turn sample, read off the labels, equal the
    separate tokenisation of each answer followed by <|im_end|>."""
    model, tok = micro_model(generation, tok_dir)
    coll = Collator(generation, tok, model.config, loss="assistant")
    cfg = S.get("stage3").data_config()
    samples = [s for s in itertools.islice(iterate(generation, config=replace(cfg, max_turns=3)), 12)]
    assert any(len(s.qas) > 1 for s in samples)
    batch = coll(samples)
    for b, s in enumerate(samples):
        labels = batch["labels"][b]
        got = labels[labels != IGNORE].tolist()
        want = []
        for qa in s.qas:
            want += tok.encode(qa.answer) + [tok.im_end_id]
        assert got == want
        # and each label is the next input token
        idx = (labels != IGNORE).nonzero()[:, 0]
        assert torch.equal(batch["input_ids"][b, idx + 1], labels[idx])


@pytest.mark.parametrize("generation", ["1", "2.5"])
def test_pretraining_labels_cover_all_text_but_no_vision_slot(generation, tok_dir):
    model, tok = micro_model(generation, tok_dir)
    coll = Collator(generation, tok, model.config, loss="text")
    samples = list(itertools.islice(iterate(generation), 4))
    batch = coll(samples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for b in range(len(samples)):
        n = int(mask[b].sum())
        target_pos = set((labels[b] != IGNORE).nonzero()[:, 0].add(1).tolist())
        if generation == "1":
            row = ids[b, :n].tolist()
            a, z = row.index(tok.img_start_id), row.index(tok.img_end_id)
            vision = set(range(a + 1, z))
        else:
            vision = set((ids[b, :n] == model.config.image_token_id).nonzero()[:, 0].tolist()) | \
                set((ids[b, :n] == model.config.video_token_id).nonzero()[:, 0].tolist())
        assert vision and target_pos == set(range(1, n)) - vision


def test_dense_targets_name_the_objects(tok_dir):
    """The cell holding a shape's centre is labelled with that shape's colour x kind, its box and its index."""
    from qvl.data.world import COLORS, KINDS
    from qvl.train.batching import dense_targets

    s = next(iterate("2.5", mix={"count": 1.0}))
    rows, cols = 12, 16
    cls, letter, box, obj = dense_targets(s.scene, (rows, cols))
    for i, sh in enumerate(s.scene.shapes):
        cx, cy = (sh.box[0] + sh.box[2]) / 2, (sh.box[1] + sh.box[3]) / 2
        k = int(cy / s.scene.height * rows) * cols + int(cx / s.scene.width * cols)
        assert cls[k] == 2 + list(COLORS).index(sh.color) * len(KINDS) + KINDS.index(sh.kind)
        assert torch.allclose(box[k] * torch.tensor([s.scene.width, s.scene.height] * 2), torch.tensor(sh.box, dtype=torch.float32))
        assert obj[k] == i
    assert (cls == 0).any()
    assert ((obj >= 0) == (cls > 1)).all()  # exactly the shape cells name a shape


def test_batch_dense_targets_number_shapes_across_images(tok_dir):
    """In a batch, the second image's shape indices follow the first image's, and each batch shape has its
    colour x kind class: the object-level loss pools the right tokens of the right image."""
    from qvl.data.world import COLORS, KINDS

    tok = tiny.load_tokenizer("2.5", tok_dir)
    model = tiny.new_model("2.5", tok)
    samples = list(itertools.islice(iterate("2.5", mix={"count": 1.0}), 2))
    b = Collator("2.5", tok, model.config, loss="text", dense=True)(samples)
    shapes = [sh for s in samples for sh in s.scene.shapes]
    assert b["dense_obj_cls"].tolist() == [list(COLORS).index(sh.color) * len(KINDS) + KINDS.index(sh.kind) for sh in shapes]
    first = len(samples[0].scene.shapes)
    n0 = int(b["vision"]["image_grid_thw"][0].prod()) // 4  # the first image's tokens (2 x 2 merge)
    own = b["dense_obj"] >= 0
    assert (b["dense_cls"][own] - 2 == b["dense_obj_cls"][b["dense_obj"][own]]).all()
    assert b["dense_obj"][:n0].max() < first <= b["dense_obj"][n0:][own[n0:]].min()


def test_per_shape_loss_reads_the_mean_of_each_shapes_tokens():
    """The per-shape term = cross-entropy of the linear read-out of each shape's mean (LayerNormed) token,
    recomputed here by hand; a shape that owns no token is left out, and tokens off shapes never count."""
    import torch.nn.functional as F

    from qvl.data.world import KINDS

    torch.manual_seed(0)
    head = DenseHead(16)
    feats = torch.randn(7, 16)
    cls = torch.tensor([0, 5, 5, 1, 9, 9, 9])
    letter, box = torch.zeros(7, dtype=torch.long), torch.rand(7, 4)
    obj = torch.tensor([-1, 0, 0, -1, 2, 2, 2])  # shape 1 owns no token
    obj_cls = torch.tensor([3, 11, 7])
    base, _ = head(feats, cls, letter, box)
    full, metrics = head(feats, cls, letter, box, obj, obj_cls)
    normed = F.layer_norm(feats, (16,), head.trunk[0].weight, head.trunk[0].bias)
    pooled = torch.stack([normed[1:3].mean(0), normed[4:7].mean(0)])
    want = F.cross_entropy(pooled @ head.obj.weight.T + head.obj.bias, torch.tensor([3, 7]))
    assert torch.allclose(full - base, want, atol=1e-5)
    right = (pooled @ head.obj.weight.T + head.obj.bias).argmax(-1) % len(KINDS) == torch.tensor([3, 7]) % len(KINDS)
    assert float(metrics["kind_acc"]) == float(right.float().mean())
    full.backward()
    assert head.obj.weight.grad.abs().sum() > 0


def test_count_targets_repeat_each_images_counts_on_its_tokens(tok_dir):
    """Every vision token of an image carries that image's counts -- shapes in all, per colour, per kind --
    counted here from the scenes by hand; the two images of a batch keep their own counts."""
    from collections import Counter

    from qvl.data.world import COLORS, KINDS
    from qvl.train.batching import N_COUNTS

    tok = tiny.load_tokenizer("2.5", tok_dir)
    model = tiny.new_model("2.5", tok)
    samples = list(itertools.islice(iterate("2.5", mix={"count": 1.0}), 2))
    b = Collator("2.5", tok, model.config, loss="text", dense=True, counts=True)(samples)
    n0 = int(b["vision"]["image_grid_thw"][0].prod()) // 4
    assert b["dense_count"].shape == (len(b["dense_cls"]), N_COUNTS)
    for rows, s in ((b["dense_count"][:n0], samples[0]), (b["dense_count"][n0:], samples[1])):
        colours, kinds = Counter(sh.color for sh in s.scene.shapes), Counter(sh.kind for sh in s.scene.shapes)
        want = [len(s.scene.shapes)] + [colours[c] for c in COLORS] + [kinds[k] for k in KINDS]
        assert (rows == torch.tensor(want)).all()


def test_count_loss_is_the_weighted_cross_entropy_of_each_tokens_counts_and_heads_travel():
    """The count term = count_weight x cross-entropy of the linear read-out of each LayerNormed token, over
    its N_COUNTS numbers, recomputed by hand; a head file without the read-out loads into a head with one
    (it starts fresh there) and the other way round (it is dropped)."""
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from qvl.train.batching import MAX_COUNT, N_COUNTS
    from qvl.train.loop import load_head

    torch.manual_seed(0)
    head = DenseHead(16, count=True)
    feats = torch.randn(5, 16)
    cls, letter, box = torch.tensor([0, 5, 5, 1, 0]), torch.zeros(5, dtype=torch.long), torch.rand(5, 4)
    count = torch.randint(0, MAX_COUNT + 1, (5, N_COUNTS))
    base, _ = head(feats, cls, letter, box, count=count, count_weight=0.0)
    full, metrics = head(feats, cls, letter, box, count=count, count_weight=0.5)
    normed = F.layer_norm(feats, (16,), head.trunk[0].weight, head.trunk[0].bias)
    logits = (normed @ head.count.weight.T + head.count.bias).view(5, N_COUNTS, MAX_COUNT + 1)
    want = 0.5 * F.cross_entropy(logits.reshape(-1, MAX_COUNT + 1), count.reshape(-1))
    assert torch.allclose(full - base, want, atol=1e-5)
    assert float(metrics["count_acc"]) == float((logits[:, 0].argmax(-1) == count[:, 0]).float().mean())
    assert "count_acc" not in head(feats, cls, letter, box, count=count)[1]  # weight 0: no count loss

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        plain = DenseHead(16)
        save_file(plain.state_dict(), f"{d}/h.safetensors")
        fresh = DenseHead(16, count=True)
        before = fresh.count.weight.clone()
        load_head(fresh, d, "h.safetensors")
        assert torch.equal(fresh.trunk[1].weight, plain.trunk[1].weight) and torch.equal(fresh.count.weight, before)
        save_file(head.state_dict(), f"{d}/h.safetensors")
        load_head(plain, d, "h.safetensors")
        assert torch.equal(plain.obj.weight, head.obj.weight)


def test_drills_replace_the_image_with_text_and_keep_answers():
    s = S.sample_at(S.get("lm-pretrain"), "2.5", 3)
    assert s.scene is None and s.clip is None
    first = s.messages[0]["content"]
    assert all(it["type"] == "text" for it in first)
    assert first[0]["text"].startswith(("Scene:", "Video of"))
    assert s.messages[1]["content"] == s.qas[0].answer


@pytest.mark.parametrize("generation", ["1", "2", "2.5"])
def test_relist_drills_answer_each_asked_object_with_its_own_box(generation):
    """The look-up-and-copy drill: every asked object comes back, in the asked order, with the box the
    scene description gave it (checked against the scene itself, not against the drill's own text)."""
    import re

    from qvl.data.tasks import make_sample, region_text

    stage = replace(S.get("lm-pretrain"), relist=1.0)
    seen = 0
    for i in range(12):
        d = S.sample_at(stage, generation, i)
        if d.task != "relist":
            continue
        seen += 1
        src = make_sample(S.sample_at(replace(stage, relist=0.0), generation, i).task, d.seed, generation,
                          stage.data_config(), render_media=False)
        boxes = {f"{'an' if s.name[0] in 'aeiou' else 'a'} {s.name}": region_text(s.box, generation, src.media)
                 for s in src.scene.shapes}
        boxes.update({f'the text "{t.text}"': region_text(t.box, generation, src.media) for t in src.scene.texts})
        asked = d.messages[0]["content"][0]["text"].split("\nWhere are ", 1)[1].rstrip("?").split(", ")
        answer = d.messages[1]["content"]
        assert answer == "; ".join(f"{a} at {boxes[a]}" for a in asked) + "."
        for a in asked:  # each asked object's box is in the description exactly as in the answer
            assert re.search(re.escape(f"{a} at {boxes[a]}"), d.messages[0]["content"][0]["text"])
    assert seen >= 6


def test_repeat_drills_copy_the_description_and_shares_add_up():
    stage = replace(S.get("lm-pretrain"), repeat=0.5, relist=0.25)
    tasks = [S.sample_at(stage, "2.5", i) for i in range(80)]
    reps = [d for d in tasks if d.task == "repeat"]
    for d in reps:
        prompt = d.messages[0]["content"][0]["text"]
        assert prompt == f"Scene: {d.messages[1]['content']}\nRepeat the scene."
    n_scene = sum(1 for i in range(80) if S.sample_at(replace(stage, repeat=0.0, relist=0.0), "2.5", i).task
                  not in ("video_direction", "video_when"))
    # about half of the scene samples repeat, a quarter relist (the same uniform draw splits them)
    assert 0.3 * n_scene <= len(reps) <= 0.7 * n_scene
    assert 0.1 * n_scene <= sum(d.task == "relist" for d in tasks) <= 0.45 * n_scene


def test_count_phase_asks_how_many_two_in_three_and_replays_the_rest():
    """The count phase (--count-samples) is stage 2's set-up with count 12 of 18.5 in the mix: gens 2 / 2.5 draw
    "how many" with probability 12 / 18.5, gen 1 (no video) 12 / 17.5; every other image task is replayed."""
    stage = S.get("count")
    assert (stage.train, stage.lr, stage.dense_weight) == (S.get("stage2").train, S.get("stage2").lr, 0.2)
    for g, total in (("2.5", 18.5), ("1", 17.5)):
        w = T.task_weights(g, stage.mix)
        assert w["count"] == pytest.approx(12 / total)
        assert set(T.IMAGE_TASKS) <= set(w) and min(w.values()) > 0
    tasks = [S.sample_at(stage, "1", i).task for i in range(40)]
    assert tasks.count("count") > 20 and not set(tasks) & set(T.VIDEO_TASKS)


# --------------------------------------------------------------------------------------------------
# The trainer: checkpoints, resume, official layout
# --------------------------------------------------------------------------------------------------


def test_resume_reproduces_the_uninterrupted_run(tok_dir, tmp_path):
    import qvl

    model, _ = micro_model("2.5", tok_dir)
    init = tiny.save_model(model, tmp_path / "init", tok_dir)
    stage = small(S.get("stage2"), batch_size=2)
    full = train(stage, "2.5", tmp_path / "full", 8, init=init, workers=0, quiet=True)
    assert full["steps"] == 4
    # the summary names what differs from the named stage: here the test's small scenes and batch
    saved = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert set(saved["changed"]) == {"data", "batch_size"} and saved["changed"]["batch_size"] == 2
    part = train(stage, "2.5", tmp_path / "part", 8, init=init, workers=0, quiet=True, stop_after=2)
    assert part["steps"] == 2 and not (tmp_path / "part" / "model").exists()
    train(stage, "2.5", tmp_path / "part", 8, init=init, workers=1, quiet=True, resume=True)
    a = qvl.load(tmp_path / "full" / "model", device="cpu").model.state_dict()
    b = qvl.load(tmp_path / "part" / "model", device="cpu").model.state_dict()
    c = qvl.load(init, device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    for f in ("loss.csv", "loss.png", "state.pt", "dense_head.safetensors", "summary.json"):
        assert (tmp_path / "full" / f).exists()
    rows = (tmp_path / "part" / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 4  # header + one row per step, across the interruption


@pytest.mark.parametrize("generation", ["1", "2.5"])
def test_labelled_positions_loss_equals_the_full_lm_loss(generation, tok_dir):
    from qvl.train.batching import embed_kwargs
    from qvl.train.loop import labelled_lm_loss, lm_loss

    model, tok = micro_model(generation, tok_dir)
    stage = small(S.get("stage3"))
    batch = fixed_batch(stage, generation, model, tok)
    embeds = model.embed(batch["input_ids"], **embed_kwargs(batch["vision"]))
    full = lm_loss(model(embeds, batch["positions"]), batch["labels"])
    fast = labelled_lm_loss(model, embeds, batch["positions"], batch["labels"])
    assert torch.allclose(full, fast, atol=1e-5)
    assert model.lm_head._forward_pre_hooks == {}  # the hook is gone afterwards (generation is untouched)


@pytest.mark.parametrize("weighting", ["answer", "sqrt"])
def test_answer_weighting_averages_per_answer_not_per_token(weighting, tok_dir):
    """Independent re-computation: each answer of each multi-turn sample tokenised on its own (+ <|im_end|>),
    its tokens' cross-entropies read from the full logits at the positions that predict them, then averaged
    per answer with weight 1/n (`answer`) or 1/sqrt(n) (`sqrt`) per token -- equals the trainer's loss."""
    import torch.nn.functional as F

    from qvl.train.batching import embed_kwargs
    from qvl.train.loop import labelled_lm_loss

    generation = "2.5"
    model, tok = micro_model(generation, tok_dir)
    cfg = S.get("stage3").data_config()
    samples = [s for s in itertools.islice(iterate(generation, config=replace(cfg, max_turns=3)), 6)]
    batch = Collator(generation, tok, model.config, loss="assistant", weighting=weighting)(samples)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], **embed_kwargs(batch["vision"]))
        logits = model(embeds, batch["positions"])
        got = labelled_lm_loss(model, embeds, batch["positions"], batch["labels"], batch["label_weights"])
    num = den = 0.0
    lengths = set()
    for b, s in enumerate(samples):
        ids = batch["input_ids"][b].tolist()
        start = 0
        for qa in s.qas:
            answer = tok.encode(qa.answer) + [tok.im_end_id]
            header = [tok.im_start_id] + tok.encode("assistant\n")
            i = next(j for j in range(start, len(ids)) if ids[j:j + len(header)] == header) + len(header)
            assert ids[i:i + len(answer)] == answer
            ce = F.cross_entropy(logits[b, i - 1:i - 1 + len(answer)].float(), torch.tensor(answer), reduction="none")
            w = 1.0 / len(answer) if weighting == "answer" else len(answer) ** -0.5
            num, den = num + w * float(ce.sum()), den + w * len(answer)
            lengths.add(len(answer))
            start = i + len(answer)
    assert len(lengths) > 1  # answers of different lengths, or the weighting would not matter
    assert abs(float(got) - num / den) < 1e-4
    token_mean = labelled_lm_loss(model, embeds, batch["positions"], batch["labels"])
    assert abs(float(token_mean) - float(got)) > 1e-4


def test_length_bucketing_regroups_the_same_samples_with_less_padding(tok_dir):
    from qvl.train.loop import StageData

    model, tok = micro_model("2.5", tok_dir)
    stage = small(S.get("stage2"), batch_size=4)
    coll = Collator("2.5", tok, model.config, loss="text")

    def seeds(data, steps):
        return [[(s.task, s.seed) for s in data.samples(k)] for k in steps]

    plain = StageData(stage, "2.5", coll, 4, 0, 8, bucket=1)
    bucketed = StageData(stage, "2.5", coll, 4, 0, 8, bucket=4)
    a, b = seeds(plain, range(8)), seeds(bucketed, range(8))
    assert sorted(itertools.chain(*a[:4])) == sorted(itertools.chain(*b[:4]))  # chunk 0: same samples
    assert sorted(itertools.chain(*a[4:])) == sorted(itertools.chain(*b[4:]))
    assert b == seeds(StageData(stage, "2.5", coll, 4, 0, 8, bucket=4), range(8))  # deterministic
    # two ranks: disjoint shards whose union is the one-process chunk
    r0 = seeds(StageData(stage, "2.5", coll, 2, 0, 8, rank=0, world=2, bucket=4), range(4))
    r1 = seeds(StageData(stage, "2.5", coll, 2, 0, 8, rank=1, world=2, bucket=4), range(4))
    assert sorted(itertools.chain(*r0, *r1)) == sorted(itertools.chain(*a[:4]))

    def pad_fraction(data):
        real = total = 0
        for k in range(8):
            batch = coll(data.samples(k))
            real += int(batch["attention_mask"].sum())
            total += batch["attention_mask"].numel()
        return 1 - real / total

    assert pad_fraction(bucketed) < pad_fraction(plain)


@pytest.mark.parametrize("generation", ["1", "2", "2.5"])
def test_saved_tiny_models_open_with_qvl_load_and_answer(generation, tok_dir, tmp_path):
    import qvl

    model, _ = micro_model(generation, tok_dir)
    tiny.save_model(model, tmp_path / "m", tok_dir)
    vlm = qvl.load(tmp_path / "m", device="cpu")
    s = next(iterate(generation, mix={"color": 1.0}))
    reply = vlm.chat(s.prompt(), max_new_tokens=4)
    assert isinstance(reply, str)
    assert vlm.generation == generation


@pytest.mark.parametrize("section", [None, [1, 1, 6]])
def test_transformers_loads_the_tiny_qwen2_5_vl_with_the_same_logits(section, tok_dir, tmp_path):
    """Also with a non-default mrope_section (the recipe's --mrope-section): it travels in config.json's
    rope_scaling and transformers rotates by it as qvl does."""
    transformers = pytest.importorskip("transformers")
    import qvl

    from _tiny import randomize_  # weights large enough that attention is not uniform (and positions matter)

    decoder = {**MICRO_DECODER, **({"mrope_section": section} if section else {})}
    model = randomize_(tiny.new_model("2.5", tiny.load_tokenizer("2.5", tok_dir), decoder=decoder, vision=MICRO_VISION))
    tiny.save_model(model, tmp_path / "m", tok_dir)
    vlm = qvl.load(tmp_path / "m", device="cpu")
    s = next(iterate("2.5", mix={"ground": 1.0}))
    batch = vlm.prepare(s.prompt())
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "m"),
                                                                         torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ours = vlm.model(vlm.model.embed(batch.input_ids, **{k: v for k, v in batch.vision.items()
                                                             if k != "second_per_grid_ts"}), batch.position_ids)
        theirs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    pixel_values=batch.vision["pixel_values"], image_grid_thw=batch.vision["image_grid_thw"]).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert hf.config.text_config.rope_scaling["mrope_section"] == (section or [2, 3, 3])
    if section:  # the section changes the answer: a run that ignored it would not match
        plain = tiny.new_model("2.5", tiny.load_tokenizer("2.5", tok_dir), decoder=MICRO_DECODER, vision=MICRO_VISION)
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            other = plain(plain.embed(batch.input_ids, **{k: v for k, v in batch.vision.items()
                                                        if k != "second_per_grid_ts"}), batch.position_ids)
        assert not torch.allclose(ours, other, atol=1e-3)


def test_cli_help_lists_stages():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "qvl.train", "--help"], capture_output=True, text=True, check=True)
    assert "vision-pretrain" in out.stdout and "--resume" in out.stdout


def test_join_puts_the_lm_stand_ins_decoder_on_the_vision_stand_in(tok_dir, tmp_path):
    """Where stage 1 starts: every vision tensor from the vision stand-in, every other tensor from the LM
    stand-in (gen 2's ViT with gen 2.5's decoder: same decoder config and tokenizer), the dense head kept."""
    from qvl.train.loop import HEAD_FILE, join

    vision, _ = micro_model("2", tok_dir, seed=2)
    lm, _ = micro_model("2.5", tok_dir, seed=1)
    tiny.save_model(vision, tmp_path / "vp" / "model", tok_dir)
    (tmp_path / "vp" / HEAD_FILE).write_bytes(b"head bytes")
    tiny.save_model(lm, tmp_path / "lm" / "model", tok_dir)
    out = join(tmp_path / "vp", tmp_path / "lm", tmp_path / "start")
    joined = tiny.load_model(out / "model")
    assert joined.generation == "2"
    got, v, d = joined.state_dict(), vision.state_dict(), lm.state_dict()
    assert any(k.startswith("visual.") for k in got) and any(not k.startswith("visual.") for k in got)
    for k in got:
        assert torch.equal(got[k], v[k] if k.startswith("visual.") else d[k]), k
    assert (out / HEAD_FILE).read_bytes() == b"head bytes"
    # gen 1's decoder (its own tokenizer and layout) does not fit gen 2's model: one clear error
    tiny.save_model(micro_model("1", tok_dir)[0], tmp_path / "lm1" / "model", tok_dir)
    with pytest.raises(ValueError, match="cannot join it to"):
        join(tmp_path / "vp", tmp_path / "lm1", tmp_path / "bad")
    # nor a decoder trained at another rotary base: its weights would run at the vision stand-in's theta
    tok = tiny.load_tokenizer("2.5", tok_dir)
    other = tiny.new_model("2.5", tok, decoder={**MICRO_DECODER, "rope_theta": 1000.0}, vision=MICRO_VISION)
    tiny.save_model(other, tmp_path / "lm1000" / "model", tok_dir)
    with pytest.raises(ValueError, match="rope_theta 1000.0 vs 10000.0"):
        join(tmp_path / "vp", tmp_path / "lm1000", tmp_path / "bad1000")


def test_recipe_chains_text_phases_from_a_fresh_decoder_and_joins_them_at_stage1(tok_dir, tmp_path, monkeypatch):
    """The recipe's wiring, with each stage's training replaced by a copy of its start: the text phases start
    fresh and chain among themselves, stage 1 starts from vision-pretrain + the last text phase's decoder,
    later stages from the one before; gen 2 trains no text phase and takes gen 2.5's LM stand-in."""
    import json
    import shutil

    from qvl.train import __main__ as R
    from qvl.train import loop

    calls = []

    def fake_train(stage, generation, out, samples, *, init=None, **kw):
        calls.append((generation, stage.name, None if init is None else Path(init), samples))
        if init is None:
            model, src = micro_model(generation, tok_dir, seed=len(calls))[0], tok_dir
        else:
            src = loop.model_dir_of(init)
            model = tiny.load_model(src)
        tiny.save_model(model, Path(out) / "model", src)
        summary = {"stage": stage.name, "samples": samples}
        (Path(out) / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(loop, "train", fake_train)
    work, out = tmp_path / "work", tmp_path / "out"
    shutil.copytree(tok_dir, work / "tokenizer")
    for g in ("2.5", "2"):
        R.run_recipe(g, out, work, scale=0.001, eval_n=1, dpo_eval_n=0, probe_n=0)
    started = {(g, name): init for g, name, init, _ in calls}
    text = [n for n in S.ORDER if S.get(n).source == "drills" and ("2.5", n) in started]
    assert text[-1] == "lm-pretrain" and len(text) > 1
    assert "lm-word" not in text  # off by default (budget 0)
    g25 = work / "gen2.5"
    assert started["2.5", text[0]] is None and started["2.5", "vision-pretrain"] is None
    for before, name in zip(text, text[1:]):
        assert started["2.5", name] == g25 / before
    assert started["2.5", "stage1"] == g25 / "stage1" / "start"
    assert started["2.5", "stage2"] == g25 / "stage1"
    assert not [n for g, n, _, _ in calls if g == "2" and n in text]  # gen 2 shares the text phases
    for g, vision_dir in (("2.5", g25 / "vision-pretrain"), ("2", work / "gen2" / "vision-pretrain")):
        start = tiny.load_model(work / f"gen{g}" / "stage1" / "start" / "model").state_dict()
        v, d = tiny.load_model(vision_dir / "model").state_dict(), tiny.load_model(g25 / "lm-pretrain" / "model").state_dict()
        for k in start:
            assert torch.equal(start[k], v[k] if k.startswith("visual.") else d[k]), (g, k)
    assert (out / "qvl-tiny-2" / "config.json").exists()
    assert json.loads((work / "gen2" / "report.json").read_text())["stages"]["lm-pretrain"]["shared_from"] == str(
        g25 / "lm-pretrain")
    assert R.shared_lm("1", work) is None and R.shared_lm("2", work) == g25 / "lm-pretrain"
    # the ground phase is off by default (budget 0); the when phase is on (gens 2 / 2.5): stage 2 -> when -> stage 3
    assert ("2.5", "ground") not in started and started["2.5", "when"] == g25 / "stage2"
    assert started["2.5", "stage3"] == g25 / "when" and started["2", "stage3"] == work / "gen2" / "when"
    calls.clear()  # --when-samples 0 (budgets {"when": 0}) switches it off: stage 3 follows stage 2
    shutil.copytree(tok_dir, tmp_path / "work0" / "tokenizer")
    R.run_recipe("2.5", out, tmp_path / "work0", scale=0.001, eval_n=1, dpo_eval_n=0, probe_n=0, budgets={"when": 0})
    assert [n for g, n, _, _ in calls if n in ("stage2", "when", "stage3")] == ["stage2", "stage3"]
    calls.clear()
    work2 = tmp_path / "work2"
    shutil.copytree(tok_dir, work2 / "tokenizer")
    R.run_recipe("2.5", tmp_path / "out2", work2, scale=0.001, eval_n=1, dpo_eval_n=0, probe_n=0,
                 budgets={"ground": 16_000, "lm-word": 6_400, "when": 9_600, "count": 4_800})
    started = {name: (init, samples) for g, name, init, samples in calls}
    assert started["ground"] == (work2 / "gen2.5" / "stage2", 16)
    assert started["when"] == (work2 / "gen2.5" / "ground", 9)  # after ground
    assert started["count"] == (work2 / "gen2.5" / "when", 4)  # after when, before stage 3
    # asked for, lm-word sits between lm-box and lm-pretrain
    assert started["lm-word"] == (work2 / "gen2.5" / "lm-box", 6)
    assert started["lm-pretrain"][0] == work2 / "gen2.5" / "lm-word"
    assert started["stage3"][0] == work2 / "gen2.5" / "count"
    calls.clear()  # gen 1 has no video input: it skips the when phase even when asked for, not the count phase
    R.run_recipe("1", tmp_path / "out2", work2, scale=0.001, eval_n=1, dpo_eval_n=0, probe_n=0,
                 budgets={"when": 9_600, "count": 4_800})
    assert [n for g, n, _, _ in calls if n in ("stage2", "when", "count", "stage3")] == ["stage2", "count", "stage3"]
    assert [init for g, n, init, _ in calls if n == "count"] == [work2 / "gen1" / "stage2"]
    assert json.loads((work2 / "gen1" / "report.json").read_text())["stages"]["when"] == {
        "skipped": "no video input in gen 1"}


def test_lm_pretrain_probe_asks_the_held_out_questions_as_text(tok_dir, tmp_path):
    """After lm-pretrain the recipe probes the decoder alone: each held-out question with its scene written
    as text. A reply function that answers from that text proves the questions carry what is needed."""
    from qvl import eval as E

    seen = []

    def oracle(samples):  # reads the answer out of the drill's own text, as a perfect look-up would
        out = []
        for s in samples:
            text = s.messages[0]["content"][0]["text"]
            assert s.scene is None and text.startswith("Scene:")
            seen.append(s.task)
            words = s.answer.split()  # "read all the text" answers list every word, top to bottom
            out.append(s.answer if s.task == "ocr" and all(f'"{w}"' in text for w in words) else "")
        return out

    res = E.evaluate(oracle, "2.5", ["ocr", "color"], 8, transform=lambda s: S.drill(s, s.seed))
    assert res["ocr"]["score"] == 1.0 and res["color"]["score"] == 0.0
    assert seen.count("ocr") == 8 and seen.count("color") == 8
    # and the recipe's probe writes probe.json for a drills stage
    from qvl.train.__main__ import TEXT_PROBE_TASKS, probe

    model, _ = micro_model("2.5", tok_dir)
    tiny.save_model(model, tmp_path / "lm-pretrain" / "model", tok_dir)
    scores = probe(tmp_path / "lm-pretrain", "2.5", 2)
    assert set(scores) == set(TEXT_PROBE_TASKS) and (tmp_path / "lm-pretrain" / "probe.json").exists()


# --------------------------------------------------------------------------------------------------
# Recipe variants: the object curriculum and decoder overrides (docs/training_log.md, session 7)
# --------------------------------------------------------------------------------------------------


def test_scene_curriculum_sets_the_scenes_per_phase_of_the_stage(tok_dir):
    from qvl.train.loop import StageData

    model, tok = micro_model("2.5", tok_dir)
    stage = small(S.get("stage2"), batch_size=4, mix={"count": 1.0, "color": 1.0},
                  curriculum=((0.25, dict(max_objects=1, max_side=150)), (0.5, dict(max_objects=2))))
    coll = Collator("2.5", tok, model.config, loss="text")
    data = StageData(stage, "2.5", coll, 4, 0, 16, bucket=1)  # 64 samples: 0-15 <= 1 shape, 16-31 <= 2, rest <= 3
    counts = [[len(s.scene.shapes) for s in data.samples(k)] for k in range(16)]
    assert max(max(c) for c in counts[:4]) == 1
    assert all(max(s.scene.width, s.scene.height) <= 150 for k in range(4) for s in data.samples(k))
    assert max(max(s.scene.width, s.scene.height) for k in range(4, 16) for s in data.samples(k)) > 150
    assert max(max(c) for c in counts[4:8]) == 2
    assert max(max(c) for c in counts[8:]) == 3  # the stage's own cap (SMALL_DATA) after the last phase
    # the cap depends on the index alone, so every rank and a resumed run draw the same samples
    again = StageData(stage, "2.5", coll, 2, 0, 16, rank=1, world=2, bucket=1)
    assert [s.seed for s in again.samples(0)] == [S.sample_at(stage, "2.5", i, total=64).seed for i in (2, 3)]
    assert S.scene_at(stage, 15, 64)["max_objects"] == 1 and S.scene_at(stage, 16, 64) == dict(max_objects=2)
    assert S.scene_at(stage, 32, 64) == {} and S.scene_at(S.get("stage2"), 0, 64) == {}


def test_the_curriculum_caps_the_clips_too(tok_dir):
    """A phase's ClipConfig overrides (under "clip") reach the videos: one shape per clip before the half."""
    stage = small(S.get("ground"), mix={"video_when": 1.0, "video_direction": 1.0},
                  curriculum=((0.5, dict(max_objects=1, clip=dict(max_tracks=1))),))
    first = [S.sample_at(stage, "2.5", i, total=40) for i in range(20)]
    rest = [S.sample_at(stage, "2.5", i, total=40) for i in range(20, 40)]
    assert all(s.clip is not None and len(s.clip.tracks) == 1 for s in first)
    assert max(len(s.clip.tracks) for s in rest) > 1


@pytest.mark.parametrize("generation", ["1", "2.5"])
def test_a_fresh_model_takes_the_decoder_overrides(generation, tok_dir, tmp_path):
    import json

    decoder = {**MICRO_DECODER, "rope_theta": 100.0}
    train(small(S.get("lm-pretrain"), batch_size=2), generation, tmp_path, 2, tokenizer=tok_dir, decoder=decoder,
          workers=0, quiet=True)
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["hidden_size"] == 64
    assert cfg["rotary_emb_base" if generation == "1" else "rope_theta"] == 100.0


@pytest.mark.parametrize("omp", [None, "1"])
def test_cpu_threads_split_between_local_ranks_unless_the_user_set_them(omp, tok_dir, tmp_path, monkeypatch):
    # two 1-thread runs side by side need OMP_NUM_THREADS=1 to hold: overwritten with cpu_count // 1 (two runs
    # of two threads on two cores), gen 2.5's when phase fell from 7 to 1.2 samples/s (session 31)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        train(small(S.get("lm-pretrain"), batch_size=2), "2.5", tmp_path, 1, tokenizer=tok_dir,
              decoder=MICRO_DECODER, workers=0, quiet=True)
        assert torch.get_num_threads() == (2 if omp is None else 3)
    finally:
        torch.set_num_threads(before)


def test_word_phase_drills_copy_the_one_quoted_word_and_the_flag_sets_its_budget(monkeypatch):
    """lm-word: the scene as text with one shape and at most one word, mostly "what does the text say?" answered
    by that word; --word-samples N gives the phase N samples (and --ground-samples still works beside it)."""
    import re

    from qvl.data.world import KINDS
    from qvl.train import __main__ as R

    samples = [S.sample_at(S.get("lm-word"), "2.5", i) for i in range(40)]
    ocr = [s for s in samples if s.task == "ocr"]
    assert len(ocr) > len(samples) / 2
    shapes = []
    for s in samples:
        scene = s.messages[0]["content"][0]["text"].split("\n")[0]
        assert scene.startswith("Scene:") and scene.count('the text "') <= 1
        shapes.append(len(re.findall(rf"\b(?:a|an) \w+ (?:{'|'.join(KINDS)}) at", scene)))
    assert max(shapes) == 1
    for s in ocr:
        word = re.search(r'the text "([^"]+)"', s.messages[0]["content"][0]["text"]).group(1)
        assert s.messages[1]["content"] == word
    seen = {}
    monkeypatch.setattr(R, "run_recipe", lambda g, *a, budgets=None, **k: seen.__setitem__(g, budgets))
    R.recipe_main(["--generation", "2.5", "--out", "/nonexistent/out", "--word-samples", "25600"])
    R.recipe_main(["--generation", "2", "--out", "/nonexistent/out", "--word-samples", "100", "--ground-samples", "7"])
    R.recipe_main(["--generation", "1", "--out", "/nonexistent/out"])
    assert seen == {"2.5": {"lm-word": 25600}, "2": {"ground": 7, "lm-word": 100}, "1": None}
    R.recipe_main(["--generation", "2.5", "--out", "/nonexistent/out", "--when-samples", "0"])
    assert seen["2.5"] == {"when": 0}  # 0 reaches the recipe: it switches off a phase that is on by default
    R.recipe_main(["--generation", "1", "--out", "/nonexistent/out", "--count-samples", "4800"])
    assert seen["1"] == {"count": 4800}


def test_set_changes_the_stage_that_trains_and_rejects_bad_fields_in_one_line(monkeypatch):
    """`python -m qvl.train ... --set FIELD=VALUE`: the stage handed to the trainer differs from the named one in
    exactly the fields set, typed like them; an unknown field, a bad value or a negative number is one line."""
    import subprocess
    import sys
    from dataclasses import asdict

    from qvl.train import __main__ as R
    from qvl.train import loop

    seen = []
    monkeypatch.setattr(loop, "train", lambda stage, *a, **k: seen.append(stage) or {})
    R.stage_main(["--generation", "2.5", "--stage", "ground", "--samples", "16", "--out", "/nonexistent/out",
                  "--init", "/nonexistent/model", "--quiet", "--set", "lr=1e-3", "--set", "train=adapter,llm",
                  "--set", "mix=ground:2,color:0.5", "--set", "answer_layer=4", "--set", "curriculum=0.25:1,0.5:2"])
    changed = {k: v for k, v in asdict(seen[0]).items() if v != asdict(S.get("ground"))[k]}
    assert changed == {"lr": 1e-3, "train": ("adapter", "llm"), "mix": {"ground": 2.0, "color": 0.5}, "answer_layer": 4,
                       "curriculum": ((0.25, {"max_objects": 1}), (0.5, {"max_objects": 2}))}
    assert type(changed["answer_layer"]) is int
    # the curriculum set reaches the scenes (the ground stage's own keeps one shape until 3/4): one shape in the
    # first quarter, at most two in the second, then more
    samples = [S.sample_at(seen[0], "2.5", i, total=80) for i in range(80)]
    objects = [len(s.scene.shapes) if s.scene else 0 for s in samples]  # clips: no scene
    assert max(objects[:20]) == 1 and max(objects[20:40]) == 2 and max(objects[40:60]) > 2
    for value, says in (("foo=1", "expected FIELD=VALUE with FIELD one of train, mix, curriculum, answer_layer"),
                        ("curriculum=0.5", "expected F:N,..."), ("curriculum=0.8:1,0.5:2", "fractions must rise"),
                        ("curriculum=0.5:0", "counts be >= 1"),
                        ("lr", "expected FIELD=VALUE"), ("loss=dpo", "expected FIELD=VALUE"),
                        ("lr=fast", "'lr=fast': could not convert"), ("lr=-1", "'lr=-1': must be >= 0"),
                        ("answer_layer=1.5", "'answer_layer=1.5': invalid literal for int()"),
                        ("train=vit", "unknown part(s) vit"), ("mix=ground", "expected task:weight items"),
                        ("mix=boxes:1", "unknown task(s) boxes")):
        out = subprocess.run([sys.executable, "-m", "qvl.train", "--generation", "2.5", "--stage", "ground",
                              "--samples", "16", "--out", "/nonexistent/out", "--set", value],
                             capture_output=True, text=True)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert says in out.stderr.strip().splitlines()[-1], (value, out.stderr)


def test_recipe_rejects_malformed_variant_flags_in_one_line():
    import subprocess
    import sys

    for flag, value, says in (("--object-curriculum", "0.5", "--object-curriculum: expected F:N"),
                              ("--rope-theta", "0", "--rope-theta must be > 1"),
                              ("--position-loss", "-1", "--position-loss must be >= 0"),
                              ("--position-layer", "8", "--position-layer must be in 0-7"),
                              ("--answer-loss", "-2", "--answer-loss must be >= 0"),
                              ("--answer-layer", "-1", "--answer-layer must be in 0-7"),
                              ("--mrope-section", "8,12,11", "--mrope-section: expected three positive integers"),
                              ("--mrope-section", "a,b,c", "--mrope-section: expected three positive integers"),
                              ("--ground-samples", "-5", "--ground-samples must be >= 0"),
                              ("--word-samples", "-1", "--word-samples must be >= 0"),
                              ("--when-samples", "-3", "--when-samples must be >= 0"),
                              ("--count-samples", "-4", "--count-samples must be >= 0"),
                              ("--count-target", "-1", "--count-target must be >= 0")):
        out = subprocess.run([sys.executable, "-m", "qvl.train", "recipe", flag, value], capture_output=True, text=True)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert says in out.stderr.strip().splitlines()[-1]
    out = subprocess.run([sys.executable, "-m", "qvl.train", "--generation", "1", "--stage", "when", "--samples", "16",
                          "--out", "/nonexistent/out"], capture_output=True, text=True)
    assert out.returncode == 2 and "gen 1 (Qwen-VL) has no video input" in out.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------
# The decoder position loss (gens 2 / 2.5)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", ["2", "2.5"])
def test_position_loss_is_the_read_out_error_of_each_image_tokens_grid_cell(generation, tok_dir):
    """The added term equals the MSE of the head's linear read-out of decoder layer L's output at every image
    token against (row, column) / 16 -- the hidden states caught here by a hook of the test's own and the
    cells counted from image_grid_thw (not from the M-RoPE ids the trainer reads)."""
    from qvl.train.loop import PositionHead

    model, tok = micro_model(generation, tok_dir)
    on = small(S.get("stage2"), position_weight=0.5, position_layer=1)
    batch = fixed_batch(on, generation, model, tok)
    head, dense = PositionHead(model.config.text.hidden_size, 1), DenseHead.for_model(model)
    caught = []
    hook = model.model.layers[1].register_forward_hook(lambda m, a, o: caught.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        loss_on, metrics = TrainModule(model, on, dense, position_head=head)(batch)
    hook.remove()
    with torch.no_grad():
        loss_off, _ = TrainModule(model, replace(on, position_weight=0.0), dense)(batch)
    cells = []
    for _, h, w in batch["vision"]["image_grid_thw"].tolist():
        cols = w // 2  # the 2 x 2 merge
        cells += [[i // cols, i % cols] for i in range(h // 2 * cols)]
    img = batch["input_ids"] == model.config.image_token_id
    assert int(img.sum()) == len(cells) > 4
    pred = caught[0][img] @ head.proj.weight.T + head.proj.bias
    expected = ((pred - torch.tensor(cells, dtype=torch.float) / 16) ** 2).mean()
    assert torch.allclose(metrics["pos_mse"], expected, atol=1e-6)
    assert torch.allclose(loss_on - loss_off, 0.5 * expected, atol=1e-5)


def test_position_head_learns_and_travels_from_stage_2_to_stage_3(tok_dir, tmp_path):
    from safetensors.torch import load_file

    from qvl.train.loop import POSITION_HEAD_FILE

    model, _ = micro_model("2.5", tok_dir)
    init = tiny.save_model(model, tmp_path / "init", tok_dir)
    s2 = small(S.get("stage2"), batch_size=2, position_weight=5.0, position_layer=0, lr=3e-3)
    train(s2, "2.5", tmp_path / "s2", 40, init=init, workers=0, quiet=True)
    mse = [float(r["pos_mse"]) for r in csv.DictReader(open(tmp_path / "s2" / "loss.csv")) if r.get("pos_mse")]
    assert len(mse) >= 15 and sum(mse[-5:]) < 0.5 * sum(mse[:5]), mse
    first = load_file(str(tmp_path / "s2" / POSITION_HEAD_FILE))
    # stage 3 starts from stage 2's head (and trains it on); a stage without the loss carries it unchanged
    s3 = small(S.get("stage3"), batch_size=2, position_weight=1.0, position_layer=0)
    train(s3, "2.5", tmp_path / "s3", 4, init=tmp_path / "s2", workers=0, quiet=True)
    state = torch.load(tmp_path / "s3" / "state.pt", weights_only=True)["module"]
    assert any(not torch.equal(state[f"position_head.{k}"], v) for k, v in first.items())
    train(small(S.get("stage3"), batch_size=2), "2.5", tmp_path / "plain", 2, init=tmp_path / "s3", workers=0,
          quiet=True)
    assert (load_file(str(tmp_path / "plain" / POSITION_HEAD_FILE))["proj.weight"]
            == load_file(str(tmp_path / "s3" / POSITION_HEAD_FILE))["proj.weight"]).all()


def test_position_loss_refuses_gen_1_and_a_missing_layer(tok_dir, tmp_path):
    model, _ = micro_model("1", tok_dir)
    init = tiny.save_model(model, tmp_path / "g1", tok_dir)
    with pytest.raises(ValueError, match="gen 2 / 2.5"):
        train(small(S.get("stage2"), position_weight=1.0), "1", tmp_path / "o1", 2, init=init, workers=0, quiet=True)
    model, _ = micro_model("2.5", tok_dir)
    init = tiny.save_model(model, tmp_path / "g25", tok_dir)
    with pytest.raises(ValueError, match="layers 0-1"):
        train(small(S.get("stage2"), position_weight=1.0, position_layer=2), "2.5", tmp_path / "o2", 2, init=init,
              workers=0, quiet=True)


# --------------------------------------------------------------------------------------------------
# The box read-out at the answer (all gens) and the grounding phase
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", ["1", "2.5"])
def test_answer_loss_is_the_read_out_error_at_the_states_that_write_each_box_number(generation, tok_dir):
    """The added term equals the MSE of the head's read-out of decoder layer L's output (caught by the test's
    own hook) at the state before each box number's first digit -- found here by searching the row for the
    number's digit tokens after the box opens -- against the number over 1000 (gen 1) or the resized side (2.5)."""
    import re

    from qvl.train.loop import AnswerBoxHead, decoder_layers

    model, tok = micro_model(generation, tok_dir)
    on = small(S.get("ground"), answer_weight=0.5, answer_layer=1)
    stage = replace(on, mix={"ground": 1.0})
    samples = [S.sample_at(stage, generation, i) for i in range(3)]
    coll = Collator(generation, tok, model.config, loss="assistant", dense=True, gen1_image_size=56, boxes=True)
    batch = coll(samples)
    head, dense = AnswerBoxHead(model.config.text.hidden_size, 1), DenseHead.for_model(model)
    caught = []
    hook = decoder_layers(model)[1].register_forward_hook(lambda m, a, o: caught.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        loss_on, metrics = TrainModule(model, on, dense, answer_head=head)(batch)
    hook.remove()
    with torch.no_grad():
        loss_off, _ = TrainModule(model, replace(on, answer_weight=0.0), dense)(batch)
    digit = {d: tok.encode(str(d))[0] for d in range(10)}
    box = {"1": r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)", "2.5": r'"bbox_2d": \[(\d+), (\d+), (\d+), (\d+)\]'}[generation]
    preds, targets = [], []
    for r, s in enumerate(samples):
        numbers = [int(v) for v in re.search(box, s.messages[-1]["content"]).groups()]
        h, w = s.media["resized_size"]
        sides = (1000,) * 4 if generation == "1" else (w, h, w, h)
        ids = batch["input_ids"][r].tolist()
        i = len(ids) - 1 - ids[::-1].index(tok.im_start_id)  # the assistant turn starts here
        if generation == "2.5":
            i += ids[i:].index(tok.encode("bbox")[0])  # after the key, whose "2" is no coordinate
        for k, (n, side) in enumerate(zip(numbers, sides)):
            want = [digit[int(c)] for c in str(n)]
            while ids[i:i + len(want)] != want or ids[i - 1] in digit.values():
                i += 1
            preds.append((caught[0][r, i - 1] @ head.proj.weight.T + head.proj.bias)[k])
            targets.append(n / side)
            i += len(want)
    assert len(targets) == 12
    expected = ((torch.stack(preds) - torch.tensor(targets)) ** 2).mean()
    assert torch.allclose(metrics["box_mse"], expected, atol=1e-6)
    assert torch.allclose(loss_on - loss_off, 0.5 * expected, atol=1e-5)


@pytest.mark.parametrize("generation", ["2", "2.5"])
def test_answer_loss_reads_the_when_answers_seconds_at_the_state_before_its_first_digit(generation, tok_dir):
    """A video "when" answer ("1.3 seconds") adds the head's fifth number: decoder layer L's output at the state
    before the answer's first digit -- found here from the end of the assistant header -- against its seconds / 6
    (absolute time); a box in the same batch still counts, so the term is the mean over both kinds."""
    import re

    from qvl.train.batching import TIME_K
    from qvl.train.loop import AnswerBoxHead, decoder_layers

    model, tok = micro_model(generation, tok_dir)
    stage = small(S.get("ground"), answer_weight=2.0, answer_layer=1, mix={"video_when": 1.0})
    samples = [S.sample_at(stage, generation, i) for i in range(3)]
    assert all(s.task == "video_when" for s in samples)
    coll = Collator(generation, tok, model.config, loss="assistant", boxes=True)
    batch = coll(samples)
    head = AnswerBoxHead(model.config.text.hidden_size, 1)
    caught = []
    hook = decoder_layers(model)[1].register_forward_hook(
        lambda m, a, o: caught.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        loss_on, metrics = TrainModule(model, stage, answer_head=head)(batch)
    hook.remove()
    with torch.no_grad():
        loss_off, _ = TrainModule(model, replace(stage, answer_weight=0.0))(batch)
    preds, targets = [], []
    header = tok.encode("<|im_start|>assistant\n")
    for r, s in enumerate(samples):
        seconds = float(re.fullmatch(r"(\d\.\d) seconds", s.messages[-1]["content"]).group(1))
        ids = batch["input_ids"][r].tolist()
        i = max(j for j in range(len(ids)) if ids[j:j + len(header)] == header) + len(header)  # the answer's start
        assert tok.decode(ids[i:i + 3]) == f"{seconds:.1f}"
        preds.append((caught[0][r, i - 1] @ head.proj.weight.T + head.proj.bias)[TIME_K])
        targets.append(seconds / 6.0)
    assert batch["box_k"].tolist() == [TIME_K] * 3
    expected = ((torch.stack(preds) - torch.tensor(targets)) ** 2).mean()
    assert torch.allclose(metrics["box_mse"], expected, atol=1e-6)
    assert torch.allclose(loss_on - loss_off, 2.0 * expected, atol=1e-5)
    # with a box in the batch: four box numbers and one time
    mixed = coll([samples[0], S.sample_at(replace(stage, mix={"ground": 1.0}), generation, 0)])
    assert sorted(mixed["box_k"].tolist()) == [0, 1, 2, 3, TIME_K]


def test_answer_head_learns_in_the_ground_phase_and_travels_to_stage_3(tok_dir, tmp_path):
    from safetensors.torch import load_file

    from qvl.train.loop import ANSWER_HEAD_FILE

    model, _ = micro_model("2", tok_dir)
    init = tiny.save_model(model, tmp_path / "init", tok_dir)
    ground = small(S.get("ground"), batch_size=4, answer_weight=5.0, answer_layer=1, lr=3e-3, mix={"ground": 1.0})
    train(ground, "2", tmp_path / "g", 160, init=init, workers=0, quiet=True)
    mse = [float(r["box_mse"]) for r in csv.DictReader(open(tmp_path / "g" / "loss.csv")) if r.get("box_mse")]
    assert len(mse) == 40 and sum(mse[-8:]) < 0.5 * sum(mse[:8]), mse
    first = load_file(str(tmp_path / "g" / ANSWER_HEAD_FILE))
    s3 = small(S.get("stage3"), batch_size=2, answer_weight=1.0, answer_layer=1)
    train(s3, "2", tmp_path / "s3", 4, init=tmp_path / "g", workers=0, quiet=True)
    state = torch.load(tmp_path / "s3" / "state.pt", weights_only=True)["module"]
    assert any(not torch.equal(state[f"answer_head.{k}"], v) for k, v in first.items())


def test_answer_loss_refuses_dpo_and_a_missing_layer(tok_dir, tmp_path):
    model, _ = micro_model("1", tok_dir)
    init = tiny.save_model(model, tmp_path / "g1", tok_dir)
    with pytest.raises(ValueError, match="layers 0-1"):
        train(small(S.get("ground"), answer_weight=1.0, answer_layer=2), "1", tmp_path / "o1", 2, init=init,
              workers=0, quiet=True)
    with pytest.raises(ValueError, match="text or assistant loss"):
        train(small(S.get("dpo"), answer_weight=1.0, answer_layer=0), "1", tmp_path / "o2", 2, init=init,
              workers=0, quiet=True)


def test_recipe_flags_put_each_loss_in_its_stages(monkeypatch):
    """--position-loss: stage 2, ground, when, count, stage 3 of gens 2 / 2.5 (gen 1 has no M-RoPE grid);
    --answer-loss: ground, when and stage 3 of every generation (gen 1 skips the when phase); --count-target: every
    stage with the dense vision loss, all generations; all beside any --object-curriculum."""
    from qvl.train import __main__ as R

    seen = {}
    monkeypatch.setattr(R, "run_recipe", lambda g, *a, stage_overrides=None, **k: seen.__setitem__(g, stage_overrides))
    R.recipe_main(["--generation", "all", "--out", "/nonexistent/out", "--position-loss", "0.5", "--position-layer", "2",
                   "--answer-loss", "2", "--answer-layer", "6", "--object-curriculum", "0.5:1",
                   "--count-target", "0.5"])
    pos, ans = dict(position_weight=0.5, position_layer=2), dict(answer_weight=2.0, answer_layer=6)
    cnt = dict(count_weight=0.5)
    curriculum = {"curriculum": ((0.5, {"max_objects": 1}),)}
    for g in ("2", "2.5"):
        assert seen[g] == {"vision-pretrain": cnt, "stage2": {**curriculum, **pos, **cnt},
                           "ground": {**pos, **cnt, **ans}, "when": {**pos, **cnt, **ans}, "count": {**pos, **cnt},
                           "stage3": {**pos, **ans}}
    assert seen["1"] == {"vision-pretrain": cnt, "stage2": {**curriculum, **cnt}, "ground": {**cnt, **ans},
                         "when": {**cnt, **ans}, "count": cnt, "stage3": ans}
