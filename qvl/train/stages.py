"""The stages of the qvl-tiny recipe: what each trains, on what data, at what resolution, with which loss.

The papers never train a VLM from scratch: Qwen-VL starts from Qwen-7B and OpenCLIP ViT-bigG, Qwen2-VL from
Qwen2 and a DFN ViT (§8). The first stages build tiny stand-ins for those pre-trained parts; the rest
follow the papers' order (reference §8.1-8.3, `tiny_training_notes.md` for why the stand-ins matter):

  vision-pretrain  ViT + adapter, dense per-token targets from the scene (class / letter / box), no decoder.
                   The measured lever: the prototypes' dense pre-training lifted colour 45 -> 64 %, count -> 71 %.
  lm-colour        the LM stand-in, a model of its own (as Qwen-7B is to Qwen-VL): a fresh decoder on text
  lm-shape         only -- the scene *written as text* then questions about it -- in focused phases, one skill
  lm-box           each on scenes with one shape (copy its colour, its kind, its box; the box phase replays
  lm-word          the other two; lm-word, only with --word-samples N, copies the one quoted word), then every drill
  lm-pretrain      on full scenes (look an object up among several). All at
                   lr 3e-4: at the old 2e-3 the decoder copied nothing in 400 steps, at 3e-4 it copies colours
                   after 400, and mixed from the start no copy forms at all (docs/training_log.md, sessions 9-10;
                   the shape copy did not form in 200 steps with colour replayed, it did in 400 without).
  stage1           alignment: the vision stand-in's model with the LM stand-in's decoder put in (`loop.join`),
                   LLM frozen, ViT + adapter trained at low resolution (Qwen-VL stage 1: 224 px, "LLM frozen";
                   Qwen2-VL's trains the ViT only) on captions and -- qvl-tiny's choice -- short colour, shape
                   and box questions, half on one-shape images: with a decoder that copies from text, such
                   questions aligned colour in 125 steps (session 9).
  stage2           multi-task pre-training: everything trained, all tasks, native resolution (gen 1: its fixed
                   size), videos for gen 2/2.5; a small dense auxiliary loss keeps the vision features from
                   washing out (another of the notes' levers).
  ground           stage 2 with grounding two in three questions, one-shape scenes first (qvl-tiny's, see below;
                   only with --ground-samples N); with --answer-loss, the box is also read out of the answer's
                   own states.
  when             the same for video timing, one-shape clips first (gens 2 / 2.5, only with --when-samples N);
                   the event's second is also read out of the state before the answer's first digit.
  count            stage 2 with count questions two in three (qvl-tiny's, only with --count-samples N).
  stage3           SFT: chat format, multi-turn, loss on assistant tokens only, ViT frozen (Qwen-VL-Chat: "LLM
                   + adapter, ViT frozen"; Qwen2/2.5-VL post-training freezes the ViT too).
  rs-sft           SFT on rejection-sampled answers: only answers the model got right (see qvl.train.dpo).
  dpo              preference optimisation against a frozen reference (Qwen2.5-VL post-training).

The text phases chain among themselves and the rest after vision-pretrain; stage 1 joins the two.
Sample budgets live in `BUDGETS`, one place; seeds are fixed: stage k reads train seeds from its own
offset (`Stage.seed_offset`), so stages never see the same scene twice and eval seeds are never touched.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from qvl.data import tasks as T
from qvl.data.tasks import DataConfig, Sample, iterate, make_sample, region_text
from qvl.data.world import SceneConfig


@dataclass(frozen=True)
class Stage:
    name: str
    train: tuple[str, ...]  # parts of tiny.param_groups that get gradients: "vision", "adapter", "llm"
    source: str = "tasks"  # "tasks" | "drills" (scene as text) | "records" (rejection-sampled / DPO pairs)
    mix: dict | None = None  # task weights (None = qvl.data.DEFAULT_MIX)
    data: dict = field(default_factory=dict)  # DataConfig overrides; "scene"/"clip": SceneConfig/ClipConfig ones
    loss: str = "text"  # "text" | "assistant" | "dense" (vision only) | "dpo"
    weighting: str = "token"  # how the LM loss averages target tokens: "token" | "answer" | "sqrt" (batching.WEIGHTINGS)
    dense_weight: float = 0.0  # weight of the dense vision loss next to the LM loss
    # weight of the decoder's (row, column) read-out at image tokens, from layer `position_layer`'s output
    # (gens 2 / 2.5; qvl.train.loop.PositionHead says why); the recipe's --position-loss sets it
    position_weight: float = 0.0
    position_layer: int = 1
    # weight of the box read-out at the answer's digit-writing states, from layer `answer_layer`'s output (all
    # gens; qvl.train.loop.AnswerBoxHead says why); the recipe's --answer-loss sets it
    answer_weight: float = 0.0
    answer_layer: int = 5
    # weight of the dense head's per-token count target (every vision token: how many shapes its image holds,
    # of each colour, of each kind; qvl.train.loop.DenseHead says why); the recipe's --count-target sets it
    count_weight: float = 0.0
    gen1_image_size: int | None = None  # Qwen-VL's fixed input size for this stage (None = the model's)
    lr: float = 1e-3
    vision_lr_scale: float = 1.0  # the notes: "a higher learning rate for the vision side" is a lever
    batch_size: int = 16
    warmup: float = 0.05  # fraction of the steps
    min_lr: float = 0.1  # cosine floor, as a fraction of lr
    weight_decay: float = 0.1
    seed_offset: int = 0
    beta: float = 0.1  # DPO temperature
    nll_weight: float = 0.0  # DPO: + this x the chosen answers' per-token NLL (qvl.train.dpo.dpo_loss)
    max_turns_eval: int = 1
    bucket: int = 8  # length bucketing: sort the samples of this many steps by length (qvl.train.loop.StageData)
    relist: float = 0.0  # drills: share of scene samples turned into look-up-and-copy drills (`relist`)
    repeat: float = 0.0  # drills: share of scene samples turned into verbatim copy drills (`repeat`)
    # Scene curriculum: ((until_fraction, SceneConfig overrides), ...) -- the samples before that fraction of the
    # stage draw scenes with those overrides (and clips with the ClipConfig ones under "clip"), the rest the
    # stage's own scenes. Session 5 saw one-object reading form in ~200 focused steps while look-up among several
    # objects did not; session 11 saw a lone shape's kind learnt sooner on small canvases with large shapes
    # (docs/training_log.md).
    curriculum: tuple[tuple[float, dict], ...] = ()

    @property
    def lm(self) -> bool:
        return self.loss != "dense"

    @property
    def dense(self) -> bool:
        return self.loss == "dense" or self.dense_weight > 0

    def data_config(self) -> DataConfig:
        d = dict(self.data)
        scene, clip = d.pop("scene", {}), d.pop("clip", {})
        cfg = DataConfig(**d)
        return replace(cfg, scene=replace(cfg.scene, **scene), clip=replace(cfg.clip, **clip))


IMAGE_MIX = {t: 1.0 for t in T.IMAGE_TASKS}
# Drills ask every task; captions are rarer (listing shapes left to right is a sort, not a look-up).
DRILL_MIX = {**{t: 1.0 for t in T.TASKS}, "caption": 0.5}
LOW_RES = 128 * 28 * 28  # stage 1: at most 128 visual tokens per image (prototype canvases: 16-144)
# Stage 2 at <= 256 tokens per image ("smaller canvases early"): only the large canvases (15 %, up to 896 px)
# are scaled down; it cuts stage 2's decoder tokens by ~1/6 (measured: docs/training_log.md). Native
# resolution (DataConfig.max_pixels = 640 tokens) comes back in stage 3, so the small text on large
# canvases is seen at full size before the model ships.
MID_RES = 256 * 28 * 28
# Vision pre-training's first phase: small canvases, at most two shapes, large ones allowed. A shape's kind is
# learnt after a long plateau (session 11: the tiny ViT on lone shapes, 30 % -> 79 % between 24 k and 48 k
# images; sooner for larger shapes), and a small canvas costs a fraction of a full one.
GROUND_MIX = {**{t: 1.0 for t in ("color", "shape", "count", "refer")}, "ground": 12.0,
              **{t: 0.5 for t in ("caption", "ocr", "video_direction", "video_when")}}
WHEN_MIX = {**{t: 1.0 for t in ("color", "shape", "count", "refer", "video_direction")}, "video_when": 12.0,
            **{t: 0.5 for t in ("caption", "ground", "ocr")}}
COUNT_MIX = {**{t: 1.0 for t in ("color", "shape", "refer", "caption", "ground")}, "count": 12.0,
             **{t: 0.5 for t in ("ocr", "video_direction", "video_when")}}
SHAPE_SCENES = dict(max_side=168, large_prob=0.0, max_objects=2, max_shape_frac=0.6)

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("vision-pretrain", train=("vision", "adapter"), loss="dense", mix=IMAGE_MIX, lr=2e-3,
          curriculum=((2 / 3, SHAPE_SCENES),),
          data=dict(max_pixels=256 * 28 * 28), seed_offset=10_000_000, batch_size=16),
    # The LM stand-in's phases: one-object scenes first (nothing to look up, only the copy to learn), the box
    # phase replaying colour and shape; seeds of each phase from its own block.
    Stage("lm-colour", train=("llm",), source="drills", loss="assistant", mix={"color": 1.0}, lr=3e-4,
          data=dict(max_turns=3, scene=dict(max_objects=1)), seed_offset=20_000_000, batch_size=16),
    Stage("lm-shape", train=("llm",), source="drills", loss="assistant", mix={"shape": 1.0},
          lr=3e-4, data=dict(max_turns=3, scene=dict(max_objects=1)), seed_offset=21_000_000, batch_size=16),
    Stage("lm-box", train=("llm",), source="drills", loss="assistant",
          mix={"ground": 1.0, "color": 0.25, "shape": 0.25}, lr=3e-4,
          data=dict(max_turns=3, scene=dict(max_objects=1)), seed_offset=22_000_000, batch_size=16),
    # The word copy (OCR from the scene as text): every dictionary word is one token, so this is a one-token copy
    # among ~104 -- it did not form in lm-pretrain's mix or in 400 focused steps, and did in 1 600 (400 + 1 200, two
    # schedules; one-text drills 3 -> 37 / 40, the text probe's OCR 0 -> 55 %; session 18). Off unless asked for
    # (--word-samples).
    Stage("lm-word", train=("llm",), source="drills", loss="assistant",
          mix={"ocr": 1.0, "color": 0.25, "shape": 0.25, "ground": 0.25}, lr=3e-4,
          data=dict(max_turns=3, scene=dict(max_objects=1, max_texts=1)), seed_offset=24_000_000, batch_size=16),
    Stage("lm-pretrain", train=("llm",), source="drills", loss="assistant", mix=DRILL_MIX, lr=3e-4,
          data=dict(max_turns=3), seed_offset=23_000_000, batch_size=16),
    # Stage 1 scores the answers only: with `text` 26 of 44 labelled tokens per row were the chat template
    # and question, which a frozen LLM predicts or not regardless of the image (docs/training_log.md). Half
    # its samples show one shape, so a colour or kind word has one place in the image to come from.
    Stage("stage1", train=("vision", "adapter"), mix={"caption": 0.5, "color": 1.0, "shape": 1.0, "ground": 0.5},
          lr=1e-3, loss="assistant", curriculum=((0.5, dict(max_objects=1)),),
          data=dict(max_pixels=LOW_RES, scene=dict(max_objects=3, large_prob=0.0)), gen1_image_size=112,
          seed_offset=30_000_000, batch_size=16),
    # Stage 2 scores the answers only for the same reason: its `text` loss fell to 0.39 on template tokens
    # while the answers stayed priors (session-1 run).
    # lr 3e-4: the decoder's copies survive it (session 9: colour 55-58 % after 4 000 samples)
    Stage("stage2", train=("vision", "adapter", "llm"), mix=None, lr=3e-4, loss="assistant", dense_weight=0.2,
          data=dict(max_pixels=MID_RES), seed_offset=40_000_000, batch_size=16),
    # A grounding phase (qvl-tiny's, not the papers'): stage 2 with grounding 12 of 18 questions, one-shape
    # scenes in its first three quarters. Session 15's drills: once the image tokens hold their columns (stage
    # 2's position loss), one-shape box drills with the answer read-out (--answer-loss) made the answer fetch
    # the shape's position -- after ~12 000 one-shape grounding samples, far more than stage 2's mix holds;
    # session 16's phase (weight 8 of 14, one-shape half) held ~4 600 of 16 000 and did not get there. The
    # other tasks are replayed: drills on grounding alone took colour from 66 % to 47 %.
    Stage("ground", train=("vision", "adapter", "llm"), mix=GROUND_MIX, lr=3e-4, loss="assistant", dense_weight=0.2,
          curriculum=((0.75, dict(max_objects=1)),), data=dict(max_pixels=MID_RES), seed_offset=45_000_000,
          batch_size=16),
    # A video-timing phase (qvl-tiny's, gens 2 / 2.5): "when" 12 of 18.5 questions, one-shape clips (and scenes) in
    # its first half, the other tasks replayed. After stage 2 the "when" answer is a per-verb constant, even with
    # one shape in the clip: the video tokens hold their time but the answer never fetches it (session 21). From
    # the shipped gen 2.5, 3 200 samples of such a phase (one-shape clips throughout) made the answered second
    # follow the true one on one-shape clips (correlation within a verb 0 -> 0.63-0.69; 0.75-0.77 with the
    # --answer-loss read-out of the seconds, which the phase therefore always has; session 22). Off unless asked
    # for (--when-samples).
    Stage("when", train=("vision", "adapter", "llm"), mix=WHEN_MIX, lr=3e-4, loss="assistant", dense_weight=0.2,
          answer_weight=1.0, curriculum=((0.5, dict(max_objects=1, clip=dict(max_tracks=1))),),
          data=dict(max_pixels=MID_RES), seed_offset=47_000_000, batch_size=16),
    # A counting phase (qvl-tiny's): stage 2 with count questions 12 of 18.5, the other tasks replayed. After the
    # recipe the models estimate a count rather than count (gen 2.5 answers "1" to most questions whose answer is
    # 2). From the shipped gen 2.5, 4 800 samples of this phase took count from 64.6 to 74.2 % (500 held out; as
    # many of stage 2's own mix: 69.2 %), colour 93.5 -> 90.0 %, shape 98.5 -> 97.0 % (200 each). It does not
    # teach counting a named colour or kind: those twos stay "1" (47 / 48), also with answers that list the counted
    # shapes first or scenes that repeat colours; in the whole recipe its gain (68.4 % after it) is gone after
    # stage 3, rs-sft and DPO (64.2 %; session 26). Off unless asked for (--count-samples).
    Stage("count", train=("vision", "adapter", "llm"), mix=COUNT_MIX, lr=3e-4, loss="assistant", dense_weight=0.2,
          data=dict(max_pixels=MID_RES), seed_offset=48_000_000, batch_size=16),
    Stage("stage3", train=("adapter", "llm"), mix=None, lr=2e-4, loss="assistant", data=dict(max_turns=3),
          seed_offset=50_000_000, batch_size=16),
    Stage("rs-sft", train=("adapter", "llm"), source="records", loss="assistant", lr=1e-4,
          seed_offset=60_000_000, batch_size=16),
    # nll_weight: plain DPO lowered the chosen answers too and broke gen 2.5's box format (session 13)
    Stage("dpo", train=("adapter", "llm"), source="records", loss="dpo", lr=2e-5, beta=0.1, nll_weight=1.0,
          warmup=0.1, seed_offset=70_000_000, batch_size=8, weight_decay=0.0),
)}
ORDER = ("vision-pretrain", "lm-colour", "lm-shape", "lm-box", "lm-word", "lm-pretrain", "stage1", "stage2", "ground",
         "when", "count", "stage3", "rs-sft", "dpo")

# Samples per stage for `python -m qvl.train recipe` (multiplied by --scale); 0 = the stage is off unless asked
# for (`ground`: --ground-samples; session 17's 24 000 hold the ~12 000 one-shape grounding samples it needs;
# `lm-word`: --word-samples; the copy formed within 25 600, session 18; `count`: --count-samples, session 26).
# The text phases run at half the budgets of sessions 12-21: stage 2 ends where it did (session 25). The when
# phase (gens 2 / 2.5) is on: the "when" answer reads the time from the video only after it (session 22).
# "rejection" = questions the stage-3 model answers; "rs-sft" trains on the accepted ones (epochs over them,
# capped by this number); "dpo" = preference pairs seen.
BUDGETS = {"vision-pretrain": 36_000, "lm-colour": 3_200, "lm-shape": 3_200, "lm-box": 3_200, "lm-word": 0,
           "lm-pretrain": 6_000, "stage1": 6_000, "stage2": 24_000, "ground": 0, "when": 9_600,
           "count": 0, "stage3": 4_000, "rejection": 1_000, "rs-sft": 2_000, "dpo": 1_000}


def get(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(ORDER)}")
    return STAGES[name]


# --------------------------------------------------------------------------------------------------
# Text drills: a scene or clip written as text, then the ordinary questions about it
# --------------------------------------------------------------------------------------------------


def _article(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _things(sample: Sample) -> list[tuple[str, str]]:
    """(name, "name at box") per object of a scene, in the generation's own box notation."""
    scene, g, sizes = sample.scene, sample.generation, sample.media
    out = [(_article(s.name), f"{_article(s.name)} at {region_text(s.box, g, sizes)}") for s in scene.shapes]
    out += [(f'the text "{t.text}"', f'the text "{t.text}" at {region_text(t.box, g, sizes)}') for t in scene.texts]
    return out


def _listed(things: list[tuple[str, str]], rng: np.random.Generator) -> str:
    """The "name at box" entries in a random order, joined as the scene description lists them."""
    return "; ".join(things[int(i)][1] for i in rng.permutation(len(things)))


def describe_scene(sample: Sample, rng: np.random.Generator) -> str:
    """Objects in random order with their boxes in the generation's own notation (the same notation the
    answers use, so a grounding answer is a copy): the decoder must find the object by name."""
    things = _things(sample)
    return f"Scene: {_listed(things, rng) if things else 'nothing'}."


def describe_clip(sample: Sample, rng: np.random.Generator) -> str:
    clip = sample.clip
    parts = []
    for i in rng.permutation(len(clip.tracks)):
        t = clip.tracks[int(i)]
        parts.append(f"{_article(t.name)} moving {t.direction}, visible from {clip.time(t.appear):.1f} "
                     f"to {clip.time(t.disappear):.1f} seconds")
    return f"Video of {clip.duration:.1f} seconds: " + "; ".join(parts) + "."


def relist(sample: Sample, seed: int) -> Sample:
    """A look-up-and-copy drill: the scene as text, then "where are: B, C, A?" answered by copying each
    named object's box out of the description, in the asked order. Every box digit of the answer is a
    supervised copy (a grounding question supervises one box; this one three or four), the skill the
    lm-pretrain probe showed missing: after 12 k ordinary drills the decoder answered text-only look-ups
    at the prior (colour 19 %, box IoU 0.01, copying a quoted word 0 %; docs/training_log.md)."""
    rng = np.random.default_rng([seed, 11])
    things = _things(sample)
    names = [t[0] for t in things]
    unique = [t for t in things if names.count(t[0]) == 1]  # a repeated name has no single answer
    if not unique:
        return drill(sample, seed)
    listed = _listed(things, rng)
    asked = [unique[int(i)] for i in rng.permutation(len(unique))]
    question = "Where are " + ", ".join(a[0] for a in asked) + "?"
    messages = [{"role": "user", "content": [{"type": "text", "text": f"Scene: {listed}.\n{question}"}]},
                {"role": "assistant", "content": "; ".join(a[1] for a in asked) + "."}]
    return replace(sample, task="relist", messages=messages, scene=None, clip=None)


def repeat(sample: Sample, seed: int) -> Sample:
    """The plainest copy drill: the scene as text, and the answer is the same text again. Every answer
    token is a copy of the token one listing earlier -- the induction pattern a look-up needs, with ~50
    supervised tokens per row instead of a question's 2-12. Measured on the tiny decoder (random-token
    rows): copying forms only after ~300 steps of dense copy loss (docs/training_log.md)."""
    rng = np.random.default_rng([seed, 17])
    things = _things(sample)
    if not things:
        return drill(sample, seed)
    listed = _listed(things, rng) + "."
    messages = [{"role": "user", "content": [{"type": "text", "text": f"Scene: {listed}\nRepeat the scene."}]},
                {"role": "assistant", "content": listed}]
    return replace(sample, task="repeat", messages=messages, scene=None, clip=None)


def drill(sample: Sample, seed: int) -> Sample:
    """The sample with its image/video replaced by a text description (same questions and answers)."""
    rng = np.random.default_rng([seed, 7])
    text = describe_clip(sample, rng) if sample.clip is not None else describe_scene(sample, rng)
    messages = [dict(m) for m in sample.messages]
    first = [it for it in messages[0]["content"] if it.get("type") == "text"]
    messages[0]["content"] = [{"type": "text", "text": text + "\n" + first[0]["text"]}] + first[1:]
    return replace(sample, messages=messages, scene=None, clip=None)


# --------------------------------------------------------------------------------------------------
# Sample streams
# --------------------------------------------------------------------------------------------------


def scene_at(stage: Stage, index: int, total: int | None) -> dict:
    """The scene overrides of the `stage.curriculum` phase that sample `index` of `total` falls in ({}: none)."""
    if not stage.curriculum or not total:
        return {}
    return next((o for until, o in stage.curriculum if index < until * total), {})


def sample_at(stage: Stage, generation: str, index: int, records: list[dict] | None = None,
              total: int | None = None) -> Sample | dict:
    """The index-th training sample of a stage: deterministic, random access (each DDP rank and DataLoader
    worker computes its own share from the index alone). `total` = the stage's sample count, which places
    the index in the `stage.curriculum`."""
    cfg = stage.data_config()
    overrides = dict(scene_at(stage, index, total))
    if overrides:  # SceneConfig fields, and ClipConfig ones under "clip"
        clip = overrides.pop("clip", {})
        cfg = replace(cfg, scene=replace(cfg.scene, **overrides), clip=replace(cfg.clip, **clip))
    mix = stage.mix
    if mix is not None and generation == "1":
        mix = {k: v for k, v in mix.items() if k not in T.VIDEO_TASKS} or None
    if stage.source == "tasks":
        return next(iterate(generation, "train", mix=mix, config=cfg, start=stage.seed_offset + index))
    if stage.source == "drills":
        s = next(iterate(generation, "train", mix=mix, config=cfg, start=stage.seed_offset + index,
                         render_media=False))
        u = np.random.default_rng([s.seed, 13]).random()
        if s.scene is not None and u < stage.repeat:
            return repeat(s, s.seed)
        if s.scene is not None and u < stage.repeat + stage.relist:
            return relist(s, s.seed)
        return drill(s, s.seed)
    if stage.source == "records":
        if not records:
            raise ValueError(f"stage {stage.name!r} needs records (rejection-sampled answers or DPO pairs)")
        return records[index % len(records)]
    raise ValueError(f"unknown source {stage.source!r}")


def record_sample(record: dict, generation: str, answer: str | None = None,
                  config: DataConfig = DataConfig()) -> Sample:
    """Rebuild the sample a record was made from (task, seed) with `answer` as the assistant's reply."""
    s = make_sample(record["task"], record["seed"], generation, config)
    messages = [dict(m) for m in s.messages]
    messages[-1] = {"role": "assistant", "content": answer if answer is not None else record["answer"]}
    return replace(s, messages=messages)


def first_samples(stage: Stage, generation: str, n: int) -> list:
    return list(itertools.islice((sample_at(stage, generation, i) for i in itertools.count()), n))
