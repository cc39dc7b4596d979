"""End-to-end fine-tuning of a pretrained encoder: the MAE recipe, optionally with the ET curriculum.

Data flows one way: training split (seeded timm augmentation: RandomResizedCrop, flip,
RandAugment, RandomErasing) -> device -> Mixup/CutMix -> [curriculum: low-frequency crop to the
stage's size B] -> timm ViT (layer-wise lr decay AdamW) -> per-epoch top-1/top-5 on the
validation split -> tracker, atomic checkpoints, and the best epoch kept in RUN/best/.

Reproducibility and resume: every random choice is a function of (seed, step, micro-step, rank):
the data stream and augmentations (`classification_data`), and Mixup's draws and drop-path
masks (the global RNGs are reseeded at each micro-step). So a resumed run needs only the weights,
the optimizer, the scaler and the step.

The curriculum option (EfficientTrain on fine-tuning): stages come from `curriculum` exactly as
in pretraining and are laid out in optimizer steps with `plan_curriculum`; the batch is
low-pass cropped on the device before the forward (the ViT resamples its position embeddings
to the smaller grid on the fly). `augment.randaug_ramp_start` adds ET's RandAugment ramp: the
magnitude of epoch e is round(start + (m - start) * e / (E - 1)) over the E epochs of the plan,
applied by rebuilding the training transform at the start of each epoch (a new DataLoader per
epoch, so workers pick up the new transform). timm reads the magnitude as an integer.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay

from mae_et import checkpoint as ckpt_lib
from mae_et.curriculum.frequency import low_frequency_crop
from mae_et.curriculum.schedules import CurriculumPlan, plan_curriculum, relative_compute
from mae_et.data.labelled import (
    SeededClassificationDataset,
    build_eval_loader,
    build_train_loader,
    finetune_train_transform,
    scan_train_split,
    shard_loader,
    split_dir,
)
from mae_et.evaluate.config import FinetuneConfig, randaug_magnitude, with_randaug_magnitude
from mae_et.models.vit import load_pretrained_vit
from mae_et.recipes import ConfigError
from mae_et.train.config import resolve_curriculum
from mae_et.train.optim import lr_at, scaled_lr, set_lr
from mae_et.files import write_json_atomic
from mae_et.train.run import Run, checkpoint_due, checkpoint_every

BEST_DIR = "best"
RESULT_FILE = "result.json"
HEAD_INIT_STD = 2e-5  # MAE fine-tuning: a near-zero head, so the first steps do not wreck the encoder


@dataclass
class FinetuneResult:
    run_dir: Path
    step: int  # optimizer steps done
    checkpoint: Path | None  # the last checkpoint written or resumed from
    best: dict[str, Any] | None  # meta of RUN/best/: top1, top5, epoch, step
    last_eval: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- shared by the eval engines


def seed_step_rngs(seed: int, step: int, micro: int, rank: int) -> None:
    """Reseed the global RNGs (Mixup draws from numpy, drop path from torch) from the step position."""
    s = hash((seed, step, micro, rank)) & ((1 << 63) - 1)  # int-tuple hashes are not randomised per process
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    torch.manual_seed(s)


@torch.no_grad()
def topk_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, C), labels (N,) -> (# top-1 correct, # top-5 correct); top-5 is top-C when C < 5."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    hit = top == labels[:, None]  # (N, k)
    return hit[:, 0].sum(), hit.any(dim=1).sum()


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module, loader: torch.utils.data.DataLoader, accelerator: Accelerator,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean cross-entropy over this rank's shard, summed over all ranks."""
    was_training = model.training
    model.eval()
    forward = forward or model
    device = accelerator.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    for images, labels in loader:
        if labels.numel() == 0:  # every file of the batch was unreadable (data.labelled.collate_eval drops them)
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with accelerator.autocast():
            logits = forward(images)  # (n, C)
        logits = logits.float()
        top1, top5 = topk_counts(logits, labels)
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), top1, top5,
                             torch.tensor(labels.numel(), device=device)]).double()
    sums = accelerator.reduce(sums, "sum")  # disjoint shards: exact totals
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise ConfigError("the validation split gave no images to evaluate; check data.val_split")
    return {"val_loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "val_images": int(n)}


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """Meta of the best checkpoint in RUN/best/ (path included), or None."""
    found = ckpt_lib.list_checkpoints(run_dir / BEST_DIR)
    if not found:
        return None
    meta = json.loads((found[-1] / ckpt_lib.META_FILE).read_text())
    return {**meta, "path": str(found[-1])}


def save_best(run_dir: Path, step: int, model_state: dict, config_yaml: str, meta: dict[str, Any]) -> Path:
    """RUN/best/step_N/ via the atomic checkpoint writer; the previous best goes only once the new one is in place."""
    return ckpt_lib.save_checkpoint(run_dir / BEST_DIR, step, model_state, {"step": step, "epoch": meta["epoch"]},
                                    config_yaml, meta, keep_last=1)


def eval_split_loader(cfg_data, classes: list[str], batch_size: int, accelerator: Accelerator) -> torch.utils.data.DataLoader:
    """Resize + centre crop loader of the validation split with the training labels, sharded per rank."""
    root = split_dir(cfg_data.root, cfg_data.val_split, "data.val_split")
    loader = build_eval_loader(root, cfg_data.img_size, batch_size, cfg_data.num_workers, classes=classes)
    return shard_loader(loader, accelerator.process_index, accelerator.num_processes)


# ----------------------------------------------------------------------------- fine-tuning pieces


def layer_decay_param_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """timm's BEiT/MAE grouping: stem (patch/cls/pos) gets layer_decay**(depth+1), block i layer_decay**(depth-i),
    final norm, fc_norm and head 1.0; no weight decay on 1-D parameters and pos/cls tokens."""
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay)


def build_mixup(cfg: FinetuneConfig, num_classes: int) -> Mixup | None:
    a = cfg.augment
    if (a.mixup <= 0 and a.cutmix <= 0) or a.mixup_prob <= 0:
        return None
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                 mode=a.mixup_mode, label_smoothing=a.smoothing, num_classes=num_classes)


def build_criterion(cfg: FinetuneConfig, mixup: Mixup | None) -> torch.nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()  # Mixup already smoothed the targets
    if cfg.augment.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.augment.smoothing)
    return torch.nn.CrossEntropyLoss()


def epoch_magnitude(cfg: FinetuneConfig, epoch: int, num_epochs: int) -> int | None:
    """RandAugment magnitude of `epoch` (ET ramp), or None for the recipe's constant policy."""
    a = cfg.augment
    if a.randaug_ramp_start is None:
        return None
    target = randaug_magnitude(a.auto_augment)
    t = min(1.0, epoch / max(1, num_epochs - 1))
    return int(math.floor(a.randaug_ramp_start + (target - a.randaug_ramp_start) * t + 0.5))


def train_transform_for(cfg: FinetuneConfig, magnitude: int | None) -> Callable:
    a = cfg.augment
    policy = a.auto_augment if magnitude is None else with_randaug_magnitude(a.auto_augment, magnitude)
    return finetune_train_transform(cfg.data.img_size, policy, a.scale, a.color_jitter, a.interpolation, a.reprob, a.remode, a.recount)


def load_finetune_model(cfg: FinetuneConfig, num_classes: int):
    """The pretrained encoder as a timm ViT with a fresh head (pos_embed resampled to data.img_size)."""
    model, spec = load_pretrained_vit(cfg.model.checkpoint, num_classes=num_classes, img_size=cfg.data.img_size,
                                      global_pool=cfg.model.global_pool, drop_path_rate=cfg.model.drop_path)
    torch.nn.init.trunc_normal_(model.head.weight, std=HEAD_INIT_STD)
    torch.nn.init.zeros_(model.head.bias)
    return model, spec


# ----------------------------------------------------------------------------- the run


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    with Run(cfg) as run:  # accelerator, the run folder (locked), resume, tracking, checkpoints, clocks (mae_et.train.run)
        return finetune_loop(cfg, run)


def finetune_loop(cfg: FinetuneConfig, run: Run) -> FinetuneResult:
    accelerator, run_dir = run.accelerator, run.run_dir
    main, device, say = run.main, run.device, run.say
    set_seed(cfg.train.seed)

    # --- data: every check (splits, classes, sizes) before the model is built
    index = scan_train_split(cfg.data.root, cfg.data.train_split)
    num_classes = len(index.classes)
    world, rank, accum, micro_batch = accelerator.num_processes, accelerator.process_index, cfg.train.accum_steps, cfg.train.batch_size
    global_batch = micro_batch * world * accum
    val_loader = eval_split_loader(cfg.data, index.classes, cfg.train.eval_batch_size or micro_batch, accelerator)
    steps_per_epoch = len(index.samples) // (micro_batch * world) // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(index.samples)} training images make no full optimizer step of global batch {global_batch} "
            f"(train.batch_size x processes x train.accum_steps); lower train.batch_size or train.accum_steps"
        )

    # --- model, curriculum, optimizer
    model, spec = load_finetune_model(cfg, num_classes)
    stages, budget = resolve_curriculum(cfg.curriculum, cfg.data.img_size, spec.patch_size)
    plan: CurriculumPlan = plan_curriculum(stages, budget, cfg.train.epochs, steps_per_epoch, cfg.data.img_size)
    num_epochs = math.ceil(plan.total_steps / steps_per_epoch)
    end_step = min(plan.total_steps, cfg.train.max_steps or plan.total_steps)
    base_lr = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.blr, global_batch)
    warmup = cfg.optim.warmup_epochs / cfg.train.epochs  # in budget progress
    ckpt_every = checkpoint_every(cfg, steps_per_epoch)
    optimizer = torch.optim.AdamW(layer_decay_param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay),
                                  lr=base_lr, betas=cfg.optim.betas, fused=True)  # one kernel for all groups, as in pretraining
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model: VisionTransformer = accelerator.unwrap_model(model)
    mixup = build_mixup(cfg, num_classes)
    criterion = build_criterion(cfg, mixup)

    # --- resume
    step, resumed_from, saved_best, last_eval = 0, None, None, {}
    found = run.resume(raw_model, optimizer)
    if found is not None:
        step = int(found.training_state["step"])
        saved_best = found.training_state.get("best") or None
        last_eval = dict(found.meta.get("last_eval") or {})  # so a relaunch after the end still reports it
        resumed_from = found.path
    if main and resumed_from is None and (run_dir / BEST_DIR).exists():
        shutil.rmtree(run_dir / BEST_DIR)  # a fresh run: an older run's best is not this run's
    accelerator.wait_for_everyone()
    # RUN/best/ may be newer than the checkpoint resumed from (a kill between the two saves): it wins
    best = (read_best(run_dir) or saved_best) if resumed_from is not None else None

    if main:
        say(f"fine-tune {cfg.name}: {cfg.model.checkpoint} ({spec.size}/{spec.patch_size}, pretrained at {spec.img_size} px) "
            f"at {cfg.data.img_size} px, {num_classes} classes, {len(index.samples)} training images, {world} process(es), "
            f"global batch {global_batch}, lr {base_lr:.3g}, layer decay {cfg.optim.layer_decay}, "
            f"{plan.total_steps} steps in {num_epochs} epochs")
        if len(plan.stages) > 1:
            say(f"curriculum '{cfg.curriculum.schedule}' ({cfg.curriculum.mode}), budget in {budget}, relative compute "
                f"{relative_compute(stages, budget, cfg.data.img_size):.3f}")
            for s in plan.summary():
                say("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))

    # --- the loop: one DataLoader per epoch (the transform may change with the RandAugment ramp)
    dataset = SeededClassificationDataset(index, train_transform_for(cfg, None))
    window_loss = torch.zeros((), device=device)
    window_count = 0
    window_start, window_steps = time.perf_counter(), 0
    run.clock.start()
    bar = run.progress(end_step, step, f"fine-tune {cfg.name}")
    lr = base_lr
    model.train()
    while step < end_step:
        epoch = step // steps_per_epoch
        epoch_end = min((epoch + 1) * steps_per_epoch, plan.total_steps)
        stop = min(epoch_end, end_step)
        magnitude = epoch_magnitude(cfg, epoch, num_epochs)
        if magnitude is not None:
            dataset.transform = train_transform_for(cfg, magnitude)
        loader = build_train_loader(
            dataset, micro_batch, rank, world, cfg.train.seed, start_micro_step=step * accum,
            num_micro_steps=(stop - step) * accum, num_workers=cfg.data.num_workers,
            pin_memory=cfg.data.pin_memory and device.type == "cuda",
        )
        batches = iter(loader)
        while step < stop:
            stage = plan.stage_at_step(step)
            lr = lr_at(plan.progress_at_step(step), base_lr, cfg.optim.min_lr, warmup)
            set_lr(optimizer, lr)
            for micro in range(accum):
                images, labels = next(batches)
                images = images.to(device, non_blocking=True)  # (n, 3, S, S) normalised
                labels = labels.to(device, non_blocking=True)  # (n,)
                seed_step_rngs(cfg.train.seed, step, micro, rank)
                targets = labels
                if mixup is not None:
                    images, targets = mixup(images, labels)  # targets (n, C) soft
                if stage.size < cfg.data.img_size:
                    images = low_frequency_crop(images, stage.size, cfg.curriculum.mode)  # (n, 3, B, B)
                with accelerator.accumulate(model):
                    logits = model(images)  # (n, C)
                    loss = criterion(logits.float(), targets)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.clip_grad is not None:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window_loss += loss.detach()
                window_count += 1
            step += 1
            window_steps += 1
            bar.update(1)

            if step % cfg.train.log_every == 0 or step == stop:
                now = time.perf_counter()
                loss_mean = (accelerator.reduce(window_loss, "sum") / (window_count * world)).item()
                metrics = {"loss": loss_mean, "lr": lr, "size": stage.size, "stage": stage.index,
                           "epoch": plan.epoch_at_step(step), "images_per_sec": window_steps * global_batch / (now - window_start),
                           **run.clock.read()}
                if magnitude is not None:
                    metrics["randaug_magnitude"] = magnitude
                run.log(step, metrics, f"step {step}/{end_step}  epoch {metrics['epoch']:.2f}  B {stage.size}  loss {loss_mean:.4f}  "
                                       f"lr {lr:.3g}  {metrics['images_per_sec']:.0f} img/s")
                window_loss.zero_()
                window_count, window_steps, window_start = 0, 0, time.perf_counter()
                if not math.isfinite(loss_mean):
                    run.stop_nonfinite(f"stopped at step {step}: the training loss is {loss_mean}",
                                       "Lower optim.blr, set optim.clip_grad, or use train.precision=bf16/fp32.")

            if step == epoch_end:  # a complete epoch: evaluate, keep the best
                # the unwrapped model: ranks may hold val shards of different sizes, and DDP's forward must
                # not be called a different number of times per rank
                with run.clock.overhead():  # evaluation is not training time
                    last_eval = {**evaluate_classifier(raw_model, val_loader, accelerator), "epoch": epoch + 1}
                improved = best is None or last_eval["top1"] > best["top1"]
                if improved:
                    best = {"top1": last_eval["top1"], "top5": last_eval["top5"], "val_loss": last_eval["val_loss"],
                            "epoch": epoch + 1, "step": step}
                    best_state = accelerator.get_state_dict(model)
                    if main:
                        best["path"] = str(save_best(run_dir, step, best_state, run.config_yaml, best))
                    accelerator.wait_for_everyone()
                run.log(step, {**last_eval, "best_top1": best["top1"], "best_epoch": best["epoch"]},
                        f"epoch {epoch + 1}/{num_epochs}  top-1 {last_eval['top1']:.2f}  top-5 {last_eval['top5']:.2f}  "
                        f"val loss {last_eval['val_loss']:.4f}  (best {best['top1']:.2f} at epoch {best['epoch']})")

            if checkpoint_due(step, ckpt_every, end_step):
                training_state = {
                    "optimizer": optimizer.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    "step": step,
                    "best": {k: v for k, v in (best or {}).items() if k != "path"},
                }
                meta = {"step": step, "total_steps": plan.total_steps, "epoch": plan.epoch_at_step(step), "stage": stage.index,
                        "size": stage.size, "world_size": world, "global_batch": global_batch,
                        "complete": step >= plan.total_steps, "last_eval": last_eval}
                run.checkpoint(step, model, training_state, meta)

    run.close()
    done = step >= plan.total_steps
    if main:
        if done:
            write_json_atomic(run_dir / RESULT_FILE, {
                "task": "finetune", "checkpoint": str(cfg.model.checkpoint), "encoder": spec.__dict__,
                "img_size": cfg.data.img_size, "num_classes": num_classes, "epochs": num_epochs, "steps": step,
                "final": last_eval, "best": best, "global_batch": global_batch, "lr": base_lr,
            })
        state = "finished" if done else f"stopped at step {step} of {plan.total_steps} (relaunch the same command to resume)"
        say(f"{state}. checkpoint: {run.last_checkpoint}; best: {best['path'] if best else 'none yet'}; metrics: {run_dir / 'metrics.jsonl'}")
    return FinetuneResult(run_dir=run_dir, step=step, checkpoint=run.last_checkpoint, best=best, last_eval=last_eval)
