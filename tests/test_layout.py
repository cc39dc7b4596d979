"""The package's shape: subpackages in pipeline order, imports one way (evaluate -> train -> run (what every run
shares: the run skeleton, its plan, tracking) -> models -> data / curriculum -> the shared leaves: recipes (config
loading), checkpoint (the on-disk format and safe loading), notices (warnings), files (safe writes), seeding (the seed
hash and its families) -> errors (the two kinds of stop)), the command front (cli) below every command that uses it,
no import circle; every entry point parses and reports user errors through mae_et.cli."""

from __future__ import annotations

import ast
import functools
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
    "run": 4,  # what the three engines share: the run skeleton, its plan in optimizer steps, tracking
    "train": 5,
    "evaluate": 6,
    "cli": 1,  # the command front every entry point shares (mae_et/cli.py imports only mae_et.errors)
    "__main__": 7,  # `mae-et <tool>`: dispatches to the evaluate tools
}


def part_of(module: str) -> str:
    """'mae_et.train.pretrain' -> 'train'; 'mae_et' (the package itself) -> ''."""
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


@functools.cache
def package_trees() -> dict[str, ast.Module]:
    """Every module of the package, parsed: {path relative to mae_et/: tree}."""
    return {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def dotted(node: ast.AST | None) -> str:
    """`a.b.c` for a name or an attribute chain; '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := dotted(node.value)):
        return f"{base}.{node.attr}"
    return ""


def called(tree: ast.AST) -> set[str]:
    """The dotted names every call in `tree` calls (`os.replace`, `plan_run`, `AcceleratorState._reset_state`)."""
    return {dotted(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)} - {""}


def top_level_functions(tree: ast.Module) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def where_defined(*names: str) -> list[str]:
    """The package modules that define a module-level function of one of these names."""
    return sorted(rel for rel, tree in package_trees().items() if set(names) & top_level_functions(tree))


def absolute_imports(tree: ast.AST) -> set[str]:
    """Every module an `import x` or `from x import y` (not a relative one) names."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


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
    assert subpackages == ["curriculum", "data", "evaluate", "models", "run", "train"]


def test_one_seed_hash_and_one_table_of_seed_families():
    """mix64 is defined once (mae_et.seeding) and no module keeps seed-family tags (_TAG_* constants) of its own."""
    assert where_defined("mix64") == ["seeding.py"], where_defined("mix64")
    tags = [
        f"{rel}: {target.id}"
        for rel, tree in package_trees().items()
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id.startswith("_TAG_")
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
    other renames are the checkpoint's, which swaps a whole folder written under a temporary name, and the files
    module's own (a run set aside whole)."""
    renames = sorted(rel for rel, tree in package_trees().items() if {"os.replace", "os.rename"} & called(tree))
    assert renames == ["checkpoint.py", "files.py"], renames


def test_one_key_comparison_for_every_loader():
    """The decoder-key rule and the key/shape comparison live in mae_et.models.keys, the resolution of a run or
    checkpoint folder in mae_et.checkpoint, not in each loader."""
    for names, home in (
        (("is_decoder_key", "_is_decoder_key"), "models/keys.py"),
        (("fmt_shape", "_fmt_shape"), "models/keys.py"),
        (("compare_state",), "models/keys.py"),
    ):
        assert where_defined(*names) == [home], (names, where_defined(*names))
    resolvers = sorted(
        rel
        for rel, tree in package_trees().items()
        if any(name.lstrip("_").startswith("resolve_checkpoint") for name in top_level_functions(tree))
    )
    assert resolvers == ["checkpoint.py"], resolvers


def floor_divides_by_micro_batch_times_world(tree: ast.Module) -> bool:
    """`... // (micro_batch * world)`: the steps of a pass over the data."""
    return any(
        isinstance(n, ast.BinOp)
        and isinstance(n.op, ast.FloorDiv)
        and isinstance(n.right, ast.BinOp)
        and isinstance(n.right.op, ast.Mult)
        and [dotted(n.right.left), dotted(n.right.right)] == ["micro_batch", "world"]
        for n in ast.walk(tree)
    )


def says(tree: ast.Module, words: str) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and words in n.value for n in ast.walk(tree))


def writes_the_result_file(tree: ast.Module) -> bool:
    return any(
        isinstance(n, ast.Call)
        and dotted(n.func) == "write_json_atomic"
        and any(isinstance(a, ast.Name) and a.id == "RESULT_FILE" for arg in n.args for a in ast.walk(arg))
        for n in ast.walk(tree)
    )


def loops_while_step_below(tree: ast.Module) -> bool:
    return any(
        isinstance(n, ast.While)
        and isinstance(n.test, ast.Compare)
        and dotted(n.test.left) == "step"
        and isinstance(n.test.ops[0], ast.Lt)
        for n in ast.walk(tree)
    )


def loops_for_step_in_range(tree: ast.Module) -> bool:
    return any(
        isinstance(n, ast.For)
        and dotted(n.target) == "step"
        and isinstance(n.iter, ast.Call)
        and dotted(n.iter.func) == "range"
        for n in ast.walk(tree)
    )


def test_one_run_plan_and_one_evaluation_loop():
    """The plan of a run in optimizer steps is mae_et.run.plan.plan_run for all three engines; the epoch loop,
    evaluation, best-epoch keeping and result writing of fine-tuning and the probe live in mae_et.evaluate.engine."""
    trees = package_trees()
    for engine in ("train/pretrain.py", "evaluate/finetune.py", "evaluate/linprobe.py"):
        assert "plan_run" in called(trees[engine]), f"{engine} plans its run by itself"
    # the steps of a pass over the data, counted in one place
    counted = sorted(rel for rel, tree in trees.items() if floor_divides_by_micro_batch_times_world(tree))
    assert counted == ["run/plan.py"], counted
    candidates = {rel: tree for rel, tree in trees.items() if rel.startswith(("evaluate/", "run/plan"))}
    for rule, home in (
        (lambda tree: says(tree, "no full optimizer step"), "run/plan.py"),
        (lambda tree: "evaluate_classifier" in top_level_functions(tree), "evaluate/engine.py"),
        (lambda tree: {"save_best", "read_best"} & top_level_functions(tree), "evaluate/engine.py"),
        (writes_the_result_file, "evaluate/engine.py"),
        (loops_while_step_below, "evaluate/engine.py"),
    ):
        where = sorted(rel for rel, tree in candidates.items() if rule(tree))
        assert where == [home], where
    for method in ("evaluate/finetune.py", "evaluate/linprobe.py"):
        assert "run_engine" in called(trees[method]) and not loops_for_step_in_range(trees[method]), method


def test_the_evaluation_methods_give_the_engine_what_it_asks():
    """Both methods have every member of the engine's EvalMethod protocol (a class attribute, or one their code
    sets on self)."""
    import inspect
    import textwrap

    from mae_et.evaluate.engine import EvalMethod
    from mae_et.evaluate.finetune import FinetuneMethod
    from mae_et.evaluate.linprobe import ProbeMethod

    asked = {n for n in dir(EvalMethod) if not n.startswith("_")} | set(inspect.get_annotations(EvalMethod))
    for cls in (FinetuneMethod, ProbeMethod):
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        set_on_self = {
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and dotted(n.value) == "self"
        }
        missing = sorted(n for n in asked if not hasattr(cls, n) and n not in set_on_self)
        assert not missing, (cls.__name__, missing)


def test_accelerate_is_reset_in_one_place_and_benchmarks_never_touch_sys_path():
    """Accelerate's private state reset is called by mae_et.run.run.fresh_accelerate_state only (every
    in-process run builds its own Accelerator; the benchmarks, the study and the tests call the helper); no
    benchmark puts a folder on sys.path but benchmarks/_checkout.py, the one bootstrap of `python benchmarks/x.py`,
    and none imports another by its bare name."""
    trees = {
        p.relative_to(REPO).as_posix(): ast.parse(p.read_text())
        for folder in ("mae_et", "benchmarks", "tests")
        for p in (REPO / folder).rglob("*.py")
    }
    resets = sorted(f for f, tree in trees.items() if any(c.endswith("._reset_state") for c in called(tree)))
    assert resets == ["mae_et/run/run.py"], resets
    on_path = sorted(
        f
        for f, tree in trees.items()
        if f.startswith("benchmarks/")
        and any(isinstance(n, ast.Attribute) and dotted(n.value) == "sys.path" for n in ast.walk(tree))
    )
    assert on_path == ["benchmarks/_checkout.py"], on_path
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - {"__init__", "_checkout"}
    bare = sorted(f for f, tree in trees.items() if any(m.split(".")[0] in scripts for m in absolute_imports(tree)))
    assert not bare, bare


STAGES = ("curriculum", "data", "evaluate", "models", "run", "train")


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


def nodes_outside_the_not_installed_handler(tree: ast.AST):
    """Every node, except inside `except ModuleNotFoundError:` (the one message mae_et.cli cannot print: mae_et
    itself is not installed)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.ExceptHandler) and dotted(child.type) == "ModuleNotFoundError":
            continue
        yield child
        yield from nodes_outside_the_not_installed_handler(child)


def prints_an_error_line(call: ast.Call) -> bool:
    """print("error: ...") or print(f"error: ...")."""
    if dotted(call.func) != "print" or not call.args:
        return False
    first = call.args[0]
    if isinstance(first, ast.JoinedStr) and first.values:
        first = first.values[0]
    return isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.startswith("error:")


def test_every_entry_point_parses_and_reports_errors_through_the_one_front():
    """No parser of its own (argparse.ArgumentParser only inside mae_et/cli.py), no `error:` printed or exit 2 by
    hand, no sys.path entry: each entry point uses mae_et.cli (OneLineParser, run_user_command, or
    run_training_script, which runs both), or is a thin script that calls one that does (the study's script calls
    benchmarks.study.cli). A not-installed handler guards imports only, and nothing but imports runs before it."""
    wrong = []
    for rel in ENTRY_POINTS:
        tree = ast.parse((REPO / rel).read_text())
        for i, node in enumerate(tree.body):
            guarded = isinstance(node, ast.Try) and any(dotted(h.type) == "ModuleNotFoundError" for h in node.handlers)
            before = [n for n in tree.body[:i] if n is not tree.body[0] or ast.get_docstring(tree) is None]
            if guarded and not all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in [*before, *node.body]):
                wrong.append(f"{rel}: code other than imports before or inside its not-installed handler's try")
        calls = [n for n in nodes_outside_the_not_installed_handler(tree) if isinstance(n, ast.Call)]
        names = {dotted(c.func) for c in calls}
        if {"argparse.ArgumentParser", "ArgumentParser"} & names:
            wrong.append(f"{rel}: builds argparse.ArgumentParser; use mae_et.cli.OneLineParser")
        exits_2 = any(
            dotted(c.func) == "sys.exit" and c.args and isinstance(c.args[0], ast.Constant) and c.args[0].value == 2
            for c in calls
        )
        if exits_2 or any(prints_an_error_line(c) for c in calls):
            wrong.append(f"{rel}: prints its own error or exit status; raise a UserError and use run_user_command")
        if {"sys.path.insert", "sys.path.append"} & names:
            wrong.append(f"{rel}: touches sys.path; the installed package (pip install -e .) is the one imported")
        imported = {
            a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "mae_et.cli"
            for a in n.names
        }
        thin = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} & {"benchmarks.study.cli"}
        if not {"run_user_command", "run_training_script"} & imported and not thin:
            wrong.append(f"{rel}: does not run its work through mae_et.cli.run_user_command")
    assert not wrong, "\n".join(wrong)
