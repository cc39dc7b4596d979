"""Linear probe: a known answer on synthetic features, both modes end to end on the mini set, resume, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ONE_THREAD_ENV, reset_accelerate
from test_finetune import MINI, REPO, load_entry_point, metrics

from mae_et import checkpoint as ck
from mae_et.data.folder import DataError
from mae_et.data.labelled import shard_range
from mae_et.evaluate.config import load_linprobe_config
from mae_et.evaluate.engine import RESULT_FILE
from mae_et.evaluate.linprobe import FEATURES_DIR, clamp_global_batch, fit_probe_on_features, linprobe
from mae_et.models.vit import LoadError
from mae_et.recipes import ConfigError

LP_RECIPE = REPO / "configs" / "linprobe" / "vit-micro-p8_mae_cpu-test.yaml"


@pytest.fixture(autouse=True)
def _one_thread(one_thread_fresh_accelerate):
    yield


def cfg_for(out: Path, checkpoint: Path, *overrides: str, root: Path = MINI):
    return load_linprobe_config(
        LP_RECIPE, [f"model.checkpoint={checkpoint}", f"data.root={root}", f"output_dir={out}", *overrides]
    )


# ----------------------------------------------------------------------------- known answers


def test_separable_gaussian_clusters_reach_100_percent():
    g = torch.Generator().manual_seed(0)

    def clusters(n: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 2  # (n,)
        centres = torch.zeros(2, dim)
        centres[0, 0], centres[1, 0] = 3.0, -3.0  # 6 standard deviations apart along one axis
        return centres[labels] + torch.randn(n, dim, generator=g), labels  # (n, D), (n,)

    train_x, train_y = clusters(512)
    val_x, val_y = clusters(256)
    # LARS moves a weight by ~lr * 1e-3 of its norm per step: 160 steps need a large lr to converge
    history = fit_probe_on_features(
        train_x, train_y, val_x, val_y, num_classes=2, epochs=20, global_batch=64, blr=50.0, warmup_epochs=1
    )
    assert [h["epoch"] for h in history] == list(range(1, 21))
    assert history[-1]["top1"] >= 98.0
    assert history[-1]["top5"] == 100.0  # top-5 of 2 classes is top-2


def test_global_batch_clamp_and_shards():
    assert clamp_global_batch(16384, 240, 1) == 240
    assert clamp_global_batch(16384, 241, 2) == 240  # a multiple of the process count
    assert clamp_global_batch(64, 240, 2) == 64
    with pytest.raises(ConfigError, match="BatchNorm"):
        clamp_global_batch(16384, 3, 2)
    shards = [shard_range(10, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3] and [i for s in shards for i in s] == list(range(10))


# ----------------------------------------------------------------------------- end to end


def test_cli_cached_end_to_end(pretrained, tmp_path):
    cmd = [
        sys.executable,
        "finetune/linprobe.py",
        "--config",
        str(LP_RECIPE),
        f"model.checkpoint={pretrained}",
        f"data.root={MINI}",
        f"output_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ONE_THREAD_ENV, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    run_dir = tmp_path / LP_RECIPE.stem
    result = json.loads((run_dir / RESULT_FILE).read_text())
    assert result["mode"] == "cached" and result["num_classes"] == 10 and result["epochs"] == 20
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0 and result["final"]["val_images"] == 100
    assert result["best"]["top1"] >= result["top1"]
    records = metrics(run_dir)
    assert [r["epoch"] for r in records if "top1" in r] == list(range(1, 21))  # top-1 / top-5 every epoch
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]  # the head learns something from 1-epoch MAE features
    assert (run_dir / FEATURES_DIR / "train.safetensors").is_file() and (
        run_dir / FEATURES_DIR / "val.safetensors"
    ).is_file()


def test_cached_resume_reuses_features(pretrained, tmp_path):
    first = linprobe(cfg_for(tmp_path, pretrained, "train.epochs=4", "train.max_steps=5"))
    assert first.step == 5 and first.result is None and first.checkpoint.name == "step_00000005"
    cache = first.run_dir / FEATURES_DIR / "train.safetensors"
    stamp = cache.stat().st_mtime_ns
    reset_accelerate()
    second = linprobe(cfg_for(tmp_path, pretrained, "train.epochs=4"))
    assert second.step == 12 and second.result is not None
    assert cache.stat().st_mtime_ns == stamp  # features were not extracted again
    assert [h["epoch"] for h in second.history] == [2, 3, 4]  # epoch 1 ended before the stop
    steps = [r["step"] for r in metrics(second.run_dir) if "loss" in r]
    assert steps == sorted(set(steps))
    # and it ends where an uninterrupted run ends: the same head weights, the same accuracies
    reset_accelerate()
    straight = linprobe(cfg_for(tmp_path / "straight", pretrained, "train.epochs=4"))
    final = ck.load_checkpoint(ck.list_checkpoints(second.run_dir / "checkpoints")[-1]).model_state
    expected = ck.load_checkpoint(ck.list_checkpoints(straight.run_dir / "checkpoints")[-1]).model_state
    assert final.keys() == expected.keys() and len(final) > 0
    for k in final:
        torch.testing.assert_close(final[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)
    assert second.history == straight.history[1:]


def test_online_mode_clamps_batch_and_resumes(pretrained, tmp_path, capsys):
    # the reference's global batch 16384 on 240 images: clamped to 240 -> one step per epoch
    first = linprobe(
        cfg_for(
            tmp_path,
            pretrained,
            "linprobe.mode=online",
            "train.batch_size=16384",
            "train.epochs=3",
            "train.max_steps=2",
            "checkpoint.every_epochs=1",
        )
    )
    assert "clamped to 240" in capsys.readouterr().out
    assert first.step == 2 and [h["epoch"] for h in first.history] == [1, 2]
    reset_accelerate()
    second = linprobe(
        cfg_for(
            tmp_path,
            pretrained,
            "linprobe.mode=online",
            "train.batch_size=16384",
            "train.epochs=3",
            "checkpoint.every_epochs=1",
        )
    )
    assert second.step == 3 and [h["epoch"] for h in second.history] == [3]
    assert second.result["global_batch"] == 240 and second.result["global_batch_requested"] == 16384
    assert second.result["mode"] == "online" and not (second.run_dir / FEATURES_DIR).exists()


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_fail_before_training(pretrained, tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.checkpoint is missing"):
        load_linprobe_config(LP_RECIPE, [f"data.root={MINI}"])
    with pytest.raises(ConfigError, match="linprobe.mode"):
        cfg_for(tmp_path, pretrained, "linprobe.mode=offline")
    with pytest.raises(ConfigError, match=r"^linprobe.pool 'max' is unknown; choose one of cls, mean"):
        cfg_for(tmp_path, pretrained, "linprobe.pool=max")

    classes = sorted(p.name for p in (MINI / "train").iterdir())
    root = tmp_path / "data"
    (root / "val").mkdir(parents=True)
    (root / "train").symlink_to(MINI / "train")
    for c in classes[1:]:
        (root / "val" / c).symlink_to(MINI / "val" / c)
    with pytest.raises(DataError, match=classes[0]):
        linprobe(cfg_for(tmp_path / "runs", pretrained, root=root))
    reset_accelerate()

    broken = tmp_path / "broken_ckpt"
    shutil.copytree(ck.list_checkpoints(pretrained / "checkpoints")[-1], broken)
    model_file = broken / ck.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(LoadError, match="unreadable"):
        linprobe(cfg_for(tmp_path / "runs", broken))
    reset_accelerate()
    entry = load_entry_point("linprobe")
    with pytest.raises(SystemExit) as exit_info:
        entry.main(
            [
                "--config",
                str(LP_RECIPE),
                f"model.checkpoint={broken}",
                f"data.root={MINI}",
                f"output_dir={tmp_path / 'runs'}",
            ]
        )
    assert exit_info.value.code == 2 and "unreadable" in capsys.readouterr().err
    assert not (tmp_path / "runs" / LP_RECIPE.stem / "checkpoints").exists()
