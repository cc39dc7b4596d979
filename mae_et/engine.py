"""The pretraining loop.

Data flows one way: config -> dataset (uint8 crops) -> curriculum (input size B for this step,
low-frequency crop on the device) -> model (patchify, mask, encode, decode, loss) -> optimizer
step under Accelerate -> tracker / checkpoint.

Every random choice is a pure function of (seed, step, micro-step, rank): the data stream
(`StepSampler`), the crops (per-sample seeds) and the mask noise. So resuming needs only the
weights, the optimizer, the scaler and the step, and a resumed run ends with the same weights
as an uninterrupted one.

Inside the step nothing waits on the host: masking is a gather, the optimizer is fused AdamW,
and a non-finite update is skipped on the device (fused AdamW's `found_inf`). The host reads
device values only every `train.log_every` steps and at checkpoints.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch.utils.data import DataLoader, Dataset, Subset

from mae_et import checkpoint as ckpt_lib
from mae_et.config import ConfigError, PretrainConfig, config_to_dict, curriculum_stages, flatten_dict
from mae_et.curriculum import CurriculumPlan, plan_curriculum, relative_compute
from mae_et.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainBatch,
    PretrainDataset,
    build_pretrain_loader,
    mix64,
    normalize_on_device,
    scan_image_folder,
)
from mae_et.frequency import low_frequency_crop
from mae_et.fractal import FractalBatchSource, FractalDataset
from mae_et.gpu_data import DeviceDecodeBatchSource, InMemoryImages, MemoryBatchSource
from mae_et.knn import knn_evaluate, knn_evaluate_loaders
from mae_et.model import MaskedAutoencoderViT, mae_vit
from mae_et.notices import RunWarning
from mae_et.optim import build_adamw, lr_at, scaled_lr, set_lr
from mae_et.step import TrainStep
from mae_et.tracking import RunTracker, resolve_wandb_mode
from mae_et.visualize import reconstruction_grid, save_png

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
RECON_SEED = 1234  # fixed images and masks, so reconstruction grids compare across steps


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is left as it was."""


@dataclass
class PretrainResult:
    run_dir: Path
    step: int  # optimizer steps done
    checkpoint: Path | None  # the last checkpoint written or resumed from
    last_metrics: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- set-up


def build_accelerator(precision: str, accum_steps: int, use_wandb: bool) -> Accelerator:
    cpu = not torch.cuda.is_available()
    if cpu and precision == "fp16":
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    # cpu=True on a machine without CUDA makes `accelerate launch --multi_gpu` start a real gloo
    # process group; without it each rank would silently train alone.
    return Accelerator(
        cpu=cpu,
        mixed_precision=MIXED_PRECISION[precision],
        gradient_accumulation_steps=accum_steps,
        log_with="wandb" if use_wandb else None,
    )


def prepare_run_dir(cfg, accelerator: Accelerator) -> Path:
    """`cfg`: any run config with `run_dir` (pretraining, fine-tuning, linear probe)."""
    # create the run folder and prove it is writable now, not at the first save (main rank writes)
    run_dir = cfg.run_dir
    error = [None]
    if accelerator.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write_probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            error[0] = f"output folder '{run_dir}' is not writable ({type(e).__name__}: {e}); pass output_dir=/a/writable/folder"
    if accelerator.num_processes > 1:
        broadcast_object_list(error)  # every rank fails the same way, none hangs
    if error[0]:
        raise ConfigError(error[0])
    return run_dir


def pretrain_data_dir(cfg: PretrainConfig) -> Path:
    root = Path(cfg.data.root)
    return root / cfg.data.split if cfg.data.split and (root / cfg.data.split).is_dir() else root


def build_model(cfg: PretrainConfig) -> MaskedAutoencoderViT:
    m = cfg.model
    return mae_vit(
        m.size,
        patch_size=m.patch_size,
        img_size=cfg.data.crop_size,
        decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads,
        norm_pix_loss=m.norm_pix_loss,
        pos_embed=m.pos_embed,
    )


@dataclass
class DataSource:
    """The pretraining images as opened: the dataset (also the source of the fixed reconstruction
    images), how many images the stream draws from, and what was skipped while opening."""

    dataset: Dataset  # PretrainDataset or FractalDataset
    num_images: int
    skipped: list
    index: Any = None  # ImageFolderIndex for folder sources
    store: InMemoryImages | None = None  # data.pipeline=memory


def open_data(cfg: PretrainConfig, main: bool, device: torch.device) -> DataSource:
    d = cfg.data
    if d.source == "fractal":
        dataset = FractalDataset(d.fractal_classes, d.fractal_images_per_class, d.crop_size, seed=cfg.train.seed, split="train")
        return DataSource(dataset, len(dataset), [])
    with warnings.catch_warnings():
        if not main:  # scan-time warnings once, from the main rank
            warnings.simplefilter("ignore")
        index = scan_image_folder(pretrain_data_dir(cfg), strict=d.strict)  # a directory listing: no decoding
    dataset = PretrainDataset(index, crop_size=d.crop_size, scale=d.scale, hflip=d.hflip, strict=d.strict)
    if d.pipeline != "memory":
        return DataSource(dataset, len(dataset), list(index.skipped), index=index)
    store_size = d.memory_size or round(d.crop_size * 256 / 224)
    on_device = d.memory_on_device and device.type == "cuda"
    with warnings.catch_warnings():
        if not main:
            warnings.simplefilter("ignore")
        store = InMemoryImages(index, store_size, device if on_device else "cpu", strict=d.strict,
                               num_workers=d.num_workers, pin_memory=device.type == "cuda" and not on_device)
    return DataSource(dataset, len(store), list(index.skipped) + list(store.skipped), index=index, store=store)


def open_batches(cfg: PretrainConfig, data: DataSource, rank: int, world: int, start_micro_step: int,
                 num_micro_steps: int, device: torch.device) -> Iterator[PretrainBatch]:
    """The stream of micro-batches (uint8 crops) of this rank, from `start_micro_step` on."""
    d, batch, seed = cfg.data, cfg.train.batch_size, cfg.train.seed
    stream = dict(start_micro_step=start_micro_step, num_micro_steps=num_micro_steps)
    if isinstance(data.dataset, FractalDataset):
        if device.type == "cuda":  # render batched on the GPU, not in workers
            return FractalBatchSource(data.dataset, batch, rank, world, seed, device, **stream)
    elif d.pipeline == "memory":
        return MemoryBatchSource(data.store, batch, rank, world, seed, d.crop_size, scale=d.scale, hflip=d.hflip,
                                 device=device, **stream)
    elif d.pipeline == "device_decode":
        return DeviceDecodeBatchSource(data.index, batch, rank, world, seed, d.crop_size, device, scale=d.scale,
                                       hflip=d.hflip, strict=d.strict, num_workers=d.num_workers, **stream)
    loader = build_pretrain_loader(data.dataset, micro_batch=batch, rank=rank, world_size=world, seed=seed,
                                   num_workers=d.num_workers, pin_memory=d.pin_memory and device.type == "cuda", **stream)
    return iter(loader)


def distinct_bad_files(accelerator: Accelerator, this_rank: set[str], known: set[str]) -> set[str]:
    """The union of every rank's unreadable files with those known from earlier launches (a collective:
    every rank calls it at the same step)."""
    return known | set(gather_object(sorted(this_rank)))


_TAG_MASK = 201  # a seed family of its own (data.py and fractal.py hold the others)


def mask_noise(seed: int, step: int, micro: int, rank: int, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(N, L) uniform noise deciding the mask (lowest kept), a pure function of its position."""
    gen = torch.Generator(device=device)
    # a hash, not a linear formula: seed*K + step*M + micro*R + rank repeats as soon as rank >= R
    gen.manual_seed(mix64(_TAG_MASK, seed, step, micro, rank))
    return torch.rand(shape, generator=gen, device=device)


class LoopClock:
    """Wall and process CPU seconds of the training loop, and the bookkeeping share of each.

    CPU time is `time.process_time()`: user + system of every thread of this process (not of loader
    worker processes). On a shared machine it moves far less than wall time when other work runs beside
    the job. `overhead()` marks checkpoint writes, reconstruction grids and the kNN monitor; training time
    is the total less that share. Totals carry across resumes through the checkpoint (`state`/`restore`).
    """

    KEYS = ("elapsed_seconds", "cpu_seconds", "overhead_seconds", "overhead_cpu_seconds")

    def __init__(self) -> None:
        self.before = dict.fromkeys(self.KEYS, 0.0)  # totals of earlier launches of this run
        self.overhead_wall = self.overhead_cpu = 0.0  # this launch
        self.wall0 = self.cpu0 = None

    def restore(self, training_state: dict) -> None:
        self.before = {k: float(training_state.get(k, 0.0)) for k in self.KEYS}

    def start(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    @contextmanager
    def overhead(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.overhead_wall += time.perf_counter() - wall
            self.overhead_cpu += time.process_time() - cpu

    def state(self) -> dict[str, float]:
        b = self.before
        return {"elapsed_seconds": b["elapsed_seconds"] + time.perf_counter() - self.wall0,
                "cpu_seconds": b["cpu_seconds"] + time.process_time() - self.cpu0,
                "overhead_seconds": b["overhead_seconds"] + self.overhead_wall,
                "overhead_cpu_seconds": b["overhead_cpu_seconds"] + self.overhead_cpu}

    def read(self) -> dict[str, float]:
        """The metrics.jsonl fields: elapsed_s / cpu_s (the whole loop) and their bookkeeping share."""
        s = self.state()
        return {"elapsed_s": s["elapsed_seconds"], "cpu_s": s["cpu_seconds"],
                "overhead_s": s["overhead_seconds"], "overhead_cpu_s": s["overhead_cpu_seconds"]}


def steps_every(epochs: float, steps_per_epoch: int) -> int:
    return max(1, round(epochs * steps_per_epoch))


# ----------------------------------------------------------------------------- the run


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    wandb_mode = resolve_wandb_mode(cfg.tracking.wandb)
    accelerator = build_accelerator(cfg.train.precision, cfg.train.accum_steps, use_wandb=wandb_mode is not None)
    run_dir = prepare_run_dir(cfg, accelerator)
    main = accelerator.is_main_process
    device = accelerator.device
    set_seed(cfg.train.seed, deterministic=cfg.train.deterministic)
    say = accelerator.print

    # --- data: the image source, sharded by Accelerate's rank and count
    data = open_data(cfg, main, device)
    dataset, skipped_at_open = data.dataset, data.skipped
    world, rank, accum, micro_batch = accelerator.num_processes, accelerator.process_index, cfg.train.accum_steps, cfg.train.batch_size
    global_batch = micro_batch * world * accum
    micro_per_epoch = data.num_images // (micro_batch * world)
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{data.num_images} images make no full optimizer step of global batch {global_batch} "
            f"(train.batch_size x processes x train.accum_steps); lower train.batch_size or train.accum_steps"
        )

    # --- curriculum plan and learning rate
    stages, budget = curriculum_stages(cfg)
    plan: CurriculumPlan = plan_curriculum(stages, budget, cfg.train.epochs, steps_per_epoch, cfg.data.crop_size)
    base_lr = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.blr, global_batch)
    warmup = cfg.optim.warmup_epochs / cfg.train.epochs  # in budget progress
    end_step = min(plan.total_steps, cfg.train.max_steps or plan.total_steps)
    ckpt_every = cfg.checkpoint.every_steps or steps_every(cfg.checkpoint.every_epochs, steps_per_epoch)
    recon_every = steps_every(cfg.tracking.recon_every_epochs, steps_per_epoch) if cfg.tracking.recon_every_epochs > 0 else None
    knn_every = steps_every(cfg.tracking.knn_every_epochs, steps_per_epoch) if cfg.tracking.knn_every_epochs > 0 else None

    # --- model and optimizer
    model = build_model(cfg)
    optimizer = build_adamw(model, base_lr, cfg.optim.weight_decay, cfg.optim.betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model: MaskedAutoencoderViT = accelerator.unwrap_model(model)
    train_step = TrainStep(accelerator, model, optimizer, cfg.model.mask_ratio, cfg.curriculum.mode, cfg.optim.clip_grad,
                           compile_mode=cfg.train.compile, sizes=tuple(sorted({s.size for s in plan.stages})))

    # --- resume
    step, counters = 0, {"nonfinite_skipped": 0}
    # unreadable files met while training, by name, over every rank and every earlier launch of this run:
    # a file met by two ranks, or met again after a resume, counts once
    known_bad_files: set[str] = set()
    # time of the loop so far: wall and process CPU (user + system, every thread of this process), each
    # with the share spent on bookkeeping (checkpoints, reconstruction grids, the kNN monitor) beside it,
    # so a study can read training time alone; carried across resumes by the checkpoint
    clock = LoopClock()
    found = resume_latest(cfg, run_dir, raw_model, optimizer, accelerator)
    resumed_from = found.path if found is not None else None
    if found is not None:
        step = int(found.training_state["step"])
        counters["nonfinite_skipped"] = found.training_state.get("counters", {}).get("nonfinite_skipped", 0)
        known_bad_files = set(found.training_state.get("bad_files", []))
        clock.restore(found.training_state)
        torch.set_rng_state(found.training_state["rng"]["torch_cpu"])
    tracker, config_yaml = start_tracking(cfg, accelerator, run_dir, wandb_mode, resume_step=step if found else None)
    if main:
        describe_run(cfg, plan, budget, stages, data.num_images, len(skipped_at_open), global_batch, base_lr, world, say)

    # --- the loop
    batches = open_batches(cfg, data, rank, world, start_micro_step=step * accum,
                           num_micro_steps=max(0, end_step - step) * accum, device=device)
    patch = cfg.model.patch_size
    nonfinite_total = torch.zeros((), device=device)  # device counters: read only at log time
    consecutive = torch.zeros((), device=device)  # the current streak of skipped updates
    longest_streak = torch.zeros((), device=device)  # the longest streak since the last check: a streak that ends
    # between two log steps still stops the run at the next one, without a host sync in the step
    window_loss = torch.zeros((), device=device)
    window_finite = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    bad_files: set[str] = set()
    window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
    clock.start()
    last_metrics: dict[str, Any] = {}
    last_ckpt = resumed_from
    model.train()

    while step < end_step:
        stage = plan.stage_at_step(step)
        lr = lr_at(plan.progress_at_step(step), base_lr, cfg.optim.min_lr, warmup)
        set_lr(optimizer, lr)
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - t0
            bad_files.update(batch.bad_files)
            num_patches = (stage.size // patch) ** 2
            noise = mask_noise(cfg.train.seed, step, micro, rank, (batch.images.shape[0], num_patches), device)  # (n, L)
            result = train_step(batch.images.to(device, non_blocking=True), stage.size, noise)
            if result.nonfinite is not None:
                grad_norm = result.grad_norm
                nonfinite_total += result.nonfinite
                consecutive = torch.where(result.nonfinite, consecutive + 1, torch.zeros_like(consecutive))
                longest_streak = torch.maximum(longest_streak, consecutive)
            finite = torch.isfinite(result.loss)
            window_loss += torch.where(finite, result.loss, torch.zeros_like(result.loss))
            window_finite += finite
        step += 1
        window_steps += 1

        at_end = step == end_step
        knn = {}
        if knn_every and (step % knn_every == 0 or at_end):
            with clock.overhead():
                knn = run_knn_monitor(raw_model, cfg, accelerator)
        if step % cfg.train.log_every == 0 or at_end or knn:
            now = time.perf_counter()
            loss_mean = accelerator.reduce(window_loss, "sum") / accelerator.reduce(window_finite, "sum").clamp(min=1)
            known_bad_files = distinct_bad_files(accelerator, bad_files, known_bad_files)
            last_metrics = {
                "loss": loss_mean.item(),
                "lr": lr,
                "size": stage.size,
                "stage": stage.index,
                "epoch": plan.epoch_at_step(step),
                "progress": plan.progress_at_step(step) if step < plan.total_steps else 1.0,
                "grad_norm": float(grad_norm),
                "images_per_sec": window_steps * global_batch / (now - window_start),
                "data_wait_frac": window_wait / (now - window_start),
                "nonfinite_skipped": counters["nonfinite_skipped"] + int(nonfinite_total.item()),
                "data_skipped_files": len(skipped_at_open) + len(known_bad_files),
                **clock.read(),
                **knn,
            }
            tracker.log(last_metrics, step)
            if main:
                say(format_log_line(step, end_step, last_metrics))
                if knn:
                    say(f"step {step}: kNN top-1 " + ", ".join(f"{k[9:]} {v:.1f}%" for k, v in knn.items()))
            window_loss.zero_(); window_finite.zero_()
            window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0

        if step % cfg.train.log_every == 0 or at_end or knn or step % ckpt_every == 0:
            # the longest streak since the last check (one host read, at log or checkpoint steps only)
            streak = int(longest_streak.item())
            if streak >= cfg.train.max_consecutive_nonfinite:
                tracker.close()
                raise NonFiniteLossError(
                    f"stopped at step {step}: {streak} non-finite losses in a row "
                    f"(limit train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite}); those updates were skipped "
                    f"and the last good checkpoint ({last_ckpt or 'none yet'}) is untouched. Lower optim.blr, set "
                    f"optim.clip_grad, or use train.precision=bf16/fp32."
                )
            longest_streak.copy_(consecutive)

        if recon_every is not None and (step % recon_every == 0 or at_end):
            with clock.overhead():
                log_reconstructions(raw_model, dataset, cfg, stage.size, run_dir, tracker, step, device, main)

        if step % ckpt_every == 0 or at_end:
            with clock.overhead():
                known_bad_files = distinct_bad_files(accelerator, bad_files, known_bad_files)
                training_state = {
                    "optimizer": optimizer.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    "step": step,
                    "counters": {"nonfinite_skipped": counters["nonfinite_skipped"] + int(nonfinite_total.item())},
                    "bad_files": sorted(known_bad_files),  # names (str): distinct over ranks and launches
                    **clock.state(),
                    # all training randomness derives from (seed, step, micro-step, rank); the global
                    # state is kept for completeness
                    "rng": {"seed": cfg.train.seed, "torch_cpu": torch.get_rng_state()},
                }
                meta = {
                    "step": step, "total_steps": plan.total_steps, "epoch": plan.epoch_at_step(step),
                    "stage": stage.index, "size": stage.size, "progress": plan.progress_at_step(min(step, plan.total_steps)),
                    "world_size": world, "global_batch": global_batch,
                    "complete": step >= plan.total_steps,
                }
                if at_end:
                    meta["rank_weight_checksums"] = rank_weight_checksums(raw_model, accelerator)
                last_ckpt = save_checkpoint_on_main(accelerator, run_dir, step, model, training_state, config_yaml, meta,
                                                    cfg.checkpoint.keep_last)

    tracker.close()
    if main:
        say_where(run_dir, last_ckpt, tracker, step, plan.total_steps, say)
    return PretrainResult(run_dir=run_dir, step=step, checkpoint=last_ckpt, last_metrics=last_metrics)


# ----------------------------------------------------------------------------- helpers (also used by the eval engines)


def resume_latest(cfg, run_dir: Path, raw_model: torch.nn.Module, optimizer, accelerator: Accelerator) -> ckpt_lib.Checkpoint | None:
    """Load the run's latest checkpoint into the model, optimizer and grad scaler (when `checkpoint.resume`)."""
    if not cfg.checkpoint.resume:
        return None
    found = ckpt_lib.load_latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        return None
    require_same_model(found.path, found.model_state, raw_model, cfg)
    raw_model.load_state_dict(found.model_state, strict=True)
    optimizer.load_state_dict(found.training_state["optimizer"])
    if accelerator.scaler is not None and found.training_state.get("scaler"):
        accelerator.scaler.load_state_dict(found.training_state["scaler"])
    warn_config_changes(found.path, cfg)
    accelerator.print(f"resumed from {found.path} at step {found.training_state['step']}")
    return found


def start_tracking(cfg, accelerator: Accelerator, run_dir: Path, wandb_mode: str | None, resume_step: int | None) -> tuple[RunTracker, str]:
    """Save the resolved config in the run folder and open the tracker; returns it and the config as YAML."""
    config_dict = config_to_dict(cfg)
    config_yaml = yaml.safe_dump(config_dict, sort_keys=False)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(config_yaml)
    tracker = RunTracker(accelerator, run_dir, cfg.tracking.project, cfg.name, flatten_dict(config_dict), wandb_mode,
                         resume_step=resume_step)
    return tracker, config_yaml


def rank_weight_checksums(model: torch.nn.Module, accelerator: Accelerator) -> list[float]:
    """One checksum of the weights per rank: DDP ranks must agree exactly."""
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for i, p in enumerate(model.parameters()):
            total += (p.double() * (1.0 + (i % 7) * 0.01)).sum()  # position-weighted, so a swap shows
    return [float(x) for x in accelerator.gather(total.reshape(1)).cpu()]


def save_checkpoint_on_main(accelerator: Accelerator, run_dir: Path, step: int, model: torch.nn.Module, training_state: dict,
                            config_yaml: str, meta: dict, keep_last: int) -> Path:
    """The main rank writes RUN/checkpoints/step_N atomically; every rank waits and gets its path."""
    model_state = accelerator.get_state_dict(model)  # a collective under some sharding schemes: every rank calls it
    path = None
    if accelerator.is_main_process:
        path = ckpt_lib.save_checkpoint(run_dir / "checkpoints", step, model_state, training_state, config_yaml, meta, keep_last)
    accelerator.wait_for_everyone()
    return broadcast_path(path, accelerator)


def broadcast_path(path: Path | None, accelerator: Accelerator) -> Path | None:
    if accelerator.num_processes == 1:
        return path
    box = [str(path) if path else None]
    broadcast_object_list(box)
    return Path(box[0]) if box[0] else None


def run_knn_monitor(model: MaskedAutoencoderViT, cfg: PretrainConfig, accelerator: Accelerator) -> dict[str, float]:
    """Weighted kNN of the unmasked encoder, on the main rank (the others wait): {"knn_top1_cls": .., ...}."""
    box: list[Any] = [None]
    if accelerator.is_main_process and cfg.data.source == "fractal":
        train, val = fractal_knn_loaders(cfg)
        box[0] = knn_evaluate_loaders(model, train, val, cfg.data.fractal_classes, device=accelerator.device)
    elif accelerator.is_main_process:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable files were already reported by the training loader
            box[0] = knn_evaluate(model, pretrain_data_dir(cfg), Path(cfg.data.root) / cfg.tracking.knn_split, cfg.data.crop_size,
                                  batch_size=cfg.tracking.knn_batch_size, num_workers=cfg.data.num_workers, device=accelerator.device)
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


FRACTAL_KNN_BANK_PER_CLASS = 50  # fixed renders of the training systems: the kNN bank
FRACTAL_KNN_VAL_PER_CLASS = 20  # the held-out split: the same systems, renders never trained on


def fractal_knn_loaders(cfg: PretrainConfig) -> tuple[DataLoader, DataLoader]:
    """Labelled loaders of fixed fractal renders, normalised like the training input: (bank, held-out)."""
    d = cfg.data
    bank = FractalDataset(d.fractal_classes, d.fractal_images_per_class, d.crop_size, seed=cfg.train.seed, split="train")
    val = FractalDataset(d.fractal_classes, FRACTAL_KNN_VAL_PER_CLASS, d.crop_size, seed=cfg.train.seed, split="val")
    n_bank = d.fractal_classes * min(FRACTAL_KNN_BANK_PER_CLASS, d.fractal_images_per_class)  # index i is class i % K

    def collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([item["image"] for item in items])  # (B, 3, S, S) uint8
        return normalize_on_device(images, IMAGENET_MEAN, IMAGENET_STD), torch.tensor([item["label"] for item in items])

    def loader(dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=cfg.tracking.knn_batch_size, num_workers=d.num_workers, collate_fn=collate)

    return loader(Subset(bank, range(n_bank))), loader(val)


def log_reconstructions(model, dataset, cfg, size, run_dir, tracker, step, device, main) -> None:
    """A grid (original | masked | reconstruction | reconstruction + visible) of fixed images at size B."""
    if not main:
        return
    n = min(cfg.tracking.recon_images, len(dataset))
    picks = [dataset[(i * (len(dataset) // n), RECON_SEED)]["image"] for i in range(n)]
    images = normalize_on_device(torch.stack(picks).to(device), IMAGENET_MEAN, IMAGENET_STD)  # (n, 3, S, S)
    images = low_frequency_crop(images, size, cfg.curriculum.mode)  # (n, 3, B, B)
    gen = torch.Generator(device=device).manual_seed(RECON_SEED)
    noise = torch.rand((n, (size // cfg.model.patch_size) ** 2), generator=gen, device=device)  # (n, L)
    grid = reconstruction_grid(model, images, IMAGENET_MEAN, IMAGENET_STD, mask_ratio=cfg.model.mask_ratio, noise=noise)
    out_dir = run_dir / "reconstructions"
    out_dir.mkdir(exist_ok=True)
    save_png(grid, out_dir / f"step_{step:08d}.png")
    tracker.log_image("reconstructions", grid, step)


def require_same_model(ckpt_path: Path, saved_state: dict, raw_model: torch.nn.Module, cfg) -> None:
    """Resume only into the model that wrote the checkpoint: otherwise one line naming the weights and config
    keys that differ, and the two ways on (instead of load_state_dict's traceback)."""
    now_state = raw_model.state_dict()
    differ = [f"{k} {list(saved_state[k].shape)} -> {list(now_state[k].shape)}"
              for k in sorted(set(saved_state) & set(now_state)) if saved_state[k].shape != now_state[k].shape]
    missing, unexpected = sorted(set(now_state) - set(saved_state)), sorted(set(saved_state) - set(now_state))
    if not (differ or missing or unexpected):
        return
    parts = []
    for label, keys in (("shapes", differ), ("not in the checkpoint", missing), ("only in the checkpoint", unexpected)):
        if keys:
            parts.append(f"{label}: " + ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else ""))
    changed = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in config_changes(ckpt_path, cfg).items() if k.startswith("model.")]
    because = f" (config: {', '.join(changed)})" if changed else ""
    raise ckpt_lib.CheckpointError(
        f"cannot resume from {ckpt_path}: the model differs from the one that wrote it{because}; "
        + "; ".join(parts)
        + f". Set a new output_dir (now {cfg.output_dir}) to start a new run, or checkpoint.resume=false to start "
        "over in this folder (its checkpoints will be replaced)"
    )


def config_changes(ckpt_path: Path, cfg) -> dict[str, tuple[Any, Any]]:
    """Flattened keys whose value differs between the checkpoint's saved config and `cfg`: (saved, now)."""
    saved_file = ckpt_path / ckpt_lib.CONFIG_FILE
    if not saved_file.is_file():
        return {}
    saved = flatten_dict(yaml.safe_load(saved_file.read_text()) or {})
    now = flatten_dict(config_to_dict(cfg))
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def warn_config_changes(ckpt_path: Path, cfg) -> None:
    ignored = {"train.max_steps", "checkpoint.resume"}  # stopping early and resuming are what resume is for
    changed = {k: v for k, v in config_changes(ckpt_path, cfg).items() if k not in ignored}
    if changed:
        warnings.warn(
            "resuming with a config that differs from the checkpoint's in: "
            + ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changed.items())
            + "; the schedule is recomputed from the new values",
            RunWarning, stacklevel=2,
        )


def describe_run(cfg, plan, budget, stages, n_images, n_skipped, global_batch, base_lr, world, say) -> None:
    say(f"run {cfg.name}: {n_images} images ({n_skipped} skipped at scan), {world} process(es), global batch {global_batch}, lr {base_lr:.3g}")
    say(f"curriculum '{cfg.curriculum.schedule}' ({cfg.curriculum.mode}), budget in {budget}: {plan.total_steps} steps, "
        f"relative compute {relative_compute(stages, budget, cfg.data.crop_size):.3f} of {cfg.train.epochs:g} full-size epochs")
    for s in plan.summary():
        say("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))


def format_log_line(step: int, end_step: int, m: dict[str, Any]) -> str:
    return (f"step {step}/{end_step}  epoch {m['epoch']:.2f}  B {m['size']}  loss {m['loss']:.4f}  lr {m['lr']:.3g}  "
            f"{m['images_per_sec']:.0f} img/s  data-wait {100 * m['data_wait_frac']:.0f}%")


def say_where(run_dir: Path, ckpt: Path | None, tracker: RunTracker, step: int, total: int, say) -> None:
    state = "finished" if step >= total else f"stopped at step {step} of {total} (relaunch the same command to resume)"
    say(f"{state}. checkpoint: {ckpt}; metrics: {run_dir / 'metrics.jsonl'}")
    if tracker.wandb_dir is not None:
        say(f"W&B ({tracker.wandb_mode}) files: {tracker.wandb_dir}" + ("  (upload with: wandb sync <that folder>/offline-run-*)" if tracker.wandb_mode == "offline" else ""))
