"""The evaluation engine: the epoch loop, evaluation, best-epoch keeping and result writing of fine-tuning and the
linear probe, written once; what differs is each method's, behind `EvalMethod`.

    result = run_engine(run, FinetuneMethod(cfg, run))   # resume, the loop, RUN/result.json

`train_epochs` is the loop alone (no run folder), as `fit_probe_on_features` uses it. docs/design.md, "The
evaluation engine"."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor

from mae_et import checkpoint as ckpt_lib
from mae_et.data.labelled import build_eval_loader, shard_loader, split_dir
from mae_et.evaluate.config import ClassificationDataConfig
from mae_et.files import write_json_atomic
from mae_et.recipes import ConfigError
from mae_et.run.plan import RunPlan, set_lr
from mae_et.run.run import BEST_DIR, RESULT_FILE, Run


@dataclass
class EvalResult:
    """What a fine-tuning or probe launch returns."""

    run_dir: Path | None
    step: int  # optimizer steps done
    checkpoint: Path | None  # the last checkpoint written or resumed from
    # the best epoch: top1, top5, val_loss, epoch, step (and path, when its weights are kept)
    best: dict[str, Any] | None
    last_eval: dict[str, Any] = field(default_factory=dict)  # the latest epoch's evaluation
    history: list[dict] = field(default_factory=list)  # this launch's epoch evaluations
    result: dict[str, Any] | None = None  # RUN/result.json, once the plan is done


class EvalMethod(Protocol):
    """What the engine asks of a method."""

    task: str  # "finetune" | "linprobe": result.json's task and the progress bar's name
    plan: RunPlan
    model: torch.nn.Module  # the trained module as prepared (DDP-wrapped under several processes): checkpoints save it
    raw_model: torch.nn.Module  # the same, unwrapped: resume loads into it
    optimizer: torch.optim.Optimizer
    keeps_best_weights: bool  # fine-tuning keeps the best epoch's weights in RUN/best/; the probe records the epoch

    def describe(self) -> list[str]:
        """The lines that open the run (main rank)."""

    def start_epoch(self, epoch: int, step: int, stop: int) -> None:
        """Prepare to serve optimizer steps [step, stop) of pass `epoch` over the data."""

    def train_step(self, step: int) -> Tensor:
        """Optimizer step `step` (the engine has set its lr); its mean loss, detached, 0-d, on the device."""

    def step_metrics(self, step: int) -> dict[str, Any]:
        """The method's own fields of a log row and of a checkpoint's meta (for example the input size)."""

    def evaluate(self) -> dict[str, float]:
        """top1, top5 (%), val_loss and val_images of the current weights on the validation split."""

    def result_fields(self) -> dict[str, Any]:
        """The method's own fields of RUN/result.json (the encoder, sizes, classes, ...)."""


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def topk_counts(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """logits (N, C), labels (N,) -> (# top-1 correct, # top-5 correct); top-5 is top-C when C < 5."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    hit = top == labels[:, None]  # (N, k)
    return hit[:, 0].sum(), hit.any(dim=1).sum()


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module, batches: Iterable[tuple[Tensor, Tensor]], accelerator: Accelerator
) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean cross-entropy of `model` over this rank's (inputs, labels) batches, summed over
    all ranks; a batch whose every file was unreadable (empty) is skipped."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    for inputs, labels in batches:
        if labels.numel() == 0:
            continue
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with accelerator.autocast():
            logits = model(inputs)  # (n, C)
        logits = logits.float()
        top1, top5 = topk_counts(logits, labels)
        sums += torch.stack(
            [F.cross_entropy(logits, labels, reduction="sum"), top1, top5, torch.tensor(labels.numel(), device=device)]
        ).double()
    sums = accelerator.reduce(sums, "sum")  # disjoint shards: exact totals
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise ConfigError("the validation split gave no images to evaluate; check data.val_split")
    return {"val_loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "val_images": int(n)}


def eval_split_loader(
    cfg_data: ClassificationDataConfig, classes: list[str], batch_size: int, accelerator: Accelerator
) -> torch.utils.data.DataLoader:
    """Resize + centre crop loader of the validation split with the training labels, sharded per rank."""
    root = split_dir(cfg_data.root, cfg_data.val_split, "data.val_split")
    loader = build_eval_loader(root, cfg_data.img_size, batch_size, cfg_data.num_workers, classes=classes)
    return shard_loader(loader, accelerator.process_index, accelerator.num_processes)


# ----------------------------------------------------------------------------- the best epoch


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """Meta of the best checkpoint in RUN/best/ (path included), or None."""
    found = ckpt_lib.list_checkpoints(run_dir / BEST_DIR)
    if not found:
        return None
    meta = json.loads((found[-1] / ckpt_lib.META_FILE).read_text())
    return {**meta, "path": str(found[-1])}


def save_best(run_dir: Path, step: int, model_state: dict, config_yaml: str, meta: dict[str, Any]) -> Path:
    """RUN/best/step_N/ via the atomic checkpoint writer; the previous best goes only once the new one is in place."""
    return ckpt_lib.save_checkpoint(
        run_dir / BEST_DIR, step, model_state, {"step": step, "epoch": meta["epoch"]}, config_yaml, meta, keep_last=1
    )


def better(best: dict[str, Any] | None, evaluation: dict[str, Any], step: int) -> dict[str, Any] | None:
    """The new best epoch when `evaluation` beats `best` on top-1 (ties keep the earlier epoch), else None."""
    if best is not None and evaluation["top1"] <= best["top1"]:
        return None
    return {
        "top1": evaluation["top1"],
        "top5": evaluation["top5"],
        "val_loss": evaluation["val_loss"],
        "epoch": evaluation["epoch"],
        "step": step,
    }


# ----------------------------------------------------------------------------- the loop


class Recorder:
    """What happens around the loop's steps. This one keeps the epoch evaluations and nothing else (a fit in
    memory); `RunRecorder` logs, keeps the best epoch and checkpoints."""

    def __init__(self, method: EvalMethod) -> None:
        self.method = method
        self.history: list[dict] = []

    def step_done(self, step: int, loss: Tensor, lr: float, log_now: bool) -> None:
        pass

    def epoch_done(self, step: int, epoch: int) -> None:
        self.history.append({**self.method.evaluate(), "epoch": epoch})

    def after(self, step: int) -> None:
        pass


def train_epochs(method: EvalMethod, step: int, recorder: Recorder) -> int:
    """Optimizer steps [step, plan.end_step): each pass over the data opened by the method, evaluated at its end.
    Returns the step reached."""
    plan = method.plan
    while step < plan.end_step:
        epoch = step // plan.steps_per_epoch
        epoch_end = min((epoch + 1) * plan.steps_per_epoch, plan.total_steps)
        stop = min(epoch_end, plan.end_step)
        method.start_epoch(epoch, step, stop)
        while step < stop:
            lr = plan.lr(step)
            set_lr(method.optimizer, lr)
            loss = method.train_step(step)
            step += 1
            recorder.step_done(step, loss, lr, log_now=step % plan.log_every == 0 or step == stop)
            if step == epoch_end:
                recorder.epoch_done(step, epoch + 1)
            recorder.after(step)
    return step


class RunRecorder(Recorder):
    """The loop inside a run folder: the loss window and the log, the best epoch, checkpoints."""

    def __init__(self, method: EvalMethod, run: Run, step: int, best: dict | None, last_eval: dict) -> None:
        super().__init__(method)
        self.run, self.best, self.last_eval = run, best, last_eval
        self.window_loss = torch.zeros((), device=run.device)
        self.window_steps, self.window_start = 0, time.perf_counter()
        self.bar = run.progress(method.plan.end_step, step, f"{method.task} {run.spec.name}")

    def step_done(self, step: int, loss: Tensor, lr: float, log_now: bool) -> None:
        self.run.check_interrupt()
        self.bar.update(1)
        self.window_loss += loss
        self.window_steps += 1
        if not log_now:
            return
        run, plan = self.run, self.method.plan
        now = time.perf_counter()
        loss_mean = (run.accelerator.reduce(self.window_loss, "sum") / (self.window_steps * run.world)).item()
        metrics = {
            "loss": loss_mean,
            "lr": lr,
            "epoch": plan.plan.epoch_at_step(step),
            "images_per_sec": self.window_steps * plan.global_batch / (now - self.window_start),
            **self.method.step_metrics(step),
            **run.clock.read(),
        }
        size = f"  B {metrics['size']}" if "size" in metrics else ""
        run.log(
            step,
            metrics,
            f"step {step}/{plan.end_step}  epoch {metrics['epoch']:.2f}{size}  loss {loss_mean:.4f}  "
            f"lr {lr:.3g}  {metrics['images_per_sec']:.0f} img/s",
        )
        self.window_loss.zero_()
        self.window_steps, self.window_start = 0, time.perf_counter()
        if not math.isfinite(loss_mean):
            run.stop_nonfinite(
                f"stopped at step {step}: the training loss is {loss_mean}",
                "Lower optim.blr, set optim.clip_grad, or use train.precision=bf16/fp32.",
            )

    def epoch_done(self, step: int, epoch: int) -> None:
        run, method = self.run, self.method
        with run.clock.overhead():  # evaluation is not training time
            self.last_eval = {**method.evaluate(), "epoch": epoch}
        self.history.append(self.last_eval)
        new_best = better(self.best, self.last_eval, step)
        if new_best is not None:
            self.best = new_best
            if method.keeps_best_weights:
                state = run.accelerator.get_state_dict(method.model)  # every rank: a collective under some sharding
                if run.main:
                    self.best["path"] = str(save_best(run.run_dir, step, state, run.config_yaml, self.best))
                run.accelerator.wait_for_everyone()
        b = self.best
        run.log(
            step,
            {**self.last_eval, "best_top1": b["top1"], "best_epoch": b["epoch"]},
            f"epoch {epoch}/{method.plan.num_epochs}  top-1 {self.last_eval['top1']:.2f}  top-5 "
            f"{self.last_eval['top5']:.2f}  "
            f"val loss {self.last_eval['val_loss']:.4f}  (best {b['top1']:.2f} at epoch {b['epoch']})",
        )

    def after(self, step: int) -> None:
        plan, run = self.method.plan, self.run
        if not plan.checkpoint_due(step):
            return
        scaler = run.accelerator.scaler
        training_state = {
            "optimizer": self.method.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "best": {k: v for k, v in (self.best or {}).items() if k != "path"},
        }
        meta = {
            "step": step,
            "total_steps": plan.total_steps,
            "epoch": plan.plan.epoch_at_step(step),
            **self.method.step_metrics(step),
            "world_size": run.world,
            "global_batch": plan.global_batch,
            "complete": step >= plan.total_steps,
            "last_eval": self.last_eval,
        }
        run.checkpoint(step, self.method.model, training_state, meta)


def resume(run: Run, method: EvalMethod) -> tuple[int, dict | None, dict]:
    """(step, best epoch, last evaluation) of the run's latest checkpoint, loaded into the method's model and
    optimizer; (0, None, {}) for a fresh run, which also clears an older run's RUN/best/."""
    found = run.resume(method.raw_model, method.optimizer)
    if found is None:
        if run.main and method.keeps_best_weights and (run.run_dir / BEST_DIR).exists():
            shutil.rmtree(run.run_dir / BEST_DIR)  # a fresh run: an older run's best is not this run's
        run.accelerator.wait_for_everyone()
        return 0, None, {}
    best = found.training_state.get("best") or None
    if method.keeps_best_weights:
        run.accelerator.wait_for_everyone()
        # RUN/best/ may be newer than the checkpoint resumed from (a kill between the two saves): it wins
        best = read_best(run.run_dir) or best
    last_eval = dict(found.meta.get("last_eval") or {})  # so a relaunch after the end still reports it
    return int(found.training_state["step"]), best, last_eval


def run_engine(run: Run, method: EvalMethod) -> EvalResult:
    """Resume, train to the plan's end or `train.max_steps`, and write RUN/result.json once the plan is done."""
    t_start = time.perf_counter()
    step, best, last_eval = resume(run, method)
    for line in method.describe():
        run.say(line)
    recorder = RunRecorder(method, run, step, best, last_eval)
    run.clock.start()
    method.model.train()
    step = train_epochs(method, step, recorder)
    run.close()
    plan, result = method.plan, None
    if step >= plan.total_steps:
        # no evaluation yet: a checkpoint from before its evaluation
        final = recorder.last_eval or {**method.evaluate(), "epoch": plan.num_epochs}
        result = {
            "task": method.task,
            **method.result_fields(),
            "epochs": plan.num_epochs,
            "steps": plan.total_steps,
            "global_batch": plan.global_batch,
            "lr": plan.base_lr,
            "top1": final["top1"],
            "top5": final["top5"],
            "final": final,
            "best": recorder.best,
            "seconds": time.perf_counter() - t_start,
        }
        if run.main:
            write_json_atomic(run.run_dir / RESULT_FILE, result)
    if run.main:
        best = recorder.best
        kept = best.get("path") or f"top-1 {best['top1']:.2f} at epoch {best['epoch']}" if best else "none yet"
        state = (
            f"finished: top-1 {result['top1']:.2f}, top-5 {result['top5']:.2f}; result: {run.run_dir / RESULT_FILE}"
            if result is not None
            else f"stopped at step {step} of {plan.total_steps} (relaunch the same command to resume)"
        )
        run.say(f"{state}; checkpoint: {run.last_checkpoint}; best: {kept}; metrics: {run.run_dir / 'metrics.jsonl'}")
    return EvalResult(
        run_dir=run.run_dir,
        step=step,
        checkpoint=run.last_checkpoint,
        best=recorder.best,
        last_eval=recorder.last_eval,
        history=recorder.history,
        result=result,
    )
