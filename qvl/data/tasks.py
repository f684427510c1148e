"""Questions with exact answers about generated scenes and clips, as chat samples for every generation.

`make_sample(task, seed, generation)` gives a `Sample`: qwen-vl-utils messages (ready for
`qvl.chat.render_qwen2` / `render_qwen_vl`), the question/answer turns, and per turn the ground truth
that `score` needs. The scene, the question and the truth depend only on (task, seed); the generation
only changes how coordinates are written, so the three generations are compared on identical data:

* gen 1 and gen 2: boxes in 0-1000 of the original image (`<box>` / `<|box_start|>` tags);
* gen 2.5: `{"bbox_2d": [...]}` JSON in absolute pixels of the *resized* image, which is
  `smart_resize(h, w, 28, min_pixels, max_pixels)` with the pixel bounds carried in the image item.

Seeds are split: `SPLITS["train"]` and `SPLITS["eval"]` never overlap, so an evaluation set is
held out by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np

from .. import grounding
from ..media import MIN_PIXELS, sample_frame_indices, smart_resize
from . import video as V
from .world import COLORS, KINDS, PLURALS, Scene, SceneConfig, left_to_right, make_scene, reading_order, render

TASKS = ("caption", "color", "shape", "count", "ground", "refer", "ocr", "video_direction", "video_when")
IMAGE_TASKS = TASKS[:7]
VIDEO_TASKS = TASKS[7:]
GENERATIONS = ("1", "2", "2.5")

# Captions weigh a lot: the prototypes only started using the image once captions were in the mix.
DEFAULT_MIX = {"caption": 0.15, "color": 0.1, "shape": 0.1, "count": 0.15, "ground": 0.15, "refer": 0.1,
               "ocr": 0.13, "video_direction": 0.06, "video_when": 0.06}

# Disjoint seed ranges: [start, stop).
SPLITS = {"train": (0, 1_000_000_000), "eval": (1_000_000_000, 1_001_000_000)}

WHEN_TOLERANCE_S = 0.5


@dataclass(frozen=True)
class DataConfig:
    """Everything that shapes the samples. `scene.max_objects` is the curriculum knob."""

    scene: SceneConfig = SceneConfig()
    clip: V.ClipConfig = V.ClipConfig()
    min_pixels: int = MIN_PIXELS  # image pixel budget, carried in each image item
    max_pixels: int = 640 * 28 * 28  # large canvases (up to ~900 px) are scaled to <= 640 tokens
    video_fps: float = 2.0  # frames given to the model per second of clip (qwen-vl-utils default)
    video_min_pixels: int = 16 * 28 * 28  # per frame; far below qwen-vl-utils' 128 tokens to keep clips cheap
    video_max_pixels: int = 64 * 28 * 28
    max_turns: int = 1  # the iterator draws 1..max_turns question/answer turns per conversation


@dataclass
class QA:
    task: str
    question: str
    answer: str
    truth: dict  # what `score` compares a reply with; always has "answer"


@dataclass
class Sample:
    task: str
    seed: int
    generation: str
    messages: list[dict]  # user / assistant turns in the qwen-vl-utils format, answers included
    qas: list[QA]
    scene: Scene | None = None
    clip: V.Clip | None = None
    media: dict = field(default_factory=dict)  # sizes: original_size, resized_size; video: frame_indices, fps

    @property
    def answer(self) -> str:
        return self.qas[-1].answer

    @property
    def truth(self) -> dict:
        return self.qas[-1].truth

    def prompt(self, turn: int = -1) -> list[dict]:
        """Messages up to and including the user question of `turn` (what a model answers in eval)."""
        turn = turn % len(self.qas)
        return self.messages[: 2 * turn + 1]


# --------------------------------------------------------------------------------------------------
# Wording
# --------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _join(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_text(scene: Scene) -> str:
    """Shapes left to right, then the words in reading order."""
    shapes = [_article(s.name) for s in left_to_right(scene.shapes)]
    if not shapes:
        out = "There are no shapes."
    elif len(shapes) == 1:
        out = f"There is {shapes[0]}."
    else:
        out = f"From left to right: {_join(shapes)}."
    words = [f'"{t.text}"' for t in reading_order(scene.texts)]
    if words:
        out += f" The text reads {_join(words)}." if len(words) == 1 else f" The texts read {_join(words)}."
    return out


def _coords(box, generation: str, sizes: dict) -> tuple[int, ...]:
    return grounding.from_original(grounding.Box(*box), generation, sizes["original_size"], sizes["resized_size"])


def region_text(box, generation: str, sizes: dict) -> str:
    """A box inside a question, in the generation's own notation (no label)."""
    if generation == "2.5":
        return "[" + ", ".join(str(c) for c in _coords(box, generation, sizes)) + "]"
    return grounding.format_box(grounding.Box(*box), generation, sizes["original_size"])


def box_answer(box, label: str, generation: str, sizes: dict) -> str:
    item = grounding.Box(*box, label=label)
    return grounding.format_boxes([item], generation, sizes["original_size"], sizes["resized_size"])


# --------------------------------------------------------------------------------------------------
# Image tasks: each returns a QA or None when the scene can't support the question
# --------------------------------------------------------------------------------------------------


def _unique(items, key):
    counts: dict = {}
    for it in items:
        counts[key(it)] = counts.get(key(it), 0) + 1
    return [it for it in items if counts[key(it)] == 1]


def ask_caption(scene, rng, generation, sizes):
    question = _pick(rng, ("Describe the image.", "What is in the picture?"))
    answer = caption_text(scene)
    return QA("caption", question, answer, {"answer": answer})


# Colour and shape answers restate the word the question names *right before* the word it asks for ("The star
# red.", "A red star."). The token that predicts the answer is then the key itself, so the key and what the
# image tokens carry meet at that one position. With a bare answer (or "The star is red.", where "is" predicts
# the colour) the key must first be fetched from the question by another head, a two-step circuit the tiny
# decoder did not form: measured on two-shape scenes, docs/training_log.md (session 12).
def ask_color(scene, rng, generation, sizes):
    candidates = _unique(scene.shapes, lambda s: s.kind)
    if not candidates:
        return None
    s = _pick(rng, candidates)
    question = _pick(rng, (f"What color is the {s.kind}?", f"Which color does the {s.kind} have?"))
    return QA("color", question, f"The {s.kind} {s.color}.", {"answer": s.color})


def ask_shape(scene, rng, generation, sizes):
    candidates = _unique(scene.shapes, lambda s: s.color)
    if not candidates:
        return None
    s = _pick(rng, candidates)
    question = _pick(rng, (f"What shape is the {s.color} object?", f"Which shape is {s.color}?"))
    return QA("shape", question, f"{_article(s.name).capitalize()}.", {"answer": s.kind})


# A count question names a kind or colour that is in the scene this often; otherwise any of them. Drawn from
# all names, two in three such answers were 0 and the tiny models learnt to answer "0" to every one of them
# (docs/training_log.md, session 13): a question should usually be about something there.
COUNT_PRESENT = 0.75


def ask_count(scene, rng, generation, sizes):
    mode = _pick(rng, ("all", "kind", "color"))
    if mode == "all":
        n = str(len(scene.shapes))
        return QA("count", "How many shapes are there?", n, {"answer": n})
    attr, names = ("kind", sorted(PLURALS)) if mode == "kind" else ("color", list(COLORS))
    present = sorted({getattr(s, attr) for s in scene.shapes})
    pick = _pick(rng, present if present and rng.random() < COUNT_PRESENT else names)
    n = str(sum(getattr(s, attr) == pick for s in scene.shapes))
    question = f"How many {PLURALS[pick]} are there?" if mode == "kind" else f"How many {pick} shapes are there?"
    return QA("count", question, n, {"answer": n})


def _targets(scene):
    """Things a box can name uniquely: shapes with a unique colour+kind, words that occur once."""
    shapes = [(f"the {s.name}", s.name, s.box, _article(s.name)) for s in _unique(scene.shapes, lambda s: s.name)]
    words = [(f'the text "{t.text}"', t.text, t.box, f'the text "{t.text}"')
             for t in _unique(scene.texts, lambda t: t.text)]
    return shapes + words


def ask_ground(scene, rng, generation, sizes):
    targets = _targets(scene)
    if not targets:
        return None
    phrase, label, box, _ = _pick(rng, targets)
    question = f"Output the bounding box of {phrase}."
    answer = box_answer(box, label, generation, sizes)
    truth = {"answer": answer, "box": tuple(box), "label": label, "generation": generation, **sizes}
    return QA("ground", question, answer, truth)


def ask_refer(scene, rng, generation, sizes):
    targets = _targets(scene)
    if not targets:
        return None
    _, _, box, answer = _pick(rng, targets)
    question = f"What is in the region {region_text(box, generation, sizes)}?"
    return QA("refer", question, answer, {"answer": answer, "box": tuple(box)})


def ask_ocr(scene, rng, generation, sizes):
    if not scene.texts:
        return None
    texts = reading_order(scene.texts)
    if len(texts) == 1:
        question = _pick(rng, ("What does the text say?", "Read the text in the image."))
    else:
        question = "Read all the text in the image, from top to bottom."
    answer = " ".join(t.text for t in texts)
    truth = {"answer": answer, "min_height": min(t.height for t in texts), "min_size": min(t.size for t in texts),
             "large": scene.large}
    return QA("ocr", question, answer, truth)


# --------------------------------------------------------------------------------------------------
# Video tasks
# --------------------------------------------------------------------------------------------------


def ask_video_direction(clip, rng, generation, sizes):
    if not clip.tracks:
        return None
    t = _pick(rng, clip.tracks)
    question = f"In which direction does the {t.name} move?"
    return QA("video_direction", question, t.direction, {"answer": t.direction})


def ask_video_when(clip, rng, generation, sizes):
    events = V.events(clip)
    if not events:
        return None
    e = _pick(rng, events)
    question = f"When does the {e.name} {e.kind}?"
    answer = f"{e.time:.1f} seconds"
    return QA("video_when", question, answer, {"answer": answer, "time": e.time, "event": e.kind})


ASK: dict[str, Callable] = {
    "caption": ask_caption, "color": ask_color, "shape": ask_shape, "count": ask_count, "ground": ask_ground,
    "refer": ask_refer, "ocr": ask_ocr, "video_direction": ask_video_direction, "video_when": ask_video_when,
}


# --------------------------------------------------------------------------------------------------
# Building samples
# --------------------------------------------------------------------------------------------------


def _check(task: str, generation: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if generation not in GENERATIONS:
        raise ValueError(f"unknown generation {generation!r}; expected one of {GENERATIONS}")
    if generation == "1" and task in VIDEO_TASKS:
        raise ValueError(f"task {task!r} needs video input, which Qwen-VL (gen 1) does not have")


def _scene_config(task: str, cfg: SceneConfig) -> SceneConfig:
    """Make sure the scene can carry the question (a word for OCR) instead of retrying blindly."""
    if task == "ocr":
        return replace(cfg, min_texts=max(1, cfg.min_texts))
    return cfg


def image_sizes(scene: Scene, config: DataConfig) -> dict:
    """original_size and the size Qwen2/2.5-VL resize to under the sample's pixel budget, both (h, w)."""
    return {"original_size": scene.size,
            "resized_size": smart_resize(scene.height, scene.width, 28, config.min_pixels, config.max_pixels)}


def _ask_chain(media, task, rng, generation, sizes, turns, pool) -> list[QA] | None:
    """The main question plus turns-1 follow-ups (other tasks from `pool`) on the same media."""
    first = ASK[task](media, rng, generation, sizes)
    if first is None:
        return None
    qas = [first]
    for _ in range(turns - 1):
        for follow in rng.permutation(pool):
            qa = ASK[str(follow)](media, rng, generation, sizes)
            if qa is not None and qa.question not in {q.question for q in qas}:
                qas.append(qa)
                break
    return qas


def _messages(media_item: dict, qas: list[QA]) -> list[dict]:
    messages = []
    for i, qa in enumerate(qas):
        content = ([media_item] if i == 0 else []) + [{"type": "text", "text": qa.question}]
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": qa.answer})
    return messages


def make_sample(task: str, seed: int, generation: str = "2.5", config: DataConfig = DataConfig(),
                turns: int = 1, render_media: bool = True) -> Sample:
    """One conversation about one generated image (or clip) built from (task, seed).

    `render_media=False` skips drawing: the media item then holds the Scene / Clip object itself, which
    no image loader accepts but which is all that text-only uses (tokenizer corpus, text LM) need.
    """
    generation = str(generation)
    _check(task, generation)
    # The stream depends on the task, not the generation: every generation gets the same scene and question.
    rng = np.random.default_rng([int(seed), TASKS.index(task)])
    is_video = task in VIDEO_TASKS
    for _ in range(100):
        if is_video:
            clip = V.make_clip(rng, config.clip)
            qas = _ask_chain(clip, task, rng, generation, {}, turns, VIDEO_TASKS)
            if qas is not None:
                return _video_sample(task, seed, generation, config, clip, qas, render_media)
        else:
            scene = make_scene(rng, _scene_config(task, config.scene))
            sizes = image_sizes(scene, config)
            qas = _ask_chain(scene, task, rng, generation, sizes, turns, IMAGE_TASKS)
            if qas is not None:
                item = {"type": "image", "image": render(scene) if render_media else scene,
                        "min_pixels": config.min_pixels, "max_pixels": config.max_pixels}
                return Sample(task, int(seed), generation, _messages(item, qas), qas, scene=scene, media=sizes)
    raise RuntimeError(f"could not build a {task!r} sample from seed {seed} with {config}")


def _video_sample(task, seed, generation, config, clip, qas, render_media) -> Sample:
    """Frames are sampled the way qwen-vl-utils samples a file (at config.video_fps), and the item's
    fps is the rate of the sampled frames, so timestamps mean seconds of the clip."""
    indices = sample_frame_indices(clip.n_frames, clip.fps, fps=config.video_fps)
    fps = len(indices) / clip.n_frames * clip.fps
    item = {"type": "video", "video": V.frames(clip, indices) if render_media else clip, "fps": fps,
            "min_pixels": config.video_min_pixels, "max_pixels": config.video_max_pixels}
    media = {"original_size": (clip.height, clip.width), "frame_indices": indices, "fps": fps}
    return Sample(task, int(seed), generation, _messages(item, qas), qas, clip=clip, media=media)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


def task_weights(generation: str, mix: dict | None = None) -> dict[str, float]:
    """Normalised mix; gen 1 drops the video tasks (it has no video input)."""
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(mix) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks in mix: {sorted(unknown)}")
    if str(generation) == "1":
        mix = {k: v for k, v in mix.items() if k not in VIDEO_TASKS}
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("the task mix has no positive weight")
    return {k: v / total for k, v in mix.items() if v > 0}


def split_of(seed: int) -> str:
    for name, (lo, hi) in SPLITS.items():
        if lo <= seed < hi:
            return name
    raise ValueError(f"seed {seed} is in no split")


def iterate(generation: str = "2.5", split: str = "train", *, mix: dict | None = None,
            config: DataConfig = DataConfig(), start: int = 0, render_media: bool = True) -> Iterator[Sample]:
    """Endless (until the split runs out) stream of samples; sample i uses seed SPLITS[split][0] + start + i,
    so a resumed run passes `start` = samples already seen."""
    weights = task_weights(generation, mix)
    names, probs = list(weights), np.array(list(weights.values()))
    lo, hi = SPLITS[split]
    for seed in range(lo + start, hi):
        pick = np.random.default_rng([seed, len(TASKS)])  # its own stream: the task choice never shifts a scene
        task = names[int(pick.choice(len(names), p=probs))]
        turns = 1 + int(pick.integers(config.max_turns))
        yield make_sample(task, seed, generation, config, turns=turns, render_media=render_media)


def eval_samples(task: str, generation: str, n: int, config: DataConfig = DataConfig(),
                 render_media: bool = True) -> list[Sample]:
    """A fixed held-out set for one task: the first n eval seeds (the same scenes for every generation)."""
    lo, _ = SPLITS["eval"]
    return [make_sample(task, lo + i, generation, config, render_media=render_media) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Case, surrounding space and a final full stop do not count."""
    return " ".join(str(text).strip().casefold().split()).rstrip(".")


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
ANSWER_WORDS = {"color": frozenset(COLORS), "shape": frozenset(KINDS)}


def named(task: str, reply: str) -> list[str]:
    """The colours (task "color") or kinds ("shape") a reply names, in order: "The star red." -> ["red"]."""
    return [w for w in re.findall(r"[a-z]+", normalize(reply)) if w in ANSWER_WORDS[task]]


def answered_seconds(reply: str) -> float | None:
    """The first number a "when" reply names ("1.2 seconds" -> 1.2), or None."""
    m = _NUMBER.search(reply)
    return float(m.group()) if m else None


def score(task: str, reply: str, truth: dict) -> float:
    """1.0 / 0.0 for exact-answer tasks (colour and shape: the reply names the right colour / kind and no other),
    and "when" (within WHEN_TOLERANCE_S); IoU in [0, 1] for grounding
    (the first box of the reply, read with the generation's own convention)."""
    if task == "ground":
        boxes = [b for b in grounding.parse(reply, truth["generation"], original_size=truth["original_size"],
                                            resized_size=truth["resized_size"]) if isinstance(b, grounding.Box)]
        return iou(boxes[0].xyxy, truth["box"]) if boxes else 0.0
    if task == "video_when":
        t = answered_seconds(reply)
        return float(t is not None and abs(t - truth["time"]) <= WHEN_TOLERANCE_S)
    if task in ANSWER_WORDS:  # "The star red." / "A red star." (or a bare word): the one colour / kind it names
        return float(named(task, reply) == [truth["answer"]])
    if task == "count":  # the one number the reply names ("2", "2.", "There are 2.")
        return float(re.findall(r"\d+", reply) == [truth["answer"]])
    return float(normalize(reply) == normalize(truth["answer"]))


__all__ = ["TASKS", "IMAGE_TASKS", "VIDEO_TASKS", "DEFAULT_MIX", "SPLITS", "DataConfig", "QA", "Sample",
           "make_sample", "iterate", "eval_samples", "task_weights", "split_of", "score", "answered_seconds", "iou",
           "normalize", "caption_text", "image_sizes", "named"]
