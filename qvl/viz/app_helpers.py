"""Glue the Gradio app (app.py) needs and the rest of qvl does not: which models exist, loading them
once, streaming token ids with their text, keeping a reply's attention over one image, and turning
qvl's own numbers (media accounting, M-RoPE ids) into table rows.

Nothing here computes anything qvl does not already compute: resizing and token counts come from
`qvl.media`, positions from `qvl.positions` (through `qvl.viz.plots.toy_prompt`), generation from
`qvl.generate.token_steps`, attention from the models' `Capture` hooks.
"""

from __future__ import annotations

import inspect
import queue
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from qvl import media
from qvl.generate import TextStream, token_steps
from qvl.models.qwen2_vl import Capture
from qvl.viz import overlays, plots

GEN_NAMES = plots.GEN_NAMES  # "1" -> "Qwen-VL", ...


# ---------------------------------------------------------------------------------------------
# Models: found on disk, loaded on first use, one copy each
# ---------------------------------------------------------------------------------------------


def find_models(root) -> list[Path]:
    """Sub-directories of `root` that hold a config.json (the bundled tiny models), by name in reverse order:
    qvl-tiny-2.5, qvl-tiny-2, qvl-tiny-1 -- the newest generation first, so it is the app's default."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if (p / "config.json").is_file()), reverse=True)


def _check_dir(path: Path) -> str | None:
    """A one-line problem with a model directory that can be seen without loading it, or None."""
    if not path.is_dir():
        return f"{path}: not a directory"
    cfg = path / "config.json"
    if not cfg.is_file():
        return f"{path}: no config.json"
    try:
        json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        return f"{cfg}: unreadable config.json ({e})"
    return None


class ModelStore:
    """Named model directories, each loaded lazily on first use and then kept (one copy per model).

    A directory that fails (missing files, wrong model type, bad weights) keeps its error message and
    is reported by name; the other models keep serving.
    """

    def __init__(self, paths, device=None):
        self.paths: dict[str, Path] = {}
        for p in paths:
            p = Path(p)
            name = p.name or str(p)
            if name in self.paths:  # two dirs with one basename: qualify with the parent
                name = f"{p.parent.name}/{p.name}"
            self.paths[name] = p
        self.device = device
        self.models: dict = {}
        self.errors: dict[str, str] = {}
        for name, p in self.paths.items():
            problem = _check_dir(p)
            if problem:
                self.errors[name] = problem
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def get(self, name: str):
        """The loaded `qvl.api.VLM`; raises RuntimeError naming the directory when it cannot load."""
        if name not in self.paths:
            raise RuntimeError(f"unknown model {name!r}; available: {', '.join(self.paths) or 'none'}")
        with self._lock:  # two sessions asking at once load it once
            if name in self.models:
                return self.models[name]
            if name in self.errors:
                raise RuntimeError(f"model {name} failed to load: {self.errors[name]}")
            import qvl

            try:
                vlm = qvl.load(self.paths[name], device=self.device)
            except Exception as e:  # noqa: BLE001 - any failure is reported, the app keeps serving
                self.errors[name] = f"{self.paths[name]}: {type(e).__name__}: {' '.join(str(e).split())}"
                raise RuntimeError(f"model {name} failed to load: {self.errors[name]}") from None
            self.models[name] = vlm
            return vlm

    def status_rows(self) -> list[list[str]]:
        """[name, directory, state] for every model."""
        rows = []
        for name, p in self.paths.items():
            if name in self.errors:
                state = f"FAILED: {self.errors[name]}"
            elif name in self.models:
                vlm = self.models[name]
                state = f"loaded: {GEN_NAMES.get(vlm.generation, vlm.generation)} on {vlm.device}"
            else:
                state = "not loaded yet (loads on first use)"
            rows.append([name, str(p), state])
        return rows


# ---------------------------------------------------------------------------------------------
# Generation with token ids, text pieces and attention
# ---------------------------------------------------------------------------------------------


@dataclass
class LastRowCapture(Capture):
    """A `Capture` that keeps only the newest query row of each call (the prompt's last token during
    prefill, the fed token during decode), moved to the CPU in fp16, for at most `max_calls` calls:
    call i is the attention that produced generated token i."""

    max_calls: int = 256

    def record_attention(self, layer, q, k, start, mask):
        if len(self.attn[layer]) >= self.max_calls:
            return
        T = q.shape[2]
        self.query_rows = (T - 1, T)
        super().record_attention(layer, q, k, start, mask)
        self.attn[layer][-1] = self.attn[layer][-1].to("cpu", torch.float16)


def supports_capture(vlm) -> bool:
    return "capture" in inspect.signature(vlm.model.forward).parameters


def attention_capture(vlm, item, budget_bytes: int = 256 * 1024**2) -> LastRowCapture | None:
    """A capture of every decoder layer's attention over one media item's tokens, or None when the
    model has no capture hooks. The number of recorded tokens is capped so the per-session copy stays
    under `budget_bytes` (fp16: layers x heads x image tokens x 2 bytes per generated token)."""
    if item is None or not supports_capture(vlm):
        return None
    t = vlm.config.text
    per_token = t.num_hidden_layers * t.num_attention_heads * max(item.tokens, 1) * 2
    return LastRowCapture(layers=list(range(t.num_hidden_layers)), key_span=(item.start, item.end),
                          max_calls=max(1, budget_bytes // per_token))


def stream_tokens(vlm, batch, max_new_tokens: int, *, capture=None, **sampling) -> Iterator[tuple[int | None, str]]:
    """(token id, text piece) per generated token of a one-conversation batch, stop token excluded;
    a final (None, tail) releases bytes held back by the incremental UTF-8 decoder.

    The decode loop runs in its own thread (inference mode is per thread, and a web server may resume
    this generator on a different worker thread each time); closing the generator (a Stop button)
    ends that thread after its current token, and returns once it has ended.
    """
    stops = set(vlm.stop_ids)
    out: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def produce():
        try:
            text = TextStream(vlm.tokenizer)
            with torch.inference_mode():
                for tok in token_steps(vlm.model, batch, max_new_tokens, stop_ids=vlm.stop_ids, pad_id=vlm.pad_id,
                                       capture=capture, check_every=1, **sampling):
                    t = int(tok[0])
                    if t in stops or cancel.is_set():
                        break
                    out.put((t, text.push(t)))
            tail = text.flush()
            if tail:
                out.put((None, tail))
            out.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            out.put(e)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
        # wait for the thread (at most its current token): a daemon thread still inside torch when the
        # interpreter exits aborts the process ("terminate called without an active exception")
        worker.join()


_DONE = object()


def attention_stack(capture: LastRowCapture) -> torch.Tensor | None:
    """[calls, layers, heads, keys] fp16 from a LastRowCapture (call i produced generated token i)."""
    layers = sorted(capture.attn)
    if not layers:
        return None
    n = min(len(capture.attn[layer]) for layer in layers)
    per_layer = [torch.cat([a[0, :, -1:, :] for a in capture.attn[layer][:n]], dim=1) for layer in layers]  # (h, n, k)
    return torch.stack(per_layer).permute(2, 0, 1, 3).contiguous()  # (n, L, h, k)


def token_weights(stack: torch.Tensor, token: int, layer: int | None, head: int | None) -> torch.Tensor:
    """Weights over the image tokens for generated token `token`, one layer or the mean over layers,
    one head or the mean over heads (via `overlays.item_weights` on each layer's [1, h, 1, keys])."""
    layers = range(stack.shape[1]) if layer is None else [layer]
    ws = [overlays.item_weights(stack[token, i][None, :, None, :], 0, stack.shape[-1], head=head) for i in layers]
    return torch.stack(ws).mean(dim=0)


# ---------------------------------------------------------------------------------------------
# Tables from qvl's own numbers
# ---------------------------------------------------------------------------------------------

TOKEN_HEADERS = ["generation", "resized (w x h)", "grid (t, h, w)", "ViT patches", "visual tokens", "LLM tokens", "note"]


def token_rows(acc: dict) -> list[list]:
    """One row per generation from `qvl.media.account`."""
    rows = []
    for gen in ("1", "2", "2.5"):
        e = acc[gen]
        name = f"{GEN_NAMES[gen]} (gen {gen})"
        if e.get("supported") is False:
            rows.append([name, "-", "-", "-", "-", "-", e.get("note", "")])
            continue
        h, w = e["resized_size"]
        rows.append([name, f"{w} x {h}", str(tuple(e["grid_thw"])), e["patches"], e["visual_tokens"],
                     e["llm_tokens"], e.get("note", "")])
    return rows


def toy_parts(acc: dict, prompt: str, generation: str) -> list:
    """The chat template's shape for one media item and a prompt, as `plots.toy_prompt` parts:
    system/user/assistant markers as words, the item as its (t, h, w) grid from `account`."""
    e = acc[generation]
    item = ("image", e["grid_thw"]) if e["kind"] == "image" else ("video", e["grid_thw"], e["second_per_grid_t"])
    return ["<|im_start|> user", item, prompt or " ", "<|im_end|> <|im_start|> assistant"]


def gen1_parts(prompt: str) -> list:
    """Gen 1's token stream for an image and a prompt: the image is 256 slots between <img> and </img>."""
    slots = " ".join(["<imgpad>"] * media.GEN1_IMAGE_TOKENS)
    return [f"<|im_start|> user Picture 1: <img> {slots} </img> {prompt or ' '} <|im_end|> <|im_start|> assistant"]


POSITION_HEADERS = ["span", "tokens", "t ids", "h ids", "w ids", "next text id"]


def position_rows(position_ids, spans) -> list[list]:
    """Per span of the prompt: token range, the (min..max) id on each axis, and the id the next text
    token gets (max + 1 after a visual run)."""
    p = torch.as_tensor(position_ids)
    if p.dim() == 3:
        p = p[:, 0]
    T = p.shape[1]
    rows = []
    for s in spans:
        a, b = s["start"], s["end"]
        seg = p[:, a:b]
        name = s["type"] if s["type"] == "text" else f"{s['type']} {s['index']}"
        nxt = int(p[0, b]) if b < T else "-"
        rows.append([name, f"{a}..{b - 1}", *(f"{int(seg[i].min())}..{int(seg[i].max())}" for i in range(3)), nxt])
    return rows


def first_frame(path: str, min_pixels=None, max_pixels=None, fps=None, nframes=None):
    """A video's first sampled frame at model size (for drawing grids/windows), plus the VideoInputs."""
    video = media.process_video(path, fps=fps, nframes=nframes, min_pixels=min_pixels, max_pixels=max_pixels)
    return overlays.video_frames(video)[0], video


__all__ = [
    "find_models", "ModelStore", "LastRowCapture", "attention_capture", "stream_tokens", "attention_stack",
    "token_weights", "token_rows", "toy_parts", "gen1_parts", "position_rows", "first_frame", "TOKEN_HEADERS",
    "POSITION_HEADERS", "supports_capture",
]
