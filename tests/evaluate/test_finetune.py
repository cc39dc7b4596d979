"""Fine-tuning end to end on the real mini data set: layer decay, best checkpoint, resume, curriculum, bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import MINI, ONE_THREAD_ENV, REPO, reset_accelerate
from safetensors.torch import load_file

from mae_et import checkpoint as ck
from mae_et.data.folder import DataError
from mae_et.evaluate.config import load_finetune_config, randaug_magnitude, with_randaug_magnitude
from mae_et.evaluate.finetune import (
    BEST_DIR,
    RESULT_FILE,
    epoch_magnitude,
    finetune,
    layer_decay_param_groups,
    load_finetune_model,
)
from mae_et.models.vit import EncoderSpec, LoadError, build_vit
from mae_et.recipes import ConfigError
from mae_et.run.plan import set_lr

PRETRAIN_RECIPE = "configs/pretrain/mae_vit-micro-p8_et_cpu-test.yaml"
FT_RECIPE = REPO / "configs" / "finetune" / "vit-micro-p8_mae_cpu-test.yaml"


@pytest.fixture(autouse=True)
def _one_thread(one_thread_fresh_accelerate):
    yield


def cfg_for(out: Path, checkpoint: Path, *overrides: str, root: Path = MINI):
    return load_finetune_config(
        FT_RECIPE, [f"model.checkpoint={checkpoint}", f"data.root={root}", f"output_dir={out}", *overrides]
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_entry_point(name: str):
    spec = importlib.util.spec_from_file_location(f"entry_{name}", REPO / "finetune" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli_run(pretrained, tmp_path_factory) -> Path:
    """The real entry point, as a user runs it: 2 epochs of the CPU recipe."""
    out = tmp_path_factory.mktemp("ft_cli")
    cmd = [
        sys.executable,
        "finetune/finetune.py",
        "--config",
        str(FT_RECIPE),
        f"model.checkpoint={pretrained}",
        f"data.root={MINI}",
        f"output_dir={out}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ONE_THREAD_ENV, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "epoch 2/2" in proc.stdout and "finished" in proc.stdout
    return out / FT_RECIPE.stem


# ----------------------------------------------------------------------------- optimizer groups


def test_layer_decay_groups_micro():
    """depth 2, decay 0.65: stem 0.65^3, block0 0.65^2, block1 0.65, final norms and head 1."""
    model = build_vit(EncoderSpec("micro", 8, 48), num_classes=10, global_pool="avg")
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.65)
    name_of = {id(p): n for n, p in model.named_parameters()}
    scale, decay = {}, {}
    for g in groups:
        for p in g["params"]:
            scale[name_of[id(p)]], decay[name_of[id(p)]] = g["lr_scale"], g["weight_decay"]
    assert set(scale) == set(name_of.values())  # every trainable parameter is in exactly one group
    expected = {
        "patch_embed.proj.weight": 0.65**3,
        "patch_embed.proj.bias": 0.65**3,
        "cls_token": 0.65**3,
        "pos_embed": 0.65**3,
        "head.weight": 1.0,
        "head.bias": 1.0,
        "fc_norm.weight": 1.0,
        "fc_norm.bias": 1.0,
    }
    for name, value in expected.items():
        assert scale[name] == pytest.approx(value), name
    for name, value in scale.items():
        if name.startswith("blocks.0."):
            assert value == pytest.approx(0.65**2), name
        if name.startswith("blocks.1."):
            assert value == pytest.approx(0.65), name
    # the deepest block learns fastest, the patch embedding slowest
    assert (
        scale["patch_embed.proj.weight"]
        < scale["blocks.0.attn.qkv.weight"]
        < scale["blocks.1.attn.qkv.weight"]
        < scale["head.weight"]
    )
    # no weight decay on pos/cls tokens, biases and norms; decay on weight matrices
    assert decay["pos_embed"] == decay["cls_token"] == decay["blocks.0.norm1.weight"] == decay["head.bias"] == 0.0
    assert decay["blocks.1.mlp.fc1.weight"] == decay["head.weight"] == 0.05

    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr(optimizer, 2.0)
    assert sorted(g["lr"] for g in optimizer.param_groups)[0] == pytest.approx(2.0 * 0.65**3)
    assert max(g["lr"] for g in optimizer.param_groups) == pytest.approx(2.0)


def test_randaug_ramp_magnitudes():
    assert randaug_magnitude("rand-m9-mstd0.5-inc1") == 9
    assert with_randaug_magnitude("rand-m9-mstd0.5-inc1", 3) == "rand-m3-mstd0.5-inc1"
    cfg = load_finetune_config(
        FT_RECIPE, [f"model.checkpoint={FT_RECIPE}", f"data.root={MINI}", "augment.randaug_ramp_start=1"]
    )
    assert [epoch_magnitude(cfg, e, 5) for e in range(5)] == [1, 3, 5, 7, 9]
    with pytest.raises(ConfigError, match="RandAugment"):
        load_finetune_config(
            FT_RECIPE,
            [
                f"model.checkpoint={FT_RECIPE}",
                f"data.root={MINI}",
                "augment.randaug_ramp_start=1",
                "augment.auto_augment=null",
            ],
        )


def test_unknown_key_and_pos_embed_resampling(pretrained):
    with pytest.raises(ConfigError, match="did you mean 'optim.layer_decay'"):
        load_finetune_config(FT_RECIPE, [f"model.checkpoint={pretrained}", f"data.root={MINI}", "optim.layer_decy=0.7"])
    # pretrained at 48 px (6x6 patches), fine-tuned at 64 px (8x8): pos_embed resampled, head near zero
    cfg = load_finetune_config(FT_RECIPE, [f"model.checkpoint={pretrained}", f"data.root={MINI}", "data.img_size=64"])
    model, spec = load_finetune_model(cfg, num_classes=10)
    assert spec.img_size == 48 and tuple(model.pos_embed.shape) == (1, 1 + 8 * 8, 64)
    assert model.head.weight.shape == (10, 64) and model.head.weight.abs().max() < 1e-3
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


# ----------------------------------------------------------------------------- end to end


def test_cli_end_to_end_best_checkpoint(cli_run):
    records = metrics(cli_run)
    evals = [r for r in records if "top1" in r]
    assert [r["epoch"] for r in evals] == [1, 2]  # top-1 / top-5 on the val split every epoch
    for r in evals:
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0 and r["val_images"] == 100
    train_logs = [r for r in records if "loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_logs)

    # RUN/best/ holds exactly one checkpoint: the first epoch with the highest top-1
    best_dirs = ck.list_checkpoints(cli_run / BEST_DIR)
    assert len(best_dirs) == 1
    best_meta = json.loads((best_dirs[0] / ck.META_FILE).read_text())
    best_eval = max(evals, key=lambda r: (r["top1"], -r["epoch"]))
    assert best_meta["epoch"] == best_eval["epoch"] and best_meta["top1"] == pytest.approx(best_eval["top1"])
    assert best_meta["step"] == best_eval["step"]
    best_weights = load_file(str(best_dirs[0] / ck.MODEL_FILE))
    final_weights = load_file(str(ck.list_checkpoints(cli_run / "checkpoints")[-1] / ck.MODEL_FILE))
    assert best_weights.keys() == final_weights.keys() and "head.weight" in best_weights

    result = json.loads((cli_run / RESULT_FILE).read_text())
    assert (
        result["final"]["epoch"] == 2 and result["best"]["epoch"] == best_meta["epoch"] and result["num_classes"] == 10
    )


def test_resume_after_max_steps_matches_uninterrupted(cli_run, pretrained, tmp_path):
    # 15 steps per epoch: stop inside epoch 2, then relaunch the same config
    first = finetune(cfg_for(tmp_path, pretrained, "train.max_steps=20"))
    run_dir = first.run_dir
    assert first.step == 20 and first.checkpoint.name == "step_00000020"
    assert not (run_dir / RESULT_FILE).exists()  # not finished
    reset_accelerate()
    second = finetune(cfg_for(tmp_path, pretrained))
    assert second.step == 30 and (run_dir / RESULT_FILE).is_file()

    records = metrics(run_dir)
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 30  # nothing logged twice
    assert [r["epoch"] for r in records if "top1" in r] == [1, 2]
    # every random choice is a function of the step: the resumed run ends where the CLI run (same config) ended
    resumed = load_file(str(second.checkpoint / ck.MODEL_FILE))
    straight = load_file(str(ck.list_checkpoints(cli_run / "checkpoints")[-1] / ck.MODEL_FILE))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5, msg=key)


def test_a_relaunch_with_another_encoder_is_refused_or_starts_over(pretrained, tmp_path):
    """The run folder of a fine-tune holds one encoder's run: a relaunch naming another model.checkpoint stops in
    one line (it would resume the old fine-tune and never load the new encoder), and checkpoint.resume=false
    starts over, the earlier run moved aside; a run folder that is the encoder's own run is refused before any
    work."""
    from mae_et.errors import UserError

    few = ["train.max_steps=2", "checkpoint.every_steps=2"]
    first = finetune(cfg_for(tmp_path, pretrained, *few))
    other = tmp_path / "another_encoder"  # the same weights under another path: another encoder, as far as a run knows
    shutil.copytree(ck.resolve_checkpoint(pretrained), other)
    reset_accelerate()
    with pytest.raises(UserError, match=r"model.checkpoint") as refused:
        finetune(cfg_for(tmp_path, other, *few))
    assert str(other) in str(refused.value) and "name=" in str(refused.value)
    assert "checkpoint.resume=false" in str(refused.value)
    assert ck.list_checkpoints(first.run_dir / "checkpoints") == [first.checkpoint]  # untouched
    reset_accelerate()
    again = finetune(cfg_for(tmp_path, other, *few, "checkpoint.resume=false"))
    assert ck.list_checkpoints(first.run_dir / "old-1" / "checkpoints")[-1].name == first.checkpoint.name
    saved = {
        d: yaml.safe_load((d / ck.CONFIG_FILE).read_text())["model"]["checkpoint"]
        for d in (first.run_dir, first.run_dir / "old-1")
    }
    assert again.step == 2 and saved == {first.run_dir: str(other), first.run_dir / "old-1": str(pretrained)}
    reset_accelerate()
    with pytest.raises(UserError, match=r"overlaps"):
        finetune(cfg_for(pretrained.parent, pretrained, *few, f"name={pretrained.name}"))


def test_curriculum_and_randaug_ramp(pretrained, tmp_path):
    result = finetune(cfg_for(tmp_path, pretrained, "curriculum.schedule=et", "augment.randaug_ramp_start=1"))
    records = [r for r in metrics(result.run_dir) if "loss" in r]
    sizes = [r["size"] for r in records]
    assert sizes == sorted(sizes) and sizes[0] == 32 and sizes[-1] == 48  # ET at 48 px, patch 8: 32 / 40 / 48
    assert 40 in sizes
    assert [r["randaug_magnitude"] for r in records if r["epoch"] <= 1] == [1, 1, 1]  # epoch 1: m = ramp start
    assert records[-1]["randaug_magnitude"] == 9  # last epoch: the recipe's m9
    assert result.best is not None and (result.run_dir / RESULT_FILE).is_file()


# ----------------------------------------------------------------------------- bad input


def _dataset_with(tmp_path: Path, train_classes: list[str] | None, val_classes: list[str] | None) -> Path:
    """A dataset root whose splits link to the mini set's class folders (None = the whole split)."""
    root = tmp_path / "data"
    for split, classes in (("train", train_classes), ("val", val_classes)):
        if classes is None:
            root.mkdir(parents=True, exist_ok=True)
            (root / split).symlink_to(MINI / split)
            continue
        (root / split).mkdir(parents=True)
        for c in classes:
            (root / split / c).symlink_to(MINI / split / c)
    return root


def test_val_split_missing_classes_is_named(pretrained, tmp_path):
    classes = sorted(p.name for p in (MINI / "train").iterdir())
    root = _dataset_with(tmp_path, None, classes[:-1])
    with pytest.raises(DataError, match=classes[-1]):
        finetune(cfg_for(tmp_path / "runs", pretrained, root=root))
    assert not (tmp_path / "runs" / FT_RECIPE.stem / "checkpoints").exists()  # failed before training


def test_empty_or_absent_split(pretrained, tmp_path):
    root = _dataset_with(tmp_path, [], None)
    (root / "train" / "some_class").mkdir()  # a class folder without images
    with pytest.raises(DataError, match="no valid image files"):
        finetune(cfg_for(tmp_path / "runs", pretrained, root=root))
    reset_accelerate()
    with pytest.raises(DataError, match="data.val_split"):
        finetune(cfg_for(tmp_path / "runs", pretrained, "data.val_split=validation"))


def test_missing_or_truncated_checkpoint(pretrained, tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.checkpoint is missing"):
        load_finetune_config(FT_RECIPE, [f"data.root={MINI}"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_finetune_config(FT_RECIPE, [f"data.root={MINI}", f"model.checkpoint={tmp_path / 'nope'}"])

    broken = tmp_path / "broken_ckpt"
    shutil.copytree(ck.list_checkpoints(pretrained / "checkpoints")[-1], broken)
    model_file = broken / ck.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    with pytest.raises(LoadError, match="unreadable"):
        finetune(cfg_for(tmp_path / "runs", broken))
    reset_accelerate()
    # the entry point reports it in one line and exits 2
    entry = load_entry_point("finetune")
    with pytest.raises(SystemExit) as exit_info:
        entry.main(
            [
                "--config",
                str(FT_RECIPE),
                f"model.checkpoint={broken}",
                f"data.root={MINI}",
                f"output_dir={tmp_path / 'runs'}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unreadable" in err


def test_default_randaugment_never_asks_for_an_invalid_op():
    """Every op of the recipe's RandAugment at its largest magnitude runs (posterize with 0 bits crashed Pillow 13)."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    policy = load_finetune_config(FT_RECIPE, [f"model.checkpoint={REPO}", f"data.root={MINI}"]).augment.auto_augment
    for recipe in (REPO / "configs" / "finetune").glob("*.yaml"):
        text = recipe.read_text()
        assert "auto_augment" not in text or "mmax9" in text, recipe.name
    ra = rand_augment_transform(policy, {"translate_const": 100, "img_mean": (124, 116, 104)})
    image = Image.new("RGB", (32, 32), (120, 60, 200))
    for op in ra.ops:
        top = op.magnitude_max if op.magnitude_max is not None else 10.0  # timm clips jittered magnitudes to 10
        op.prob, op.magnitude_std, op.magnitude = 1.0, 0.0, top
        op(image)  # raises on an invalid op


@pytest.mark.parametrize(
    "override, message",
    [
        # each went through before: a seed numpy refuses mid-setup, timm's KeyError or bare AssertionError at the
        # first transform, a "decay" that climbs, a run scored on its own training images
        ("train.seed=-1", r"^train.seed must be in \[0, 4294967296\), got -1$"),
        ("train.seed=4294967296", r"^train.seed must be in \[0, 4294967296\)"),
        ("optim.betas=[0.9, 1.5]", r"^optim.betas\[1\] must be in \[0, 1\), got 1.5$"),
        ("augment.interpolation=bicubik", r"^augment.interpolation 'bicubik' is unknown; .*did you mean 'bicubic'\?$"),
        ("augment.remode=pixels", r"^augment.remode 'pixels' is unknown; choose one of pixel, rand, const"),
        ("model.global_pool=max", r"^model.global_pool 'max' is unknown; choose one of avg, token$"),
        ("tracking.project=me/mae", r"^tracking.project 'me/mae' is not a W&B project name"),
        ("optim.min_lr=5", r"^optim.min_lr 5 is above the lr"),
        ("data.val_split=train", r"^data.train_split \(.*\) and data.val_split \(.*\) are the same folder"),
        ("data.val_split=./train/", r"are the same folder"),
        ("data.val_split=", r"^data.train_split .* overlap"),
    ],
)
def test_evaluation_config_values_are_bounded_before_any_work(override, message):
    from mae_et.errors import UserError
    from mae_et.evaluate.config import load_linprobe_config

    common = [f"model.checkpoint={REPO}", f"data.root={MINI}"]
    with pytest.raises(UserError, match=message) as info:
        load_finetune_config(FT_RECIPE, [*common, override])
    assert "\n" not in str(info.value)
    if not override.startswith(("augment.", "optim.betas")):  # the probe has no such keys
        with pytest.raises(UserError, match=message):
            load_linprobe_config(REPO / "configs" / "linprobe" / "vit-micro-p8_mae_cpu-test.yaml", [*common, override])


def test_an_augment_policy_with_an_op_pillow_refuses_is_refused_on_load():
    """MAE's own rand-m9-mstd0.5-inc1 draws magnitude 10 now and then, where PosterizeIncreasing asks for 0 bits:
    a Pillow that refuses them crashed a few thousand images into the run. Now: one line on load."""
    from PIL import Image, ImageOps

    try:
        ImageOps.posterize(Image.new("RGB", (2, 2)), 0)
        pytest.skip("this Pillow posterizes to 0 bits: the policy runs")
    except ValueError:
        pass
    common = [f"model.checkpoint={REPO}", f"data.root={MINI}"]
    for policy in ("rand-m9-mstd0.5-inc1", "rand-inc1"):
        with pytest.raises(ConfigError, match=rf"^augment.auto_augment '{policy}': its PosterizeIncreasing op fails"):
            load_finetune_config(FT_RECIPE, [*common, f"augment.auto_augment={policy}"])
    capped = load_finetune_config(FT_RECIPE, [*common, "augment.auto_augment=rand-m9-mstd0.5-inc1-mmax9"])
    assert capped.augment.auto_augment == "rand-m9-mstd0.5-inc1-mmax9"
