"""Every benchmark times the step a run trains: for a row that decodes a share of the full size's patches at a
curriculum's small sizes, the training loop and each benchmark ask the model for the same computation."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import CPU_RECIPE, MINI, REPO, in_process_run, load_benchmark

from mae_et.models.mae import MaskedAutoencoderViT
from mae_et.train.config import curriculum_stages, load_pretrain_config
from mae_et.train.pretrain import mask_noise, pretrain

# etpp at reduced sizes (32 and 40 px of a 48-px crop), a quarter of the full crop's 36 patches decoded at every stage
ROW = {
    "curriculum.schedule": "etpp",
    "curriculum.budget": "compute",
    "curriculum.mode": "resize",
    "model.decode_fraction": 0.25,
    "model.decode_fraction_of": "full_size",
}


@pytest.fixture
def asked(monkeypatch):
    """{(B, mask ratio, decoded share, what it is a share of)} the model's forward was called with."""
    seen: set[tuple] = set()
    forward = MaskedAutoencoderViT.forward

    def spy(self, imgs, **kw):
        seen.add((imgs.shape[-1], kw["mask_ratio"], kw["decode_fraction"], kw["decode_of_patches"]))
        return forward(self, imgs, **kw)

    monkeypatch.setattr(MaskedAutoencoderViT, "forward", spy)
    return seen


def row_config(tmp_path, *more: str):
    overrides = [f"{k}={v}" for k, v in ROW.items()]
    return load_pretrain_config(
        CPU_RECIPE,
        [*overrides, f"data.root={MINI}", f"output_dir={tmp_path / 'runs'}", "tracking.wandb=off", *more],
    )


def trained(tmp_path, asked) -> set[tuple]:
    """What the training loop asks for over a whole (short) etpp run: every stage's size."""
    cfg = row_config(
        tmp_path,
        "train.epochs=1",
        "train.batch_size=16",
        "tracking.knn_every_epochs=0",
        "tracking.recon_every_epochs=0",
    )
    with in_process_run():
        pretrain(cfg)
    run = set(asked)
    asked.clear()
    assert {b for b, *_ in run} == {s.size for s in curriculum_stages(cfg)[0]} and len({b for b, *_ in run}) > 1
    assert {d for *_, d in run} == {36}  # the full 48-px crop's patches, at every size
    return run


def test_each_benchmark_step_is_the_training_loops(tmp_path, asked):
    run = trained(tmp_path, asked)
    cfg = row_config(tmp_path, "train.batch_size=4")
    sizes = sorted({b for b, *_ in run})

    throughput = load_benchmark("throughput")
    with in_process_run():
        throughput.bench_row(cfg, cfg.model.size, 4, sizes, steps=1, warmup=0, peak_tflops=1.0, data_root=None)
    assert asked == run, "benchmarks/throughput.py times another step"
    asked.clear()

    from benchmarks.study.runs import warm_run

    with in_process_run():
        warm_run("row", cfg)
    assert asked == run, "the study's warm-up builds another step"
    asked.clear()

    from benchmarks.gpu.steps import OurModel
    from mae_et.train.step import build_training

    with in_process_run():
        accelerator = load_benchmark("throughput").fresh_accelerator("fp32")
        _, _, eager = build_training(cfg, accelerator, 1e-4, tuple(sizes), compile_mode="none")
        ours = OurModel(cfg.model.size, 4, tuple(sizes), cfg, eager)
        images = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)  # (n, 3, S, S)
        for step in (
            ours.partial_step(accelerator, cfg, "none", "eager"),
            ours.compiled_step(accelerator, "none", "eager"),
        ):
            for b in sizes:
                step(images, b, mask_noise(0, 0, 0, 0, (4, (b // 8) ** 2), accelerator.device))
    assert asked == run, "benchmarks/gpu_check.py times another step"


def test_step_costs_times_each_runs_own_step(tmp_path, asked):
    """benchmarks/step_costs.py on a study whose one curriculum run is the row: the same computation as training."""
    run = trained(tmp_path, asked)
    raw = yaml.safe_load((REPO / "configs" / "study" / "mini_cpu-smoke.yaml").read_text())
    raw["pretrain"]["recipe"] = str(CPU_RECIPE)
    raw["eval"]["finetune"]["recipe"] = str(REPO / "configs" / "finetune" / "vit-micro-p8_mae_cpu-test.yaml")
    raw["runs"] = {
        "baseline": {"budget": 1.0, "overrides": {"curriculum.schedule": "none"}},
        "row": {"budget": 1.0, "overrides": ROW},
    }
    raw["targets"] = {"runs": {}}
    raw.pop("ablations", None)
    raw.pop("frontier", None)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    from benchmarks.study.config import load_study

    step_costs = load_benchmark("step_costs")
    with in_process_run():
        step_costs.measure(load_study(path), steps_per_epoch=15, rounds=1, warmup=0, steps=1)
    assert {a for a in asked if a[2] == 0.25} == run
