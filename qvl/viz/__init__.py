"""Figures shared by the Gradio app and the notebooks (no model logic: they draw what qvl computes).

* `qvl.viz.overlays` - PIL drawings on images: patch grid + merge units, Qwen2.5-VL windows, boxes/points,
                       attention heat maps, video frames paired into temporal patches
* `qvl.viz.plots`    - matplotlib (static) and plotly (interactive) figures: M-RoPE ids, time ids,
                       ViT attention masks, tokens vs resolution, token streams
* `qvl.viz.costs`    - arithmetic from configs: KV-cache bytes, ViT FLOPs/activations, parameters per component
"""

from qvl.viz import costs, overlays, plots

__all__ = ["costs", "overlays", "plots"]
