"""The sections of gpu_check after the step rows: end to end (c) through the fast pipelines and tar shards beside
the step that ran it; the HOG-target step and the target alone beside the pixel step; the batched fractal renderer
(d); the training probe (e): plain MAE and the curriculum on the same images, losses and wall-time ratio beside the
planned FLOPs ratio. And the JPEG folder made when no --data is given."""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.fractal_speed import rate
from benchmarks.gpu.plan import Plan
from benchmarks.gpu.report import Report, free_memory
from benchmarks.gpu.steps import OurModel, StepBench
from benchmarks.study.config import NO_MONITORS
from benchmarks.study.runs import planned_stages, train_flops
from benchmarks.throughput import count_params, end_to_end, time_calls, time_step
from mae_et.data.folder import scan_image_folder
from mae_et.data.fractal import FractalDataset, render_fractal_batch
from mae_et.data.shards import write_shards
from mae_et.data.sources import data_dir, open_source
from mae_et.run.run import fresh_accelerate_state
from mae_et.train.pretrain import pretrain
from mae_et.train.step import TrainStep, build_training


def best_step(report: Report, ours: OurModel, size: int) -> tuple[TrainStep, dict | None]:
    """The fastest of our measured steps at this B (compiled when that row ran)."""
    rows = [
        r
        for r in report.data["step"]
        if r["impl"] == "ours" and r["model"] == ours.size and r["batch"] == ours.batch and r["size"] == size
    ]
    best = max(rows, key=lambda r: r["img_s"], default=None)
    if best is not None and best["compile"] != "none" and ours.compiled is not None:
        return ours.compiled, best
    return ours.eager, next((r for r in rows if r["compile"] == "none"), None)


def end_to_end_rows(report: Report, plan: Plan, bench: StepBench, data_root: Path) -> None:
    ours = bench.ours.get(0)
    if ours is None:
        report.skip("e2e", "all", "the main model's step rows did not run")
        return
    reserve = plan.reserve_s["hog"] + plan.reserve_s["fractal"] + plan.reserve_s["probe"]
    # the shard source: the same images written as tar shards here, read by the loader's workers
    folder = data_root / "train" if (data_root / "train").is_dir() else data_root
    shard_dir = Path(tempfile.mkdtemp(prefix="gpu_check_shards_"))
    write_shards(folder, shard_dir / "set", shard_size=500)
    sources = {
        "memory": [f"data.root={data_root}", "data.pipeline=memory"],
        "device_decode": [f"data.root={data_root}", "data.pipeline=device_decode"],
        "shards": [f"data.root={shard_dir / 'set'}", "data.source=shards", "data.pipeline=loader",
                   f"data.shard_cache={shard_dir / 'cache'}", "tracking.knn_every_epochs=0"],
    }  # fmt: skip
    for pipeline, data_overrides in sources.items():
        cfg = plan.row_config(
            *data_overrides, f"data.num_workers={plan.num_workers}", model=ours.size, batch=ours.batch
        )
        if report.fits("e2e", pipeline, plan.reserve_s["e2e"] / 3, reserve):
            with report.guard("e2e", pipeline, report.left() - reserve):
                e2e_pipeline(report, plan, cfg, ours, bench.device)
            free_memory()


def e2e_pipeline(report: Report, plan: Plan, cfg, ours: OurModel, device: torch.device) -> None:
    """Real JPEGs through cfg.data.pipeline (or the shard source) into our fastest step at each B: img/s, data-wait
    share, x the step."""
    name = "shards" if cfg.data.source == "shards" else cfg.data.pipeline
    t0 = time.perf_counter()
    data = open_source(
        cfg.data, cfg.train.seed, main=True, device=device
    )  # memory: every image decoded once, here (open_s)
    open_s = time.perf_counter() - t0
    for size in plan.e2e_sizes:
        step, step_row = best_step(report, ours, size)
        img_s, wait = end_to_end(cfg, data, step, size, plan.e2e_steps, plan.warmup, device)
        step_img_s = step_row["img_s"] if step_row else None
        report.add(
            "e2e",
            {
                "pipeline": name,
                "model": ours.size,
                "batch": ours.batch,
                "size": size,
                "compile": step.compile_mode,
                "img_s": img_s,
                "data_wait": wait,
                "open_s": open_s,
                "num_images": data.num_images,
                "num_workers": cfg.data.num_workers,
                "step_img_s": step_img_s,
                "fraction_of_step": img_s / step_img_s if step_img_s else None,
            },
        )
        print(
            f"e2e {name} B={size} ({step.compile_mode}): {img_s:,.0f} img/s, {100 * wait:.0f}% data wait"
            + (f", {100 * img_s / step_img_s:.0f}% of the step" if step_img_s else ""),
            flush=True,
        )


def hog_rows(report: Report, plan: Plan, bench: StepBench) -> None:
    """The HOG-target step (impl ours_hog, a model of its own: its head predicts HOG) beside section a's pixel step
    at the same B, and the HOG target alone on a (batch, 3, B, B) float batch: its share of the HOG step."""
    model_size, batch, _ = plan.models[0]
    cfg = bench.cfg_for(model_size, batch, hog=True)
    pixel = {
        r["size"]: r
        for r in report.data["step"]
        if r["impl"] == "ours" and r["compile"] == "none" and (r["model"], r["batch"]) == (model_size, batch)
    }
    reserve = plan.reserve_s["fractal"] + plan.reserve_s["probe"]
    step = None
    for size in plan.hog_sizes:
        item = f"ours_hog {model_size} b{batch} B={size} eager"
        if not report.fits("hog", item, 2 * bench.estimate_s(model_size, batch, size, cfg, step is None), reserve):
            continue
        with report.guard("hog", item, report.left() - reserve):
            if step is None:
                _, _, step = build_training(cfg, bench.accelerator, 1e-4, tuple(plan.hog_sizes), compile_mode="none")
            timing = time_step(step, cfg, size, plan.steps, plan.warmup, bench.device)
            row = bench.record("ours_hog", model_size, batch, size, "none", timing, cfg, count_params(step.model))
            hog = bench.accelerator.unwrap_model(step.model).hog
            pixels = torch.randn(batch, 3, size, size, device=bench.device)  # (n, 3, B, B): what the loss sees
            target = time_calls(lambda: hog(pixels), plan.steps, plan.warmup, bench.device)
            entry = {
                "model": model_size,
                "batch": batch,
                "size": size,
                "hog_step_ms": row["step_ms"],
                "hog_target_ms": 1000 * target.seconds_per_step,
                "target_share": target.seconds_per_step / timing.seconds_per_step,
                "pixel_step_ms": pixel[size]["step_ms"] if size in pixel else None,
            }
            entry["hog_over_pixel_step"] = (
                entry["hog_step_ms"] / entry["pixel_step_ms"] if entry["pixel_step_ms"] else None
            )
            report.add("hog", entry)
            print(
                f"hog B={size}: target {entry['hog_target_ms']:.2f} ms = {100 * entry['target_share']:.1f}% of the HOG "
                f"step ({entry['hog_step_ms']:.1f} ms)",
                flush=True,
            )
    step = None  # the HOG model's memory back before the next section
    free_memory()


def fractal_rows(report: Report, plan: Plan, device: torch.device) -> None:
    for size in plan.fractal_sizes:
        if not report.fits("fractal", f"B={size}", 2 * plan.fractal_seconds + 1, plan.reserve_s["probe"]):
            continue
        with report.guard("fractal", f"B={size}", report.left() - plan.reserve_s["probe"]):
            data = FractalDataset(10, 1000, size, seed=0)
            systems = [data.system(i % 10) for i in range(plan.fractal_batch)]
            counter = itertools.count()
            img_s = rate(
                lambda: render_fractal_batch(systems, [next(counter) for _ in systems], size, device=device),
                plan.fractal_batch,
                plan.fractal_seconds,
                device,
            )  # one warm-up call, then timed calls
            report.add("fractal", {"size": size, "batch": plan.fractal_batch, "device": device.type, "img_s": img_s})
            print(f"fractal B={size} batch {plan.fractal_batch} on {device.type}: {img_s:,.0f} img/s", flush=True)


def probe_config(plan: Plan, data_root: Path, out: Path, name: str, schedule: str):
    """One probe run: the plan's recipe on the data through the memory pipeline, eager, no monitor or checkpoint."""
    return plan.row_config(
        f"data.root={data_root}",
        "data.pipeline=memory",
        f"data.num_workers={plan.num_workers}",
        f"train.batch_size={plan.probe_batch}",
        f"train.epochs={plan.probe_epochs}",
        "train.accum_steps=1",
        f"optim.warmup_epochs={plan.probe_epochs / 4}",
        "train.compile=none",
        f"curriculum.schedule={schedule}",
        f"output_dir={out}",
        f"name={name}",
        "tracking.wandb=off",
        *NO_MONITORS,
        "checkpoint.resume=false",
        f"checkpoint.every_steps={10**9}",
        "checkpoint.keep_last=1",
        "train.max_steps=null",
    )


def planned_flops_ratio(cfg) -> float:
    """FLOPs of the run's curriculum over the same steps at full size (what the wall ratio should approach)."""
    images = len(scan_image_folder(data_dir(cfg.data)).samples)
    stages = planned_stages(cfg, images // cfg.train.batch_size)
    return train_flops(cfg, stages) / train_flops(cfg, [(cfg.data.crop_size, sum(n for _, n in stages))])


def probe_run(plan: Plan, data_root: Path, tmp: Path, name: str, schedule: str) -> dict:
    cfg = probe_config(plan, data_root, tmp, name, schedule)
    steps_per_epoch = len(scan_image_folder(data_dir(cfg.data)).samples) // cfg.train.batch_size
    cfg.train.log_every = max(1, round(plan.probe_epochs * steps_per_epoch / 10))  # about ten points per curve
    fresh_accelerate_state()
    result = pretrain(cfg)
    fresh_accelerate_state()
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = lines[-1]
    train_s = last["elapsed_s"] - last["overhead_s"]  # the loop, less the final checkpoint's bookkeeping
    return {
        "schedule": schedule,
        "steps": result.step,
        "images": result.step * cfg.train.batch_size,
        "model": cfg.model.size,
        "batch": cfg.train.batch_size,
        "compile": cfg.train.compile,
        "train_s": train_s,
        "img_s": result.step * cfg.train.batch_size / train_s,
        "first_loss": lines[0]["loss"],
        "last_loss": last["loss"],
        "loss_falling": last["loss"] < lines[0]["loss"],
        "curve": [{"step": x["step"], "size": x["size"], "loss": x["loss"]} for x in lines],
        "planned_flops_ratio": planned_flops_ratio(cfg),
    }


def probe(report: Report, plan: Plan, data_root: Path) -> None:
    if not report.fits("probe", "baseline + et", plan.reserve_s["probe"]):
        return
    runs = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_probe_") as tmp:
        for name, schedule in (("baseline", "none"), ("et", "et")):
            with report.guard("probe", name):
                runs[name] = r = probe_run(plan, data_root, Path(tmp), f"probe_{name}", schedule)
                print(
                    f"probe {name}: {r['steps']} steps, {r['train_s']:.1f} s, loss {r['first_loss']:.4f} -> "
                    f"{r['last_loss']:.4f}",
                    flush=True,
                )
            fresh_accelerate_state()
            free_memory()
    entry = {"runs": runs}
    if len(runs) == 2:
        entry["wall_ratio"] = runs["et"]["train_s"] / runs["baseline"]["train_s"]
        entry["planned_flops_ratio"] = runs["et"]["planned_flops_ratio"]
        print(
            f"probe: et / baseline wall time {entry['wall_ratio']:.3f} (FLOPs ratio {entry['planned_flops_ratio']:.3f})"
        )
    report.add("probe", entry)


def make_jpeg_folder(root: Path, per_class: int, side: int = 224) -> Path:
    """An ImageFolder of smooth random JPEGs (2 classes under train/), made on the spot."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for label in range(2):
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = torch.randint(0, 256, (3, 8, 8), generator=gen, dtype=torch.uint8)  # (3, 8, 8)
            big = torch.nn.functional.interpolate(low[None].float(), size=(side, side), mode="bilinear")[0]  # (3, s, s)
            pixels = big.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # (s, s, 3)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root
