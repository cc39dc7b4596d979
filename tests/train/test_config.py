"""Recipes, overrides and validation: every mistake fails in one clear line."""

from __future__ import annotations

import pytest
import yaml
from conftest import CPU_RECIPE, REPO

from mae_et.recipes import ConfigError, build_config, parse_overrides, save_config
from mae_et.train.config import PretrainConfig, curriculum_stages, load_pretrain_config

RECIPES = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def load(mini_root, *overrides):
    return load_pretrain_config(CPU_RECIPE, [f"data.root={mini_root}", *overrides])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(recipe, mini_root):
    cfg = load_pretrain_config(recipe, [f"data.root={mini_root}"])
    assert cfg.name == recipe.stem
    stages, budget = curriculum_stages(cfg)
    assert stages[-1].size == cfg.data.crop_size


def test_recipe_names_describe_their_curriculum(mini_root):
    for recipe in RECIPES:
        cfg = load_pretrain_config(recipe, [f"data.root={mini_root}"])
        expected = {"none": "_baseline_", "et": "_et_", "etpp": "_etpp_"}[cfg.curriculum.schedule]
        assert expected in recipe.name, recipe.name
        assert f"mae_vit-{cfg.model.size}-p{cfg.model.patch_size}_" in recipe.name


def test_base_inheritance_and_overrides(mini_root):
    cfg = load(mini_root, "train.epochs=7", "optim.clip_grad=1.5", "data.scale=[0.3, 0.9]", "curriculum.schedule=etpp")
    assert cfg.train.epochs == 7.0 and isinstance(cfg.train.epochs, float)
    assert cfg.optim.clip_grad == 1.5
    assert cfg.data.scale == (0.3, 0.9)
    assert cfg.model.size == "micro"  # from the recipe
    assert cfg.optim.betas == (0.9, 0.95)  # inherited from the base recipe
    assert curriculum_stages(cfg)[1] == "compute"


def test_scientific_notation_without_dot_is_a_number(mini_root):
    cfg = load(mini_root, "optim.blr=1e-4")
    assert cfg.optim.blr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=5", "unknown config key 'train.epoch'; did you mean 'train.epochs'"),
        ("trian.epochs=5", "did you mean 'train.epochs'"),
        ("model.mask_ration=0.5", "did you mean 'model.mask_ratio'"),
        ("train.epochs=abc", "'train.epochs' must be a number"),
        ("train.batch_size=2.5", "'train.batch_size' must be an integer"),
        ("model.norm_pix_loss=maybe", "must be true or false"),
        ("model.mask_ratio=1.0", r"model.mask_ratio must be in \(0, 1\)"),
        ("model.mask_ratio=0", r"model.mask_ratio must be in \(0, 1\)"),
        ("data.crop_size=36", "data.crop_size 36 is not a multiple of model.patch_size 8"),
        ("curriculum.stages=[{size: 56, fraction: 1.0}]", "above the crop size"),
        ("curriculum.stages=[{size: 20, fraction: 1.0}]", "multiple of the patch size"),
        ("curriculum.stages=[{size: 16, fraction: 0.5}]", "sum"),
        ("curriculum.schedule=fancy", "curriculum.schedule 'fancy' is unknown"),
        ("curriculum.mode=wavelet", "curriculum.mode 'wavelet' is unknown"),
        ("train.precision=fp8", "train.precision 'fp8' is unknown"),
        ("model.size=gigantic", "model.size 'gigantic' is unknown"),
        ("model.pos_embed=learned", "model.pos_embed 'learned' is unknown; choose grid"),
        ("curriculum.min_size=20", "curriculum.min_size 20 must be a multiple of the patch size 8"),
        ("curriculum.min_size=64", "curriculum.min_size 64 must be .* between 8 and the crop size 48"),
        ("optim.warmup_epochs=99", "optim.warmup_epochs must be in"),
        ("data.root=/no/such/folder", "data.root '/no/such/folder' is not a folder"),
        ("trainepochs", "not of the form section.key=value"),
    ],
)
def test_invalid_values_fail_with_one_clear_line(mini_root, override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load(mini_root, override)
    assert "\n" not in str(info.value)


def test_min_size_lifts_the_small_stages_and_keeps_their_share(mini_root):
    from mae_et.train.config import curriculum_stages

    plain, _ = curriculum_stages(load(mini_root, "curriculum.schedule=etpp"))
    floored, budget = curriculum_stages(load(mini_root, "curriculum.schedule=etpp", "curriculum.min_size=32"))
    assert budget == "compute" and min(s.size for s in plain) == 24
    assert [s.size for s in floored] == [max(s.size, 32) for s in plain]
    assert [s.fraction for s in floored] == [s.fraction for s in plain]


def test_missing_data_root_says_what_to_pass():
    with pytest.raises(ConfigError, match="data.root is missing: pass data.root=/path/to/imagefolder") as info:
        load_pretrain_config(CPU_RECIPE, [])
    assert "Imagenette" in str(info.value)  # where to get a copy


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrain_config("configs/pretrain/nope.yaml", [])


def test_saved_config_round_trips(tmp_path, mini_root):
    cfg = load(mini_root, "train.epochs=3")
    save_config(cfg, tmp_path / "c.yaml")
    again = build_config(PretrainConfig, yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}


@pytest.mark.parametrize("value, expected", [("off", "off"), ("false", "off"), ("offline", "offline"), ("auto", "auto")])
def test_wandb_switch_accepts_yaml_booleans(mini_root, value, expected):
    assert load(mini_root, f"tracking.wandb={value}").tracking.wandb == expected
