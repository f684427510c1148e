"""qvl app: upload an image or a video and see what each Qwen-VL generation does with it.

    python app.py                         # bundled tiny models (assets/models/*), 127.0.0.1:7860
    python app.py --model DIR --model DIR2 --port 8000

Five views, each a small function calling qvl (no model logic and no figure code here):
  Tokens    - resize, patch grid and merge units, token counts per generation, memory for a checkpoint, video frames
  Positions - M-RoPE (t, h, w) ids of every token, gen 1's 1-D ids, video time ids
  Windows   - Qwen2.5-VL's attention windows on the image, the block-diagonal mask, window vs full cost
  Chat      - streamed multi-turn chat, boxes/points drawn, attention of a generated token over the image
  Compare   - one image and prompt through every model side by side
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry / version checks

import gradio as gr  # noqa: E402

from qvl import grounding, media  # noqa: E402
from qvl.chat import vision_items  # noqa: E402
from qvl.checkpoint import CheckpointError  # noqa: E402
from qvl.viz import app_helpers as H  # noqa: E402
from qvl.viz import costs, overlays, plots  # noqa: E402

ROOT = Path(__file__).resolve().parent
BUNDLED = ROOT / "assets" / "models"
CHECKPOINTS = costs.preset_names()
GEN25_CHECKPOINTS = [n for n in CHECKPOINTS if "Qwen2.5-VL" in n]
USER_ERRORS = (media.MediaError, CheckpointError, ValueError, OSError, RuntimeError)
FIGURE_ERRORS = USER_ERRORS


def _opt(x, cast=int):
    """A knob where 0 / empty means "the model's default"."""
    return None if x in (None, "", 0) else cast(x)


def _problem(e: Exception) -> str:
    return f"⚠️ **{type(e).__name__}**: {' '.join(str(e).split())}"


def _table(rows, headers):
    """Rows for a gr.Dataframe output (a DataFrame keeps the column names in the API's answer)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=headers)


def _account(path, min_pixels, max_pixels, fps, nframes) -> dict:
    """`media.account` with the knobs (0 = default); an image is also decoded once, so a truncated
    file is reported by every view, not only by those that draw it."""
    acc = media.account(path, min_pixels=_opt(min_pixels), max_pixels=_opt(max_pixels), fps=_opt(fps, float),
                        nframes=_opt(nframes))
    if acc["2.5"]["kind"] == "image":
        media.load_image(path)
    return acc


def _media_kind(path: str) -> str:
    return "video" if media.is_video_source(path) else "image"


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def tokens_view(path, min_pixels, max_pixels, fps, nframes, checkpoint):
    """-> (message, token count line, per-generation table, patch-grid image, memory table, frame strip)"""
    if not path:
        return "Upload an image or a video.", "", None, None, None, None
    lo, hi, fps, nf = _opt(min_pixels), _opt(max_pixels), _opt(fps, float), _opt(nframes)
    try:
        acc = _account(path, lo, hi, fps, nf)
        e = acc["2.5"]
        strip = None
        if e["kind"] == "video":
            frame, video = H.first_frame(path, lo, hi, fps, nf)
            grid_img = overlays.draw_patch_grid(frame)
            strip = overlays.frame_strip(overlays.video_frames(video), video.timestamps,
                                         frame_indices=video.frame_indices)
        else:
            grid_img = overlays.patch_grid(path, lo, hi)
        mem = _memory_rows(acc, checkpoint)
    except USER_ERRORS as err:
        return _problem(err), "", None, None, None, None
    g1 = acc["1"]
    gen1 = f"{g1['llm_tokens']}" if g1.get("supported", True) else "no video input"
    count = (f"**{e['kind'].capitalize()} tokens — Qwen2.5-VL: {e['visual_tokens']} · Qwen2-VL: "
             f"{acc['2']['visual_tokens']} · Qwen-VL: {g1.get('visual_tokens', '-')}** "
             f"(LLM tokens with markers: {e['llm_tokens']} / {acc['2']['llm_tokens']} / {gen1})")
    table = _table(H.token_rows(acc), H.TOKEN_HEADERS)
    return "", count, table, grid_img, mem, strip


def _memory_rows(acc, checkpoint):
    """costs.summary for the chosen published checkpoint, with the grid its generation would use."""
    gen = costs.generation_of(costs.preset_config(checkpoint))
    e = acc[gen]
    if e.get("supported") is False:
        return _table([[checkpoint, e["note"]]], ["checkpoint", "note"])
    rows = costs.summary(e["grid_thw"], e["llm_tokens"], checkpoint)
    return _table([[k, v] for k, v in rows.items()], ["quantity", "value"])


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------


def positions_view(path, prompt, generation, min_pixels, max_pixels, fps, nframes):
    """-> (message, M-RoPE figure, 3-D figure, span table, video time-id figure)"""
    if not path:
        return "Upload an image or a video.", None, None, None, None
    try:
        acc = _account(path, min_pixels, max_pixels, fps, nframes)
        tps = None if generation == "2" else 2.0  # Qwen2.5-VL's tokens_per_second (Hub configs)
        toy = plots.toy_prompt(H.toy_parts(acc, prompt, generation), tokens_per_second=tps)
        video = acc[generation]["kind"] == "video"
        g1 = None if video else plots.toy_prompt(H.gen1_parts(prompt))
        fig = plots.mrope_figure(
            toy["position_ids"], toy["spans"], toy["tokens"],
            gen1_ids=None if g1 is None else g1["gen1_ids"], gen1_spans=None if g1 is None else g1["spans"],
            gen1_tokens=None if g1 is None else g1["tokens"],
            title=f"{H.GEN_NAMES[generation]}: position ids of a one-{acc[generation]['kind']} prompt")
        fig3d = plots.mrope_3d_figure(toy["position_ids"], toy["spans"], toy["tokens"])
        rows = _table(H.position_rows(toy["position_ids"], toy["spans"]), H.POSITION_HEADERS)
        times = None
        if video:
            e = acc[generation]
            times = plots.time_ids_plot(fps_list=sorted({0.5, 1.0, e["sampled_fps"], 4.0}),
                                        duration_s=max(e["timestamps"][-1], 2.0))
    except USER_ERRORS as err:
        return _problem(err), None, None, None, None
    return "", fig, fig3d, rows, times


# ---------------------------------------------------------------------------------------------
# Window attention
# ---------------------------------------------------------------------------------------------


def windows_view(path, checkpoint, layer, min_pixels, max_pixels, fps, nframes):
    """-> (message, windows over the image, block-diagonal mask figure, cost table)"""
    if not path:
        return "Upload an image or a video.", None, None, None
    lo, hi = _opt(min_pixels), _opt(max_pixels)
    try:
        acc = _account(path, lo, hi, fps, nframes)
        grid = acc["2.5"]["grid_thw"]
        window = costs.preset_config(checkpoint).vision.window_size
        src = H.first_frame(path, lo, hi, _opt(fps, float), _opt(nframes))[0] if acc["2.5"]["kind"] == "video" else path
        # a video frame is already at model size: its own size is both bounds
        bounds = (src.width * src.height,) * 2 if acc["2.5"]["kind"] == "video" else (lo, hi)
        img = overlays.draw_windows(src, *bounds, window_size=window)
        kinds = costs.vision_block_kinds(checkpoint)
        layer = min(int(layer), len(kinds) - 1)
        fig = plots.attention_mask_plot(grid, layer, checkpoint)
        c = costs.vision_costs(grid, checkpoint)
    except USER_ERRORS as err:
        return _problem(err), None, None, None
    full = [i for i, k in enumerate(kinds) if k == "full"]
    rows = [
        ["ViT patches (L)", f"{c['patches']:,}"],
        ["windows (one block-diagonal block each)", len(c["window_segments"])],
        ["full-attention blocks", f"{full} of {c['blocks']}"],
        ["attention FLOPs, one window block", costs.human_count(c["flops_window_layer"], "FLOP")],
        ["attention FLOPs, one full block", costs.human_count(c["flops_full_layer"], "FLOP")],
        ["attention FLOPs, tower as configured", costs.human_count(c["flops_as_configured"], "FLOP")],
        ["attention FLOPs, if every block were full", costs.human_count(c["flops_all_full"], "FLOP")],
        ["attention matrix per block (eager), window / full",
         f"{costs.human_bytes(c['scores_bytes_window'])} / {costs.human_bytes(c['scores_bytes_full'])}"],
    ]
    return "", img, fig, _table(rows, ["quantity", "value"])


# ---------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------


def _user_turn(message: dict, max_pixels, fps) -> tuple[list[dict], dict]:
    """The MultimodalTextbox value -> (chat display messages, one qvl user message)."""
    shown, content = [], []
    for f in message.get("files") or []:
        p = f if isinstance(f, str) else f.get("path")
        shown.append({"role": "user", "content": {"path": p}})
        if _media_kind(p) == "video":
            content.append({"type": "video", "video": p, **({"fps": float(fps)} if fps else {})})
        else:
            content.append({"type": "image", "image": p, **({"max_pixels": int(max_pixels)} if max_pixels else {})})
    text = (message.get("text") or "").strip()
    if text:
        shown.append({"role": "user", "content": text})
        content.append({"type": "text", "text": text})
    return shown, {"role": "user", "content": content}


def _last_image(batch):
    items = [m for m in batch.media if m.kind == "image"]
    return items[-1] if items else None


def _drawn(answer, vlm, batch, conversation):
    """Boxes/points of the answer on the latest image (original pixels) + the convention, or (None, note)."""
    item = _last_image(batch)
    if item is None:
        return None, ""
    found = grounding.parse(answer, vlm.generation, batch)
    if not found:
        return None, "No boxes or points in the answer."
    src = [e["source"] for e in vision_items(conversation) if e["type"] == "image"][-1]
    img = overlays.draw_grounding(src, found, resized_size=item.resized_size)
    marks = []
    for i, it in enumerate(found):
        label = it.label or f"item {i}"
        if isinstance(it, grounding.Box):
            marks.append((tuple(int(v) for v in it.as_int()), label))
        else:
            x, y = int(it.x), int(it.y)
            marks.append(((max(x - 4, 0), max(y - 4, 0), x + 4, y + 4), label))
    note = (f"{len(found)} item(s) parsed in the {H.GEN_NAMES[vlm.generation]} convention: "
            f"{overlays.CONVENTIONS[vlm.generation]}")
    return (img, marks), note


def chat_view(message, history, state, model_name, max_new_tokens, temperature, top_p, max_pixels, fps,
              store: H.ModelStore):
    """Streamed reply. Yields (chat history, textbox value, boxes image, grounding note, stats, token picker, state)."""
    history = list(history or [])
    state = dict(state or {})
    conversation = list(state.get("conversation", []))
    nothing = gr.update()
    shown, user = _user_turn(message or {}, _opt(max_pixels), _opt(fps, float))
    if not user["content"]:
        yield history, nothing, nothing, "Type a message or attach an image/video.", nothing, nothing, state
        return
    history += shown
    try:
        vlm = store.get(model_name)  # the first use loads the model (not counted in time to first token)
        t0 = time.perf_counter()  # from here: media processing, prompt, prefill
        conversation.append(user)
        batch = vlm.prepare(conversation)
        item = _last_image(batch)
        capture = H.attention_capture(vlm, item)
    except USER_ERRORS as err:
        history.append({"role": "assistant", "content": _problem(err)})
        yield history, None, None, "", _problem(err), gr.update(choices=[], value=None), state
        return
    history.append({"role": "assistant", "content": ""})
    answer, ids, t_first = "", [], None
    sampling = {"temperature": float(temperature or 0)}
    if sampling["temperature"] > 0 and top_p is not None and float(top_p) < 1:
        sampling["top_p"] = float(top_p)
    for tok, piece in H.stream_tokens(vlm, batch, int(max_new_tokens), capture=capture, **sampling):
        if t_first is None:
            t_first = time.perf_counter()
        if tok is not None:
            ids.append(tok)
        answer += piece
        history[-1] = {"role": "assistant", "content": answer}
        state["conversation"] = conversation + [{"role": "assistant", "content": answer}]
        yield history, None, nothing, "", "generating…", nothing, state
    t_end = time.perf_counter()
    n_prompt = int(batch.attention_mask.sum())
    ttft = (t_first or t_end) - t0
    rate = (len(ids) - 1) / (t_end - t_first) if len(ids) > 1 and t_end > t_first else float("nan")
    stats = (f"{vlm.generation and H.GEN_NAMES[vlm.generation]} · prompt tokens {n_prompt}"
             + (f" (image {item.tokens})" if item else "")
             + f" · time to first token {ttft:.3f} s · {len(ids)} new tokens · {rate:.1f} tokens/s")
    history[-1] = {"role": "assistant", "content": answer or "(empty answer)"}
    state["conversation"] = conversation + [{"role": "assistant", "content": answer}]
    drawn, note = _drawn(answer, vlm, batch, state["conversation"])
    choices = []
    if capture is not None:
        stack = H.attention_stack(capture)
        if stack is not None and len(ids):
            n = min(stack.shape[0], len(ids))
            state["attention"] = {"stack": stack[:n], "grid": item.grid_thw, "source": _image_source(conversation),
                                  "layers": stack.shape[1], "heads": stack.shape[2]}
            choices = [(f"{i}: {vlm.decode([ids[i]])!r}", i) for i in range(n)]
    else:
        state.pop("attention", None)
    yield (history, None, drawn, note, stats, gr.update(choices=choices, value=choices[0][1] if choices else None),
           state)


def _image_source(conversation):
    return [e["source"] for e in vision_items(conversation) if e["type"] == "image"][-1]


def attention_view(token, layer, head, state):
    """-> (message, heat map of one generated token's attention over the latest image)"""
    att = (state or {}).get("attention")
    if att is None or token is None:
        return "Ask about an image first; then pick a generated token.", None
    token = int(token)
    if not 0 <= token < att["stack"].shape[0]:
        return f"token {token} out of range (0..{att['stack'].shape[0] - 1})", None
    li = None if layer in (None, "mean") else int(layer)
    hi = None if head in (None, "mean") else int(head)
    if (li is not None and not 0 <= li < att["layers"]) or (hi is not None and not 0 <= hi < att["heads"]):
        return f"the model has {att['layers']} layers and {att['heads']} heads", None
    w = H.token_weights(att["stack"], token, li, hi)
    what = f"layer {'mean' if li is None else li}, head {'mean' if hi is None else hi}"
    img = overlays.attention_overlay(att["source"], w, att["grid"],
                                     caption=f"Generated token {token}: attention over the image tokens ({what})")
    return "", img


def clear_chat():
    return [], None, None, "", "", gr.update(choices=[], value=None), {}


# ---------------------------------------------------------------------------------------------
# Compare
# ---------------------------------------------------------------------------------------------

STATUS_HEADERS = ["model", "directory", "state"]
COMPARE_HEADERS = ["model", "generation", "prompt tokens", "image tokens", "image grid", "max position id",
                   "answer", "boxes/points", "time to first token (s)", "tokens/s"]


def compare_view(path, prompt, names, max_new_tokens, store: H.ModelStore):
    """-> (message, per-generation accounting table, per-model table, drawn answers)"""
    if not path:
        return "Upload an image.", None, None, []
    try:
        if _media_kind(path) != "image":
            raise media.MediaError("Compare takes an image (gen 1 has no video input)")
        acc = _account(path, 0, 0, 0, 0)
    except USER_ERRORS as err:
        return _problem(err), None, None, []
    rows, gallery, problems = [], [], []
    for name in names or []:
        try:
            vlm = store.get(name)
            conv = [{"role": "user", "content": [{"type": "image", "image": path},
                                                 {"type": "text", "text": prompt or "Describe the image."}]}]
            t0 = time.perf_counter()
            batch = vlm.prepare(conv)
            answer, n, t_first = "", 0, None
            for tok, piece in H.stream_tokens(vlm, batch, int(max_new_tokens)):
                t_first = t_first or time.perf_counter()
                n += tok is not None
                answer += piece
            t_end = time.perf_counter()
        except USER_ERRORS as err:
            problems.append(f"{name}: {_problem(err)}")
            continue
        item = _last_image(batch)
        found = grounding.parse(answer, vlm.generation, batch)
        pos = batch.position_ids
        rate = (n - 1) / (t_end - t_first) if n > 1 else float("nan")
        rows.append([name, H.GEN_NAMES[vlm.generation], int(batch.attention_mask.sum()), item.tokens,
                     str(item.grid_thw or "448x448 fixed"), int(pos.max()), answer, len(found),
                     round((t_first or t_end) - t0, 4), round(rate, 1)])
        if found:
            gallery.append((overlays.draw_grounding(path, found, resized_size=item.resized_size), name))
    msg = "\n\n".join(problems) if problems else ("" if names else "Pick one or more models.")
    return (msg, _table(H.token_rows(acc), H.TOKEN_HEADERS),
            _table(rows, COMPARE_HEADERS), gallery)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def build_demo(model_dirs=(), bundled=BUNDLED, device=None) -> gr.Blocks:
    store = H.ModelStore([*H.find_models(bundled), *model_dirs], device=device)
    names = store.names
    models_note = ("" if names else f"No models: the bundled tiny models go in `{bundled}`, or pass `--model DIR`. "
                   "Tokens, Positions and Window attention work without one.")

    with gr.Blocks(title="qvl: Qwen-VL, Qwen2-VL, Qwen2.5-VL") as demo:
        gr.Markdown("# qvl — what Qwen-VL, Qwen2-VL and Qwen2.5-VL do with your image or video")
        with gr.Row():
            media_in = gr.File(label="Image or video", type="filepath", elem_id="media", scale=2)
            with gr.Column(scale=3):
                with gr.Row():
                    min_px = gr.Number(0, label="min pixels (0 = default 3136)", precision=0, elem_id="min_px")
                    max_px = gr.Number(0, label="max pixels (0 = default 12845056)", precision=0, elem_id="max_px")
                with gr.Row():
                    fps = gr.Number(0, label="video fps (0 = default 2)", elem_id="fps")
                    nframes = gr.Number(0, label="video frames (0 = from fps)", precision=0, elem_id="nframes")
        media_msg = gr.Markdown(elem_id="media_msg")
        knobs = [min_px, max_px, fps, nframes]

        with gr.Tabs():
            with gr.Tab("Tokens", id="tokens"):
                ckpt = gr.Dropdown(CHECKPOINTS, value="Qwen/Qwen2.5-VL-7B-Instruct",
                                   label="memory for checkpoint", elem_id="ckpt")
                tok_count = gr.Markdown(elem_id="tok_count")
                tok_table = gr.Dataframe(label="tokens per generation", elem_id="tok_table", interactive=False)
                with gr.Row():
                    grid_img = gr.Image(label="resized input: 14-px patches (yellow), 2x2 merge units = tokens (red)",
                                        elem_id="grid_img", format="png")
                    mem_table = gr.Dataframe(label="memory and compute", elem_id="mem_table", interactive=False)
                frames_img = gr.Image(label="video uploads only: sampled frames paired into temporal patches",
                                      elem_id="frames_img", format="png", height=240)
            with gr.Tab("Positions", id="positions"):
                with gr.Row():
                    pos_prompt = gr.Textbox("What is in the picture?", label="prompt", elem_id="pos_prompt")
                    pos_gen = gr.Radio(["2", "2.5"], value="2.5", label="generation (M-RoPE)", elem_id="pos_gen")
                pos_msg = gr.Markdown()
                pos_table = gr.Dataframe(label="ids per span (text resumes at max + 1)", elem_id="pos_table",
                                         interactive=False)
                pos_plot = gr.Plot(elem_id="pos_plot")
                pos_3d = gr.Plot(elem_id="pos_3d")
                time_plot = gr.Plot(label="video uploads only: time ids, Qwen2-VL vs Qwen2.5-VL", elem_id="time_plot")
            with gr.Tab("Window attention", id="windows"):
                with gr.Row():
                    win_ckpt = gr.Dropdown(GEN25_CHECKPOINTS, value="Qwen/Qwen2.5-VL-7B-Instruct",
                                           label="checkpoint", elem_id="win_ckpt")
                    win_layer = gr.Slider(0, 31, value=0, step=1, label="ViT block (7, 15, 23, 31: full attention)",
                                          elem_id="win_layer")
                win_msg = gr.Markdown()
                with gr.Row():
                    win_img = gr.Image(label="windows over the resized image", elem_id="win_img", format="png")
                    mask_plot = gr.Plot(elem_id="mask_plot")
                win_table = gr.Dataframe(label="window vs full attention", elem_id="win_table", interactive=False)
            with gr.Tab("Chat", id="chat"):
                gr.Markdown(models_note)
                with gr.Row():
                    model = gr.Dropdown(names, value=names[0] if names else None, label="model",
                                        elem_id="model", scale=3)
                    status_btn = gr.Button("model status", scale=1)
                status = gr.Dataframe(value=store.status_rows, headers=STATUS_HEADERS,
                                      label="models", elem_id="model_status", interactive=False)
                with gr.Row():
                    max_new = gr.Slider(1, 2048, value=128, step=1, label="max new tokens", elem_id="max_new")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p")
                    chat_max_px = gr.Number(0, label="max pixels per image (0 = model default)", precision=0)
                    chat_fps = gr.Number(0, label="video fps (0 = default 2)")
                with gr.Row():
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(label="chat", elem_id="chat", height=420)
                        box = gr.MultimodalTextbox(file_types=["image", "video"], file_count="multiple",
                                                   placeholder="Ask about an image or a video…", elem_id="mm",
                                                   show_label=False)
                        with gr.Row():
                            stop = gr.Button("Stop", variant="stop", elem_id="stop")
                            clear = gr.Button("Clear", elem_id="clear")
                        stats = gr.Markdown(elem_id="chat_stats")
                    with gr.Column(scale=2):
                        # the heading sits above the image, not on it: Gradio draws a block label over the
                        # top-left corner, where an answer's box often is
                        gr.Markdown("**boxes and points in the answer**")
                        boxes = gr.AnnotatedImage(label="boxes and points in the answer", elem_id="annot",
                                                  show_label=False)
                        boxes_note = gr.Markdown(elem_id="annot_note")
                        with gr.Row():
                            attn_token = gr.Dropdown([], label="generated token", elem_id="attn_token", allow_custom_value=True)
                            attn_layer = gr.Dropdown(["mean"] + [str(i) for i in range(64)], value="mean",
                                                     label="layer")
                            attn_head = gr.Dropdown(["mean"] + [str(i) for i in range(64)], value="mean",
                                                    label="head")
                        attn_msg = gr.Markdown()
                        attn_img = gr.Image(label="attention over the image", elem_id="attn_img", format="png")
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    cmp_models = gr.CheckboxGroup(names, value=names, label="models", elem_id="cmp_models")
                    cmp_prompt = gr.Textbox("Describe the image.", label="prompt", elem_id="cmp_prompt")
                    cmp_new = gr.Slider(1, 512, value=128, step=1, label="max new tokens")  # a gen-2.5 JSON box: ~36
                cmp_btn = gr.Button("Compare", variant="primary", elem_id="cmp_btn")
                cmp_msg = gr.Markdown(elem_id="cmp_msg")
                cmp_acc = gr.Dataframe(label="tokens per generation (qvl.media.account)", interactive=False)
                cmp_table = gr.Dataframe(label="models side by side", elem_id="cmp_table", interactive=False)
                gr.Markdown("**boxes and points drawn on the original image**, one per model")
                # "contain": a thumbnail shows the whole drawing ("cover" cropped a box at the image's top edge)
                cmp_gallery = gr.Gallery(label="boxes and points drawn (original image)", columns=3, show_label=False,
                                         object_fit="contain", elem_id="cmp_gallery")

        session = gr.State({})

        # --- analysis views: rerun on a new upload or knob change (cheap; no model) ---
        tok_io = dict(fn=tokens_view, inputs=[media_in, *knobs, ckpt],
                      outputs=[media_msg, tok_count, tok_table, grid_img, mem_table, frames_img])
        pos_io = dict(fn=positions_view, inputs=[media_in, pos_prompt, pos_gen, *knobs],
                      outputs=[pos_msg, pos_plot, pos_3d, pos_table, time_plot])
        win_io = dict(fn=windows_view, inputs=[media_in, win_ckpt, win_layer, *knobs],
                      outputs=[win_msg, win_img, mask_plot, win_table])
        media_in.change(api_name="tokens", **tok_io).then(api_name="positions", **pos_io).then(
            api_name="windows", **win_io)
        for k in knobs:
            k.submit(api_visibility="private", **tok_io).then(api_visibility="private", **pos_io).then(
                api_visibility="private", **win_io)
        ckpt.change(api_visibility="private", **tok_io)
        pos_prompt.submit(api_visibility="private", **pos_io)
        pos_gen.change(api_visibility="private", **pos_io)
        win_ckpt.change(api_visibility="private", **win_io)
        win_layer.release(api_visibility="private", **win_io)

        # --- chat: one model copy, requests queue (concurrency 1 shared with Compare) ---
        def chat_fn(message, history, state, model_name, max_new_tokens, temperature, top_p, max_pixels, fps):
            yield from chat_view(message, history, state, model_name, max_new_tokens, temperature, top_p,
                                 max_pixels, fps, store)

        chat_event = box.submit(
            chat_fn, [box, chatbot, session, model, max_new, temperature, top_p, chat_max_px, chat_fps],
            [chatbot, box, boxes, boxes_note, stats, attn_token, session],
            api_name="chat", concurrency_id="model", concurrency_limit=1)
        chat_event.then(lambda: _table(store.status_rows(), STATUS_HEADERS), None, status, api_visibility="private")
        stop.click(None, None, None, cancels=[chat_event], api_visibility="private")
        clear.click(clear_chat, None, [chatbot, box, boxes, boxes_note, stats, attn_token, session],
                    api_name="clear")
        for c in (attn_token, attn_layer, attn_head):
            c.change(attention_view, [attn_token, attn_layer, attn_head, session], [attn_msg, attn_img],
                     api_name="attention" if c is attn_token else None,
                     api_visibility="public" if c is attn_token else "private")
        status_btn.click(lambda: _table(store.status_rows(), STATUS_HEADERS), None, status, api_name="model_status")

        def compare_fn(path, prompt, names, max_new_tokens):
            return compare_view(path, prompt, names, max_new_tokens, store)

        cmp_btn.click(compare_fn, [media_in, cmp_prompt, cmp_models, cmp_new],
                      [cmp_msg, cmp_acc, cmp_table, cmp_gallery], api_name="compare", concurrency_id="model",
                      concurrency_limit=1)
    demo.store = store
    return demo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], metavar="DIR",
                    help="a checkpoint directory in the official layout (repeatable)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="ask gradio for a public share link (off by default)")
    ap.add_argument("--device", default=None, help="torch device for the models (default: cuda when available)")
    ap.add_argument("--max-file-size", default="200mb", help="upload size limit (default 200mb)")
    args = ap.parse_args(argv)
    demo = build_demo(args.model, device=args.device)
    demo.queue(default_concurrency_limit=4).launch(server_name=args.host, server_port=args.port,
                                                   share=args.share, max_file_size=args.max_file_size,
                                                   ssr_mode=False)


if __name__ == "__main__":
    main()
