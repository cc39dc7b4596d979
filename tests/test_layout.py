"""The package's shape: subpackages in pipeline order, imports one way (evaluate -> train -> models -> data /
curriculum -> the shared leaves: recipes (config loading), checkpoint (the on-disk format and safe loading),
notices (warnings), files (safe writes), seeding (the seed hash and its families) -> errors (the two kinds of stop)),
the command front (cli) below every command that uses it, no import circle; every entry point parses and reports
user errors through mae_et.cli."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "mae_et"
# lower numbers are imported by higher ones, never the other way; data and curriculum do not import each other
LAYERS = {
    "errors": -1,  # UserError / RunStopped: every layer raises them
    "notices": 0,
    "files": 0,
    "seeding": 0,
    "recipes": 1,
    "checkpoint": 1,
    "data": 2,
    "curriculum": 2,
    "models": 3,
    "train": 4,
    "evaluate": 5,
    "cli": 1,  # the command front every entry point shares (mae_et/cli.py imports only mae_et.errors)
    "__main__": 6,  # `mae-et <tool>`: dispatches to the evaluate tools
}


def part_of(module: str) -> str:
    """'mae_et.train.run' -> 'train'; 'mae_et' (the package itself) -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mae_et"):
            found.add(node.module)
            if node.module == "mae_et":  # from mae_et import x: x is a module
                found.update(f"mae_et.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mae_et"))
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_known_part():
    unknown = {m for m in all_modules() if part_of(m) and part_of(m) not in LAYERS}
    assert not unknown, f"modules outside the layout: {sorted(unknown)}"


def test_imports_run_one_way():
    wrong = []
    for module, imported in all_modules().items():
        here = part_of(module)
        if not here:
            continue
        for target in imported:
            there = part_of(target)
            if not there or there == here:
                continue
            if LAYERS[there] > LAYERS[here] or (LAYERS[there] == LAYERS[here]):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the pipeline order:\n" + "\n".join(sorted(wrong))


def test_no_import_circle_between_modules():
    modules = all_modules()  # parsed once: the comprehension below asks for every import target
    graph = {m: {t for t in imported if t in modules and t != m} for m, imported in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert cycle is None, " -> ".join(cycle)


def test_the_folder_list_is_the_pipeline():
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert subpackages == ["curriculum", "data", "evaluate", "models", "train"]


def test_one_seed_hash_and_one_table_of_seed_families():
    """mix64 is defined once (mae_et.seeding) and no module keeps seed-family tags of its own."""
    import re

    defined = [p for p in PACKAGE.rglob("*.py") if re.search(r"^def mix64\(", p.read_text(), re.M)]
    assert [p.relative_to(PACKAGE).as_posix() for p in defined] == ["seeding.py"]
    tags = [
        f"{p.relative_to(PACKAGE)}: {m}"
        for p in PACKAGE.rglob("*.py")
        for m in re.findall(r"^_TAG_\w+ = .*$", p.read_text(), re.M)
    ]
    assert not tags, tags


def test_seed_values_stay_those_of_earlier_runs():
    """The hash and the family numbers are part of every run's draws: values computed by the code before the table
    moved to mae_et.seeding (commit 9e53f3b), so a checkpoint of then resumes to the same weights now."""
    from mae_et.seeding import Family, mix64

    assert mix64(Family.MASK, 0, 5, 1, 3) == 7802528054470776200
    assert mix64(Family.EPOCH_ORDER, 7, 2) == 3493149007435799828
    assert mix64(Family.FRACTAL_DATASET_SAMPLE, 3, 1, 9, 4) == 2316997843018051254
    assert len({int(f) for f in Family}) == len(Family)


def test_files_are_replaced_in_one_place():
    """Whole files are written through mae_et.files.write_atomic (a temporary beside, fsync, one rename); the only
    other rename is the checkpoint's, which swaps a whole folder written under a temporary name."""
    renames = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "os.replace(" in p.read_text())
    assert renames == ["checkpoint.py", "files.py"], renames


def test_one_key_comparison_for_every_loader():
    """The decoder-key rule and the key/shape comparison live in mae_et.models.keys, the resolution of a run or
    checkpoint folder in mae_et.checkpoint, not in each loader."""
    import re

    for pattern, home in (
        (r"^def _?is_decoder_key\(", "models/keys.py"),
        (r"^def _?fmt_shape\(", "models/keys.py"),
        (r"^def compare_state\(", "models/keys.py"),
        (r"^def _?resolve_checkpoint", "checkpoint.py"),
    ):
        where = [
            p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if re.search(pattern, p.read_text(), re.M)
        ]
        assert where == [home], (pattern, where)


def test_one_run_plan_and_one_evaluation_loop():
    """The plan of a run in optimizer steps is mae_et.train.plan.plan_run for all three engines; the epoch loop,
    evaluation, best-epoch keeping and result writing of fine-tuning and the probe live in mae_et.evaluate.engine."""
    import re

    sources = {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}
    for engine in ("train/pretrain.py", "evaluate/finetune.py", "evaluate/linprobe.py"):
        assert re.search(r"\bplan_run\(", sources[engine]), f"{engine} plans its run by itself"
    # the steps of a pass over the data, counted in one place
    counted = sorted(f for f, s in sources.items() if re.search(r"//\s*\(\s*micro_batch \* world\)", s))
    assert counted == ["train/plan.py"], counted
    for rule, home in (
        (r"no full optimizer step", "train/plan.py"),
        (r"^def evaluate_classifier\(", "evaluate/engine.py"),
        (r"^def (save|read)_best\(", "evaluate/engine.py"),
        (r"write_json_atomic\([^)]*RESULT_FILE", "evaluate/engine.py"),
        (r"^\s*while step < ", "evaluate/engine.py"),
    ):
        where = sorted(
            f for f, s in sources.items() if re.search(rule, s, re.M) and f.startswith(("evaluate/", "train/plan"))
        )
        assert where == [home], (rule, where)
    for method in ("evaluate/finetune.py", "evaluate/linprobe.py"):
        assert "run_engine(" in sources[method] and not re.search(r"^\s*for step in range\(", sources[method], re.M)


def test_the_evaluation_methods_give_the_engine_what_it_asks():
    """Both methods have every member of the engine's EvalMethod protocol."""
    import inspect

    from mae_et.evaluate.engine import EvalMethod
    from mae_et.evaluate.finetune import FinetuneMethod
    from mae_et.evaluate.linprobe import ProbeMethod

    asked = {n for n in dir(EvalMethod) if not n.startswith("_")} | set(inspect.get_annotations(EvalMethod))
    for cls in (FinetuneMethod, ProbeMethod):
        source = inspect.getsource(cls)
        missing = sorted(n for n in asked if not hasattr(cls, n) and f"self.{n}" not in source)
        assert not missing, (cls.__name__, missing)


def test_accelerate_is_reset_in_one_place_and_benchmarks_never_touch_sys_path():
    """Accelerate's private state reset is called by mae_et.train.run.fresh_accelerate_state only (every
    in-process run builds its own Accelerator; the benchmarks, the study and the tests call the helper); no
    benchmark puts a folder on sys.path but benchmarks/_checkout.py, the one bootstrap of `python benchmarks/x.py`,
    and none imports another by its bare name."""
    import re

    sources = {
        p.relative_to(REPO).as_posix(): p.read_text()
        for folder in ("mae_et", "benchmarks", "tests")
        for p in (REPO / folder).rglob("*.py")
    }
    resets = sorted(f for f, s in sources.items() if "_reset_state(" in s and f != "tests/test_layout.py")
    assert resets == ["mae_et/train/run.py"], resets
    on_path = sorted(f for f, s in sources.items() if f.startswith("benchmarks/") and re.search(r"sys\.path\.", s))
    assert on_path == ["benchmarks/_checkout.py"], on_path
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - {"__init__", "_checkout"}
    bare = re.compile(rf"^\s*(from|import) ({'|'.join(sorted(scripts))})\b", re.M)
    assert not [f for f, s in sources.items() if bare.search(s)]


STAGES = ("curriculum", "data", "evaluate", "models", "train")


def test_tests_sit_in_the_stage_folder_of_what_they_test():
    """tests/<stage>/ mirrors mae_et/<stage>/: a test file there imports that stage, and the test file named for a
    module (test_<module>.py for mae_et[/<stage>]/<module>.py) sits in that module's folder of tests/."""
    tests = REPO / "tests"
    wrong = []
    for stage in STAGES:
        for path in sorted((tests / stage).glob("test_*.py")):
            ours = {m for m in imports_of(path) if m != "mae_et"}
            if ours and not any(part_of(m) == stage for m in ours):
                wrong.append(f"{path.relative_to(REPO)} imports no mae_et.{stage} module: {sorted(ours)}")
    homes: dict[str, set[Path]] = {}  # test_<name>.py -> the tests/ folders of the modules called <name>
    for module in all_modules():
        parts = module.split(".")
        if len(parts) in (2, 3) and parts[-1] != "__init__":
            homes.setdefault(f"test_{parts[-1]}.py", set()).add(tests.joinpath(*parts[1:-1]))
    for name, folders in sorted(homes.items()):
        for found in sorted(tests.rglob(name)):
            if found.parent not in folders:
                where = " or ".join(sorted(f"{f.relative_to(REPO)}/" for f in folders))
                wrong.append(f"{found.relative_to(REPO)} is named for a module of {where}: it belongs there")
    assert not wrong, "\n".join(wrong)


ENTRY_POINTS = [
    "pretrain.py",
    "finetune/finetune.py",
    "finetune/linprobe.py",
    "mae_et/__main__.py",
    "mae_et/evaluate/knn.py",
    "mae_et/evaluate/export.py",
    "mae_et/evaluate/visualize.py",
    "benchmarks/study/cli.py",
    *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "benchmarks").glob("[!_]*.py")),
]


def test_every_entry_point_parses_and_reports_errors_through_the_one_front():
    """No parser of its own (argparse.ArgumentParser only inside mae_et/cli.py), no `error:` printed or exit 2 by
    hand, no sys.path entry: each entry point uses mae_et.cli (OneLineParser, run_user_command), or is a thin script
    that calls one that does (the study's script calls benchmarks.study.cli)."""
    wrong = []
    for rel in ENTRY_POINTS:
        text = (REPO / rel).read_text()
        tree = ast.parse(text)
        for handler in [n for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler)]:
            if isinstance(handler.type, ast.Name) and handler.type.id == "ModuleNotFoundError":
                # the one message mae_et.cli cannot print: mae_et itself is not installed
                text = text.replace(ast.get_source_segment(text, handler), "")
        if "argparse.ArgumentParser(" in text:
            wrong.append(f"{rel}: builds argparse.ArgumentParser; use mae_et.cli.OneLineParser")
        if "sys.exit(2)" in text or 'print(f"error:' in text:
            wrong.append(f"{rel}: prints its own error or exit status; raise a UserError and use run_user_command")
        if "sys.path.insert" in text or "sys.path.append" in text:
            wrong.append(f"{rel}: touches sys.path; the installed package (pip install -e .) is the one imported")
        names = {
            a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "mae_et.cli"
            for a in n.names
        }
        thin = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} & {"benchmarks.study.cli"}
        if "run_user_command" not in names and not thin:
            wrong.append(f"{rel}: does not run its work through mae_et.cli.run_user_command")
    assert not wrong, "\n".join(wrong)
