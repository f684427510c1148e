"""Helpers shared by the app tests (test_app_api.py, test_app_browser.py): tiny checkpoints, images,
and the app launched in-process on a free port.

Tiny checkpoints are qvl models (gen 2 and 2.5) with random weights and the tiny byte-level BPE
tokenizer of test_generate.py, written with `qvl.checkpoint.save_pretrained` - the official layout
`python app.py --model DIR` reads.

`box_model` is a gen-2 checkpoint whose weights are set by hand so that greedy decoding writes a
fixed grounding answer, whatever the image: every decoder layer's output projections (attention
o_proj, MLP down_proj) are zero, so the last hidden state is the current token's embedding, and the
untied lm_head maps each token of the chain "\\n -> <|object_ref_start|> -> target ->
<|object_ref_end|> -> <|box_start|> -> (120,80),(400,300) -> <|box_end|> -> <|im_end|>" to the next
one (a bigram model). The two plain-text pieces are added tokens of its tokenizer. The app runs it
like any other checkpoint.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(tempfile.gettempdir(), "qvl-app-tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

BOX_TEXT = "(120,80),(400,300)"  # gen 2: thousandths of the original image
BOX_LABEL = "target"
MAX_PIXELS = 64 * 28 * 28  # the tiny checkpoints' preprocessor bound: <= 64 image tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, timeout: float = 60.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def write_png(path, width: int, height: int, seed: int = 0) -> str:
    """A smooth gradient with a few coloured blocks (compresses well, not uniform)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                    (xx + yy) % 256], axis=-1).astype(np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, max(width - 20, 1)), rng.integers(0, max(height - 20, 1))
        arr[y0:y0 + 20, x0:x0 + 20] = rng.integers(0, 256, 3)
    Image.fromarray(arr).save(path)
    return str(path)


def _tokenizer(extra: list[str] = ()):
    from tokenizers import AddedToken

    from test_generate import build_tokenizer  # the tiny BPE with the Qwen2 special tokens

    tok = build_tokenizer()
    if extra:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    return tok


def _config(generation: str, tok):
    from qvl.config import Qwen2VLConfig, TextConfig, VisionConfig

    text = TextConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, mrope_section=[2, 3, 3],
                      max_position_embeddings=4096, tie_word_embeddings=False)
    if generation == "2":
        vision = VisionConfig(depth=2, dim=32, num_heads=2, mlp_dim=64, out_dim=64, hidden_act="quick_gelu")
    else:
        vision = VisionConfig(depth=2, dim=32, num_heads=2, mlp_dim=48, out_dim=64, hidden_act="silu",
                              window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
    ids = {s: tok.token_to_id(s) for s in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                           "<|vision_end|>", "<|endoftext|>", "<|im_end|>")}
    return Qwen2VLConfig(generation=generation, text=text, vision=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"])


def make_tiny_model(directory, generation: str, seed: int = 0) -> Path:
    """A random tiny qvl checkpoint of `generation` ("2" or "2.5") saved in the official layout."""
    from qvl.checkpoint import model_class, save_pretrained
    from _tiny import randomize_

    tok = _tokenizer()
    cfg = _config(generation, tok)
    torch.manual_seed(seed)
    model = randomize_(model_class(cfg)(cfg).eval(), seed)
    save_pretrained(model, directory, tokenizer=tok, min_pixels=4 * 28 * 28, max_pixels=MAX_PIXELS)
    return Path(directory)


def make_box_model(directory, seed: int = 0) -> Path:
    """The gen-2 bigram checkpoint described in the module docstring."""
    from qvl.checkpoint import model_class, save_pretrained
    from _tiny import randomize_

    tok = _tokenizer([BOX_TEXT, BOX_LABEL])
    cfg = _config("2", tok)
    torch.manual_seed(seed)
    model = randomize_(model_class(cfg)(cfg).eval(), seed)
    last = tok.encode("<|im_start|>assistant\n", add_special_tokens=False).ids[-1]  # the prompt's last token
    chain = [last] + [tok.token_to_id(t) for t in ("<|object_ref_start|>", BOX_LABEL, "<|object_ref_end|>",
                                                   "<|box_start|>", BOX_TEXT, "<|box_end|>", "<|im_end|>")]
    assert len(set(chain)) == len(chain) and None not in chain
    sd = model.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                p.zero_()  # every layer adds nothing: the final hidden state is the current token's embedding
        emb = sd["model.embed_tokens.weight"]
        head = dict(model.named_parameters())["lm_head.weight"]
        head.zero_()
        for a, b in zip(chain, chain[1:]):
            head[b] = 10.0 * emb[a] / emb[a].norm()
    save_pretrained(model, directory, tokenizer=tok, min_pixels=4 * 28 * 28, max_pixels=MAX_PIXELS)
    return Path(directory)


def launch(model_dirs, bundled, max_file_size="2mb"):
    """build_demo + launch on a free 127.0.0.1 port. -> (demo, url)"""
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    import app

    demo = app.build_demo(model_dirs, bundled=bundled, device="cpu")
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            ssr_mode=False, quiet=True, share=False, max_file_size=max_file_size)
    wait_http_ok(url)
    return demo, url
