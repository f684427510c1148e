"""`python -m qvl.train ...`: one stage, or the whole recipe.

    python -m qvl.train --generation 2.5 --stage stage2 --samples 20000 --out runs/s2 --init runs/s1 [--resume]
    python -m qvl.train --generation 2.5 --stage ground ... --set lr=1e-3 --set answer_weight=1   # a variant
    python -m qvl.train recipe --generation all --out assets/models [--work runs/recipe] [--scale 0.1]
    torchrun --nproc_per_node 2 -m qvl.train ...            # DDP (gloo on CPU, nccl on CUDA); --fsdp to shard

The recipe runs every stage in `qvl.train.stages.ORDER` for each generation with the sample budgets of
`stages.BUDGETS` (times --scale), skipping stages that already finished (so re-running it resumes), then
evaluates the result and writes the shipped model (bf16, official layout) to OUT/qvl-tiny-{gen}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import fields, replace
from pathlib import Path

from qvl.data.tasks import TASKS
from qvl.train import stages as S


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 1 on CPU, 4 on CUDA)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP under torchrun")
    ap.add_argument("--quiet", action="store_true")


def parse_curriculum(text: str) -> tuple[tuple[float, dict], ...]:
    """'F:N,...' -> a Stage.curriculum: the samples before fraction F of the stage draw at most N shapes per
    scene (fractions rising, in (0, 1]; N >= 1). Raises ValueError in one line."""
    try:
        phases = [(float(f), int(n)) for f, n in (p.split(":") for p in text.split(","))]
    except ValueError:
        raise ValueError(f"expected F:N,... (e.g. 0.25:1,0.5:2), got {text!r}") from None
    fracs = [f for f, _ in phases]
    if not all(0 < f <= 1 for f in fracs) or fracs != sorted(set(fracs)) or min(n for _, n in phases) < 1:
        raise ValueError(f"fractions must rise within (0, 1] and counts be >= 1, got {text!r}")
    return tuple((f, {"max_objects": n}) for f, n in phases)


def parse_set(stage: S.Stage, text: str) -> tuple[str, object]:
    """'FIELD=VALUE' -> (field, value) for a field of `stage` that is a number, the parts to train
    (comma-separated), the task mix (task:weight, comma-separated) or the scene curriculum (F:N, comma-separated:
    at most N shapes before fraction F). Raises ValueError in one line."""
    numeric = {f.name: type(getattr(stage, f.name)) for f in fields(S.Stage)
               if type(getattr(stage, f.name)) in (int, float)}
    numeric["gen1_image_size"] = int  # None = the model's own size
    name, eq, value = text.partition("=")
    if not eq or name not in {*numeric, "train", "mix", "curriculum"}:
        raise ValueError(f"expected FIELD=VALUE with FIELD one of train, mix, curriculum, "
                         f"{', '.join(sorted(numeric))}; got {text!r}")
    try:
        if name == "curriculum":
            return name, parse_curriculum(value)
        if name == "mix":
            if not all(item.count(":") == 1 for item in value.split(",")):
                raise ValueError("expected task:weight items, comma-separated")
            mix = {task: float(w) for task, w in (item.split(":") for item in value.split(","))}
            if unknown := set(mix) - set(TASKS):
                raise ValueError(f"unknown task(s) {', '.join(sorted(unknown))}")
            return name, mix
        if name == "train":
            parts = tuple(value.split(","))
            if unknown := set(parts) - {"vision", "adapter", "llm"}:
                raise ValueError(f"unknown part(s) {', '.join(sorted(unknown))} (vision, adapter, llm)")
            return name, parts
        number = numeric[name](value)
        if number < 0:
            raise ValueError("must be >= 0")
        return name, number
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None


def stage_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m qvl.train", description="Train one stage of qvl-tiny.")
    ap.add_argument("--generation", required=True, choices=["1", "2", "2.5"])
    ap.add_argument("--stage", required=True, choices=list(S.ORDER))
    ap.add_argument("--samples", type=int, required=True, help="samples for this stage (all ranks together)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", default=None, help="model dir (or stage dir) to start from")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir for a fresh model (built there if missing)")
    ap.add_argument("--records", default=None, help="JSONL of accepted answers (rs-sft) or pairs (dpo)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resume later)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change one field of the stage (qvl.train.stages.Stage), e.g. answer_weight=1, "
                         "train=adapter,llm, mix=ground:2,color:1, curriculum=0.75:1 (at most 1 shape for the "
                         "first 3/4); repeatable")
    _common(ap)
    a = ap.parse_args(argv)
    if a.stage == "when" and a.generation == "1":
        ap.error("the when phase trains video timing; gen 1 (Qwen-VL) has no video input")
    stage = S.get(a.stage)
    try:
        stage = replace(stage, **dict(parse_set(stage, text) for text in a.set))
    except ValueError as e:
        ap.error(f"--set: {e}")
    from qvl.train import tiny
    from qvl.train.dpo import read_jsonl
    from qvl.train.loop import train

    tokenizer = a.tokenizer
    if a.init is None:
        tokenizer = str(tiny.build_tokenizers(tokenizer or Path(a.out) / "tokenizer"))
    records = read_jsonl(a.records) if a.records else None
    summary = train(stage, a.generation, a.out, a.samples, init=a.init, tokenizer=tokenizer, resume=a.resume,
                    device=a.device, batch_size=a.batch_size, lr=a.lr, workers=a.workers, seed=a.seed,
                    fsdp=a.fsdp, stop_after=a.stop_after, records=records, quiet=a.quiet)
    if not a.quiet:
        print(json.dumps(summary))
    return 0


PROBE_TASKS = ("color", "shape", "count", "ground")
TEXT_PROBE_TASKS = ("color", "shape", "count", "ground", "ocr")  # the text phases: the scene given as text

# Gen 2 and gen 2.5 have the same tiny decoder and tokenizer (qvl.train.tiny), so in a recipe that trains both
# they share one LM stand-in, as Qwen2-VL and Qwen2.5-VL each start from their own release of the same LLM
# family: the ablation between them then differs only in the vision side and the positions, and the second
# one does not pay for the text phases again.
SHARED_LM = {"2": "2.5"}


def shared_lm(generation: str, work: Path) -> Path | None:
    """The finished LM stand-in (its last text phase's directory) that gen `generation` takes from the
    generation it shares the LM with, or None (none shared, or that one's text phases have not finished)."""
    last = [n for n in S.ORDER if S.get(n).source == "drills"][-1]
    donor = work / f"gen{SHARED_LM.get(generation, '-')}" / last
    return donor if (donor / "summary.json").exists() else None


def probe(stage_dir: Path, generation: str, n: int, device=None) -> dict:
    """A small held-out check after a stage (PROBE_TASKS, n each) -> {task: score}, kept in
    STAGE/probe.json: where along the recipe the model starts to use the image. After each text phase the same
    questions come with the scene written as text (TEXT_PROBE_TASKS): whether the LM stand-in can look
    an object up and copy its box or word before any image is involved."""
    from qvl import eval as E
    from qvl.train.loop import model_dir_of

    path = stage_dir / "probe.json"
    if path.exists():
        return json.loads(path.read_text())
    if S.get(stage_dir.name).source == "drills":  # the decoder alone: can it look up and copy from text?
        tasks, transform = TEXT_PROBE_TASKS, lambda s: S.drill(s, s.seed)
    else:
        tasks, transform = PROBE_TASKS, None
    results = E.evaluate_dir(model_dir_of(stage_dir), n, tasks=tasks, device=device, transform=transform)[0]
    scores = {t: round(float(r["score"]), 4) for t, r in results.items()}
    path.write_text(json.dumps(scores) + "\n")
    print(f"gen {generation} after {stage_dir.name}: " + ", ".join(f"{t} {v:.2f}" for t, v in scores.items()),
          flush=True)
    return scores


def run_recipe(generation: str, out: Path, work: Path, scale: float = 1.0, device=None, workers=None,
               eval_n: int = 200, dpo_eval_n: int = 50, seed: int = 0, fsdp: bool = False,
               probe_n: int = 32, decoder: dict | None = None, stage_overrides: dict | None = None,
               budgets: dict | None = None) -> dict:
    """All stages for one generation -> OUT/qvl-tiny-{generation}; returns a report dict.
    `decoder` overrides tiny.DECODER for the fresh model; `stage_overrides` = {stage name: {Stage field: value}};
    `budgets` = {stage name: samples} over stages.BUDGETS (all recorded in the report, so a variant of the recipe
    says what it changed). A stage whose budget is 0 is skipped."""
    import torch.distributed as dist

    from qvl import eval as E
    from qvl.train import dpo, tiny
    from qvl.train.loop import join, model_dir_of, train

    main = not dist.is_initialized() or dist.get_rank() == 0
    tok_dir = tiny.build_tokenizers(work / "tokenizer") if main else work / "tokenizer"
    if dist.is_initialized():
        dist.barrier()
    gdir = work / f"gen{generation}"
    report: dict = {"generation": generation, "stages": {}}
    if decoder or stage_overrides or budgets:
        report["variant"] = {"decoder": decoder or {}, "stages": stage_overrides or {}, "budgets": budgets or {}}
    stage_overrides = stage_overrides or {}
    budget = {k: max(1, int(v * scale)) if v else 0 for k, v in {**S.BUDGETS, **(budgets or {})}.items()}
    # Two chains, as in the papers: the vision stand-in (vision-pretrain) and the LM stand-in (the text
    # phases, from a fresh decoder), joined where stage 1 starts (loop.join); then one chain to the end.
    prev = None  # the last stage of the vision / main chain
    lm = None  # the LM stand-in's last text phase, until the join
    donor = shared_lm(generation, work)
    for name in S.ORDER:
        sdir = gdir / name
        text = S.get(name).source == "drills"
        if not budget[name]:
            report["stages"][name] = {"skipped": "budget 0"}
            continue
        if name == "when" and generation == "1":
            report["stages"][name] = {"skipped": "no video input in gen 1"}
            continue
        if text and donor is not None:
            report["stages"][name] = {"shared_from": str(donor.parent / name)}
            lm = donor
            continue
        records = None
        if name in ("rs-sft", "dpo"):
            rec_file = gdir / ("accepted.jsonl" if name == "rs-sft" else "pairs.jsonl")
            if main and not rec_file.exists():
                import qvl

                if name == "rs-sft":  # the SFT model answers fresh training questions
                    vlm = qvl.load(model_dir_of(prev), device=device)
                    qs = dpo.questions(generation, budget["rejection"], start=S.get("rs-sft").seed_offset)
                    good, bad, stats = dpo.rejection_sample(E.vlm_reply_fn(vlm), qs)
                    dpo.write_jsonl(gdir / "accepted.jsonl", good)
                    dpo.write_jsonl(gdir / "rejected.jsonl", bad)
                    (gdir / "rejection.json").write_text(json.dumps(stats, indent=2) + "\n")
                    print(f"gen {generation} rejection sampling: accepted {stats['accepted']}/{stats['asked']} "
                          f"({100 * stats['acceptance_rate']:.1f} %)", flush=True)
                else:
                    good, bad = dpo.read_jsonl(gdir / "accepted.jsonl"), dpo.read_jsonl(gdir / "rejected.jsonl")
                    dpo.write_jsonl(rec_file, dpo.make_pairs(good, bad, generation, seed))
            if dist.is_initialized():
                dist.barrier()
            records = dpo.read_jsonl(rec_file)
            if name == "rs-sft" and (gdir / "rejection.json").exists():
                report["rejection"] = json.loads((gdir / "rejection.json").read_text())
            if not records:  # nothing accepted / no pairs: the stage has no data, keep the previous model
                report["stages"][name] = {"skipped": "no records"}
                continue
        init = lm if text else prev
        if not text and lm is not None:  # the first stage after the text phases starts from the joined model
            init = sdir / "start"
            if main and not (sdir / "summary.json").exists():
                join(prev, lm, init)
                print(f"gen {generation} {name}: starts from {prev} with the decoder of {lm}", flush=True)
            if dist.is_initialized():
                dist.barrier()
            lm = None
        if (sdir / "summary.json").exists():
            report["stages"][name] = json.loads((sdir / "summary.json").read_text())
        else:
            if name == "dpo" and main and dpo_eval_n:
                report["dpo_before"] = E.evaluate_dir(model_dir_of(prev), dpo_eval_n, device=device)[0]
            stage = replace(S.get(name), **stage_overrides.get(name, {}))
            report["stages"][name] = train(stage, generation, sdir, budget[name], init=init, tokenizer=tok_dir,
                                           resume=True, device=device, workers=workers, seed=seed, fsdp=fsdp,
                                           records=records, decoder=decoder)
        if main and probe_n and S.get(name).lm:
            report["stages"][name]["probe"] = probe(sdir, generation, probe_n, device)
        if text:
            lm = sdir
        else:
            prev = sdir
    if main:
        final = model_dir_of(prev)
        results, cost, _ = E.evaluate_dir(final, eval_n, device=device)
        report["eval"], report["cost"] = results, cost
        if "dpo_before" in report:
            report["dpo_after"] = E.evaluate_dir(final, dpo_eval_n, device=device)[0]
        print(E.format_table(results, cost, f"qvl-tiny gen {generation} after the recipe"), flush=True)
        ship = out / f"qvl-tiny-{generation}"
        if ship.exists():
            shutil.rmtree(ship)
        import torch

        tiny.save_model(tiny.load_model(final), ship, final, dtype=torch.bfloat16)
        (gdir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        # the shipped directory carries its own measurements (transformers ignores extra files)
        shutil.copy(gdir / "report.json", ship / "training_report.json")
    return report


def recipe_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m qvl.train recipe", description="The whole qvl-tiny recipe.")
    ap.add_argument("--generation", default="all", choices=["all", "1", "2", "2.5"])
    ap.add_argument("--out", default="assets/models", help="where the shipped models go")
    ap.add_argument("--work", default="runs/recipe", help="stage checkpoints, logs, curves")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's sample budget")
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--rope-theta", type=float, default=None,
                    help="decoder rotary base (default tiny.DECODER's 10^4; docs/training_log.md session 6)")
    ap.add_argument("--mrope-section", default=None, metavar="T,H,W",
                    help="gens 2 / 2.5: rotary pairs per M-RoPE axis (default the released 1/4 : 3/8 : 3/8, 8,12,12); "
                         "w always takes the lowest frequencies, so a smaller t + h gives the columns faster ones "
                         "(docs/training_log.md session 16)")
    ap.add_argument("--object-curriculum", default=None, metavar="F:N,...",
                    help="stage 2 draws at most N shapes per scene before fraction F of its samples, e.g. 0.25:1,0.5:2")
    ap.add_argument("--position-loss", type=float, default=0.0, metavar="W",
                    help="gens 2 / 2.5: weight of an auxiliary (row, column) read-out of the image tokens in stages 2 "
                         "and 3 and the optional phases (loop.PositionHead; docs/training_log.md session 14); 0 = off")
    ap.add_argument("--position-layer", type=int, default=1, help="decoder layer the --position-loss reads")
    ap.add_argument("--answer-loss", type=float, default=0.0, metavar="W",
                    help="weight of a read-out of each box number (and a 'when' answer's seconds) from the answer's "
                         "states that write it, in the ground and when phases and stage 3 (loop.AnswerBoxHead; "
                         "docs/training_log.md sessions 15, 22); 0 = off")
    ap.add_argument("--answer-layer", type=int, default=5, help="decoder layer the --answer-loss reads")
    ap.add_argument("--count-target", type=float, default=0.0, metavar="W",
                    help="weight of a per-token count target in the dense vision loss (every vision token: how many "
                         "shapes, per colour, per kind its image holds) in vision-pretrain, stage 2 and the ground / "
                         "when phases (loop.DenseHead; docs/training_log.md session 25); 0 = off")
    ap.add_argument("--ground-samples", type=int, default=None, metavar="N",
                    help="run the ground phase (stage 2's set-up, two in three questions grounding, one-shape scenes first) for N "
                         "samples between stage 2 and stage 3; 0 = skip it (docs/training_log.md session 16)")
    ap.add_argument("--when-samples", type=int, default=None, metavar="N",
                    help="gens 2 / 2.5: run the when phase (stage 2's set-up, two in three questions 'when', one-shape "
                         "clips first) for N samples between stage 2 (or ground) and stage 3 (default stages.BUDGETS' "
                         "9 600); 0 = skip it (docs/training_log.md session 22)")
    ap.add_argument("--count-samples", type=int, default=None, metavar="N",
                    help="run the count phase (stage 2's set-up, two in three questions 'how many') for N samples "
                         "after stage 2 (and the ground / when phases), before stage 3; 0 = skip it "
                         "(docs/training_log.md session 26)")
    ap.add_argument("--word-samples", type=int, default=None, metavar="N",
                    help="run the lm-word text phase (copy the quoted word: one shape and one text per scene) for N "
                         "samples between lm-box and lm-pretrain; 0 = skip it (docs/training_log.md session 18)")
    _common(ap)
    a = ap.parse_args(argv)
    from qvl.train import tiny

    if a.count_target < 0:
        ap.error(f"--count-target must be >= 0, got {a.count_target}")
    for flag in ("position", "answer"):
        if getattr(a, f"{flag}_loss") < 0:
            ap.error(f"--{flag}-loss must be >= 0, got {getattr(a, f'{flag}_loss')}")
        if not 0 <= getattr(a, f"{flag}_layer") < tiny.DECODER["layers"]:
            ap.error(f"--{flag}-layer must be in 0-{tiny.DECODER['layers'] - 1}, got {getattr(a, f'{flag}_layer')}")
    optional = {"ground": a.ground_samples, "when": a.when_samples, "count": a.count_samples,
                "lm-word": a.word_samples}  # phase -> --*-samples
    for name, n in optional.items():
        if n is not None and n < 0:
            ap.error(f"--{name.removeprefix('lm-')}-samples must be >= 0, got {n}")
    if a.rope_theta is not None and not a.rope_theta > 1:
        ap.error(f"--rope-theta must be > 1 (the rotary base), got {a.rope_theta}")
    decoder = {"rope_theta": a.rope_theta} if a.rope_theta else {}
    if a.mrope_section:
        half = tiny.DECODER["hidden"] // tiny.DECODER["heads"] // 2
        try:
            section = [int(x) for x in a.mrope_section.split(",")]
        except ValueError:
            section = []
        if len(section) != 3 or min(section) < 1 or sum(section) != half:
            ap.error(f"--mrope-section: expected three positive integers T,H,W summing to {half} (the decoder's "
                     f"rotary pairs), got {a.mrope_section!r}")
        decoder["mrope_section"] = section  # gen 1 has no M-RoPE and ignores it
    decoder = decoder or None
    overrides = {}
    if a.object_curriculum:
        try:
            overrides = {"stage2": {"curriculum": parse_curriculum(a.object_curriculum)}}
        except ValueError as e:
            ap.error(f"--object-curriculum: {e}")
    gens = ["2.5", "2", "1"] if a.generation == "all" else [a.generation]

    def for_generation(g: str) -> dict | None:
        """The overrides for one generation: the position loss needs M-RoPE grid ids, so not gen 1; the answer
        read-out starts in the ground phase, once stage 2 has put the positions into the image tokens."""
        out = {k: dict(v) for k, v in overrides.items()}
        if a.position_loss and g != "1":
            for s in ("stage2", "ground", "when", "count", "stage3"):
                out.setdefault(s, {}).update(position_weight=a.position_loss, position_layer=a.position_layer)
        if a.count_target:
            for s in (n for n in S.ORDER if S.get(n).dense):  # the count target is part of the dense loss
                out.setdefault(s, {}).update(count_weight=a.count_target)
        if a.answer_loss:
            for s in ("ground", "when", "stage3"):
                out.setdefault(s, {}).update(answer_weight=a.answer_loss, answer_layer=a.answer_layer)
        return out or None

    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    for g in gens:
        run_recipe(g, out, work, a.scale, a.device, a.workers, a.eval_n, dpo_eval_n=min(50, a.eval_n), seed=a.seed,
                   fsdp=a.fsdp, probe_n=min(32, a.eval_n), decoder=decoder, stage_overrides=for_generation(g),
                   budgets={k: v for k, v in optional.items() if v is not None} or None)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "recipe":
        return recipe_main(argv[1:])
    return stage_main(argv)


if __name__ == "__main__":
    sys.exit(main())
