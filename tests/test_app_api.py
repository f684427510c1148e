"""The Gradio app through its API (gradio_client), launched in-process on a free 127.0.0.1 port with
tiny checkpoints passed as --model directories.

Every view's numbers are checked against qvl computed here, independently of the app:
token counts against `qvl.media.account` (itself tested against transformers / qwen-vl-utils in
test_media.py) and smart_resize arithmetic, position ids against the M-RoPE rules written out by hand,
window counts against the window size, prompt lengths against `VLM.prepare`, boxes against the
pixels of the drawn mask.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest_app import (BOX_LABEL, BOX_TEXT, MAX_PIXELS, launch, make_box_model, make_tiny_model,
                          write_png)

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from qvl import media  # noqa: E402
from qvl.viz import costs  # noqa: E402

CKPT = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("app_files")
    out = {
        "png": write_png(d / "scene.png", 320, 240),
        "tall": write_png(d / "tall.png", 60, 900, seed=1),
        "wide201": write_png(d / "wide.png", 2010, 10, seed=2),
    }
    (d / "notes.txt").write_text("this is not an image\n")
    out["txt"] = str(d / "notes.txt")
    data = (d / "scene.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 3])
    out["truncated"] = str(d / "truncated.png")
    (d / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(4000))
    out["corrupt"] = str(d / "corrupt.png")
    (d / "empty.mp4").write_bytes(b"")  # a video with zero frames (and zero bytes)
    out["empty_video"] = str(d / "empty.mp4")
    # A PNG whose header claims 30000 x 30000 px (900 MP): refused before any pixel is decoded.
    def png_chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                                 + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))
    out["bomb"] = str(d / "bomb.png")
    big = np.random.default_rng(1).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)  # ~3.6 MB as PNG
    Image.fromarray(big).save(d / "big.png")
    out["big"] = str(d / "big.png")
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("app_models")
    broken = d / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    return {
        "tiny25": make_tiny_model(d / "tiny25", "2.5", seed=0),
        "tiny2": make_tiny_model(d / "tiny2", "2", seed=1),
        "box": make_box_model(d / "box"),
        "broken": broken,
        "missing": d / "missing",
    }


@pytest.fixture(scope="module")
def app_url(models, tmp_path_factory):
    bundled = tmp_path_factory.mktemp("no_bundled")  # an empty assets/models
    demo, url = launch([models[k] for k in ("tiny25", "tiny2", "box", "broken", "missing")], bundled)
    yield url
    demo.close()


@pytest.fixture()
def client(app_url):
    return Client(app_url, verbose=False)


def tokens(client, path, min_px=0, max_px=0, fps=0, nframes=0, ckpt=CKPT):
    return client.predict(handle_file(path), min_px, max_px, fps, nframes, ckpt, api_name="/tokens")


def chat(client, text, files=(), model="box", max_new=24, temperature=0.0, top_p=1.0, max_px=0, fps=0, history=()):
    return client.predict({"text": text, "files": [handle_file(f) for f in files]}, list(history), model, max_new,
                          temperature, top_p, max_px, fps, api_name="/chat")


def _resend(history):
    """A history as the API returned it -> as an input again (files as FileData)."""
    out = []
    for m in history:
        content = [{"type": "file", "file": handle_file(c["file"]["path"] if isinstance(c["file"], dict) else c["file"])}
                   if c["type"] == "file" else c for c in m["content"]]
        out.append({"role": m["role"], "content": content})
    return out


def _rows(table):
    return {r[0]: r for r in table["data"]}


# ---------------------------------------------------------------------------------------------


def test_endpoints(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/tokens", "/positions", "/windows", "/chat", "/attention", "/compare", "/model_status",
            "/clear"} <= names


@pytest.mark.parametrize("max_px", [0, 100 * 28 * 28])
def test_tokens_view_counts_equal_qvl_accounting(client, files, max_px):
    msg, count, table, grid_img, mem, frames = tokens(client, files["png"], max_px=max_px)
    assert msg == "" and frames is None
    acc = media.account(files["png"], max_pixels=max_px or None)
    # smart_resize by hand: 320x240 -> multiples of 28 (within max_pixels)
    h, w = media.smart_resize(240, 320, 28, media.MIN_PIXELS, max_px or media.MAX_PIXELS)
    n = (h // 28) * (w // 28)
    assert acc["2.5"]["visual_tokens"] == n
    assert f"Qwen2.5-VL: {n} · Qwen2-VL: {n} · Qwen-VL: 256" in count
    rows = _rows(table)
    assert rows["Qwen2.5-VL (gen 2.5)"][4] == n and rows["Qwen2.5-VL (gen 2.5)"][5] == n + 2
    assert rows["Qwen2.5-VL (gen 2.5)"][1] == f"{w} x {h}"
    assert rows["Qwen-VL (gen 1)"][4:6] == [256, 258]
    img = Image.open(grid_img)
    assert img.width == max(w, 320) and img.height > h  # the resized picture plus a caption band
    mem_rows = _rows(mem)
    assert mem_rows["KV cache (prompt)"][1] == costs.human_bytes(costs.kv_cache_bytes(CKPT, n + 2))
    assert mem_rows["ViT patches"][1] == f"{4 * n:,}"


def test_tokens_view_tall_image_and_video(client, files, tmp_path):
    _, count, table, *_ = tokens(client, files["tall"])
    assert _rows(table)["Qwen2-VL (gen 2)"][4] == media.account(files["tall"])["2"]["visual_tokens"]

    from conftest import synthetic_frames, write_mp4

    video = str(write_mp4(tmp_path / "clip.mp4", synthetic_frames(20, 96, 64), fps=10))
    msg, count, table, grid_img, mem, frames = tokens(client, video, fps=4)
    acc = media.account(video, fps=4)
    assert msg == "" and acc["2.5"]["kind"] == "video"
    # 20 frames at 10 fps = 2 s, sampled at 4 fps -> 8 frames -> 4 temporal patches
    assert acc["2.5"]["frames"] == 8 and acc["2.5"]["grid_thw"][0] == 4
    assert f"Qwen2.5-VL: {acc['2.5']['visual_tokens']}" in count
    assert _rows(table)["Qwen-VL (gen 1)"][4] == "-"  # gen 1 has no video input
    assert frames is not None and Image.open(frames).width > 4 * 96  # four pairs of frames


def test_positions_view_follows_the_mrope_rules(client, files):
    msg, fig, fig3d, table, times = client.predict(handle_file(files["png"]), "Where is the box?", "2.5", 0, 0, 0, 0,
                                                   api_name="/positions")
    assert msg == "" and fig is not None and fig3d is not None and times is None
    e = media.account(files["png"])["2.5"]
    _, gh, gw = e["grid_thw"]
    lh, lw = gh // 2, gw // 2
    spans = table["data"]
    text0, image, text1 = spans[0], spans[1], spans[2]
    assert image[0] == "image 0"
    a, b = map(int, image[1].split(".."))
    assert b - a + 1 == e["visual_tokens"] == lh * lw
    start = int(text0[2].split("..")[1]) + 1  # the image's ids start after the text before it (incl. vision_start)
    assert image[2] == f"{start}..{start}"  # one t id for a still image
    assert image[3] == f"{start}..{start + lh - 1}" and image[4] == f"{start}..{start + lw - 1}"
    assert image[5] == start + max(lh, lw)  # text resumes at max + 1
    assert text1[2].startswith(f"{start + max(lh, lw)}..")


@pytest.mark.parametrize("gen", ["2", "2.5"])
def test_positions_view_video_time_ids(client, tmp_path, gen):
    from conftest import synthetic_frames, write_mp4

    video = str(write_mp4(tmp_path / "clip.mp4", synthetic_frames(24, 64, 64), fps=8))  # 3 s
    msg, fig, _, table, times = client.predict(handle_file(video), "what moves?", gen, 0, 0, 1, 0,
                                               api_name="/positions")
    e = media.account(video, fps=1)[gen]
    t = e["grid_thw"][0]
    assert msg == "" and times is not None and t >= 2
    row = next(r for r in table["data"] if r[0] == "video 0")
    start = int(row[2].split("..")[0])
    # Qwen2-VL: t id = patch index; Qwen2.5-VL: floor(index * 2 s/patch * 2 tokens/s)
    last = (t - 1) if gen == "2" else math.floor((t - 1) * e["second_per_grid_t"] * 2)
    assert row[2] == f"{start}..{start + last}"


def test_windows_view(client, files):
    msg, img, fig, table = client.predict(handle_file(files["png"]), CKPT, 3, 0, 0, 0, 0, api_name="/windows")
    assert msg == "" and img is not None and fig is not None
    _, gh, gw = media.account(files["png"])["2.5"]["grid_thw"]
    per_side = 112 // 28  # 4x4 merged tokens per window
    n_windows = math.ceil(gh / 2 / per_side) * math.ceil(gw / 2 / per_side)
    rows = _rows(table)
    assert rows["windows (one block-diagonal block each)"][1] == n_windows
    cfg = costs.preset_config(CKPT)
    assert rows["full-attention blocks"][1] == f"{cfg.vision.fullatt_block_indexes} of {cfg.vision.depth}"
    L, dim = gh * gw, cfg.vision.dim
    assert rows["attention FLOPs, one full block"][1] == costs.human_count(4 * L * L * dim, "FLOP")
    # the windowed drawing covers whole windows (padding hatched): width = windows across x 112 px
    assert Image.open(img).width == max(math.ceil(gw / 2 / per_side) * 112, 320)


@pytest.mark.parametrize("kind,needle", [
    ("txt", "not a recognised image"), ("truncated", ""), ("corrupt", "not a recognised image"),
    ("empty_video", ""), ("wide201", "aspect ratio"), ("bomb", "decompression bomb"),
])
def test_bad_uploads_give_a_message_and_the_app_keeps_serving(client, files, kind, needle):
    for api in ("/tokens", "/positions", "/windows"):
        if api == "/tokens":
            msg = tokens(client, files[kind])[0]
        elif api == "/positions":
            msg = client.predict(handle_file(files[kind]), "hi", "2.5", 0, 0, 0, 0, api_name=api)[0]
        else:
            msg = client.predict(handle_file(files[kind]), CKPT, 0, 0, 0, 0, 0, api_name=api)[0]
        assert msg.startswith("⚠️") and needle in msg, (api, msg)
    assert tokens(client, files["png"])[0] == ""  # the next request works


def test_upload_over_the_size_limit_is_refused_and_the_app_keeps_serving(client, files):
    with pytest.raises(Exception, match="(?i)size|large|exceed"):
        tokens(client, files["big"])
    assert tokens(client, files["png"])[0] == ""


def test_bad_upload_in_chat(client, files):
    history, *_ = chat(client, "what is this?", [files["corrupt"]])
    assert "⚠️" in history[-1]["content"][0]["text"] and "not a recognised image" in history[-1]["content"][0]["text"]
    history, *_ = chat(client, "where?", [files["png"]])
    assert BOX_TEXT in history[-1]["content"][0]["text"]


def test_chat_answer_box_stats_and_attention(client, files, models):
    import qvl

    history, box_value, annotated, note, stats, token_choices = chat(client, "Where is the target?", [files["png"]])
    answer = history[-1]["content"][0]["text"]
    assert history[-1]["role"] == "assistant"
    assert answer == f"<|object_ref_start|>{BOX_LABEL}<|object_ref_end|><|box_start|>{BOX_TEXT}<|box_end|>"
    # the box on the original 320x240 image, from the gen-2 thousandths
    assert "Qwen2-VL convention" in note and "ORIGINAL image" in note
    (ann,) = annotated["annotations"]
    assert ann["label"] == BOX_LABEL
    mask = np.asarray(Image.open(ann["image"]).convert("L")) > 0
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min()) == (int(120 / 1000 * 320), int(80 / 1000 * 240))
    assert (xs.max(), ys.max()) in {(int(400 / 1000 * 320) - d, int(300 / 1000 * 240) - d) for d in (0, 1)}
    # prompt tokens = what the model's own prepare gives; image tokens = account with the checkpoint's bound
    vlm = qvl.load(models["box"], device="cpu")
    batch = vlm.prepare([{"role": "user", "content": [{"type": "image", "image": files["png"]},
                                                      {"type": "text", "text": "Where is the target?"}]}])
    n_img = media.account(files["png"], max_pixels=MAX_PIXELS)["2"]["visual_tokens"]
    assert f"prompt tokens {batch.input_ids.shape[1]} (image {n_img})" in stats
    assert "time to first token" in stats and "6 new tokens" in stats
    # a generated token's attention over the image (the session keeps the capture)
    assert len(token_choices["choices"]) == 6
    msg, heat = client.predict(4, "mean", "mean", api_name="/attention")
    assert msg == "" and Image.open(heat).width == 320
    msg, heat1 = client.predict(4, "1", "0", api_name="/attention")
    assert msg == "" and not np.array_equal(np.asarray(Image.open(heat)), np.asarray(Image.open(heat1)))
    assert "layers" in client.predict(4, "7", "0", api_name="/attention")[0]  # the tiny model has 2 layers


def test_chat_streams_and_keeps_turns(client, files):
    job = client.submit({"text": "Describe it.", "files": [handle_file(files["png"])]}, [], "tiny25", 12, 0.0, 1.0, 0,
                        0, api_name="/chat")
    job.result()
    assert len(job.outputs()) >= 3  # streamed: several partial histories before the final one
    history = job.outputs()[-1][0]
    history, *_, stats = chat(client, "And now?", model="tiny25", max_new=4, history=_resend(history))[:5]
    roles = [m["role"] for m in history]
    assert roles == ["user", "user", "assistant", "user", "assistant"]
    # the second turn's prompt holds the first turn (image included): longer than the image alone
    n_img = media.account(files["png"], max_pixels=MAX_PIXELS)["2.5"]["visual_tokens"]
    assert int(stats.split("prompt tokens ")[1].split()[0]) > n_img + 20


def test_sessions_are_separate(app_url, files):
    a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    ja = a.submit({"text": "where?", "files": [handle_file(files["png"])]}, [], "box", 24, 0.0, 1.0, 0, 0,
                  api_name="/chat")
    jb = b.submit({"text": "hello", "files": []}, [], "tiny2", 6, 0.0, 1.0, 0, 0, api_name="/chat")
    ha, hb = ja.result()[0], jb.result()[0]
    assert BOX_TEXT in ha[-1]["content"][0]["text"] and BOX_TEXT not in hb[-1]["content"][0]["text"]
    assert [m["role"] for m in hb] == ["user", "assistant"]
    assert "pick a generated token" in b.predict(0, "mean", "mean", api_name="/attention")[0]  # b asked no image


def test_stop_cancels_and_the_next_request_works(client, files):
    job = client.submit({"text": "Go on.", "files": [handle_file(files["png"])]}, [], "tiny25", 2048, 0.0, 1.0, 0, 0,
                        api_name="/chat")
    while len(job.outputs()) < 2 and not job.done():
        pass
    job.cancel()
    history = chat(client, "where?", [files["png"]])[0]
    assert BOX_TEXT in history[-1]["content"][0]["text"]


def test_failing_model_dirs_are_named_and_others_keep_serving(client, files, models):
    status = client.predict(api_name="/model_status")
    rows = _rows(status)
    assert rows["missing"][2].startswith("FAILED") and "not a directory" in rows["missing"][2]
    history = chat(client, "hi", [files["png"]], model="broken")[0]
    text = history[-1]["content"][0]["text"]
    assert "broken failed to load" in text and str(models["broken"]) in text and "llama" in text
    rows = _rows(client.predict(api_name="/model_status"))
    assert rows["broken"][2].startswith("FAILED") and "llama" in rows["broken"][2]
    assert BOX_TEXT in chat(client, "where?", [files["png"]])[0][-1]["content"][0]["text"]


def test_compare(client, files):
    msg, acc_table, table, gallery = client.predict(handle_file(files["png"]), "Where is the target?",
                                                    ["box", "tiny2", "tiny25", "broken"], 8, api_name="/compare")
    assert "broken" in msg and "llama" in msg
    rows = _rows(table)
    assert set(rows) == {"box", "tiny2", "tiny25"}
    n_img = media.account(files["png"], max_pixels=MAX_PIXELS)["2"]["visual_tokens"]
    assert all(r[3] == n_img for r in rows.values())
    assert rows["box"][1] == "Qwen2-VL" and rows["tiny25"][1] == "Qwen2.5-VL" and rows["box"][7] == 1
    assert len(gallery) >= 1 and gallery[0]["caption"] == "box"
    assert _rows(acc_table)["Qwen2.5-VL (gen 2.5)"][4] == media.account(files["png"])["2.5"]["visual_tokens"]
