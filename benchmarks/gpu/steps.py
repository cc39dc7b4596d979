"""Sections a + b of gpu_check: step rows of ours (eager, decoding a share, compiled) and of Hugging Face's peer, each
built by the training loop's own builders (`build_training`, `train_step_of`) and timed by benchmarks/throughput.py's
pieces, within the run's budget and compile cap; then the ratios between them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from benchmarks.gpu.plan import Plan
from benchmarks.gpu.report import Report, free_memory
from benchmarks.gpu.tables import format_step_row
from benchmarks.study.runs import image_flops
from benchmarks.throughput import (
    allocated,
    count_params,
    fresh_accelerator,
    hf_training,
    mfu,
    owned_bytes,
    time_calls,
    time_step,
)
from mae_et.models.mae import MODEL_SIZES
from mae_et.train.step import TrainStep, build_training, train_step_of


@dataclass
class OurModel:
    """Our model and optimizer for one (size, batch), with an eager step and, once asked for, a compiled one."""

    size: str
    batch: int
    sizes: tuple[int, ...]
    cfg: object
    eager: TrainStep
    compiled: TrainStep | None = None
    partial: dict = field(default_factory=dict)  # compile mode -> TrainStep decoding a share (same weights)

    def compiled_step(self, accelerator, mode: str, backend: str) -> TrainStep:
        if self.compiled is None:  # same weights and optimizer: only the forward is wrapped
            self.compiled = train_step_of(
                self.cfg, accelerator, self.eager.model, self.eager.optimizer, self.sizes, mode, backend
            )
        return self.compiled

    def partial_step(self, accelerator, cfg, mode: str, backend: str) -> TrainStep:
        """The same weights and optimizer, the decoder on the visible + cfg.model.decode_fraction of the patches."""
        if mode not in self.partial:
            self.partial[mode] = train_step_of(
                cfg, accelerator, self.eager.model, self.eager.optimizer, self.sizes, mode, backend
            )
        return self.partial[mode]


class StepBench:
    """Step rows: ours eager, the HF peer, ours compiled; one Accelerator (the run's precision) for all."""

    def __init__(self, report: Report, plan: Plan, args) -> None:
        self.report, self.plan, self.args = report, plan, args
        self.accelerator = fresh_accelerator(plan.row_config().train.precision)
        self.device = self.accelerator.device
        self.peak_tflops = args.peak_tflops or report.data["matmul_tflops"]
        self.ours: dict[int, OurModel] = {}
        self.compile_spent = 0.0
        self.left_out: set[int] = set()  # model indices the caller skipped

    # -- helpers

    def cfg_for(self, model_size: str, batch: int, partial: bool = False, hog: bool = False):
        share = [f"model.decode_fraction={self.plan.partial_fraction}"] if partial else []
        target = ["model.target=hog", "model.norm_pix_loss=false"] if hog else []
        return self.plan.row_config(*share, *target, model=model_size, batch=batch)

    def estimate_s(self, model_size: str, batch: int, size: int, cfg, build: bool) -> float:
        """Seconds for one step row: FLOPs at the lowest MFU seen so far (10% before any), plus a model build."""
        mfus = [r["mfu"] for r in self.report.data["step"] if r["mfu"] > 0]
        lowest = min(mfus) if mfus else 0.10
        per_step = batch * image_flops(cfg, size) / (self.peak_tflops * 1e12 * lowest)
        params = 12 * MODEL_SIZES[model_size]["depth"] * MODEL_SIZES[model_size]["embed_dim"] ** 2
        return (self.plan.steps + self.plan.warmup) * per_step + (2.0 + 3e-8 * params if build else 0.0)

    def compile_estimate_s(self, model_size: str) -> float:
        """Seconds to compile one graph: the slowest per block so far (dynamo unrolls the blocks), else the guess."""
        depth = MODEL_SIZES[model_size]["depth"]
        per_block = [
            r["compile_s"] / MODEL_SIZES[r["model"]]["depth"] for r in self.report.data["step"] if "compile_s" in r
        ]
        main_depth = MODEL_SIZES[self.plan.models[0][0]]["depth"]
        return depth * (max(per_block) if per_block else self.plan.compile_guess_s / main_depth)

    def later_reserve(self) -> float:
        return sum(self.plan.reserve_s.values())

    def record(
        self,
        impl: str,
        model_size: str,
        batch: int,
        size: int,
        compile_mode: str,
        timing,
        cfg,
        params: int,
        extra: dict | None = None,
    ) -> dict:
        img_s = batch / timing.seconds_per_step
        flops = image_flops(cfg, size)
        row = {
            "impl": impl,
            "model": model_size,
            "batch": batch,
            "size": size,
            "compile": compile_mode,
            "img_s": img_s,
            "step_ms": 1000 * timing.seconds_per_step,
            "gflop_per_image": flops / 1e9,
            "mfu": mfu(flops, img_s, self.peak_tflops),
            "peak_mem_gib": timing.peak_mem_gib,
            "first_call_s": timing.first_call_s,
            "params": params,
            **(extra or {}),
        }
        self.report.add("step", row)
        print(format_step_row(row), flush=True)
        return row

    # -- ours

    def build_ours(self, index: int) -> OurModel:
        model_size, batch, sizes = self.plan.models[index]
        cfg = self.cfg_for(model_size, batch)
        _, _, eager = build_training(cfg, self.accelerator, 1e-4, tuple(sizes), compile_mode="none")
        self.ours[index] = OurModel(model_size, batch, tuple(sizes), cfg, eager)
        return self.ours[index]

    def time_ours(self, ours: OurModel, size: int, step: TrainStep, compile_mode: str, partial_cfg=None) -> dict:
        """One row of ours; with partial_cfg, the partial step (impl "ours_partial", its FLOPs at its share)."""
        timing = time_step(step, ours.cfg, size, self.plan.steps, self.plan.warmup, self.device, own_peak=True)
        extra = {}
        if compile_mode != "none":
            # the first call compiles this size's graph and runs one step
            extra["compile_s"] = max(timing.first_call_s - timing.seconds_per_step, 0.0)
        if partial_cfg is not None:
            extra["decode_fraction"] = partial_cfg.model.decode_fraction
        return self.record(
            "ours" if partial_cfg is None else "ours_partial",
            ours.size,
            ours.batch,
            size,
            compile_mode,
            timing,
            ours.cfg if partial_cfg is None else partial_cfg,
            count_params(step.model),
            extra,
        )

    def partial_eager(self, index: int) -> None:
        """Ours decoding a share of the patches (model.decode_fraction), eager, at the plan's partial sizes."""
        model_size, batch, _ = self.plan.models[index]
        cfg = self.cfg_for(model_size, batch, partial=True)
        for size in self.plan.partial_sizes:
            item = f"ours_partial {model_size} b{batch} B={size} eager"
            if not self.report.fits(
                "step", item, self.estimate_s(model_size, batch, size, cfg, index not in self.ours)
            ):
                continue
            with self.report.guard("step", item):
                ours = self.ours.get(index) or self.build_ours(index)
                self.time_ours(
                    ours, size, ours.partial_step(self.accelerator, cfg, "none", self.plan.compile_backend), "none", cfg
                )

    def ours_eager(self, index: int) -> None:
        model_size, batch, sizes = self.plan.models[index]
        for k, size in enumerate(sizes):
            item = f"ours {model_size} b{batch} B={size} eager"
            cfg = self.cfg_for(model_size, batch)
            if not self.report.fits("step", item, self.estimate_s(model_size, batch, size, cfg, k == 0)):
                continue
            with self.report.guard("step", item):
                ours = self.ours.get(index) or self.build_ours(index)
                self.time_ours(ours, size, ours.eager, "none")

    # -- the Hugging Face peer

    def hf(self, index: int) -> None:
        model_size, batch, sizes = self.plan.models[index]
        try:
            import transformers  # noqa: F401
        except ImportError:
            for size in sizes:
                self.report.skip(
                    "step",
                    f"hf {model_size} b{batch} B={size}",
                    "transformers is not installed (pip install -e '.[bench]')",
                )
            return
        cfg = self.cfg_for(model_size, batch)
        peer: list = []  # [model, optimizer] once built
        for k, size in enumerate(sizes):
            item = f"hf {model_size} b{batch} B={size} eager"
            if not self.report.fits("step", item, self.estimate_s(model_size, batch, size, cfg, k == 0)):
                continue
            with self.report.guard("step", item):
                peer = peer or list(hf_training(cfg, self.accelerator))
                self.time_hf(*peer, cfg, model_size, batch, size)
        del peer
        free_memory()

    def time_hf(self, model, optimizer, cfg, model_size: str, batch: int, size: int) -> dict:
        accelerator = self.accelerator
        pixels = torch.randn(batch, 3, size, size, device=self.device)  # (n, 3, B, B) normalised input
        interpolate = size != cfg.data.crop_size

        def run() -> None:
            out = model(pixel_values=pixels, interpolate_pos_encoding=interpolate)
            accelerator.backward(out.loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        others = allocated() - owned_bytes(model, optimizer)
        timing = time_calls(run, self.plan.steps, self.plan.warmup, self.device, others)
        attn = getattr(accelerator.unwrap_model(model).config, "_attn_implementation", None)
        return self.record(
            "hf",
            model_size,
            batch,
            size,
            "none",
            timing,
            cfg,
            count_params(model),
            {"attn_implementation": attn, "interpolate_pos_encoding": interpolate},
        )

    # -- ours compiled

    def compiled(self, mode: str) -> None:
        stopped = False
        for index, size, *kind in self.plan.compile_order:
            if index in self.left_out:
                continue
            partial = kind == ["partial"]
            model_size, batch, _ = self.plan.models[index]
            item = f"ours{'_partial' if partial else ''} {model_size} b{batch} B={size} compile={mode}"
            compile_est = self.compile_estimate_s(model_size)
            cfg = self.cfg_for(model_size, batch)
            if stopped:
                self.report.skip("step", item, "an earlier compiled row was stopped at its limit")
                continue
            if self.compile_spent + compile_est > self.args.compile_cap_s:
                self.report.skip(
                    "step",
                    item,
                    f"compile cap: {self.compile_spent:.0f} s spent + about {compile_est:.0f} s "
                    f"for this graph > --compile-cap-s {self.args.compile_cap_s:.0f}",
                )
                continue
            estimate = compile_est + self.estimate_s(model_size, batch, size, cfg, index not in self.ours)
            if not self.report.fits("step", item, estimate, self.later_reserve()):
                continue
            t0, failures = time.perf_counter(), len(self.report.data["failed"])
            # the row may run to the compile cap, never into the later sections' reserve
            limit = min(self.args.compile_cap_s - self.compile_spent, self.report.left() - self.later_reserve())
            with self.report.guard("step", item, limit):
                ours = self.ours.get(index) or self.build_ours(index)
                if partial:
                    pcfg = self.cfg_for(model_size, batch, partial=True)
                    self.time_ours(
                        ours,
                        size,
                        ours.partial_step(self.accelerator, pcfg, mode, self.plan.compile_backend),
                        mode,
                        pcfg,
                    )
                else:
                    self.time_ours(
                        ours, size, ours.compiled_step(self.accelerator, mode, self.plan.compile_backend), mode
                    )
            self.compile_spent += time.perf_counter() - t0
            stopped = (
                len(self.report.data["failed"]) > failures and "OutOfTime" in self.report.data["failed"][-1]["error"]
            )

    def drop(self, index: int) -> None:
        self.ours.pop(index, None)
        free_memory()


def step_ratios(report: Report, crop: int) -> None:
    """ours / HF at each (model, batch, B), eager and compiled; each B against our own full-size figure."""
    rows = report.data["step"]
    report.data["ratios"], report.data["size_speedups"] = [], []
    for hf in (r for r in rows if r["impl"] == "hf"):
        key = {k: hf[k] for k in ("model", "batch", "size")}
        ratio = dict(key, hf_img_s=hf["img_s"])
        for r in rows:  # ours_<compile>_over_hf, ours_partial_<compile>_over_hf (HF decodes every masked patch)
            if r["impl"] in ("ours", "ours_partial") and all(r[k] == v for k, v in key.items()):
                ratio[f"{r['impl']}_{r['compile']}_img_s"] = r["img_s"]
                ratio[f"{r['impl']}_{r['compile']}_over_hf"] = r["img_s"] / hf["img_s"]
        report.data["ratios"].append(ratio)
    for r in rows:
        full = next(
            (
                x
                for x in rows
                if x["impl"] == r["impl"]
                and x["model"] == r["model"]
                and x["batch"] == r["batch"]
                and x["compile"] == r["compile"]
                and x["size"] == crop
            ),
            None,
        )
        if full is not None and r["size"] != crop:
            report.data["size_speedups"].append(
                {
                    "impl": r["impl"],
                    "model": r["model"],
                    "batch": r["batch"],
                    "compile": r["compile"],
                    "size": r["size"],
                    "over_full_size": r["img_s"] / full["img_s"],
                }
            )
    report.save()
