"""Recipes, overrides and validation: every mistake fails in one clear line."""

from __future__ import annotations

import pytest
import yaml
from helpers import CPU_RECIPE, REPO, call_main

from mae_et.recipes import ConfigError, build_config, parse_overrides, save_config
from mae_et.train.config import PretrainConfig, curriculum_stages, load_pretrain_config

RECIPES = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def load(mini_root, *overrides):
    return load_pretrain_config(CPU_RECIPE, [f"data.root={mini_root}", *overrides])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(recipe, mini_root, tmp_path):
    """Given the data (and, for a recipe that continues from weights, a start point where it says), each loads."""
    from mae_et.recipes import load_yaml_recipe

    init = load_yaml_recipe(recipe).get("model", {}).get("init")
    start = [f"model.init={tmp_path / init}"] if init else []
    if init:
        (tmp_path / init).write_bytes(b"")  # only its place is checked on load; the run reads it
        with pytest.raises(ConfigError, match=f"model.init '{init}' does not exist"):
            load_pretrain_config(recipe, [f"data.root={mini_root}"])
    cfg = load_pretrain_config(recipe, [f"data.root={mini_root}", *start])
    assert cfg.name == recipe.stem
    stages, budget = curriculum_stages(cfg)
    assert stages[-1].size == cfg.data.crop_size


def test_recipe_names_describe_their_curriculum(mini_root):
    for recipe in RECIPES:
        cfg = load_pretrain_config(recipe, [f"data.root={mini_root}", "model.init=null"])
        expected = {"none": "_baseline_", "et": "_et_", "etpp": "_etpp_"}[cfg.curriculum.schedule]
        assert expected in recipe.name, recipe.name
        assert f"mae_vit-{cfg.model.size}-p{cfg.model.patch_size}_" in recipe.name
        assert ("_hog_" in recipe.name) == (cfg.model.target == "hog"), recipe.name  # the target, when not pixels


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
        ("model.decode_fraction=0", r"model.decode_fraction must be in \(0, 1\], got 0.0"),
        ("model.decode_fraction=1.5", r"model.decode_fraction must be in \(0, 1\]"),
        ("model.decode_fraction_of=full", "model.decode_fraction_of 'full' is unknown; choose one of stage, full_size"),
        ("data.crop_size=36", "data.crop_size 36 is not a multiple of model.patch_size 8"),
        ("curriculum.stages=[{size: 56, fraction: 1.0}]", "above the crop size"),
        ("curriculum.stages=[{size: 20, fraction: 1.0}]", "multiple of the patch size"),
        ("curriculum.stages=[{size: 16, fraction: 0.5}]", "sum"),
        ("curriculum.schedule=fancy", "curriculum.schedule 'fancy' is unknown"),
        ("curriculum.mode=wavelet", "curriculum.mode 'wavelet' is unknown"),
        ("train.precision=fp8", "train.precision 'fp8' is unknown"),
        ("model.size=gigantic", "model.size 'gigantic' is unknown"),
        ("model.pos_embed=learned", "model.pos_embed 'learned' is unknown; choose one of grid, extent"),
        # each a traceback, a silent run on nothing, or a wrong message before the rules moved into the schema
        ("optim.blr=-1e-4", r"optim.blr must be > 0, got -0.0001"),
        ("optim.blr=.inf", r"optim.blr must be a finite number > 0, got inf"),
        ("optim.blr=.nan", r"optim.blr must be a finite number > 0, got nan"),
        ("optim.lr=-1", r"optim.lr must be > 0, got -1.0"),
        ("model.patch_size=0", r"model.patch_size must be > 0, got 0"),
        ("data.num_workers=-1", r"data.num_workers must be >= 0, got -1"),
        (
            "model.decoder_num_heads=5",
            r"model.decoder_embed_dim 32 does not divide into model.decoder_num_heads 5 heads",
        ),
        ("model.decoder_embed_dim=30", r"model.decoder_embed_dim 30 is not a multiple of 4 .*; use e.g. 32"),
        ("train.epochs=.inf", r"train.epochs must be a finite number > 0, got inf"),
        ("checkpoint.every_epochs=-1", r"checkpoint.every_epochs must be >= 0, got -1.0"),
        ("checkpoint.every_steps=0", r"checkpoint.every_steps must be > 0, got 0"),
        (
            "data.crop_size=8",
            r"at input size 8 \(1x1 patches of 8\) model.mask_ratio 0.75 keeps 0 of 1 patches visible",
        ),
        ("model.mask_ratio=0.99", r"keeps 0 of 16 patches visible"),
        ("curriculum.budget=steps", "curriculum.budget 'steps' is unknown; choose one of epochs, compute"),
        ("data.pipeline=gpu", "data.pipeline 'gpu' is unknown; choose one of loader, memory, device_decode"),
        ("train.log_every=0", r"train.log_every must be > 0, got 0"),
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


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../up", "/tmp/elsewhere", "' '", '"a\\0b"'])
def test_a_run_name_is_one_folder_inside_output_dir(micro_run, mini_root, name):
    """name=.. put the run in output_dir's parent (over a config.yaml there): a run name is one folder name, not
    '.', '..', a path, blank or with a NUL, by the same rule in the three run configs."""
    from mae_et.evaluate.config import load_finetune_config, load_linprobe_config

    common = [f"model.checkpoint={micro_run}", f"data.root={mini_root}", f"name={name}"]
    for load_config, recipe in (
        (load_pretrain_config, CPU_RECIPE),
        (load_finetune_config, REPO / "configs" / "finetune" / "vit-micro-p8_mae_cpu-test.yaml"),
        (load_linprobe_config, None),
    ):
        with pytest.raises(ConfigError, match=r"^name '.*' must be one folder name inside output_dir") as info:
            load_config(recipe, common[1:] if load_config is load_pretrain_config else common)
        assert "\n" not in str(info.value) and "name=" in str(info.value)
    assert load(mini_root, "name=..my.run..").run_dir.name == "..my.run.."  # dots inside a name are fine


def test_saved_config_round_trips(tmp_path, mini_root):
    cfg = load(mini_root, "train.epochs=3", "curriculum.stages=[{size: 40, fraction: 0.5}, {size: 48, fraction: 0.5}]")
    save_config(cfg, tmp_path / "c.yaml")
    again = build_config(PretrainConfig, yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}


@pytest.mark.parametrize(
    "value, expected", [("off", "off"), ("false", "off"), ("offline", "offline"), ("auto", "auto")]
)
def test_wandb_switch_accepts_yaml_booleans(mini_root, value, expected):
    assert load(mini_root, f"tracking.wandb={value}").tracking.wandb == expected


def test_a_recipe_with_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, mini_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {CPU_RECIPE}\ntrain:\n  epochs: [3\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=rf"config file '{bad}' is not valid YAML at line \d+, column \d+: ") as info:
        load_pretrain_config(bad, [f"data.root={mini_root}"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"override 'train.epochs=\[3': the value is not valid YAML"):
        load(mini_root, "train.epochs=[3")


def test_a_base_chain_that_reaches_itself_names_the_cycle(tmp_path, mini_root):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\ntrain:\n  epochs: 3\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"inherits itself through _base_ \(a.yaml -> b.yaml -> a.yaml\)"):
        load_pretrain_config(tmp_path / "a.yaml", [f"data.root={mini_root}"])
    (tmp_path / "self.yaml").write_text("_base_: self.yaml\n")
    with pytest.raises(ConfigError, match=r"\(self.yaml -> self.yaml\)"):
        load_pretrain_config(tmp_path / "self.yaml", [f"data.root={mini_root}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("augment.mixup=-0.5", r"augment.mixup must be >= 0, got -0.5"),
        ("augment.cutmix=-1", r"augment.cutmix must be >= 0, got -1.0"),
        ("augment.auto_augment=rand-q9", r"augment.auto_augment 'rand-q9' is not a policy timm knows"),
        ("augment.auto_augment=trivial", r"augment.auto_augment 'trivial' is not a policy timm knows"),
        ("optim.lr=.inf", r"optim.lr must be a finite number > 0, got inf"),
        ("data.num_workers=-1", r"data.num_workers must be >= 0, got -1"),
        ("train.precision=fp8", r"train.precision 'fp8' is unknown; choose one of bf16, fp16, fp32"),
        ("checkpoint.every_epochs=-1", r"checkpoint.every_epochs must be >= 0"),
    ],
)
def test_evaluation_configs_share_the_schema_rules(micro_run, mini_root, override, message):
    """The same rules, declared once, hold in the fine-tune (and probe) configs."""
    from mae_et.evaluate.config import load_finetune_config, load_linprobe_config

    common = [f"model.checkpoint={micro_run}", f"data.root={mini_root}"]
    with pytest.raises(ConfigError, match=message):
        load_finetune_config(REPO / "configs" / "finetune" / "vit-micro-p8_mae_cpu-test.yaml", [*common, override])
    if not override.startswith("augment."):
        with pytest.raises(ConfigError, match=message):
            load_linprobe_config(None, [*common, override])
    # and the defaults pass
    ok = load_finetune_config(
        REPO / "configs" / "finetune" / "vit-micro-p8_mae_cpu-test.yaml",
        [*common, "augment.auto_augment=augmix-m5-w4-d2", "checkpoint.every_epochs=0"],
    )
    assert ok.checkpoint.every_epochs == 0


def test_an_invalid_value_on_the_command_line_is_one_line_and_exit_2(tmp_path, mini_root, capsys):
    """pretrain.py's main(), in this process (that an entry point's user error is one line as its own process too:
    tests/test_entry_points.py)."""
    from pretrain import main

    argv = ["--config", str(CPU_RECIPE), f"data.root={mini_root}", f"output_dir={tmp_path}", "model.patch_size=0"]
    proc = call_main(main, argv, capsys)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: model.patch_size must be > 0, got 0"
    assert not (tmp_path / CPU_RECIPE.stem).exists()


def test_an_unknown_choice_names_the_closest_one(mini_root):
    with pytest.raises(
        ConfigError, match=r"^train.precision 'bf61' is unknown; choose one of bf16, fp16, fp32; did you mean 'bf16'\?$"
    ):
        load(mini_root, "train.precision=bf61")
    with pytest.raises(
        ConfigError, match=r"^model.size 'smal' is unknown; choose one of micro, .*; did you mean 'small'\?$"
    ):
        load(mini_root, "model.size=smal")
    with pytest.raises(ConfigError, match=r"^curriculum.schedule 'true' is unknown"):  # a YAML boolean is no word here
        load(mini_root, "curriculum.schedule=yes")


def test_model_sizes_are_the_declared_choices():
    from typing import get_args

    from mae_et.models.mae import MODEL_SIZES, ModelSize

    assert get_args(ModelSize) == tuple(MODEL_SIZES)


def test_validation_changes_nothing_and_auto_is_resolved_on_load(mini_root, micro_run):
    """Defaults that depend on other keys are made explicit by the loader; the validators only check."""
    import copy

    from mae_et.evaluate.config import load_finetune_config, load_linprobe_config, validate_finetune, validate_linprobe
    from mae_et.train.config import validate_pretrain

    cfg = load(mini_root, "data.source=auto", "tracking.wandb=off")
    assert cfg.data.source == "imagefolder" and cfg.tracking.wandb == "off"
    assert load_pretrain_config(CPU_RECIPE, ["data.source=auto"]).data.source == "fractal"
    ft = load_finetune_config(
        REPO / "configs/finetune/vit-micro-p8_mae_cpu-test.yaml",
        [f"model.checkpoint={micro_run}", f"data.root={mini_root}", "tracking.wandb=false"],
    )
    lp = load_linprobe_config(
        REPO / "configs/linprobe/vit-micro-p8_mae_cpu-test.yaml",
        [f"model.checkpoint={micro_run}", f"data.root={mini_root}", "tracking.wandb=yes"],
    )
    assert (ft.tracking.wandb, lp.tracking.wandb) == ("off", "auto")
    for c, validate in ((cfg, validate_pretrain), (ft, validate_finetune), (lp, validate_linprobe)):
        before = copy.deepcopy(c)
        validate(c)
        assert c == before


def test_no_validator_assigns_to_the_config():
    """The config modules' check and validate functions read the config; none writes to it."""
    import ast

    for path in (REPO / "mae_et/run/config.py", REPO / "mae_et/train/config.py", REPO / "mae_et/evaluate/config.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith(("validate", "check", "_check")):
                writes = [
                    ast.unparse(t)
                    for node in ast.walk(fn)
                    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Attribute)
                ]
                assert not writes, f"{path.name}:{fn.name} writes {writes}"


def test_keys_the_configs_share_are_declared_alike():
    """One range per key across pretraining, fine-tuning and the probe (the probe's epochs are whole: its
    schedule is per epoch and it has no curriculum)."""
    import dataclasses
    import typing

    from mae_et.evaluate.config import FinetuneConfig, LinprobeConfig

    def declared(cls, prefix=""):
        out, hints = {}, typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            out.update(declared(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t) else {f"{prefix}{f.name}": t})
        return out

    configs = {c.__name__: declared(c) for c in (PretrainConfig, FinetuneConfig, LinprobeConfig)}
    allowed = {("LinprobeConfig", "train.epochs")}
    names = list(configs)
    shared = 0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for key in sorted(configs[a].keys() & configs[b].keys()):
                shared += 1
                if (a, key) in allowed or (b, key) in allowed:
                    continue
                assert configs[a][key] == configs[b][key], (
                    f"{key}: {a} declares {configs[a][key]}, {b} {configs[b][key]}"
                )
    assert shared > 40  # optim, train, checkpoint, tracking, data keys


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["curriculum.mode=fft"], "only what the model sees with curriculum.mode=resize"),
        (["curriculum.mode=resize", "data.pipeline=memory"], "needs data.pipeline=loader"),
    ],
)
def test_stage_sized_decoding_needs_the_loader_and_the_resize_mode(mini_root, overrides, says):
    with pytest.raises(ConfigError, match=says):
        load(mini_root, "data.decode_size=stage", *overrides)
    assert load(mini_root, "data.decode_size=stage", "curriculum.mode=resize").data.decode_size == "stage"


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["data.pipeline=memory", "tracking.knn_every_epochs=0"], "read by the loader's workers"),
        (["tracking.knn_every_epochs=1"], "set tracking.knn_every_epochs=0"),
    ],
)
def test_a_shard_source_needs_the_loader_and_no_knn_monitor(mini_root, overrides, says):
    with pytest.raises(ConfigError, match=says):
        load(mini_root, "data.source=shards", *overrides)
    cfg = load(mini_root, "data.source=shards", "tracking.knn_every_epochs=0")
    assert cfg.data.source == "shards"


@pytest.mark.parametrize(
    "override, message",
    [
        # each ran before: a seed numpy or torch refuses mid-setup, a "decay" that climbs, a stage size cut silently
        ("train.seed=-1", r"^train.seed must be in \[0, 4294967296\), got -1$"),
        ("train.seed=4294967296", r"^train.seed must be in \[0, 4294967296\), got 4294967296$"),
        ("optim.betas=[0.9, 1.0]", r"^optim.betas\[1\] must be in \[0, 1\), got 1.0$"),
        ("optim.betas=[-0.1, 0.95]", r"^optim.betas\[0\] must be in \[0, 1\), got -0.1$"),
        ("optim.betas=[.nan, 0.95]", r"^optim.betas\[0\] must be a finite number in \[0, 1\), got nan$"),
        (
            "curriculum.stages=[{size: 40.9, fraction: 1.0}]",
            r"'curriculum.stages\[0\].size' must be an integer, got 40.9",
        ),
        ("curriculum.stages=[{size: big, fraction: 1.0}]", r"'curriculum.stages\[0\].size' must be an integer"),
        ("curriculum.stages=[{size: 48, fraction: most}]", r"'curriculum.stages\[0\].fraction' must be a number"),
        ("curriculum.stages=[{size: 48}]", r"curriculum.stages\[0\].fraction is missing"),
        ("curriculum.stages=[{size: 48, fraction: 1.0, sise: 3}]", r"unknown config key 'curriculum.stages\[0\].sise'"),
        ("curriculum.stages=[48]", r"curriculum.stages\[0\]' must be a mapping"),
        ("curriculum.stages=[{size: 44, fraction: 1.0}]", "curriculum size 44 is not a multiple of the patch size 8"),
        ("optim.min_lr=0.55", r"^optim.min_lr 0.55 is above the lr"),
        (["optim.lr=0.1", "optim.min_lr=0.55"], r"^optim.min_lr 0.55 is above the lr 0.1 \(optim.lr\)"),
        ("tracking.project=team/mae", r"^tracking.project 'team/mae' is not a W&B project name"),
        ("tracking.project=a:b", r"^tracking.project 'a:b' is not a W&B project name"),
        (f"tracking.project={'p' * 129}", r"is not a W&B project name.* at most 128 characters"),
        (
            ["tracking.knn_every_epochs=1", "tracking.knn_split=train"],
            r"^data.split \(.*train'\) and tracking.knn_split \(.*train'\) are the same folder",
        ),
        (["tracking.knn_every_epochs=1", "tracking.knn_split=./train/"], r"are the same folder"),
    ],
)
def test_every_value_is_bounded_before_any_work(mini_root, override, message):
    from mae_et.errors import UserError

    with pytest.raises(UserError, match=message) as info:
        load(mini_root, *([override] if isinstance(override, str) else override))
    assert "\n" not in str(info.value)


def test_the_bounds_hold_at_their_edges(mini_root):
    cfg = load(
        mini_root,
        "train.seed=4294967295",
        "optim.betas=[0.0, 0.999]",
        "curriculum.stages=[{size: 40.0, fraction: 0.5}, {size: 48, fraction: 0.5}]",
        "optim.lr=0.1",
        "optim.min_lr=0.1",
        "tracking.project=my-project_2.0",
        "tracking.knn_every_epochs=1",
        "tracking.knn_split=val",
    )
    assert cfg.train.seed == 2**32 - 1 and cfg.optim.betas == (0.0, 0.999)
    assert [(s.size, s.fraction) for s in curriculum_stages(cfg)[0]] == [(40, 0.5), (48, 0.5)]


@pytest.mark.parametrize(
    "name", ["mae", "a" * 128, "a" * 129, "team/mae", "a\\b", "a#b", "a?b", "a%b", "a:b", "x y", "ümlaut"]
)
def test_project_names_follow_wandbs_own_rule(mini_root, name):
    """Our verdict on a project name is wandb's (its Settings validator), decided before any run starts."""
    from wandb.sdk.wandb_settings import Settings

    try:
        Settings(project=name)
        wandb_accepts = True
    except Exception:
        wandb_accepts = False
    try:
        load(mini_root, f"tracking.project={name}")
        we_accept = True
    except ConfigError:
        we_accept = False
    assert we_accept == wandb_accepts


def test_a_recipe_file_that_is_too_big_is_refused_before_it_is_parsed(tmp_path, mini_root, monkeypatch):
    big = tmp_path / "big.yaml"
    big.write_text("train:\n  epochs: 3\n" + "# padding\n" * 300_000)  # 3 MB: parsing a 100 MB one took minutes
    monkeypatch.setattr(yaml, "safe_load", lambda *a, **k: pytest.fail("parsed"))
    with pytest.raises(ConfigError, match=rf"^config file '{big}' is 3.0 MB; a recipe is at most 1 MB"):
        load_pretrain_config(big, [f"data.root={mini_root}"])


def test_a_recipe_or_base_that_is_a_folder_or_missing_names_the_file_to_fix(tmp_path, mini_root):
    with pytest.raises(ConfigError, match=rf"^config file '{tmp_path}' is a folder, not a recipe file"):
        load_pretrain_config(tmp_path, [f"data.root={mini_root}"])
    child = tmp_path / "child.yaml"
    (tmp_path / "sub").mkdir()
    child.write_text("_base_: sub\n")
    with pytest.raises(ConfigError, match=rf"^config file '{child}': its _base_ 'sub' \('{tmp_path / 'sub'}'\) is a"):
        load_pretrain_config(child, [f"data.root={mini_root}"])
    (tmp_path / "middle.yaml").write_text("_base_: gone.yaml\n")
    child.write_text("_base_: middle.yaml\n")
    with pytest.raises(
        ConfigError, match=rf"^config file '{tmp_path / 'middle.yaml'}': its _base_ 'gone.yaml' .* does"
    ):
        load_pretrain_config(child, [f"data.root={mini_root}"])
