"""Train the tiny tokenizers of qvl-tiny on generated text.

* Qwen2-VL / Qwen2.5-VL: a byte-level BPE (`tokenizers`) built like the released Qwen2 `tokenizer.json`:
  NFC normaliser; pre-tokenizer = Qwen's split regex (the same one gen 1 uses, which isolates every digit,
  `\\p{N}` without `{1,3}`) followed by ByteLevel without its own regex; ByteLevel decoder. The Qwen2
  special tokens are added tokens *after* the learned vocabulary, in the released order
  (`<|endoftext|>` first), exactly as 151643.. follow the 151643 BPE entries in the real file. Saved as
  `tokenizer.json` + `tokenizer_config.json` that transformers' `Qwen2TokenizerFast` loads.
* Qwen-VL (gen 1): a tiny `qwen.tiktoken` rank file from `qvl.tokenizer_qwen_vl.train_bpe`.

Byte-level means any string encodes (unseen scripts fall back to single bytes) and decodes back unchanged.

    python -m qvl.data.tokenizer OUT_DIR [--samples N] [--vocab V] [--gen1-ranks R]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..chat import QWEN2_CHAT_TEMPLATE, render_qwen2, render_qwen_vl
from ..tokenizer_qwen_vl import PAT_STR, QwenVLTokenizer, train_bpe
from ..tokenizer_qwen_vl import SPECIAL_TOKENS as GEN1_SPECIALS
from . import world
from .tasks import DataConfig, iterate
from .video import DIRECTIONS

# The Qwen2 family's special tokens, in the order of their released ids 151643..151656.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
DEFAULT_VOCAB = 1536  # learned entries + specials; the prototypes' 113-token character vocab made answers long
DEFAULT_GEN1_RANKS = 1024


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


def _split_on(text: str, specials: Iterable[str]) -> list[str]:
    """Text between special tokens: the specials become added tokens, so BPE must not learn their pieces."""
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
    return [p for p in re.split(pattern, text) if p]


def vocabulary_text() -> list[str]:
    """Every word the world can show or say, once, so rare words still get merges."""
    words = [w for ws in world.WORDS.values() for w in ws]
    words += list(world.COLORS) + list(world.KINDS) + list(world.PLURALS.values()) + list(DIRECTIONS)
    return [" ".join(words), " ".join(str(i) for i in range(100))]


def chat_texts(n_samples: int, generations=("2", "2.5"), config: DataConfig = DataConfig(), start: int = 0):
    """Rendered conversations (answers included) from the train split, without drawing any media.

    Multi-turn is on so follow-up turns are in the corpus too."""
    config = replace(config, max_turns=max(3, config.max_turns))
    for generation in generations:
        render = render_qwen_vl if generation == "1" else render_qwen2
        for s in itertools.islice(iterate(generation, "train", config=config, start=start, render_media=False),
                                  n_samples):
            yield render(s.messages, add_generation_prompt=False)


def corpus(n_samples: int = 3000, config: DataConfig = DataConfig()) -> list[str]:
    """Training text for the Qwen2-family tokenizer: pieces of rendered chats between special tokens."""
    pieces = vocabulary_text()
    for text in chat_texts(n_samples, ("2", "2.5"), config):
        pieces += _split_on(text, SPECIAL_TOKENS)
    return pieces


# --------------------------------------------------------------------------------------------------
# Qwen2 family
# --------------------------------------------------------------------------------------------------


def empty_tokenizer() -> Tokenizer:
    """The Qwen2 pipeline with an empty BPE model."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB) -> Tokenizer:
    """BPE over `texts` to `vocab_size` entries in total (the 256 byte symbols, merges, 14 specials)."""
    tok = empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(list(texts), trainer)
    # normalized=False: the names match the raw text, as in the released tokenizer.json
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tokenizer_config(tok: Tokenizer, model_max_length: int = 32768) -> dict:
    """tokenizer_config.json in the layout of the Qwen2-VL / 2.5-VL instruct checkpoints."""
    decoder = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
               for i, t in sorted(tok.get_added_tokens_decoder().items())}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def save_tokenizer(tok: Tokenizer, directory) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2, ensure_ascii=False)
                                                     + "\n")
    return directory


# --------------------------------------------------------------------------------------------------
# Qwen-VL (gen 1)
# --------------------------------------------------------------------------------------------------

_GEN1_IMAGE = re.compile(r"<img>.*?</img>", re.S)  # the path inside becomes byte slots, not BPE tokens


def gen1_corpus(n_samples: int = 3000, config: DataConfig = DataConfig()) -> str:
    parts = vocabulary_text()
    for text in chat_texts(n_samples, ("1",), config):
        parts += _split_on(_GEN1_IMAGE.sub("", text), GEN1_SPECIALS)
    return "\n".join(parts)


def train_gen1_ranks(text: str, n_ranks: int = DEFAULT_GEN1_RANKS) -> dict[bytes, int]:
    """A tiny qwen.tiktoken rank table (the gen-1 engineer's trainer; pure Python, ~n_ranks/100 s)."""
    return train_bpe(text, n_ranks)


def save_gen1(ranks: dict[bytes, int], directory) -> Path:
    directory = Path(directory)
    QwenVLTokenizer(ranks).save(directory)
    return directory


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qvl.data.tokenizer", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="writes OUT/qwen2/{tokenizer.json,tokenizer_config.json} and OUT/qwen_vl/qwen.tiktoken")
    ap.add_argument("--samples", type=int, default=3000, help="conversations per generation in the corpus")
    ap.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    ap.add_argument("--gen1-ranks", type=int, default=DEFAULT_GEN1_RANKS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    tok = train_tokenizer(corpus(args.samples), args.vocab)
    save_tokenizer(tok, out / "qwen2")
    ranks = train_gen1_ranks(gen1_corpus(args.samples), args.gen1_ranks)
    save_gen1(ranks, out / "qwen_vl")
    print(f"{out / 'qwen2'}: {tok.get_vocab_size()} tokens; {out / 'qwen_vl'}: {len(ranks)} ranks")


if __name__ == "__main__":
    main()
