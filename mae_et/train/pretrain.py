"""The pretraining loop: MAE with (or without) the EfficientTrain frequency curriculum.

config -> image source (uint8 crops) -> the step (low-frequency crop to this step's B, MAE, fused AdamW) ->
tracker / checkpoint (`mae_et.run.run`). Every random choice is a pure function of (seed, step, micro-step, rank),
so a resumed run ends with the weights of an uninterrupted one; the host reads the device counters only at log and
checkpoint steps (docs/design.md, "The pretraining loop").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from mae_et.curriculum.schedules import relative_compute
from mae_et.data.folder import PretrainBatch
from mae_et.data.sources import open_source
from mae_et.models.mae import MaskedAutoencoderViT
from mae_et.models.start import StartPointError, load_start_point
from mae_et.run.plan import RunPlan, plan_run, set_lr, steps_every
from mae_et.run.run import Run
from mae_et.run.tracking import RunTracker
from mae_et.seeding import Family, mix64
from mae_et.train.config import PretrainConfig, curriculum_stages
from mae_et.train.monitors import (
    HEADLINE_KNN,
    knn_held_out_count,
    log_reconstructions,
    reconstruction_figure_path,
    run_knn_monitor,
    standard_error,
)
from mae_et.train.step import MicroStepResult, build_training


@dataclass
class PretrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    checkpoint: Path | None  # the last checkpoint written or resumed from
    last_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Schedule(RunPlan):
    """The run's plan in optimizer steps (`mae_et.run.plan`) and when the monitors are due."""

    recon_every: int | None = None
    knn_every: int | None = None


def plan_pretraining(cfg: PretrainConfig, num_images: int, world: int) -> Schedule:
    stages, budget = curriculum_stages(cfg)
    base = plan_run(cfg.plan_spec(), num_images, world, stages, budget, cfg.data.crop_size)
    t = cfg.tracking

    def every(epochs: float) -> int | None:
        return steps_every(epochs, base.steps_per_epoch) if epochs > 0 else None

    return Schedule(**vars(base), recon_every=every(t.recon_every_epochs), knn_every=every(t.knn_every_epochs))


class LoopCounters:
    """The loop's running numbers: the step's stay on the device until a log or checkpoint step (window loss,
    skipped updates, their streak and its longest since the last check); unreadable files by name (counted once)."""

    def __init__(self, device: torch.device, found) -> None:
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        self.window_loss, self.window_finite, self.grad_norm = zero(), zero(), zero()
        self.nonfinite, self.streak, self.longest_streak = zero(), zero(), zero()
        state = found.training_state if found is not None else {}
        self.nonfinite_before = int(state.get("counters", {}).get("nonfinite_skipped", 0))
        self.known_bad: set[str] = set(state.get("bad_files", []))  # every rank, every earlier launch
        self.bad_here: set[str] = set()  # this rank, this launch
        self.window_start, self.window_wait, self.window_steps = time.perf_counter(), 0.0, 0

    def next_batch(self, batches: Iterator[PretrainBatch]) -> PretrainBatch:
        t0 = time.perf_counter()
        batch = next(batches)
        self.window_wait += time.perf_counter() - t0
        self.bad_here.update(batch.bad_files)
        return batch

    def add(self, result: MicroStepResult) -> None:
        if result.nonfinite is not None:  # an optimizer-step boundary
            self.grad_norm = result.grad_norm
            self.nonfinite += result.nonfinite
            self.streak = torch.where(result.nonfinite, self.streak + 1, torch.zeros_like(self.streak))
            self.longest_streak = torch.maximum(self.longest_streak, self.streak)
        finite = torch.isfinite(result.loss)
        self.window_loss += torch.where(finite, result.loss, torch.zeros_like(result.loss))
        self.window_finite += finite

    def end_step(self) -> None:
        self.window_steps += 1

    def skipped_updates(self) -> int:
        return self.nonfinite_before + int(self.nonfinite.item())

    def distinct_bad_files(self) -> set[str]:
        """A collective: every rank calls it at the same step."""
        self.known_bad |= set(gather_object(sorted(self.bad_here)))
        return self.known_bad

    def read_window(self, accelerator: Accelerator, global_batch: int) -> dict[str, float]:
        """Loss, speed and data wait of the window since the last log step; starts the next window."""
        now = time.perf_counter()
        finite = accelerator.reduce(self.window_finite, "sum")
        # a window in which no loss was finite has no mean: NaN (metrics.jsonl writes null), not 0.0
        loss = torch.where(finite > 0, accelerator.reduce(self.window_loss, "sum") / finite.clamp(min=1), float("nan"))
        out = {
            "loss": loss.item(),
            "grad_norm": float(self.grad_norm),
            "images_per_sec": self.window_steps * global_batch / (now - self.window_start),
            "data_wait_frac": self.window_wait / (now - self.window_start),
        }
        self.window_loss.zero_()
        self.window_finite.zero_()
        self.window_start, self.window_wait, self.window_steps = time.perf_counter(), 0.0, 0
        return out

    def streak_since_last_check(self) -> int:
        longest = int(self.longest_streak.item())
        self.longest_streak.copy_(self.streak)
        return longest


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    with Run(cfg.run_spec()) as run:  # the run folder is this process's until the block ends (mae_et.run.run)
        return train_loop(cfg, run)


def train_loop(cfg: PretrainConfig, run: Run) -> PretrainResult:
    set_seed(cfg.train.seed, deterministic=cfg.train.deterministic)
    data = open_source(cfg.data, cfg.train.seed, run.main, run.device)  # the source the config names
    sched = plan_pretraining(cfg, data.num_images, run.world)
    sizes = tuple(sorted({s.size for s in sched.plan.stages}))  # one compiled graph per curriculum size
    model, optimizer, train_step = build_training(cfg, run.accelerator, sched.base_lr, sizes)
    raw_model: MaskedAutoencoderViT = run.accelerator.unwrap_model(model)
    start = (lambda model: start_from(cfg, model, run)) if cfg.model.init else None  # continued pretraining
    found = run.resume(raw_model, optimizer, start)
    step = int(found.training_state["step"]) if found is not None else 0
    if found is not None:
        torch.set_rng_state(found.training_state["rng"]["torch_cpu"])
    counters = LoopCounters(run.device, found)
    if run.main:
        describe_run(cfg, sched, data.num_images, len(data.skipped), run.world, run.say)
    untrained = untrained_knn(found, raw_model, cfg, sched, run)  # the floor every later kNN stands beside
    held_out = knn_held_out_count(cfg) if sched.knn_every is not None else 0

    accum, patch, last_metrics = cfg.train.accum_steps, cfg.model.patch_size, {}
    batches = data.batches(
        run.rank,
        run.world,
        cfg.train.batch_size,
        start_micro_step=step * accum,
        num_micro_steps=max(0, sched.end_step - step) * accum,
        # data.decode_size=stage: the loader crops each micro-step straight to its stage's B
        size_at=(lambda m: sched.plan.stage_at_step(m // accum).size) if cfg.data.decode_size == "stage" else None,
    )
    run.clock.start()
    bar = run.progress(sched.end_step, step, f"pretrain {cfg.name}")
    model.train()
    while step < sched.end_step:
        run.check_interrupt()
        stage = sched.plan.stage_at_step(step)
        set_lr(optimizer, sched.lr(step))
        for micro in range(accum):
            batch = counters.next_batch(batches)
            noise = mask_noise(
                cfg.train.seed, step, micro, run.rank, (len(batch.images), (stage.size // patch) ** 2), run.device
            )  # (n, L)
            counters.add(train_step(batch.images.to(run.device, non_blocking=True), stage.size, noise))
        step += 1
        counters.end_step()
        bar.update(1)
        knn = {}
        if sched.due(step, sched.knn_every):
            with run.clock.overhead():
                knn = run_knn_monitor(raw_model, cfg, run.accelerator)
        if sched.due(step, sched.log_every) or knn:
            last_metrics = {
                **counters.read_window(run.accelerator, sched.global_batch),
                **step_metrics(sched, step, stage),
                "nonfinite_skipped": counters.skipped_updates(),
                "data_skipped_files": len(data.skipped) + len(counters.distinct_bad_files()),
                **run.clock.read(),
                **knn,
                **({f"untrained_{k}": v for k, v in untrained.items()} if knn else {}),
            }
            run.log(step, last_metrics, format_log_line(step, sched.end_step, last_metrics))
            if knn:
                run.say(f"step {step}: kNN top-1 {knn_line(knn, untrained, held_out)}")
        if sched.due(step, sched.log_every) or knn or sched.checkpoint_due(step):
            streak = counters.streak_since_last_check()  # checked before any checkpoint of skipped updates
            if streak >= cfg.train.max_consecutive_nonfinite:
                run.stop_nonfinite(
                    f"stopped at step {step}: {streak} non-finite losses in a row (limit "
                    f"train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite}); those updates "
                    "were skipped",
                    "Lower optim.blr, set optim.clip_grad, or use train.precision=bf16/fp32.",
                )
        if sched.due(step, sched.recon_every):
            with run.clock.overhead():
                log_reconstructions(
                    raw_model, data.dataset, cfg, stage.size, run.run_dir, run.tracker, step, run.device, run.main
                )
        if sched.checkpoint_due(step):
            state, meta = checkpoint_contents(cfg, sched, step, stage, optimizer, counters, run, raw_model, untrained)
            run.checkpoint(step, model, state, meta)
    run.close()
    if run.main:
        final_knn = {k: v for k, v in last_metrics.items() if k.startswith("knn_top1_")}  # the end step's monitor
        if final_knn:
            run.say(headline_line(final_knn, untrained, held_out))
        figure = reconstruction_figure_path(run.run_dir, step)  # the loop's figure of the end step, when it drew one
        figure = figure if sched.recon_every is not None and figure.is_file() else None
        say_where(run.run_dir, run.last_checkpoint, run.tracker, step, sched.plan.total_steps, run.say, figure)
    return PretrainResult(run_dir=run.run_dir, step=step, checkpoint=run.last_checkpoint, last_metrics=last_metrics)


# ----------------------------------------------------------------------------- the loop's pieces


def start_from(cfg: PretrainConfig, raw_model: MaskedAutoencoderViT, run: Run) -> dict[str, Any]:
    """A fresh run's start point (model.init) into the model, checked against model.init_sha256 when given; its
    hash is returned for the run to record as model.init_sha256."""
    start = load_start_point(raw_model, cfg.model.init)
    if cfg.model.init_sha256 not in (None, start.sha256):
        raise StartPointError(
            f"model.init '{cfg.model.init}': {start.weights_file} has sha256 {start.sha256}, not the "
            f"model.init_sha256 {cfg.model.init_sha256} given; pass the weights that hash names, or drop the key"
        )
    run.say(
        f"starting from {start.kind} weights {start.weights_file} (sha256 {start.sha256[:16]}...)"
        + ("" if start.decoder else "; it holds the encoder only: the decoder starts fresh")
    )
    return {"model": {"init_sha256": start.sha256}}


def untrained_knn(
    found, raw_model: MaskedAutoencoderViT, cfg: PretrainConfig, sched: Schedule, run: Run
) -> dict[str, float]:
    """With the kNN monitor on, the kNN of the encoder before any update (measured at step 0, or read from the
    checkpoint): a random-init ViT scores far above chance, so every later kNN stands beside it."""
    if sched.knn_every is None:
        return {}
    if found is not None:
        return dict(found.training_state.get("knn_untrained") or {})
    untrained = run_knn_monitor(raw_model, cfg, run.accelerator)  # before the loop's clocks start: not training time
    run.say(f"step 0 (untrained encoder): kNN top-1 {knn_line(untrained, {}, knn_held_out_count(cfg))}")
    return untrained


def knn_line(knn: dict[str, float], untrained: dict[str, float], held_out: int) -> str:
    """'mean 57.5% (untrained 38.0%), cls 53.5% (...); 1000 held-out images, standard error up to 1.6 points'."""
    headline_first = sorted(knn, key=lambda k: k != HEADLINE_KNN)
    accuracies = ", ".join(_beside_untrained(k, knn[k], untrained) for k in headline_first)
    worst = max((standard_error(v, held_out) for v in knn.values()), default=0.0)
    return f"{accuracies}; {held_out} held-out images, standard error up to {worst:.1f} points"


def _beside_untrained(key: str, top1: float, untrained: dict[str, float]) -> str:
    """'mean 57.5% (untrained 38.0%)' for the key 'knn_top1_mean'."""
    return f"{key[9:]} {top1:.1f}%" + (f" (untrained {untrained[key]:.1f}%)" if key in untrained else "")


def format_log_line(step: int, end_step: int, m: dict[str, Any]) -> str:
    return (
        f"step {step}/{end_step}  epoch {m['epoch']:.2f}  B {m['size']}  loss {m['loss']:.4f}  lr {m['lr']:.3g}  "
        f"{m['images_per_sec']:.0f} img/s  data-wait {100 * m['data_wait_frac']:.0f}%"
    )


def step_metrics(sched: Schedule, step: int, stage) -> dict[str, Any]:
    plan = sched.plan
    return {
        "lr": sched.lr(step - 1),
        "size": stage.size,
        "stage": stage.index,
        "epoch": plan.epoch_at_step(step),
        "progress": plan.progress_at_step(step) if step < plan.total_steps else 1.0,
    }


def checkpoint_contents(
    cfg,
    sched: Schedule,
    step: int,
    stage,
    optimizer,
    counters: LoopCounters,
    run: Run,
    raw_model: torch.nn.Module,
    untrained: dict[str, float],
):
    """(training_state, meta) of a checkpoint at `step`; the run adds its clocks to the state."""
    accelerator = run.accelerator
    state = {
        "optimizer": optimizer.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "step": step,
        "counters": {"nonfinite_skipped": counters.skipped_updates()},
        "bad_files": sorted(counters.distinct_bad_files()),  # names: distinct over ranks and launches
        # all training randomness derives from (seed, step, micro-step, rank); the global state is kept for completeness
        "rng": {"seed": cfg.train.seed, "torch_cpu": torch.get_rng_state()},
        "knn_untrained": untrained,
    }
    plan = sched.plan
    meta = {
        "step": step,
        "total_steps": plan.total_steps,
        "epoch": plan.epoch_at_step(step),
        "stage": stage.index,
        "size": stage.size,
        "progress": plan.progress_at_step(min(step, plan.total_steps)),
        "world_size": run.world,
        "global_batch": sched.global_batch,
        "complete": step >= plan.total_steps,
    }
    if step == sched.end_step:
        meta["rank_weight_checksums"] = rank_weight_checksums(raw_model, accelerator)
    return state, meta


def mask_noise(
    seed: int, step: int, micro: int, rank: int, shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """(N, L) uniform noise deciding the mask (lowest kept), a pure function of its position."""
    gen = torch.Generator(device=device)
    # a hash, not a linear formula: seed*K + step*M + micro*R + rank repeats as soon as rank >= R
    gen.manual_seed(mix64(Family.MASK, seed, step, micro, rank))
    return torch.rand(shape, generator=gen, device=device)


# ----------------------------------------------------------------------------- the run


def rank_weight_checksums(model: torch.nn.Module, accelerator: Accelerator) -> list[float]:
    """One checksum of the weights per rank: DDP ranks must agree exactly."""
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for i, p in enumerate(model.parameters()):
            total += (p.double() * (1.0 + (i % 7) * 0.01)).sum()  # position-weighted, so a swap shows
    return [float(x) for x in accelerator.gather(total.reshape(1)).cpu()]


def describe_run(cfg: PretrainConfig, sched: Schedule, n_images: int, n_skipped: int, world: int, say) -> None:
    plan = sched.plan  # the curriculum as plan_pretraining resolved it
    say(
        f"run {cfg.name}: {n_images} images ({n_skipped} skipped at scan), {world} process(es), global batch "
        f"{sched.global_batch}, lr {sched.base_lr:.3g}"
    )
    say(
        f"curriculum '{cfg.curriculum.schedule}' ({cfg.curriculum.mode}), budget in {plan.budget}: "
        f"{plan.total_steps} steps, "
        f"relative compute {relative_compute(plan.schedule, plan.budget, plan.full_size):.3f} of {cfg.train.epochs:g} "
        "full-size epochs"
    )
    for s in plan.summary():
        say("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))


def headline_line(knn: dict[str, float], untrained: dict[str, float], held_out: int) -> str:
    """The run's result in one line: the headline kNN, its gain over the untrained encoder, the larger standard
    error of the two, then the other poolings."""
    top1 = knn[HEADLINE_KNN]
    before = untrained.get(HEADLINE_KNN)  # absent when resumed from a checkpoint that did not keep it
    se = max(standard_error(a, held_out) for a in (top1, top1 if before is None else before))
    gain = "" if before is None else f", {top1 - before:+.1f} points over the untrained encoder's {before:.1f}%"
    others = ", ".join(_beside_untrained(k, v, untrained) for k, v in knn.items() if k != HEADLINE_KNN)
    return (
        f"kNN top-1 of the {HEADLINE_KNN[9:]}-pooled features {top1:.1f}%{gain}; standard error {se:.1f} points "
        f"({held_out} held-out images)" + (f"; {others}" if others else "")
    )


def say_where(
    run_dir: Path, ckpt: Path | None, tracker: RunTracker, step: int, total: int, say, figure: Path | None = None
) -> None:
    state = "finished" if step >= total else f"stopped at step {step} of {total} (relaunch the same command to resume)"
    say(f"{state}. checkpoint: {ckpt}; metrics: {run_dir / 'metrics.jsonl'}")
    if figure is not None:
        say(f"reconstructions: {figure}")
    if tracker.wandb_dir is not None:
        say(
            f"W&B ({tracker.wandb_mode}) files: {tracker.wandb_dir}"
            + ("  (upload with: wandb sync <that folder>/offline-run-*)" if tracker.wandb_mode == "offline" else "")
        )
