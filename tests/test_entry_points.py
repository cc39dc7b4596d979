"""The entry points from any directory: `python /path/to/pretrain.py` finds its recipe and configs/ wherever it runs;
every entry point ends a user error in one line, exit 2. Each entry point runs as its own process once here (or in the
test file of its stage), where what the shell sees is the behaviour; the other cases run it in this process, as
`python` would (`run_as_python`: the script or module as __main__, its exit status, stdout and stderr)."""

from __future__ import annotations

import importlib
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CPU_RECIPE, MINI, ONE_THREAD_ENV, REPO, in_process_run

from mae_et import recipes
from mae_et.recipes import ConfigError
from mae_et.train.config import load_pretrain_config


@pytest.fixture
def run_as_python(monkeypatch, capsys):
    """`python ARGV...` (a script path relative to the checkout, or `-m module ...`) run in this process from `cwd`:
    runpy runs it as __main__ with its sys.argv (a script's folder first on sys.path, as python puts it); returns
    its exit status, stdout and stderr as a CompletedProcess. Saves the 3-4 s a new interpreter spends importing."""

    def run(cwd: Path, argv: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        module = argv[1] if argv[0] == "-m" else None
        if module:
            package = hasattr(sys.modules.get(module), "__path__")
            # the module run as __main__, when imported already: runpy runs a fresh copy (the package stays)
            monkeypatch.delitem(sys.modules, f"{module}.__main__" if package else module, raising=False)
            monkeypatch.setattr(sys, "argv", [module, *argv[2:]])
        else:
            path = str(script or REPO / argv[0])
            monkeypatch.setattr(sys, "argv", [path, *argv[1:]])
            monkeypatch.syspath_prepend(str(Path(path).parent))  # sys.path is restored after the test
        capsys.readouterr()
        try:
            with in_process_run():
                if module:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    return run


def test_pretrain_default_recipe_from_another_directory(tmp_path, run_as_python):
    """The default command, launched from a folder that has no configs/: it finds its recipe and trains."""
    proc = run_as_python(
        tmp_path,
        [
            "pretrain.py",
            f"output_dir={tmp_path / 'runs'}",
            "train.max_steps=1",
            "train.batch_size=8",
            "tracking.wandb=off",
            "tracking.recon_every_epochs=0",
            "tracking.knn_every_epochs=0",
        ],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((tmp_path / "runs").glob("*/checkpoints/step_00000001"))


@pytest.mark.parametrize("script", ["finetune/finetune.py", "finetune/linprobe.py"])
def test_eval_entry_points_find_their_default_recipe_from_another_directory(tmp_path, script, run_as_python):
    """Past the recipe, the next thing they need is model.checkpoint: the recipe was found and read."""
    proc = run_as_python(tmp_path, [script])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: model.checkpoint is missing"), proc.stderr


def test_a_relative_recipe_path_is_found_in_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_pretrain_config("configs/pretrain/mae_vit-micro-p8_et_cpu-test.yaml", [f"data.root={tmp_path}"])
    assert cfg.name == "mae_vit-micro-p8_et_cpu-test" and cfg.model.size == "micro"  # its _base_ followed too


def test_a_missing_recipe_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"'configs/pretrain/nope.yaml' does not exist \(here or in .*configs\)"):
        load_pretrain_config("configs/pretrain/nope.yaml")


def test_an_installed_copy_without_recipes_says_where_they_are(tmp_path, monkeypatch):
    """A non-editable install has no configs/ beside the package: the error says so and what to pass."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recipes, "SOURCE_ROOT", tmp_path / "site-packages")
    with pytest.raises(ConfigError) as info:
        load_pretrain_config("configs/pretrain/mae_vit-tiny-p8_et_20e_fractal.yaml")
    message = str(info.value)
    assert "no recipes beside it" in message and "configs/ folder of the source checkout" in message
    assert "pip install -e" in message and "\n" not in message


# ----------------------------------------------------------------------------- one style for every entry point

# Every entry point as a user runs it (the training scripts, the mae-et tools, the study, the benchmark scripts),
# each with one argument that is wrong for argparse and one user error past the parser. The last field: whether the
# user error runs as the command's own process here: once for each entry point that no other test runs as a process
# (pretrain.py runs so under the launcher below and in tests/train/test_pretrain.py, finetune.py in the test without
# the package installed and tests/evaluate/test_finetune.py, linprobe.py in tests/evaluate/test_linprobe.py, the
# study's script in tests/benchmarks/test_curriculum_vs_baseline.py); an import that printed anything shows there.
ENTRY_POINTS = {
    "pretrain": (["pretrain.py"], "data.root=/nonexistent/imagenet", "is not a folder", False),
    "finetune": (["finetune/finetune.py"], "data.root=x", "model.checkpoint is missing", False),
    "linprobe": (["finetune/linprobe.py"], "data.root=x", "model.checkpoint is missing", False),
    "mae-et knn": (["-m", "mae_et", "knn", "nowhere", "--data"], "nowhere", "does not exist", False),
    "mae-et export": (["-m", "mae_et", "export", "nowhere"], "out.safetensors", "does not exist", True),
    "mae-et visualize": (
        ["-m", "mae_et", "visualize", "nowhere", "img.jpg", "--out"],
        "grid.png",
        "does not exist",
        False,
    ),
    "python -m knn": (["-m", "mae_et.evaluate.knn", "nowhere", "--data"], "nowhere", "does not exist", True),
    "study": (["benchmarks/curriculum_vs_baseline.py", "--study"], "configs/study/nope.yaml", "nope.yaml", False),
    "step_costs": (
        ["benchmarks/step_costs.py", "--study", "x.yaml", "--images", "9", "--rounds"],
        "0",
        "must be >= 1",
        True,
    ),
    "peer_cpu": (["benchmarks/peer_cpu.py", "--rounds"], "0", "must be >= 1", True),
    "hog_cost": (["benchmarks/hog_cost.py", "--rounds"], "0", "must be >= 1", True),
}


def run_entry(cwd, argv, timeout=300):
    first = argv[0] if argv[0] == "-m" else str(REPO / argv[0])
    return subprocess.run([sys.executable, first, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["pretrain", "finetune", "mae-et export", "study", "step_costs"])
def test_a_bad_argument_is_one_line_and_exit_2(tmp_path, name, run_as_python):
    """argparse's complaint, in the same one line as every other user error, with where the help is (one entry point
    of each kind here: that every one parses with mae_et.cli.OneLineParser is tests/test_layout.py's)."""
    argv, last, _, _ = ENTRY_POINTS[name]
    line = one_error_line(run_as_python(tmp_path, [*argv, last, "--no-such-flag"]))
    assert "unrecognized arguments: --no-such-flag" in line and "--help)" in line, line


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_a_user_error_is_one_line_and_exit_2(tmp_path, name, run_as_python):
    argv, last, says, own_process = ENTRY_POINTS[name]
    proc = run_entry(tmp_path, [*argv, last]) if own_process else run_as_python(tmp_path, [*argv, last])
    assert says in one_error_line(proc), proc.stderr


def test_mae_et_is_declared_as_a_console_script_that_runs_the_tools():
    """[project.scripts] names mae_et.__main__:main, and that main dispatches to each tool's own main."""
    import tomllib

    from mae_et import __main__ as mae_et_main

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mae-et": "mae_et.__main__:main"}
    assert sorted(mae_et_main.TOOLS) == ["export", "knn", "visualize"]
    for module, _ in mae_et_main.TOOLS.values():
        assert callable(importlib.import_module(module).main)


def test_mae_et_help_lists_the_tools_and_a_tool_help_names_the_subcommand(tmp_path, run_as_python):
    top = run_as_python(tmp_path, ["-m", "mae_et", "--help"])
    assert top.returncode == 0 and all(t in top.stdout for t in ("knn", "export", "visualize")), top.stderr
    tool = run_as_python(tmp_path, ["-m", "mae_et", "export", "--help"])
    assert tool.returncode == 0 and tool.stdout.startswith("usage: mae-et export "), tool.stdout + tool.stderr


def test_a_training_script_without_the_package_installed_says_how_to_install_it(tmp_path):
    """No sys.path entry of its own: with no site-packages (python -S), the script cannot find mae_et and says so."""
    proc = subprocess.run(
        [sys.executable, "-S", str(REPO / "finetune" / "finetune.py")], cwd=tmp_path, capture_output=True, text=True
    )
    line = one_error_line(proc)
    assert "mae_et is not installed" in line and "pip install -e ." in line, line


def test_a_training_script_of_another_checkout_refuses_this_checkouts_package(tmp_path, run_as_python):
    """A second clone (or worktree) whose script would import the installed mae_et of this one (as this process
    does, with this checkout's package): one line naming both."""
    other = tmp_path / "other-checkout"
    (other / "finetune").mkdir(parents=True)
    (other / "mae_et").mkdir()
    shutil.copy(REPO / "finetune" / "finetune.py", other / "finetune" / "finetune.py")
    proc = run_as_python(tmp_path, ["finetune/finetune.py"], script=other / "finetune" / "finetune.py")
    line = one_error_line(proc)
    assert f"is in the checkout {other}" in line and f"imports mae_et from {REPO}" in line, line


# ----------------------------------------------------------------------------- under the launcher (mae-et launch)


@pytest.fixture
def launch_env(tmp_path):
    """The README's set-up on this CPU machine: `accelerate config` done once (its default config for a machine
    without GPUs, with a free port at each launch so that launches beside each other do not meet), and one thread
    per process (ONE_THREAD_ENV)."""
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    basic = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "mixed_precision": "no"}
    config.write_text(
        json.dumps({**basic, "num_machines": 1, "num_processes": 1, "use_cpu": True, "main_process_port": 0})
    )
    return {**ONE_THREAD_ENV, "HF_HOME": str(tmp_path / "hf")}


def readme_pretrain(env, launcher_options, *overrides):
    """`mae-et launch [options] pretrain.py --config RECIPE data.root=...`, run in the checkout as the README does."""
    cmd = [sys.executable, "-m", "mae_et", "launch", *launcher_options, "pretrain.py"]
    cmd += ["--config", str(CPU_RECIPE.relative_to(REPO)), f"data.root={MINI}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("launcher_options", [[], ["--multi_gpu", "--num_processes", "2"]], ids=["one", "multi_gpu"])
def test_a_user_error_under_the_launcher_is_one_line_and_exit_2(tmp_path, launch_env, launcher_options):
    """The README's command with a bad override, in one process and in two: the line and exit status of
    `python pretrain.py`, and nothing else (no launcher traceback, no torchrun failure report, one line for both
    ranks)."""
    proc = readme_pretrain(launch_env, launcher_options, f"output_dir={tmp_path / 'runs'}", "train.epochs=-1")
    assert proc.stdout == "", proc.stdout
    assert "train.epochs" in one_error_line(proc), proc.stderr
    assert not (tmp_path / "runs").exists()


def test_several_processes_without_multi_gpu_say_that_one_runs(tmp_path, launch_env):
    """`--num_processes 2` without `--multi_gpu` starts one process (accelerate's plain launcher): the run says so,
    once, and runs; its own lines come through as they are."""
    proc = readme_pretrain(
        launch_env,
        ["--num_processes", "2"],
        f"output_dir={tmp_path / 'runs'}",
        "train.max_steps=1",
        "train.batch_size=8",
        "tracking.wandb=off",
        "tracking.recon_every_epochs=0",
        "tracking.knn_every_epochs=0",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 process(es)" in proc.stdout and "stopped at step 1" in proc.stdout, proc.stdout
    said = [line for line in proc.stderr.splitlines() if "--multi_gpu" in line]
    assert len(said) == 1 and said[0].startswith("warning: accelerate launch was asked for more than one process")
