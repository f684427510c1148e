"""scripts/box_lookup_check.py: the attention it recomputes is transformers' own (eager attentions, the oracle),
the named object's tokens are the cells its box covers, the drill's two losses are what they say, and the
script trains and measures end to end on a micro model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from qvl.data import tasks as T
from qvl.train import tiny
from qvl.train.batching import Collator, embed_kwargs

from test_train import MICRO_DECODER, MICRO_VISION, tok_dir  # noqa: F401  (fixture)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "box_lookup_check.py"
spec = importlib.util.spec_from_file_location("box_lookup_check", SCRIPT)
bl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bl)


def grounding(n: int, seed: int = 11):
    """Held-out one-question grounding samples on scenes with two or more objects (small canvases)."""
    out = []
    while len(out) < n:
        s = T.make_sample("ground", seed, "2.5")
        seed += 1
        if len(s.scene.shapes) + len(s.scene.texts) >= 2 and max(s.scene.width, s.scene.height) <= 400:
            out.append(s)
    return out


@pytest.fixture(scope="module")
def micro(tok_dir, tmp_path_factory):  # noqa: F811
    tok = tiny.load_tokenizer("2.5", tok_dir)
    d = tmp_path_factory.mktemp("micro")
    tiny.save_model(tiny.new_model("2.5", tok, seed=3, decoder=MICRO_DECODER, vision=MICRO_VISION), d, tok_dir)
    return d


def test_head_attention_is_transformers_eager_attention(micro):
    """At the states that write the box numbers, every head's recomputed probabilities equal transformers'
    `output_attentions` (eager) for the same checkpoint, over all keys up to the query."""
    transformers = pytest.importorskip("transformers")
    model = tiny.load_model(micro).eval()
    coll = Collator("2.5", tiny.load_tokenizer("2.5", micro), model.config, loss="assistant", boxes=True)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(micro), torch_dtype=torch.float32, attn_implementation="eager").eval()
    inputs = bl.Inputs(model, 1)
    checked = 0
    for sample in grounding(2):
        b = coll([sample])
        with torch.no_grad():
            model(model.embed(b["input_ids"], **embed_kwargs(b["vision"])), b["positions"])
            ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True,
                     pixel_values=b["vision"]["pixel_values"], image_grid_thw=b["vision"]["image_grid_thw"]).attentions[1]
            queries = b["box_at"][:, 1]
            assert len(queries) == 4
            for h in range(MICRO_DECODER["heads"]):
                got = bl.head_log_attention(inputs.attn, inputs.x[0], inputs.cos[0], inputs.sin[0], queries, h).exp()
                want = ref[0, h, queries, :got.shape[1]]
                assert (got - want).abs().max().item() < 1e-5
                checked += 1
    assert checked == 2 * MICRO_DECODER["heads"]


def test_named_object_tokens_are_cells_its_box_covers():
    """Every marked cell overlaps the asked object's box; the cell holding the box centre is marked; tokens of
    other objects' centres are not; a question that is not grounding gives None. Cells in raster order."""
    for s in grounding(6):
        sc, box = s.scene, s.qas[0].truth["box"]
        rows, cols = max(2, sc.height // 28), max(2, sc.width // 28)
        mask = bl.named_object_tokens(s, (rows, cols))
        assert mask is not None and mask.shape == (rows * cols,)
        cw, ch = sc.width / cols, sc.height / rows
        for i in mask.nonzero().squeeze(1).tolist():
            r, c = divmod(i, cols)
            assert c * cw < box[2] and (c + 1) * cw > box[0] and r * ch < box[3] and (r + 1) * ch > box[1]

        def cell(b):
            return int((b[1] + b[3]) / 2 // ch) * cols + int((b[0] + b[2]) / 2 // cw)

        assert mask[cell(box)]
        others = [o.box for o in (*sc.shapes, *sc.texts) if tuple(o.box) != tuple(box)]
        assert all(not mask[cell(o)] for o in others if cell(o) != cell(box))
    assert bl.named_object_tokens(T.make_sample("color", 2, "2.5"), (4, 4)) is None


def test_drill_losses_are_minus_log_mass_and_the_value_read_out_error(micro):
    """The look-up term is the mean over box-number states of -log(the head's attention on the named object's
    tokens) -- found here from transformers' eager attentions and each object's box -- and the value term is
    the MSE of the read-out of the head's values at image tokens against (row, column) / 16 of the merged grid."""
    transformers = pytest.importorskip("transformers")
    model = tiny.load_model(micro).eval()
    coll = Collator("2.5", tiny.load_tokenizer("2.5", micro), model.config, loss="assistant", boxes=True)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(micro), torch_dtype=torch.float32, attn_implementation="eager").eval()
    losses = bl.LookupLosses(model, layer=1, head=2, lookup=0.5, value=2.0)
    samples = grounding(2, seed=40)
    b = coll(samples)
    with torch.no_grad():
        model(model.embed(b["input_ids"], **embed_kwargs(b["vision"])), b["positions"])
        total, metrics = losses(b, samples)
    img_id = model.config.image_token_id
    minus_log, values, targets = [], [], []
    with torch.no_grad():
        for row, s in enumerate(samples):
            one = coll([s])
            att = hf(input_ids=one["input_ids"], attention_mask=one["attention_mask"], output_attentions=True,
                     pixel_values=one["vision"]["pixel_values"], image_grid_thw=one["vision"]["image_grid_thw"])
            _, h, w = one["vision"]["image_grid_thw"][0].tolist()
            rows, cols = h // 2, w // 2
            idx = (one["input_ids"][0] == img_id).nonzero().squeeze(1)
            named = idx[bl.named_object_tokens(s, (rows, cols))]
            for q in one["box_at"][:, 1].tolist():
                minus_log.append(-att.attentions[1][0, 2, q, named].sum().log())
            x = losses.inputs.x[row, (b["input_ids"][row] == img_id)]
            kv = 2 // (MICRO_DECODER["heads"] // MICRO_DECODER["kv_heads"])
            v = model.model.layers[1].self_attn.v_proj(x).view(len(x), MICRO_DECODER["kv_heads"], -1)[:, kv]
            values.append(losses.read(v))
            targets += [[i // cols, i % cols] for i in range(rows * cols)]
    look = torch.stack(minus_log).mean()
    value = ((torch.cat(values) - torch.tensor(targets, dtype=torch.float32) / 16) ** 2).mean()
    assert len(minus_log) == 8
    assert abs(metrics["lookup"].item() - look.item()) < 1e-4
    assert abs(metrics["value_mse"].item() - value.item()) < 1e-5
    assert abs(total.item() - (0.5 * look + 2.0 * value).item()) < 1e-4


def test_script_drills_and_measures(micro, tmp_path, capsys):
    args = [str(micro), "--n", "12", "--layer", "1", "--head", "1", "--train", "2", "--batch", "2",
            "--out", str(tmp_path / "drill"), "--value", "1", "--answer-layer", "1", "--mrope-section", "2,2,4", "--tasks", "ground"]
    assert bl.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["questions"] >= 1 and out["head"] == 1
    assert len(out["mass_on_named_per_head"]) == MICRO_DECODER["heads"]
    assert all(0.0 <= m <= 1.0 for m in out["mass_on_named_per_head"])
    assert len(out["tokens_r2_row_col"]) == len(out["attended_r2_row_col"]) == len(out["value_r2_row_col"]) == 2
    config = json.loads((tmp_path / "drill" / "model" / "config.json").read_text())
    assert config["rope_scaling"]["mrope_section"] == [2, 2, 4]
    with pytest.raises(SystemExit):
        bl.main([str(micro), "--train", "2"])  # a drill needs --out
