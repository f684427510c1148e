"""scripts/induction_check.py: its rows are `x SEP x` with random lengths, and the loss mask covers exactly the
copy, so a model scores below the unigram loss only by copying."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from test_train import tok_dir  # noqa: F401  (fixture)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "induction_check.py"
spec = importlib.util.spec_from_file_location("induction_check", SCRIPT)
ic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ic)


def test_rows_are_a_sequence_a_separator_and_its_copy():
    g = torch.Generator().manual_seed(0)
    ids, mask = ic.rows(64, vocab=16, lo=3, hi=9, first_id=100, sep_id=5, g=g)
    assert ids.shape == mask.shape == (64, 19)
    lengths = set()
    for row, m in zip(ids.tolist(), mask.tolist()):
        L = row.index(5)  # the first separator ends the sequence
        lengths.add(L)
        assert 3 <= L <= 9 and all(100 <= t < 116 for t in row[:L])
        assert row[L + 1:2 * L + 1] == row[:L]  # the copy
        assert all(t == 5 for t in row[2 * L + 1:])  # right padding
        # next-token targets on the copy only: from SEP (predicts x_1) to x_{L-1} of the copy (predicts x_L)
        assert [i for i, v in enumerate(m) if v] == list(range(L, 2 * L))
    assert len(lengths) > 3  # the distance to the earlier occurrence varies from row to row


def test_a_few_steps_run_and_save(tmp_path, tok_dir):
    out = tmp_path / "copy"
    assert ic.main(["--tokenizer", str(tok_dir), "--layers", "1", "--steps", "2", "--every", "1", "--batch", "2",
                    "--min-len", "2", "--max-len", "6", "--save", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
