"""qvl: the Qwen-VL model family (Qwen-VL, Qwen2-VL, Qwen2.5-VL) in plain PyTorch.

    import qvl
    vlm = qvl.load("path/to/checkpoint")   # official Hub layout, any generation
    vlm.chat([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                           {"type": "text", "text": "Where is the cat?"}]}])

The pieces are plain modules: `qvl.media` (images/videos -> patches), `qvl.chat` (messages -> prompt),
`qvl.positions` (M-RoPE and vision positions), `qvl.models` (one file per generation),
`qvl.checkpoint` (official layout in and out), `qvl.generate` (prefill/decode), `qvl.grounding` (boxes).
"""

from qvl.api import VLM, load

__version__ = "0.1.0"
__all__ = ["VLM", "load", "__version__"]
