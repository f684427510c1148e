"""qvl: the Qwen-VL model family (Qwen-VL, Qwen2-VL, Qwen2.5-VL) in plain PyTorch."""

__version__ = "0.1.0"
