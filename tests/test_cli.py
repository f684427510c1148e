"""The inspector CLI: counts match an independent oracle, bad input ends with exit 2 and one line each."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qvl", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_inspect_json_matches_transformers_smart_resize():
    image = ASSETS / "shapes_640x480.png"
    r = run_cli("inspect", image, "--json", "--max-pixels", 200704)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)[str(image)]
    w, h = Image.open(image).size
    rh, rw = hf_smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=200704)
    for gen in ("2", "2.5"):
        assert tuple(out[gen]["resized_size"]) == (rh, rw)
        assert out[gen]["grid_thw"] == [1, rh // 14, rw // 14]
        assert out[gen]["visual_tokens"] == (rh // 28) * (rw // 28)
    assert out["1"]["llm_tokens"] == 258  # <img> + 256 resampler queries + </img>


def test_inspect_table_lists_each_generation():
    r = run_cli("inspect", ASSETS / "motion_4s_8fps.mp4", ASSETS / "tall_300x1800.png")
    assert r.returncode == 0, r.stderr
    assert "timestamps" in r.stdout and "has no video input" in r.stdout
    rows = [ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("  ") and ln.split()[0] in ("1", "2", "2.5")]
    assert rows == ["1", "2", "2.5"] * 2


def _write(name, data):
    def make(d):
        p = d / name
        if data is not None:
            p.write_bytes(data)
        return p
    return make


@pytest.mark.parametrize("make_bad, needle", [
    (_write("missing.png", None), "not found"),
    (_write("empty.png", b""), "empty"),
    (_write("corrupt.jpg", b"\xff\xd8\xff\xe0garbage"), "corrupt.jpg"),
    (_write("broken.mp4", b"not a video"), "broken.mp4"),
    (_write("notes.txt", b"hello"), "notes.txt"),
])
def test_bad_input_one_line_exit_2_and_batch_continues(tmp_path, make_bad, needle):
    bad = make_bad(tmp_path)
    good = ASSETS / "shapes_640x480.png"
    r = run_cli("inspect", bad, good)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(bad.name) in errors[0] and needle in errors[0]
    assert str(good) in r.stdout  # the good file after the bad one was still inspected


def test_extreme_aspect_ratio_is_refused(tmp_path):
    p = tmp_path / "strip.png"
    Image.new("RGB", (2010, 10), "red").save(p)
    r = run_cli("inspect", p)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "aspect" in r.stderr and "strip.png" in r.stderr
