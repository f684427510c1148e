"""Two CPU processes with gloo train a few DDP steps: both ranks end with identical weights, different from init."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from qvl.train import stages as S
from qvl.train import tiny

from test_train import micro_model, small, tok_dir  # noqa: F401  (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_dump(rank, world, port, init, out, stage):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    from qvl.train import loop

    seen = {}
    original = loop.TrainModule.forward

    def forward(self, batch):  # record which samples each rank trained on
        seen.setdefault("ids", []).append(batch["input_ids"].sum().item())
        return original(self, batch)

    loop.TrainModule.forward = forward
    captured = {}  # every rank's own model object (the trainer only writes rank 0's copy to disk)
    orig_train_module_init = loop.TrainModule.__init__

    def init_hook(self, model, *a, **k):
        orig_train_module_init(self, model, *a, **k)
        captured["model"] = model

    loop.TrainModule.__init__ = init_hook
    loop.train(stage, "2.5", out / f"run{rank}", 12, init=init, workers=0, quiet=True, save_every=10_000)
    torch.save({"state": {k: v.detach().clone() for k, v in captured["model"].state_dict().items()},
                "batches": seen["ids"]}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_hold_identical_weights(tok_dir, tmp_path):
    model, _ = micro_model("2.5", tok_dir)
    init = tiny.save_model(model, tmp_path / "init", tok_dir)
    stage = small(S.get("stage3"), batch_size=2)
    mp.spawn(_worker_dump, args=(2, _free_port(), init, tmp_path, stage), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(r0["batches"]) == 3  # 12 samples / (2 per rank x 2 ranks)
    assert r0["batches"] != r1["batches"]  # each rank read its own shard
    start = model.state_dict()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert any(not torch.equal(r0["state"][k], start[k]) for k in start)
    assert (tmp_path / "run0" / "model" / "config.json").exists()
