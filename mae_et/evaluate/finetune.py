"""End-to-end fine-tuning of a pretrained encoder: the MAE recipe, optionally with the ET curriculum.

What fine-tuning has of its own (`FinetuneMethod`: layer-wise lr decay, Mixup/CutMix, the curriculum's
low-frequency crop, the RandAugment ramp); the loop, evaluation, the best epoch and RUN/result.json are the
evaluation engine's (`mae_et.evaluate.engine`). Every random choice is a function of (seed, step, micro-step, rank),
so a resumed run needs only the weights, the optimizer, the scaler and the step. docs/design.md, "Fine-tuning".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay

from mae_et.curriculum.frequency import low_frequency_crop
from mae_et.curriculum.schedules import relative_compute, resolve_curriculum
from mae_et.data.labelled import (
    SeededClassificationDataset,
    build_train_loader,
    finetune_train_transform,
    scan_train_split,
)
from mae_et.evaluate.config import (
    FinetuneConfig,
    randaug_magnitude,
    with_randaug_magnitude,
)
from mae_et.evaluate.engine import (
    BEST_DIR,
    RESULT_FILE,
    EvalResult,
    eval_split_loader,
    evaluate_classifier,
    run_engine,
)
from mae_et.models.vit import load_pretrained_vit
from mae_et.run.plan import optimizer_steps_per_epoch, plan_run
from mae_et.run.run import Run
from mae_et.seeding import Family, mix64, seed_global_rngs

__all__ = ["BEST_DIR", "RESULT_FILE", "FinetuneMethod", "finetune"]

HEAD_INIT_STD = 2e-5  # MAE fine-tuning: a near-zero head, so the first steps do not wreck the encoder


# ----------------------------------------------------------------------------- fine-tuning pieces


def layer_decay_param_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """timm's BEiT/MAE grouping: stem (patch/cls/pos) gets layer_decay**(depth+1), block i layer_decay**(depth-i),
    final norm, fc_norm and head 1.0; no weight decay on 1-D parameters and pos/cls tokens."""
    return param_groups_layer_decay(
        model, weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=layer_decay
    )


def build_mixup(cfg: FinetuneConfig, num_classes: int) -> Mixup | None:
    a = cfg.augment
    if (a.mixup <= 0 and a.cutmix <= 0) or a.mixup_prob <= 0:
        return None
    return Mixup(
        mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix,
        prob=a.mixup_prob,
        switch_prob=a.mixup_switch_prob,
        mode=a.mixup_mode,
        label_smoothing=a.smoothing,
        num_classes=num_classes,
    )


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
    return finetune_train_transform(
        cfg.data.img_size, policy, a.scale, a.color_jitter, a.interpolation, a.reprob, a.remode, a.recount
    )


def load_finetune_model(cfg: FinetuneConfig, num_classes: int):
    """The pretrained encoder as a timm ViT with a fresh head (pos_embed resampled to data.img_size)."""
    model, spec = load_pretrained_vit(
        cfg.model.checkpoint,
        num_classes=num_classes,
        img_size=cfg.data.img_size,
        global_pool=cfg.model.global_pool,
        drop_path_rate=cfg.model.drop_path,
    )
    torch.nn.init.trunc_normal_(model.head.weight, std=HEAD_INIT_STD)
    torch.nn.init.zeros_(model.head.bias)
    return model, spec


# ----------------------------------------------------------------------------- the method


class FinetuneMethod:
    """Fine-tuning for the evaluation engine (`mae_et.evaluate.engine.EvalMethod`): data, model and optimizer
    built and checked (splits, classes, sizes before the model), the step with Mixup and the curriculum crop."""

    task = "finetune"
    keeps_best_weights = True

    def __init__(self, cfg: FinetuneConfig, run: Run) -> None:
        self.cfg, self.run = cfg, run
        accelerator = run.accelerator
        set_seed(cfg.train.seed)
        # --- data: every check (splits, classes, sizes) before the model is built
        self.index = scan_train_split(cfg.data.root, cfg.data.train_split)
        self.num_classes = len(self.index.classes)
        micro_batch = cfg.train.batch_size
        self.val_loader = eval_split_loader(
            cfg.data, self.index.classes, cfg.train.eval_batch_size or micro_batch, accelerator
        )
        optimizer_steps_per_epoch(
            len(self.index.samples), micro_batch, run.world, cfg.train.accum_steps
        )  # raises if none
        # --- model, plan, optimizer
        model, self.spec = load_finetune_model(cfg, self.num_classes)
        self.stages, self.budget = resolve_curriculum(cfg.curriculum, cfg.data.img_size, self.spec.patch_size)
        self.plan = plan_run(
            cfg.plan_spec(), len(self.index.samples), run.world, self.stages, self.budget, cfg.data.img_size
        )
        optimizer = torch.optim.AdamW(
            layer_decay_param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay),
            lr=self.plan.base_lr,
            betas=cfg.optim.betas,
            fused=True,
        )  # one kernel, as in pretraining
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.raw_model: VisionTransformer = accelerator.unwrap_model(self.model)
        self.mixup = build_mixup(cfg, self.num_classes)
        self.criterion = build_criterion(cfg, self.mixup)
        self.dataset = SeededClassificationDataset(self.index, train_transform_for(cfg, None))
        self.magnitude: int | None = None
        self.batches = None

    def describe(self) -> list[str]:
        cfg, plan = self.cfg, self.plan
        lines = [
            f"fine-tune {cfg.name}: {cfg.model.checkpoint} ({self.spec.size}/{self.spec.patch_size}, pretrained at "
            f"{self.spec.img_size} px) at {cfg.data.img_size} px, {self.num_classes} classes, "
            f"{len(self.index.samples)} "
            f"training images, {self.run.world} process(es), global batch {plan.global_batch}, lr {plan.base_lr:.3g}, "
            f"layer decay {cfg.optim.layer_decay}, {plan.total_steps} steps in {plan.num_epochs} epochs"
        ]
        if len(plan.plan.stages) > 1:
            lines.append(
                f"curriculum '{cfg.curriculum.schedule}' ({cfg.curriculum.mode}), budget in {self.budget}, relative "
                f"compute {relative_compute(self.stages, self.budget, cfg.data.img_size):.3f}"
            )
            lines += [
                "  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items())
                for s in plan.plan.summary()
            ]
        return lines

    def start_epoch(self, epoch: int, step: int, stop: int) -> None:
        """A DataLoader per epoch: the RandAugment ramp may change the transform, and workers must pick it up."""
        cfg, run = self.cfg, self.run
        self.magnitude = epoch_magnitude(cfg, epoch, self.plan.num_epochs)
        if self.magnitude is not None:
            self.dataset.transform = train_transform_for(cfg, self.magnitude)
        accum = cfg.train.accum_steps
        loader = build_train_loader(
            self.dataset,
            cfg.train.batch_size,
            run.rank,
            run.world,
            cfg.train.seed,
            start_micro_step=step * accum,
            num_micro_steps=(stop - step) * accum,
            num_workers=cfg.data.num_workers,
            pin_memory=cfg.data.pin_memory and run.device.type == "cuda",
        )
        self.batches = iter(loader)

    def train_step(self, step: int) -> torch.Tensor:
        cfg, accelerator, device = self.cfg, self.run.accelerator, self.run.device
        stage = self.plan.plan.stage_at_step(step)
        total = torch.zeros((), device=device)
        for micro in range(cfg.train.accum_steps):
            images, labels = next(self.batches)
            images = images.to(device, non_blocking=True)  # (n, 3, S, S) normalised
            labels = labels.to(device, non_blocking=True)  # (n,)
            # Mixup draws from numpy, drop path from torch: both from the step's position
            seed_global_rngs(mix64(Family.FINETUNE_STEP, cfg.train.seed, step, micro, self.run.rank))
            targets = labels
            if self.mixup is not None:
                images, targets = self.mixup(images, labels)  # targets (n, C) soft
            if stage.size < cfg.data.img_size:
                images = low_frequency_crop(images, stage.size, cfg.curriculum.mode)  # (n, 3, B, B)
            with accelerator.accumulate(self.model):
                logits = self.model(images)  # (n, C)
                loss = self.criterion(logits.float(), targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.clip_grad is not None:
                    accelerator.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        return total / cfg.train.accum_steps

    def step_metrics(self, step: int) -> dict[str, Any]:
        stage = self.plan.plan.stage_at_step(step - 1)  # the step just done
        extra = {"randaug_magnitude": self.magnitude} if self.magnitude is not None else {}
        return {"size": stage.size, "stage": stage.index, **extra}

    def evaluate(self) -> dict[str, float]:
        # the unwrapped model: ranks may hold val shards of different sizes, and DDP's forward must not be called a
        # different number of times per rank
        return evaluate_classifier(self.raw_model, self.val_loader, self.run.accelerator)

    def result_fields(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.cfg.model.checkpoint),
            "encoder": self.spec.__dict__,
            "img_size": self.cfg.data.img_size,
            "num_classes": self.num_classes,
        }


def finetune(cfg: FinetuneConfig) -> EvalResult:
    with Run(cfg.run_spec()) as run:  # accelerator, the run folder (locked), resume, tracking, checkpoints, clocks
        return run_engine(run, FinetuneMethod(cfg, run))
