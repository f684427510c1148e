"""The Qwen2 tokenizer family (Qwen2-VL, Qwen2.5-VL) over `tokenizers.Tokenizer.from_file("tokenizer.json")`.

Byte-level BPE with NFC normalisation; all special tokens (`<|im_start|>`, `<|image_pad|>`, the
grounding tokens...) are "added tokens" of tokenizer.json, recognised by name anywhere in the text
(reference qwen2 §1.3). qvl adds two things on top of `tokenizers`:

* named ids of the tokens the rest of qvl needs (`im_end_id`, `image_pad_id`, ...), looked up by
  name so a tiny test tokenizer with other ids works the same as the real one (151643...);
* `token_bytes(id)`: the raw bytes of one token, for streaming text that never splits a character.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

# The special tokens qvl uses, by name (ids in the released tokenizers in the comments, §1.3).
SPECIAL_NAMES = {
    "endoftext": "<|endoftext|>",  # 151643: pad, and an extra EOS in generation_config
    "im_start": "<|im_start|>",  # 151644
    "im_end": "<|im_end|>",  # 151645: end of a turn = main EOS
    "object_ref_start": "<|object_ref_start|>",  # 151646
    "object_ref_end": "<|object_ref_end|>",  # 151647
    "box_start": "<|box_start|>",  # 151648
    "box_end": "<|box_end|>",  # 151649
    "quad_start": "<|quad_start|>",  # 151650
    "quad_end": "<|quad_end|>",  # 151651
    "vision_start": "<|vision_start|>",  # 151652
    "vision_end": "<|vision_end|>",  # 151653
    "vision_pad": "<|vision_pad|>",  # 151654 (unused by the models)
    "image_pad": "<|image_pad|>",  # 151655
    "video_pad": "<|video_pad|>",  # 151656
}


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """Inverse of byte-level BPE's byte -> printable character table.

    Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other
    68 bytes (controls, space, soft hyphen...) are mapped, in byte order, to chars 256, 257, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, token_bytes(id) -> bytes, plus named special ids."""

    def __init__(self, tokenizer: _HFTokenizer):
        self.tk = tokenizer
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.ids = {k: tokenizer.token_to_id(v) for k, v in SPECIAL_NAMES.items()}
        missing = [SPECIAL_NAMES[k] for k in ("im_start", "im_end") if self.ids[k] is None]
        if missing:
            raise ValueError(f"not a Qwen2-family tokenizer: {', '.join(missing)} not in its vocabulary")
        self._byte_level = type(tokenizer.decoder).__name__ == "ByteLevel" if tokenizer.decoder else False

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """A tokenizer.json file, or a checkpoint directory holding one."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json (qvl reads the fast-tokenizer file only)")
        return cls(_HFTokenizer.from_file(str(file)))

    def __len__(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def __getattr__(self, name: str):
        # im_end_id, image_pad_id, ... -> the id of that special token (None if absent)
        if name.endswith("_id") and name[:-3] in SPECIAL_NAMES:
            return self.ids[name[:-3]]
        raise AttributeError(name)

    @property
    def eos_ids(self) -> list[int]:
        """Stop ids when generation_config.json is missing: <|im_end|>, then <|endoftext|>."""
        return [i for i in (self.ids["im_end"], self.ids["endoftext"]) if i is not None]

    @property
    def pad_id(self) -> int:
        return self.ids["endoftext"] if self.ids["endoftext"] is not None else 0

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(int(i))

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token names in the text become their ids; nothing is added around it."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, i: int) -> bytes:
        """The bytes one token stands for (an added token: its UTF-8 text)."""
        i = int(i)
        if i in self._added:
            return self._added[i].encode("utf-8")
        piece = self.tk.id_to_token(i)
        if piece is None:  # a padding row of the model's vocabulary: decode() drops it too
            return b""
        if not self._byte_level:
            return self.tk.decode([i]).encode("utf-8")
        table = _byte_of_char()
        return bytes(table[c] for c in piece)

    def is_special(self, i: int) -> bool:
        return int(i) in self._special
