"""qvl-tiny training: the Qwen-VL training paradigm on generated data, in plain PyTorch.

    from qvl.train import train, STAGES, BUDGETS
    train("stage2", "2.5", "runs/s2", samples=20_000, init="runs/s1")

Modules: `tiny` (configs, init, save/load), `batching` (samples -> labelled batches), `stages` (what each
stage trains, on which data, with which loss; sample budgets), `loop` (the trainer), `dpo` (rejection
sampling + DPO). CLI: `python -m qvl.train --help`, `python -m qvl.train recipe --help`; eval:
`python -m qvl.eval MODEL_DIR`.
"""

from qvl.train.loop import train
from qvl.train.stages import BUDGETS, ORDER, STAGES, Stage

__all__ = ["train", "Stage", "STAGES", "ORDER", "BUDGETS"]
