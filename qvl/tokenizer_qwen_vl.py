"""The Qwen-VL (first generation) tokenizer: tiktoken BPE from `qwen.tiktoken` + Qwen-VL's special tokens.

Section numbers (§) refer to /work/shared/reference/qwen_vl_gen1_and_qwen_vl_utils.md.

* `qwen.tiktoken` holds one `<base64 token bytes> <rank>` line per mergeable token (§3.1). The released file
  has 151,643 ranks; everything here is generic over that number, so a tiny file built by `train_bpe`
  (for tests and tiny models, no download) works the same way.
* Special tokens get ids len(ranks), len(ranks)+1, ... in a fixed order (§3.2).
* An `<img>path</img>` span becomes exactly `image_span` (256) slots holding the UTF-8 *bytes* of the path
  as token ids, right-padded with `<imgpad>` (§3.3). The model overwrites those slots with image features.
"""

from __future__ import annotations

import base64
import json
import unicodedata
from collections import Counter
from pathlib import Path

import regex
import tiktoken

# cl100k's pre-tokenizer with one change: numbers split into single digits (`\p{N}` instead of `\p{N}{1,3}`),
# §3.1. Alternatives: contractions | optional non-letter + letters | one digit | optional space + punctuation
# | newlines | trailing whitespace | other whitespace.
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
# IMAGE_ST, in this order (§3.2)
IMAGE_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + EXTRAS + IMAGE_TAGS   # ids len(ranks) + 0 .. 216
IMG_TOKEN_SPAN = 256
VOCAB_FILE = "qwen.tiktoken"


# ----------------------------------------------------------------------------------------------------------
# The rank file


def load_ranks(path) -> dict[bytes, int]:
    """Read a `qwen.tiktoken` file: `<base64> <rank>` per line -> {token bytes: rank}."""
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not exactly 0 .. {len(ranks) - 1}")
    return ranks


def save_ranks(ranks: dict[bytes, int], path) -> None:
    lines = (f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    Path(path).write_text("\n".join(lines) + "\n")


def byte_rank_order() -> list[int]:
    """The byte values in rank order 0..255 (§3.1): GPT-2 / cl100k order, printable bytes first
    ('!'..'~', '¡'..'¬', '®'..'ÿ'), then the rest ascending; so rank 0 is '!' and rank 188 is 0x00."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    return printable + [b for b in range(256) if b not in printable]


def train_bpe(text: str, n_ranks: int) -> dict[bytes, int]:
    """Learn a small rank table from `text`: the 256 single bytes, then greedy BPE merges (most frequent
    adjacent pair inside a pre-token, ties broken by the smaller pair) until `n_ranks` or no pair repeats.

    Enough for tests and tiny models; every byte string stays encodable because all single bytes exist.
    """
    ranks = {bytes([b]): i for i, b in enumerate(byte_rank_order())}
    words = Counter(regex.findall(PAT_STR, unicodedata.normalize("NFC", text)))
    pieces = {tuple(bytes([b]) for b in w.encode()): n for w, n in words.items()}   # word split -> count
    while len(ranks) < n_ranks:
        pairs = Counter()
        for word, n in pieces.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        pieces = {_merge(word, best, merged): n for word, n in pieces.items()}
    return ranks


def _merge(word: tuple, pair: tuple, merged: bytes) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# The tokenizer


class QwenVLTokenizer:
    """encode(text) -> ids and decode(ids) -> text with Qwen-VL's special tokens and image-path slots."""

    def __init__(self, ranks: dict[bytes, int], image_span: int = IMG_TOKEN_SPAN):
        n = len(ranks)
        self.ranks = ranks
        self.image_span = image_span
        self.special_ids = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}   # §3.2
        self.enc = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_ids)
        ids = self.special_ids
        self.eod_id, self.im_start_id, self.im_end_id = ids[ENDOFTEXT], ids[IM_START], ids[IM_END]
        self.ref_start_id, self.ref_end_id = ids["<ref>"], ids["</ref>"]
        self.box_start_id, self.box_end_id = ids["<box>"], ids["</box>"]
        self.img_start_id, self.img_end_id, self.img_pad_id = ids["<img>"], ids["</img>"], ids["<imgpad>"]

    def __len__(self) -> int:               # 151,860 for the released file
        return len(self.ranks) + len(SPECIAL_TOKENS)

    # -- files -----------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path) -> "QwenVLTokenizer":
        """Load `qwen.tiktoken` from a checkpoint directory (or the file itself). The image span follows
        the directory's config.json `visual.n_queries` when present (tiny models), else 256."""
        path = Path(path)
        file = path / VOCAB_FILE if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{path}: no {VOCAB_FILE} found")
        span = IMG_TOKEN_SPAN
        config = file.parent / "config.json"
        if config.exists():
            span = json.loads(config.read_text()).get("visual", {}).get("n_queries", IMG_TOKEN_SPAN)
        return cls(load_ranks(file), image_span=span)

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_ranks(self.ranks, directory / VOCAB_FILE)
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "QWenTokenizer", "model_max_length": 8192,
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, indent=2) + "\n")

    # -- encode ----------------------------------------------------------------------------------------
    def encode(self, text: str, allowed_special="all") -> list[int]:
        """NFC-normalise, BPE-encode (special tokens in the text are parsed, §3.1), then turn every
        <img>…</img> span into `image_span` byte slots (§3.3). Disallowed specials encode as plain text."""
        text = unicodedata.normalize("NFC", text)
        ids = self.enc.encode(text, allowed_special=allowed_special, disallowed_special=())
        return self._image_spans_to_slots(ids)

    def _image_spans_to_slots(self, ids: list[int]) -> list[int]:
        out, i = [], 0
        while i < len(ids):
            if ids[i] != self.img_start_id:
                out.append(ids[i])
                i += 1
                continue
            try:
                end = ids.index(self.img_end_id, i + 1)
            except ValueError:
                raise ValueError("<img> without a closing </img>: an image reference needs both tags") from None
            path_bytes = self.enc.decode_bytes(ids[i + 1:end])
            if len(path_bytes) > self.image_span:
                raise ValueError(f"image path of {len(path_bytes)} UTF-8 bytes does not fit the "
                                 f"{self.image_span} image slots: {path_bytes[:60]!r}...")
            # each byte value v becomes token id v (the id, not the BPE rank of byte v), §3.3
            pads = [self.img_pad_id] * (self.image_span - len(path_bytes))
            out += [self.img_start_id, *path_bytes, *pads, self.img_end_id]
            i = end + 1
        return out

    # -- decode ----------------------------------------------------------------------------------------
    def image_paths(self, ids: list[int]) -> list[str]:
        """The paths/URLs stored in the image slots, in order (what the released model loaded, §4)."""
        return [path for path, _ in self._image_spans(ids)]

    def _image_spans(self, ids: list[int]):
        """Yield (path, (start, end)) for each closed <img> … </img>, end = index of </img>."""
        i = 0
        while i < len(ids):
            if ids[i] == self.img_start_id and self.img_end_id in ids[i + 1:]:
                end = ids.index(self.img_end_id, i + 1)
                slots = ids[i + 1:end]
                if self.img_pad_id in slots:
                    slots = slots[:slots.index(self.img_pad_id)]
                if all(0 <= t < 256 for t in slots):  # byte slots; anything else is left as ordinary tokens
                    yield bytes(slots).decode("utf-8", errors="replace"), (i, end)
                i = end + 1
            else:
                i += 1

    def decode(self, ids, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """ids -> text. Image slots are turned back into the path text first (§3.3); `skip_special_tokens`
        then drops every id >= <|endoftext|> (tags included; the path text stays)."""
        ids = [int(t) for t in ids]
        out, last = [], 0
        for path, (a, b) in self._image_spans(ids):
            out += ids[last:a + 1] + self.enc.encode_ordinary(path) + [ids[b]]
            last = b + 1
        out += ids[last:]
        if skip_special_tokens:
            out = [t for t in out if t < self.eod_id]
        unknown = sorted({t for t in out if t >= len(self) or t < 0})
        if unknown:
            raise ValueError(f"token ids outside the {len(self)}-entry vocabulary: {unknown[:10]}")
        return self.enc.decode(out, errors=errors)
