"""Generation as plain functions (gpt-fast style): prefill, decode one token, sample, generate, stream.

The model interface (docs/CONTRACTS.md):
    model.embed(input_ids, **vision)                       -> embeds [B, T, H]
    model(embeds, positions, cache, start, pad_mask, ...)  -> logits [B, T, V]
    model.make_cache(batch_size, max_len, device, dtype)   -> static KVCache

The state of one generation is explicit: a preallocated KV cache of prompt + max_new_tokens slots,
a key mask over those slots (False on the left padding), and `rope_deltas`, the offset between a
token's cache slot and its rotary position. Positions are computed ONCE for the prompt; a decoded
token at slot s gets position s + rope_delta on every M-RoPE axis (reference qwen2 §4.4), so the
vision inputs are never looked at again after prefill.

Sampling follows transformers' order (repetition penalty, then temperature, top-k, top-p) and draws
with the exponential trick, so no step needs a host sync except the (periodic) "all rows stopped" check.

Decode steps are *static* (gpt-fast style): the cache slot is a LongTensor that the loop increments in
place, the step writes there and attends over the whole preallocated cache under a mask, so every step
has identical shapes and control flow. `compile=True` turns the step into one CUDA graph
(`torch.compile(mode="reduce-overhead")`) that is replayed for every token: eager decode launches ~15
kernels per layer, and at bs=1 that launch overhead, not HBM bandwidth, would set the speed.
"""

from __future__ import annotations

import codecs
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from qvl.positions import decode_position_ids, mrope_position_ids, text_position_ids

# ---------------------------------------------------------------------------------------------
# The prompt batch
# ---------------------------------------------------------------------------------------------


@dataclass
class MediaItem:
    """Where one image/video sits in the token stream of a batch, and what it was resized to."""

    kind: str  # "image" | "video"
    row: int  # conversation (batch row)
    start: int  # first placeholder token (index into the padded row)
    end: int  # one past the last placeholder token
    grid_thw: tuple[int, int, int] | None  # ViT patches (None for gen 1: fixed 448x448, 256 slots)
    original_size: tuple[int, int]  # (h, w) of the source (first frame for videos)
    resized_size: tuple[int, int]  # (h, w) fed to the model
    info: dict = field(default_factory=dict)  # e.g. video timestamps / frame indices / fps

    @property
    def tokens(self) -> int:
        return self.end - self.start


@dataclass
class Batch:
    """A left-padded prompt batch, ready for `generate`. Built by `qvl.api.VLM.prepare`."""

    input_ids: torch.Tensor  # LongTensor[B, T], left-padded
    attention_mask: torch.Tensor  # LongTensor[B, T], 1 = real token
    vision: dict = field(default_factory=dict)  # keyword arguments of model.embed (pixel_values, grids...)
    position_ids: torch.Tensor | None = None  # [3, B, T] (gen 2/2.5) or [B, T] (gen 1); None = compute
    rope_deltas: torch.Tensor | None = None  # LongTensor[B, 1]
    media: list[MediaItem] = field(default_factory=list)  # every image/video, in token order
    text: list[str] = field(default_factory=list)  # the rendered prompts (before pad expansion)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def to(self, device) -> "Batch":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.attention_mask), {k: move(v) for k, v in self.vision.items()},
            move(self.position_ids), move(self.rope_deltas), self.media, self.text,
        )


def prompt_positions(model, input_ids, attention_mask, vision: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions of the prompt and the decode offset. -> (positions, rope_deltas [B, 1])

    Gen 2/2.5: 3-D M-RoPE ids from the token ids and the grids. Gen 1: 1-D ids counting real tokens,
    so rope_delta = (#real tokens) - T, the same "slot + delta" rule as M-RoPE.
    """
    if model.generation == "1":
        pos = text_position_ids(attention_mask)
        deltas = attention_mask.long().sum(dim=1, keepdim=True) - attention_mask.shape[1]
        return pos, deltas
    cfg = model.config
    return mrope_position_ids(
        input_ids,
        vision.get("image_grid_thw"),
        vision.get("video_grid_thw"),
        attention_mask,
        second_per_grid_ts=vision.get("second_per_grid_ts"),
        tokens_per_second=cfg.tokens_per_second,
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        merge_size=cfg.vision.spatial_merge_size,
    )


def _decode_positions(model, cache_len: int | torch.Tensor, rope_deltas: torch.Tensor) -> torch.Tensor:
    """cache_len: the slot being written (an int, or a LongTensor for static steps: no host value needed)."""
    pos = decode_position_ids(cache_len, rope_deltas)  # (3, B, 1): equal on all axes after the prompt
    return pos[0] if model.generation == "1" else pos  # gen 1 wants (B, 1)


def _embed_kwargs(vision: dict) -> dict:
    # second_per_grid_ts only matters for positions; the model's embed doesn't take it.
    return {k: v for k, v in vision.items() if k != "second_per_grid_ts" and v is not None}


# ---------------------------------------------------------------------------------------------
# One forward each: prefill and decode
# ---------------------------------------------------------------------------------------------


def _accepts(fn, name: str) -> bool:
    """Whether a callable takes keyword `name` (gen 1 and gen 2 models differ in optional extras)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _forward(model, embeds, positions, cache, start, pad_mask, capture):
    kwargs = {}
    if capture is not None:
        kwargs["capture"] = capture
    if _accepts(model.forward, "last_only"):  # skip the [T, V] lm_head projection of the prompt
        kwargs["last_only"] = True
    return model(embeds, positions, cache, start, pad_mask, **kwargs)[:, -1]


def prefill(model, batch: Batch, cache, pad_mask=None, *, capture=None) -> torch.Tensor:
    """Run the whole prompt (vision tower included) into slots [0, T) of `cache`. -> logits [B, V] of the last token."""
    if batch.position_ids is None:
        batch.position_ids, batch.rope_deltas = prompt_positions(
            model, batch.input_ids, batch.attention_mask, batch.vision
        )
    kwargs = _embed_kwargs(batch.vision)
    if capture is not None and _accepts(model.embed, "capture"):
        kwargs["capture"] = capture  # vision-tower attention is recorded during embed
    embeds = model.embed(batch.input_ids, **kwargs)
    return _forward(model, embeds, batch.position_ids, cache, 0, pad_mask, capture)


def _token_embedding(model) -> torch.nn.Embedding:
    return model.transformer.wte if model.generation == "1" else model.model.embed_tokens


def decode_one(model, tokens, positions, cache, start, pad_mask=None, capture=None) -> torch.Tensor:
    """Feed one token per row ([B, 1]) at slot `start`. -> logits [B, V]

    `start` an int: attend to slots [0, start]. `start` a LongTensor (static step): attend to the whole
    cache under a mask, so the shapes are the same every step. Decoded tokens are plain text, so they go
    straight through the embedding table (gen 1's `embed` checks for <img> tags with a host sync).
    Kept free of Python introspection so `torch.compile(fullgraph=True)` can trace it whole.
    """
    embeds = _token_embedding(model)(tokens)
    if capture is None:
        return model(embeds, positions, cache, start, pad_mask)[:, -1]
    return model(embeds, positions, cache, start, pad_mask, capture=capture)[:, -1]


# ---------------------------------------------------------------------------------------------
# Logits processors (same maths as transformers' processors; tested against them)
# ---------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on tokens already present (`seen` [B, V] bool): divide positive logits, multiply negative ones."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept too), -inf elsewhere."""
    k = min(max(int(k), 1), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of top tokens whose probability reaches p.

    Sorted ascending, a token is dropped when the mass of itself and everything below it is <= 1 - p
    (i.e. the tokens above it already hold >= p). The top `min_keep` tokens always stay.
    """
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    below = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # mass of this token and all smaller ones
    drop = below <= 1 - p
    drop[..., -min_keep:] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def process_logits(logits, seen=None, *, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0):
    """All processors in transformers' order. The warpers (temperature/top-k/top-p) only matter when sampling."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature and temperature > 0:
        if temperature != 1.0:
            logits = logits / temperature
        if top_k:
            logits = apply_top_k(logits, top_k)
        if top_p is not None and top_p < 1.0:
            logits = apply_top_p(logits, top_p)
    return logits


def sample(logits, *, temperature=0.0, generator=None) -> torch.Tensor:
    """Greedy (temperature 0) or a draw from softmax(logits). -> LongTensor[B]

    The draw is argmax(p / E) with E ~ Exp(1), which picks token i with probability p_i (an
    exponential race), without torch.multinomial's host sync.
    """
    if not temperature or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _stop_tensor(stop_ids, device) -> torch.Tensor:
    if stop_ids is None:
        stop_ids = []
    elif isinstance(stop_ids, int):
        stop_ids = [stop_ids]
    return torch.tensor(list(stop_ids), dtype=torch.long, device=device)


_COMPILED: dict[str, object] = {}  # one compiled step per backend mode: a new torch.compile wrapper recompiles
_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its static KV cache (compile only)
CACHE_ROUND = 256  # compiled runs round the cache length up, so prompts of similar length share one graph


def compiled_decode_step(device_type: str):
    """`decode_one` compiled whole: CUDA graphs on CUDA (mode="reduce-overhead"), inductor's default elsewhere."""
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(decode_one, mode=mode, fullgraph=True)
    return _COMPILED[mode]


def _static_cache(model, batch_size: int, max_len: int, device, dtype):
    """The model's reusable compiled-decode cache (gpt-fast's setup_caches): same buffers, same addresses,
    so a CUDA graph recorded in one `generate` call is replayed by the next one."""
    max_len = -(-max_len // CACHE_ROUND) * CACHE_ROUND
    cache = _CACHES.get(model)
    want_dtype = dtype or model.lm_head.weight.dtype
    if (cache is None or (cache.batch_size, cache.max_len) != (batch_size, max_len)
            or cache.k[0].device != torch.device(device) or cache.k[0].dtype != want_dtype
            or cache.k[0].is_inference() != torch.is_inference_mode_enabled()):  # inference tensors stay there
        cache = model.make_cache(batch_size, max_len, device=device, dtype=dtype).mark_static()
        _CACHES[model] = cache
    else:  # stale keys sit behind the mask; zero them anyway so a NaN from an earlier run cannot leak (0 * NaN)
        for t in cache.k + cache.v:
            t.zero_()
    return cache


def _generator(seed, generator, device):
    if generator is not None or seed is None:
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def token_steps(
    model,
    batch: Batch,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] | int | None = None,
    pad_id: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    capture=None,
    compile: bool = False,
    check_every: int | None = None,
    cache_dtype=None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B] LongTensor) until all rows stopped or max_new_tokens.

    A row that produced a stop id keeps yielding `pad_id`. `check_every`: how often to pay a host
    sync to see whether all rows stopped (default every step on CPU, every 8 steps elsewhere; at most
    check_every-1 wasted steps, which `generate` trims). `compile`: run the decode step through
    `torch.compile(fullgraph=True)` (CUDA graphs on CUDA); the first call pays the compilation.
    """
    device = batch.input_ids.device
    B, T = batch.input_ids.shape
    if max_new_tokens <= 0:
        return
    check_every = check_every or (1 if device.type == "cpu" else 8)
    generator = _generator(seed, generator, device)
    stops = _stop_tensor(stop_ids, device)

    # Static decode steps (slot as a tensor, attention over the whole cache) unless attention is being
    # recorded: Capture keeps the growing int-slot path, whose maps span exactly the keys written so far.
    static = capture is None
    compile = compile and static
    if compile:
        cache = _static_cache(model, B, T + max_new_tokens, device, cache_dtype)
    else:
        cache = model.make_cache(B, T + max_new_tokens, device=device, dtype=cache_dtype)
    # Key mask over every cache slot: the prompt's padding is False, later slots are True (a slot is only
    # attended once written). None when nothing is padded, so the prefill can use plain causal SDPA.
    pad_mask = None
    if not bool(batch.attention_mask.bool().all()):
        pad_mask = torch.ones(B, cache.max_len, dtype=torch.bool, device=device)
        pad_mask[:, :T] = batch.attention_mask.bool()

    # Tokens already in each row, for the repetition penalty. Unlike transformers, the left padding
    # is not "seen": a padded row is then penalised exactly like the same prompt unpadded.
    seen = None
    logits = prefill(model, batch, cache, pad_mask, capture=capture)
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
        # Point the padding at the row's last token (real under left padding) so it marks nothing new.
        ids = torch.where(batch.attention_mask.bool(), batch.input_ids, batch.input_ids[:, -1:])
        seen.scatter_(1, ids, True)

    step = compiled_decode_step(device.type) if compile else decode_one
    mark_step = compile and device.type == "cuda"  # tell CUDA graphs each call is a new step (outputs get reused)
    slot = torch.full((1,), T, dtype=torch.long, device=device)  # the static step's cache slot, advanced in place

    rope_deltas = batch.rope_deltas
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        logits = process_logits(logits, seen, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        raw = sample(logits, temperature=temperature, generator=generator)  # (B,)
        token = raw.masked_fill(finished, pad_id)  # what the caller sees: pad_id after a row's stop
        yield token
        if stops.numel():
            finished |= torch.isin(token, stops)
        if i == max_new_tokens - 1 or ((i + 1) % check_every == 0 and bool(finished.all())):
            return
        # Finished rows keep running on their own (valid) samples: their results are discarded, and
        # pad_id need not be a valid token id (e.g. -1).
        if seen is not None:
            seen.scatter_(1, raw[:, None], True)
        if static:
            positions = _decode_positions(model, slot, rope_deltas)
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(model, raw[:, None], positions, cache, slot, pad_mask)
            slot += 1
        else:
            positions = _decode_positions(model, T + i, rope_deltas)
            logits = step(model, raw[:, None], positions, cache, T + i, pad_mask, capture)


@torch.no_grad()
def generate(model, batch: Batch, max_new_tokens: int = 128, **kwargs) -> torch.Tensor:
    """New tokens of every row: LongTensor[B, N], N <= max_new_tokens.

    Like transformers' output after the prompt: a row that stopped holds its stop token and then
    `pad_id`. Keyword arguments: see `token_steps`. Use `trim` for per-row lists without the padding.
    """
    tokens = list(token_steps(model, batch, max_new_tokens, **kwargs))
    if not tokens:
        return batch.input_ids.new_zeros(batch.input_ids.shape[0], 0)
    out = torch.stack(tokens, dim=1)  # (B, N)
    stops = _stop_tensor(kwargs.get("stop_ids"), out.device)
    if stops.numel():  # drop the trailing all-stopped steps of a late periodic check
        done = torch.isin(out, stops).long().cumsum(dim=1) > 0  # (B, N): at or after a row's first stop
        after = torch.cat([torch.zeros_like(done[:, :1]), done[:, :-1]], dim=1)  # strictly after it
        n = int((~after).sum(dim=1).max())
        out = out[:, :n]
    return out


def trim(tokens: torch.Tensor, stop_ids=None, keep_stop: bool = False) -> list[list[int]]:
    """Per-row token lists cut at the first stop id (dropped unless keep_stop)."""
    stops = set(_stop_tensor(stop_ids, "cpu").tolist())
    rows = []
    for row in tokens.tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), None)
        rows.append(row if cut is None else row[: cut + 1 if keep_stop else cut])
    return rows


# ---------------------------------------------------------------------------------------------
# Streaming text
# ---------------------------------------------------------------------------------------------


def _token_bytes_fn(tokenizer):
    """id -> bytes for qvl's tokenizers (Qwen2 `Tokenizer.token_bytes`, tiktoken `enc.decode_single_token_bytes`)."""
    if hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes
    enc = getattr(tokenizer, "enc", None)
    if enc is not None and hasattr(enc, "decode_single_token_bytes"):
        return enc.decode_single_token_bytes
    return lambda i: tokenizer.decode([i]).encode("utf-8")  # last resort: may split a character


class TextStream:
    """Incremental detokeniser: push token ids, get text pieces that are always whole characters.

    Byte-level BPE tokens can end in the middle of a UTF-8 character (one CJK character or emoji is
    often two or three tokens). The bytes of every token go through an incremental UTF-8 decoder,
    which holds back an incomplete tail until the next bytes complete it; `flush` releases the rest
    (as U+FFFD if it never completes, like a full decode does).
    """

    def __init__(self, tokenizer, skip_ids: Sequence[int] = ()):
        self._bytes = _token_bytes_fn(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._skip = set(int(i) for i in skip_ids)

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._skip:
            return ""
        try:
            data = self._bytes(token_id)
        except (KeyError, ValueError, IndexError):  # a padding row beyond the tokenizer: no text
            data = b""
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


@torch.no_grad()
def stream(model, batch: Batch, tokenizer, max_new_tokens: int = 128, **kwargs) -> Iterator[str]:
    """Yield text pieces of a single-conversation batch as they are generated (stop token excluded)."""
    if batch.input_ids.shape[0] != 1:
        raise ValueError(f"stream() takes one conversation, got a batch of {batch.input_ids.shape[0]}")
    stops = set(_stop_tensor(kwargs.get("stop_ids"), "cpu").tolist())
    kwargs.setdefault("check_every", 1)
    text = TextStream(tokenizer)
    for token in token_steps(model, batch, max_new_tokens, **kwargs):
        t = int(token[0])  # the one host sync per token that streaming needs anyway
        if t in stops:
            break
        piece = text.push(t)
        if piece:
            yield piece
    tail = text.flush()
    if tail:
        yield tail
