"""The generated world qvl-tiny is trained and evaluated on: scenes, clips, tasks and a tiny tokenizer.

    from qvl.data import make_sample, iterate, score
    s = make_sample("ground", seed=7, generation="2.5")   # s.messages, s.answer, s.truth
    score("ground", reply, s.truth)                         # IoU / exact match / +-0.5 s

Nothing here is downloaded; everything is deterministic by seed. Fonts come from matplotlib's DejaVu files.
The tokenizer trainer lives in `qvl.data.tokenizer` (imported on demand: it needs only `tokenizers`).
"""

from .tasks import (DEFAULT_MIX, GENERATIONS, IMAGE_TASKS, SPLITS, TASKS, VIDEO_TASKS, QA, DataConfig, Sample,
                    eval_samples, iterate, make_sample, score, split_of, task_weights)
from .video import Clip, ClipConfig, Track, events, frames, make_clip, write_mp4
from .world import COLORS, KINDS, SCRIPTS, Scene, SceneConfig, Shape, Text, make_scene, render

__all__ = [
    "DEFAULT_MIX", "GENERATIONS", "IMAGE_TASKS", "SPLITS", "TASKS", "VIDEO_TASKS", "QA", "DataConfig", "Sample",
    "eval_samples", "iterate", "make_sample", "score", "split_of", "task_weights",
    "Clip", "ClipConfig", "Track", "events", "frames", "make_clip", "write_mp4",
    "COLORS", "KINDS", "SCRIPTS", "Scene", "SceneConfig", "Shape", "Text", "make_scene", "render",
]
