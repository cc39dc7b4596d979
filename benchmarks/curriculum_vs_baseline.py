"""The claim, measured: MAE with the EfficientTrain curriculum vs plain MAE, in time and accuracy.

    python benchmarks/curriculum_vs_baseline.py --study configs/study/<name>.yaml \
        [--data /data/imagenette] [--out DIR] [--seeds 0 1] [--launch auto|subprocess|inprocess] \
        [--ablations all [--ablation-seeds 0]] [--pretrain-only | --eval-only | --report-only] [--publish]

One model size and one schedule length E (the study config, `configs/study/*.yaml`); per seed, the pretraining
runs the config lists under `runs:` (in its order; one must be `baseline`, which every speed-up and accuracy is
measured against) and one floor. The first edition (imagenette_vit-t8_64px_20e_cpu.yaml):
  baseline             plain MAE, E epochs
  et                   the `et` curriculum, E epochs
  etpp_half            the `etpp` curriculum, a compute budget of E/2 full-size-epoch equivalents
  baseline_equal_time  plain MAE given et's time (budget `equal_time`): a full run of E' = E * time(et) /
                       time(baseline) epochs of the same seed (rounded to a whole step), its warmup + cosine
                       schedule ending at E', not a truncated E-epoch run; it trains after et and baseline
  untrained            the same encoder at E = 0: the baseline's initial weights (same seed), the floor
                       every trained encoder must clear
The second (imagenette_vit-t8_64px_20e_partial_cpu.yaml) adds partial reconstruction (model.decode_fraction) to
plain MAE, et and etpp. `targets.runs` names, per run, its speed-up and accuracy bounds (`run_targets`).
Every run warms up over the same share (`warmup_fraction`) of its own budget. Each encoder is then
evaluated the same way on the validation split: weighted kNN (cls and mean features), the linear probe
on cached features (the loop of `linprobe.mode=cached`), and a short fine-tune; with `eval.knn.sizes`, kNN at
those test sizes too (resolution robustness: positions as the encoder's `model.pos_embed` mode gives them).

Time. Each run's training time is read from the engine's own clock (metrics.jsonl): the loop only, less
its bookkeeping (checkpoint writes, and the grids / kNN monitor, which the study switches off). Two
clocks, per run and per curriculum stage: wall seconds and process CPU seconds (user + system of every
thread). On a shared machine CPU time moves far less than wall time when other work runs beside a study;
`verdict_clock` in the study config says which clock the speed-ups of the verdicts (and the equal-time
budget) use, and both are reported. Speed-ups are computed within one seed (same machine, same hour),
then averaged over seeds. Evaluation stages get wall and CPU seconds too.

Sessions end. A study killed at any point resumes when the same command runs again: finished runs and
evaluations are read back from `state.json` (when their settings still match), a half-finished
pretraining resumes from its last checkpoint (`checkpoint_every_epochs`) with its clocks carried over,
and a half-finished fine-tune resumes from its own. Every run records the machine it ran on and the commit
that trained it; the report says when a seed's runs, or the seeds, ran on different machines, or the runs
on different commits.

Ablations (`ablations:` in the study config, `--ablations`): rows '<run>+<name>' that change one setting of
a run; `--ablation-seeds` gives them fewer seeds than the study (all: '0'; per ablation: 'pos_extent=0,1').
They get their own table, each accuracy beside its difference from the same run on the same seeds.

Launch: `subprocess` (the default on a GPU) runs each pretraining as `python pretrain.py ...` in a
fresh process; `inprocess` (the default on a CPU, where importing torch costs more than a tiny run) calls
`mae_et.train.pretrain.pretrain` in this process with Accelerate's state reset. With `train.compile` on, one
throwaway step per curriculum size of every run first fills a study-local inductor cache, so no run pays a
compile that another run found cached.

Over seeds: mean, half-range ((max - min) / 2: "within the baseline's seed spread" means at or above its
worst seed) and the sample std. Fine-tune top-1 is the last epoch's (no selection on val).

One writer per part: the pretraining part (the default, and --pretrain-only) and the evaluation part (the default,
and --eval-only) each hold a lock in `--out` for the process's life, so a second process doing the same part stops
in one line; a run folder is moved aside (its config changed) only under its own run lock, never while a run writes
it. `--out` may not overlap the data. Recorded commands (`python`, paths relative to the checkout) and run folders
(relative to the checkout when inside it) name no machine, so a published file reads the same after a rerun elsewhere.

Report only (--report-only): results.json, table.md and the plot written again from state.json and the study
config, nothing trained or evaluated (e.g. after the report's layout changed); what state.json does not hold (the
date, device, torch, launch, training-image count and compile warm-up of the session) is kept from the results.json
it replaces, so the same state gives the same files.

Output under `--out` (default runs/study/<study name>/; with --publish the report files and state.json are also
copied to benchmarks/results/<study name>/, which is committed, and a study whose out folder has no state.json
starts from that published one: a later session on a new checkout reads the evaluated seeds back): state.json
(every finished run and evaluation;
rewritten after each), results.json (everything: per run and seed, mean and spread, speed-ups on both
clocks, verdicts, machines, date), table.md, accuracy_vs_time.png; runs/ (pretraining run folders),
eval/ (fine-tune folders), logs/.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mae_et.checkpoint import META_FILE, list_checkpoints, save_checkpoint  # noqa: E402
from mae_et.curriculum.schedules import plan_curriculum  # noqa: E402
from mae_et.data.folder import scan_image_folder  # noqa: E402
from mae_et.data.labelled import build_eval_loader  # noqa: E402
from mae_et.evaluate.config import load_finetune_config  # noqa: E402
from mae_et.evaluate.finetune import finetune  # noqa: E402
from mae_et.evaluate.linprobe import fit_probe_on_features  # noqa: E402
from mae_et.files import FileError, RunFolderBusy, RunFolderLock, check_output_folder, write_text_atomic  # noqa: E402
from mae_et.models.features import extract_pools, knn_accuracy  # noqa: E402
from mae_et.models.flops import mae_train_flops_per_image  # noqa: E402
from mae_et.models.mae import get_2d_sincos_pos_embed  # noqa: E402
from mae_et.models.vit import load_pretrained_vit  # noqa: E402
from mae_et.recipes import ConfigError, config_to_dict, flatten_dict  # noqa: E402
from mae_et.train.config import curriculum_stages, load_pretrain_config  # noqa: E402
from mae_et.train.optim import build_adamw  # noqa: E402
from mae_et.train.pretrain import build_model, mask_noise, pretrain  # noqa: E402
from mae_et.train.run import build_accelerator, fresh_accelerate_state  # noqa: E402
from mae_et.train.step import TrainStep  # noqa: E402
from mae_et.train.tracking import METRICS_FILE  # noqa: E402

BASELINE = "baseline"  # the run every speed-up and accuracy is measured against (every study has one)
UNTRAINED = "untrained"  # E = 0: the floor
EQUAL_TIME = "equal_time"  # the budget of the run that gets et's time (needs runs named et and baseline)
EQUAL_TIME_OF = "et"
CLOCKS = ("wall", "cpu")
ACCURACY_KEYS = ("knn_top1_cls", "knn_top1_mean", "linear_top1", "finetune_top1")
TIME_KEYS = ("wall_s", "cpu_s")
SUMMARY_KEYS = (
    "epochs",
    "steps",
    *TIME_KEYS,
    "steady_s",
    "quiet_cpu_s",
    "process_s",
    "s_per_epoch",
    "images_per_sec",
    "final_loss",
    "pflop",
    *ACCURACY_KEYS,
    "finetune_best_top1",
)
NEVER = 10**9  # checkpoint.every_steps: no periodic checkpoint
STATE_FILE = "state.json"
EVAL_ONLY_POLL_S = 30  # --poll-seconds


class StudyError(RuntimeError):
    """A study that cannot run as configured, or a run that failed; one line (plus a log tail)."""


# ----------------------------------------------------------------------------- the study config


@dataclass
class RunSpec:
    budget: float | str  # a multiple of E (epochs, or full-size-epoch compute for etpp), or "equal_time"
    overrides: list[str]


@dataclass
class Ablation:
    """A variant of some curriculum runs, measured against the same seed's baseline (e.g. another position
    embedding, warm-up or stage floor): row `<run>+<name>` per listed run."""

    runs: list[str]
    overrides: list[str]
    warmup_fraction: float | None  # None: the study's


@dataclass
class Study:
    name: str
    path: Path
    data_root: Path | None
    seeds: list[int]
    recipe: Path  # the pretraining base recipe
    epochs: float  # E
    warmup_fraction: float
    checkpoint_every_epochs: float | None  # periodic checkpoints, so a killed run resumes (None: only the final one)
    verdict_clock: str  # wall | cpu: the clock of the verdicts' speed-ups and of the equal-time budget
    threads: int | None  # intra-op CPU threads of every run and evaluation (None: torch's default)
    overrides: list[str]  # pretraining overrides shared by every run
    runs: dict[str, RunSpec]  # in the config's order: the order they are pretrained and tabled in
    eval: dict[str, Any]
    finetune_recipe: Path
    finetune_overrides: list[str]
    reference: dict[str, Any]
    targets: dict[str, Any]  # {"runs": {row: RunTarget-like dict}, "min_gain_over_untrained": points} (`run_targets`)
    ablations: dict[str, Ablation]
    peak_tflops: float
    assumed_mfu: float
    raw: dict[str, Any]

    @property
    def run_names(self) -> list[str]:
        return list(self.runs)


def run_targets(raw: dict[str, Any], runs: dict[str, RunSpec], path: Path) -> dict[str, Any]:
    """The study's targets as {"runs": {row: {speedup, within_seed_range: [keys], max_drop: {key: points}}},
    "min_gain_over_untrained": points}: each listed run must be `speedup`x faster than the baseline on the verdict
    clock, each key of within_seed_range at or above the baseline's worst seed (mean - half-range), each key of
    max_drop at most that many points below the baseline's mean.

    The first edition's keys (et_speedup, etpp_speedup, etpp_max_drop, accuracy_keys) read as the same targets."""
    if "runs" in raw:
        per_run = {
            row: {
                "speedup": float(t["speedup"]),
                "within_seed_range": list(t.get("within_seed_range") or []),
                "max_drop": {k: float(v) for k, v in (t.get("max_drop") or {}).items()},
            }
            for row, t in raw["runs"].items()
        }
    else:
        keys = list(raw.get("accuracy_keys", ACCURACY_KEYS))
        per_run = {
            "et": {"speedup": float(raw["et_speedup"]), "within_seed_range": keys, "max_drop": {}},
            "etpp_half": {
                "speedup": float(raw["etpp_speedup"]),
                "within_seed_range": [],
                "max_drop": {k: float(raw["etpp_max_drop"]) for k in keys},
            },
        }
    for row, t in per_run.items():
        if row not in runs or row == BASELINE:
            raise StudyError(
                f"{path}: targets.runs.{row} is not a run of this study (other than the baseline); "
                f"its runs: {', '.join(r for r in runs if r != BASELINE)}"
            )
        unknown = [k for k in [*t["within_seed_range"], *t["max_drop"]] if k not in ACCURACY_KEYS]
        if unknown:
            raise StudyError(
                f"{path}: targets.runs.{row}: accuracies {unknown} unknown; choose from {', '.join(ACCURACY_KEYS)}"
            )
    return {"runs": per_run, "min_gain_over_untrained": float(raw.get("min_gain_over_untrained", 0.0))}


def dotted(mapping: dict | None) -> list[str]:
    """{'model.size': 'small'} -> ['model.size="small"']: JSON is YAML, so each value parses back as written."""
    return [f"{key}={json.dumps(value)}" for key, value in (mapping or {}).items()]


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study config '{path}' does not exist; pass --study configs/study/<name>.yaml")
    path = path.resolve()  # recipe paths are relative to it, whatever the folder a (sub)process runs in
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        pre, ev = raw["pretrain"], raw["eval"]
        runs = {name: RunSpec(spec["budget"], dotted(spec.get("overrides"))) for name, spec in raw["runs"].items()}
        if BASELINE not in runs:
            raise StudyError(
                f"{path}: runs needs one named '{BASELINE}' (every speed-up and accuracy is measured against it)"
            )
        for name, spec in runs.items():
            if name == UNTRAINED or "+" in name:
                raise StudyError(
                    f"{path}: runs.{name}: the name '{UNTRAINED}' and names with a '+' are the study's own rows"
                )
            if spec.budget != EQUAL_TIME and not (isinstance(spec.budget, (int, float)) and spec.budget > 0):
                raise StudyError(f"{path}: runs.{name}.budget must be a positive multiple of E or '{EQUAL_TIME}'")
            if spec.budget == EQUAL_TIME and (EQUAL_TIME_OF not in runs or runs[EQUAL_TIME_OF].budget == EQUAL_TIME):
                raise StudyError(
                    f"{path}: runs.{name}: budget '{EQUAL_TIME}' is {EQUAL_TIME_OF}'s time, and there is no "
                    f"run '{EQUAL_TIME_OF}' with a budget"
                )
        clock = raw.get("verdict_clock", "wall")
        if clock not in CLOCKS:
            raise StudyError(f"{path}: verdict_clock must be one of {', '.join(CLOCKS)}; got {clock!r}")
        unknown = [k for k in raw["targets"].get("accuracy_keys", ACCURACY_KEYS) if k not in ACCURACY_KEYS]
        if unknown:
            raise StudyError(f"{path}: targets.accuracy_keys {unknown} unknown; choose from {', '.join(ACCURACY_KEYS)}")
        targets = run_targets(raw["targets"], runs, path)
        every = pre.get("checkpoint_every_epochs")
        ablations = {}
        for name, spec in (raw.get("ablations") or {}).items():
            bad = [r for r in spec["runs"] if r not in runs or runs[r].budget == EQUAL_TIME]
            if bad or "+" in name:
                raise StudyError(
                    f"{path}: ablations.{name}: runs {bad} are not pretraining runs with a budget (or the "
                    f"name has a '+'); choose from {', '.join(r for r in runs if runs[r].budget != EQUAL_TIME)}"
                )
            ablations[name] = Ablation(
                list(spec["runs"]),
                dotted(spec.get("overrides")),
                float(spec["warmup_fraction"]) if spec.get("warmup_fraction") is not None else None,
            )
        return Study(
            name=raw["name"],
            path=path,
            # relative data roots are the repository's (e.g. .data/imagenette, ../shared/data/...)
            data_root=REPO / raw["data_root"] if raw.get("data_root") else None,
            seeds=[int(s) for s in raw["seeds"]],
            recipe=path.parent / pre["recipe"],
            epochs=float(pre["epochs"]),
            warmup_fraction=float(pre["warmup_fraction"]),
            checkpoint_every_epochs=float(every) if every else None,
            verdict_clock=clock,
            threads=int(raw["threads"]) if raw.get("threads") else None,
            overrides=dotted(pre.get("overrides")),
            runs=runs,
            eval=ev,
            finetune_recipe=path.parent / ev["finetune"]["recipe"],
            finetune_overrides=dotted(ev["finetune"].get("overrides")),
            reference=raw["reference"],
            targets=targets,
            ablations=ablations,
            peak_tflops=float(raw["flops"]["peak_tflops"]),
            assumed_mfu=float(raw["flops"]["assumed_mfu"]),
            raw=raw,
        )
    except KeyError as e:
        raise StudyError(f"{path}: missing key {e}; see configs/study/mini_cpu-smoke.yaml for the layout") from None


def run_name(run: str, seed: int) -> str:
    return f"{run}_seed{seed}"


def split_row(row: str) -> tuple[str, str | None]:
    """'et+pos_extent' -> ('et', 'pos_extent'); 'et' -> ('et', None)."""
    run, _, ablation = row.partition("+")
    return run, ablation or None


def ablation_seed_plan(tokens: list[str], ablations: list[str], seeds: list[int]) -> dict[str, list[int]]:
    """--ablation-seeds as {ablation: seeds}: plain seeds ('0 1') for every ablation, 'name=0,1' for one; an ablation
    not named gets the plain seeds given, else every seed of the study."""
    plain, named = [], {}
    for token in tokens:
        name, _, values = token.rpartition("=")
        try:
            parsed = [int(v) for v in values.split(",")]
        except ValueError:
            raise StudyError(
                f"--ablation-seeds {token}: give seeds ('0 1') or <ablation>=<seed>,<seed> (e.g. pos_extent=0,1)"
            ) from None
        if not name:
            plain.extend(parsed)
        elif name not in ablations:
            raise StudyError(
                f"--ablation-seeds {token}: '{name}' is not among --ablations ({', '.join(ablations) or 'none'})"
            )
        else:
            named[name] = parsed
    plan = {name: named.get(name, plain or list(seeds)) for name in ablations}
    missing = sorted({s for chosen in plan.values() for s in chosen} - set(seeds))
    if missing:
        raise StudyError(
            f"--ablation-seeds {missing} are not among --seeds {seeds}: an ablation is compared with its "
            "seed's baseline and run; add them to --seeds"
        )
    return plan


def pretrain_overrides(study: Study, row: str, seed: int, epochs: float, data_root: Path, out: Path) -> list[str]:
    """Every override of one pretraining: the study's, the run's (then an ablation's, for a row 'run+ablation'),
    then what the study fixes for all. `untrained` takes the baseline's (its encoder is the baseline's at step 0)."""
    run, ablation = split_row(row)
    spec = study.ablations[ablation] if ablation else None
    warmup = spec.warmup_fraction if spec and spec.warmup_fraction is not None else study.warmup_fraction
    every = (
        f"checkpoint.every_epochs={study.checkpoint_every_epochs!r}"
        if study.checkpoint_every_epochs
        else f"checkpoint.every_steps={NEVER}"
    )
    return [
        *study.overrides,
        *study.runs[BASELINE if run == UNTRAINED else run].overrides,
        *(spec.overrides if spec else []),
        f"data.root={json.dumps(str(data_root))}",
        f"output_dir={json.dumps(str(out / 'runs'))}",
        f"name={run_name(row, seed)}",
        f"train.seed={seed}",
        f"train.epochs={epochs!r}",
        f"optim.warmup_epochs={warmup * epochs!r}",
        # a killed run resumes from its last checkpoint; the engine's clock leaves checkpoint writes out of the
        # training time. No grids, no kNN monitor, no W&B.
        every,
        "checkpoint.resume=true",
        "checkpoint.keep_last=1",
        "tracking.recon_every_epochs=0",
        "tracking.knn_every_epochs=0",
        'tracking.wandb="off"',
    ]


def pretrain_command(recipe: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "pretrain.py"), "--config", str(recipe), *overrides]


# ----------------------------------------------------------------------------- compute accounting


def planned_stages(cfg, steps_per_epoch: int) -> list[tuple[int, int]]:
    """[(B, steps)] of a run, as the engine lays it out."""
    stages, budget = curriculum_stages(cfg)
    plan = plan_curriculum(stages, budget, cfg.train.epochs, steps_per_epoch, cfg.data.crop_size)
    return [(s.size, s.num_steps) for s in plan.stages]


def train_flops(cfg, stages: list[tuple[int, int]]) -> float:
    batch = cfg.train.batch_size * cfg.train.accum_steps
    return sum(steps * batch * image_flops(cfg, size) for size, steps in stages)


def image_flops(cfg, size: int) -> float:
    """Training FLOPs per image at input size B, with the decoder tokens the run really decodes
    (model.decode_fraction)."""
    m = cfg.model
    return mae_train_flops_per_image(
        m.size,
        size,
        m.patch_size,
        m.decoder_embed_dim,
        m.decoder_depth,
        m.mask_ratio,
        decode_fraction=m.decode_fraction,
        target=m.target,
        hog_cell_size=m.hog_cell_size,
        hog_bins=m.hog_bins,
    )


# ----------------------------------------------------------------------------- machine and clocks


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({model}, {os.cpu_count()} cores)"


def machine() -> dict[str, Any]:
    """Where a run ran: the device, and the host (a resumed study may continue on another one)."""
    return {"device": device_name(), "host": platform.node(), "torch": torch.__version__}


def code_version() -> dict[str, Any] | None:
    """The commit of this checkout, and whether its tracked files differ from it (numerics such as the mask
    stream changed between commits, so a run records the code that trained it); None outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return None


class Stopwatch:
    """Wall and process CPU seconds of a block: `with Stopwatch() as sw: ...; sw.wall, sw.cpu`."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def training_clock(record: dict[str, Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of training up to a metrics.jsonl record: the loop less its bookkeeping."""
    return (
        record["elapsed_s"] - record.get("overhead_s", 0.0),
        record.get("cpu_s", math.nan) - record.get("overhead_cpu_s", 0.0),
    )


QUIET_QUANTILE = 0.1  # quiet_cpu_seconds: the window of each stage that 90% of its windows are slower than


def quiet_cpu_seconds(records: list[dict[str, Any]], quantile: float = QUIET_QUANTILE) -> float:
    """The run's CPU time on a quiet machine: per curriculum stage, the `quantile` of its logged windows' CPU seconds
    per step (the stage's first window, which holds its one-time start, left out), times the stage's steps.

    Other work on this 2-vCPU host only ever slows a window (a neighbouring test run doubled the study's CPU seconds
    per step), and it covered more than half of some runs, which moves even the median; the fastest decile is what
    the run costs when left alone. Reported beside the CPU clock, which stays the verdicts' clock."""
    per_size: dict[int, list[tuple[int, float]]] = {}
    prev_step, prev_cpu = 0, 0.0
    for r in records:
        cpu = training_clock(r)[1]
        if r["step"] > prev_step:
            per_size.setdefault(r["size"], []).append(
                (r["step"] - prev_step, (cpu - prev_cpu) / (r["step"] - prev_step))
            )
        prev_step, prev_cpu = r["step"], cpu
    total = 0.0
    for windows in per_size.values():
        rates = sorted(rate for _, rate in (windows[1:] or windows))
        total += sum(steps for steps, _ in windows) * rates[int(quantile * (len(rates) - 1))]
    return total


def backfill_quiet_cpu(record: dict[str, Any]) -> dict[str, Any]:
    """A record written before quiet_cpu_s existed (the second edition's training commit): computed from its run
    folder's metrics.jsonl when the folder is here; otherwise the record as it is."""
    if "quiet_cpu_s" not in record and (in_repo(record["run_dir"]) / METRICS_FILE).is_file():
        lines = (in_repo(record["run_dir"]) / METRICS_FILE).read_text().splitlines()
        record = {**record, "quiet_cpu_s": quiet_cpu_seconds([json.loads(x) for x in lines if x.strip()])}
    return record


# ----------------------------------------------------------------------------- pretraining


def clear_if_config_changed(run_dir: Path, cfg) -> Path | None:
    """A run folder left by a different config (an edited study, or the same data under another path) starts over
    instead of resuming; the old folder is moved aside, not deleted (it may hold a finished run's only
    checkpoint), and the keys that differ are named. Returns where it went."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    now = flatten_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)))
    before = flatten_dict(yaml.safe_load(saved.read_text()) or {})
    differ = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if not differ:
        return None
    aside = next(
        run_dir.with_name(f"{run_dir.name}.old-{n}")
        for n in range(1, 10_000)
        if not run_dir.with_name(f"{run_dir.name}.old-{n}").exists()
    )
    with run_folder_lock(run_dir):  # never move a folder a live run is writing
        run_dir.rename(aside)
    print(
        f"  {run_dir.name}: its saved config differs from this study's in "
        + ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in differ[:4])
        + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        + f"; starting it over (the old folder is kept as {aside.name})",
        flush=True,
    )
    return aside


def launch_pretrain(cfg_recipe: Path, overrides: list[str], log_path: Path, launch: str, env: dict) -> float:
    """One pretraining run, to its end (resuming when its folder has a checkpoint); returns the launch's wall
    time (s)."""
    t0 = time.perf_counter()
    if launch == "subprocess":
        with open(log_path, "a") as log:
            proc = subprocess.run(
                pretrain_command(cfg_recipe, overrides), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-20:])
            raise StudyError(f"pretraining failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    else:
        fresh_accelerate_state()
        with open(log_path, "a") as log, redirect_stdout(log):
            pretrain(load_pretrain_config(cfg_recipe, overrides))
    return time.perf_counter() - t0


def read_pretrain_run(run_dir: Path, cfg, process_s: float) -> dict[str, Any]:
    """The numbers of a finished run, from its metrics.jsonl and final checkpoint."""
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    ckpts = list_checkpoints(run_dir / "checkpoints")
    meta = json.loads((ckpts[-1] / META_FILE).read_text()) if ckpts else {}
    if not meta.get("complete"):
        raise StudyError(f"run {run_dir} did not finish (no complete final checkpoint)")
    steps, global_batch = meta["step"], meta["global_batch"]
    steps_per_epoch = round(steps / meta["epoch"])  # meta epoch = steps / steps_per_epoch
    # time per curriculum stage: each logged window (train.log_every steps) counts for the stage of its last
    # step, so a window that straddles a stage change (at most log_every steps) goes to the later stage
    per_size: dict[int, dict[str, Any]] = {}
    prev_step, prev_wall, prev_cpu = 0, 0.0, 0.0
    for r in records:
        wall, cpu = training_clock(r)
        s = per_size.setdefault(
            r["size"], {"size": r["size"], "steps": 0, "seconds": 0.0, "cpu_seconds": 0.0, "windows": []}
        )
        s["steps"] += r["step"] - prev_step
        s["seconds"] += wall - prev_wall
        s["cpu_seconds"] += cpu - prev_cpu
        s["windows"].append(r["images_per_sec"])
        prev_step, prev_wall, prev_cpu = r["step"], wall, cpu
    for s in per_size.values():
        windows = s.pop("windows")
        s["images_per_sec"] = s["steps"] * global_batch / s["seconds"]
        s["images_per_cpu_sec"] = s["steps"] * global_batch / s["cpu_seconds"]
        # a stage's first window holds its one-time start (tracing the graph of a new size, first allocations):
        # the median of the others is the stage's steady rate, for a wall time without those starts
        s["steady_images_per_sec"] = statistics.median(windows[1:] or windows)
    stages = sorted(per_size.values(), key=lambda s: s["size"])
    wall, cpu = training_clock(records[-1])
    epochs_seen = steps / steps_per_epoch  # epochs of images (a compute budget runs more than its E)
    plan = planned_stages(cfg, steps_per_epoch)
    if sum(n for _, n in plan) != steps:
        raise StudyError(f"run {run_dir}: {steps} steps done, the plan has {sum(n for _, n in plan)}")
    flops = train_flops(cfg, plan)
    return {
        "run_dir": repo_relative(run_dir),
        "schedule": cfg.curriculum.schedule,
        "epochs": cfg.train.epochs,
        "decode_fraction": cfg.model.decode_fraction,
        "pos_embed": cfg.model.pos_embed,
        "target": cfg.model.target,
        "steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "global_batch": global_batch,
        "epochs_of_images": epochs_seen,
        "wall_s": wall,
        "cpu_s": cpu,
        "process_s": process_s,
        "s_per_epoch": wall / epochs_seen,
        "images_per_sec": steps * global_batch / wall,
        "steady_s": sum(s["steps"] * global_batch / s["steady_images_per_sec"] for s in stages),
        "quiet_cpu_s": quiet_cpu_seconds(records),
        "stages": stages,
        "final_loss": records[-1]["loss"],
        "pflop": flops / 1e15,
        "achieved_tflops": flops / wall / 1e12,
    }


def equal_time_budget(epochs: float, et_time: float, baseline_time: float, steps_per_epoch: int) -> tuple[float, int]:
    """E' = E * time(et) / time(baseline), rounded to a whole step (half up, as the curriculum planner)."""
    steps = max(1, math.floor(epochs * et_time / baseline_time * steps_per_epoch + 0.5))
    return steps / steps_per_epoch, steps


def save_untrained_encoder(study: Study, seed: int, data_root: Path, out: Path) -> Path:
    """The E = 0 row: the baseline's initial weights (the engine seeds the same way before building the model),
    saved as a finished run folder, so every evaluation reads it like any pretrained encoder."""
    cfg = load_pretrain_config(study.recipe, pretrain_overrides(study, UNTRAINED, seed, study.epochs, data_root, out))
    set_seed(seed, deterministic=cfg.train.deterministic)
    model = build_model(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    with run_folder_lock(cfg.run_dir):  # a run folder like any other: one writer
        write_text_atomic(cfg.run_dir / "config.yaml", config_yaml)
        save_checkpoint(
            cfg.run_dir / "checkpoints",
            0,
            model.state_dict(),
            {"step": 0},
            config_yaml,
            {"step": 0, "total_steps": 0, "epoch": 0.0, "complete": True, "untrained": True},
            keep_last=1,
        )
    return cfg.run_dir


def run_folder_lock(run_dir: Path) -> RunFolderLock:
    """The run folder's own lock (the one `pretrain`/`finetune` hold), for the study's writes into a run folder."""
    return RunFolderLock(
        run_dir, ways_on="another study process is using it; wait for it to end, or give this study another --out"
    )


def warm_compile(study: Study, data_root: Path, out: Path) -> None:
    """One throwaway step per curriculum size of every run, compiled exactly as the runs will compile it:
    fills the inductor cache, so that no run pays a compile that another run would have found cached."""
    for run, spec in study.runs.items():
        if spec.budget == EQUAL_TIME:
            continue  # the baseline's graph
        fresh_accelerate_state()
        cfg = load_pretrain_config(
            study.recipe, pretrain_overrides(study, run, 0, study.epochs * spec.budget, data_root, out)
        )
        accelerator = build_accelerator(cfg.train.precision, cfg.train.accum_steps, use_wandb=False)
        device = accelerator.device
        model, optimizer = accelerator.prepare(*_model_and_optimizer(cfg))
        stages, _ = curriculum_stages(cfg)
        sizes = tuple(sorted({s.size for s in stages}))  # the engine's TrainStep gets the same sizes
        step = TrainStep(
            accelerator,
            model,
            optimizer,
            cfg.model.mask_ratio,
            cfg.curriculum.mode,
            cfg.optim.clip_grad,
            compile_mode=cfg.train.compile,
            sizes=sizes,
            decode_fraction=cfg.model.decode_fraction,
        )
        n, crop = cfg.train.batch_size, cfg.data.crop_size
        images = torch.randint(0, 256, (n, 3, crop, crop), dtype=torch.uint8, device=device)  # (n, 3, S, S)
        for size in sizes:
            t0 = time.perf_counter()
            step(images, size, mask_noise(0, 0, 0, 0, (n, (size // cfg.model.patch_size) ** 2), device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            print(f"compiled {run} B={size} in {time.perf_counter() - t0:.1f}s", flush=True)
    fresh_accelerate_state()


def _model_and_optimizer(cfg):
    model = build_model(cfg)
    return model, build_adamw(model, 0.0, cfg.optim.weight_decay, cfg.optim.betas)  # lr 0: the step is throwaway


# ----------------------------------------------------------------------------- evaluation


def encoder_at_size(run_dir: Path, test_size: int | None = None, pos_embed: str = "grid"):
    """The encoder as a timm ViT for inputs of test_size (None: its training size), with the positions its MAE's
    `model.pos_embed` mode gives a grid of g = test_size / p patches: grid 0..g-1 (the reference), or extent (g
    positions spread over its training grid G, fractional). At the training size both are the stored table."""
    model, spec = load_pretrained_vit(run_dir, img_size=test_size)
    if test_size is not None and test_size != spec.img_size:
        g, full = test_size // spec.patch_size, spec.img_size // spec.patch_size
        table = get_2d_sincos_pos_embed(
            model.embed_dim, g, cls_token=True, extent=full if pos_embed == "extent" else None
        )
        with torch.no_grad():
            model.pos_embed.copy_(table.unsqueeze(0))  # (1, 1+g*g, D): replaces timm's bicubic resampling
    return model


def encoder_features(
    run_dir: Path,
    data_root: Path,
    img_size: int,
    batch_size: int,
    workers: int,
    device,
    splits: tuple[str, ...] = ("train", "val"),
    test_size: int | None = None,
    pos_embed: str = "grid",
) -> tuple[dict, list[str]]:
    """Centre-crop features of each split of `data_root` (what the kNN and the cached probe use), at img_size, by the
    encoder built for test_size (`encoder_at_size`; None: its training size):
    ({split: ({"cls": (N, D), "mean": (N, D)}, labels (N,))}, class names)."""
    model = encoder_at_size(run_dir, test_size, pos_embed)
    model.to(device)
    classes, features = None, {}
    for split in splits:
        loader = build_eval_loader(data_root / split, img_size, batch_size, workers, classes=classes)
        classes = loader.dataset.classes
        features[split] = extract_pools(model, loader, device, ("cls", "mean"))  # ({pool: (N, D)}, labels (N,))
    return features, classes


def probe_settings(probe: dict[str, Any]) -> dict[str, Any]:
    """The study's linprobe section as fit_probe_on_features arguments."""
    return dict(
        epochs=int(probe["epochs"]),
        global_batch=int(probe["batch_size"]),
        blr=float(probe["blr"]),
        warmup_epochs=float(probe["warmup_epochs"]),
        min_lr=float(probe.get("min_lr", 0.0)),
        weight_decay=float(probe.get("weight_decay", 0.0)),
        momentum=float(probe.get("momentum", 0.9)),
    )


def run_finetune(
    study: Study,
    run_dir: Path,
    data_root: Path,
    img_size: int,
    seed: int,
    out: Path,
    log_path: Path,
    extra: list[str] = (),
) -> dict[str, float]:
    """The study's fine-tune of one encoder; resumes a half-finished one of the same config."""
    name = f"{run_dir.name}_finetune"
    cfg = load_finetune_config(
        study.finetune_recipe,
        [
            *study.finetune_overrides,
            f"model.checkpoint={json.dumps(str(run_dir))}",
            f"data.root={json.dumps(str(data_root))}",
            f"data.img_size={img_size}",
            f"data.num_workers={int(study.eval['num_workers'])}",
            f"output_dir={json.dumps(str(out / 'eval'))}",
            f"name={name}",
            f"train.seed={seed}",
            'tracking.wandb="off"',
            "checkpoint.resume=true",
            "checkpoint.every_epochs=1",
            "checkpoint.keep_last=1",
            *extra,
        ],
    )
    clear_if_config_changed(cfg.run_dir, cfg)
    fresh_accelerate_state()
    with open(log_path, "a") as log, redirect_stdout(log):
        ft = finetune(cfg)
    fresh_accelerate_state()
    # the last epoch: no selection on the validation split
    return {"finetune_top1": ft.last_eval["top1"], "finetune_best_top1": ft.best["top1"]}


def evaluate_encoder(
    study: Study,
    run_dir: Path,
    data_root: Path,
    img_size: int,
    seed: int,
    out: Path,
    log_path: Path,
    pos_embed: str = "grid",
) -> dict[str, Any]:
    """kNN (cls, mean), the cached-feature linear probe and the short fine-tune of one encoder, each stage timed;
    with eval.knn.sizes, kNN at each of those test sizes too (`knn_top1_<pool>_at<size>`, train bank and queries at
    that size, positions as the encoder's pos_embed mode gives them)."""
    ev, knn = study.eval, study.eval["knn"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seconds: dict[str, dict[str, float]] = {}

    # one pass of centre crops per split serves the kNN and the probe (the features linprobe.mode=cached uses)
    with Stopwatch() as sw:
        features, classes = encoder_features(
            run_dir, data_root, img_size, int(knn["batch_size"]), int(ev["num_workers"]), device
        )
        (train_x, train_y), (val_x, val_y) = features["train"], features["val"]
        result: dict[str, Any] = {
            f"knn_top1_{pool}": knn_accuracy(
                train_x[pool],
                train_y,
                val_x[pool],
                val_y,
                len(classes),
                k=int(knn["k"]),
                temperature=float(knn["temperature"]),
            )
            for pool in ("cls", "mean")
        }
    seconds["features_knn"] = sw.as_dict()

    sizes = [int(b) for b in knn.get("sizes") or []]
    if sizes:
        with Stopwatch() as sw:
            for size in sizes:
                if size == img_size:
                    at = {pool: result[f"knn_top1_{pool}"] for pool in ("cls", "mean")}
                else:
                    feats, _ = encoder_features(
                        run_dir,
                        data_root,
                        size,
                        int(knn["batch_size"]),
                        int(ev["num_workers"]),
                        device,
                        test_size=size,
                        pos_embed=pos_embed,
                    )
                    (tx, ty), (vx, vy) = feats["train"], feats["val"]
                    at = {
                        pool: knn_accuracy(
                            tx[pool],
                            ty,
                            vx[pool],
                            vy,
                            len(classes),
                            k=int(knn["k"]),
                            temperature=float(knn["temperature"]),
                        )
                        for pool in ("cls", "mean")
                    }
                for pool, acc in at.items():
                    result[f"knn_top1_{pool}_at{size}"] = acc
        seconds["knn_sizes"] = sw.as_dict()

    with Stopwatch() as sw:
        fresh_accelerate_state()
        history = fit_probe_on_features(
            train_x["cls"], train_y, val_x["cls"], val_y, len(classes), seed=seed, **probe_settings(ev["linprobe"])
        )
        result["linear_top1"] = history[-1]["top1"]
    seconds["linear_probe"] = sw.as_dict()

    with Stopwatch() as sw:
        result.update(run_finetune(study, run_dir, data_root, img_size, seed, out, log_path))
    seconds["finetune"] = sw.as_dict()
    return {**result, "eval_seconds": seconds}


def recheck(study: Study, state: StudyState, items: list[str], data_root: Path, img_size: int, out: Path) -> dict:
    """Evaluate finished encoders ('<row>:<seed>') again, into <out>/recheck/, each number beside the stored one:
    whether a stored evaluation reproduces with this code on this machine (e.g. before comparing rows evaluated by
    different commits). Nothing in state.json changes."""
    report = {}
    for item in items:
        row, _, seed = item.rpartition(":")
        entry = state.data["runs"].get(row, {}).get(seed, {})
        if not row or "pretrain" not in entry or "eval" not in entry:
            raise StudyError(
                f"--recheck {item}: no evaluated run '{row}' seed '{seed}' in {state.path}; give "
                f"<row>:<seed> of one, e.g. baseline:0"
            )
        run_dir = in_repo(entry["pretrain"]["value"]["run_dir"])
        if not (run_dir / "checkpoints").is_dir():
            raise StudyError(
                f"--recheck {item}: its run folder {run_dir} is gone, so its encoder cannot be evaluated again"
            )
        stored = entry["eval"]["value"]
        name = run_name(row, int(seed))
        new = evaluate_encoder(
            study, run_dir, data_root, img_size, int(seed), out / "recheck", out / "logs" / f"{name}.recheck.log"
        )
        report[name] = {
            "code": code_version(),
            "machine": machine(),
            "stored": stored,
            "again": new,
            "difference": {k: new[k] - stored[k] for k in (*ACCURACY_KEYS, "finetune_best_top1") if k in stored},
        }
        print(
            f"recheck {name}: " + ", ".join(f"{k} {stored[k]:.2f} -> {new[k]:.2f}" for k in report[name]["difference"]),
            flush=True,
        )
    (out / "recheck").mkdir(parents=True, exist_ok=True)
    (out / "recheck" / "recheck.json").write_text(json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------- summary, verdicts, report


def spread(values: list[float]) -> dict[str, Any]:
    """Mean and spread over seeds: half-range ((max - min) / 2) and the sample std."""
    return {
        "mean": statistics.fmean(values),
        "half_range": (max(values) - min(values)) / 2,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def summarise(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of every number the seeds all have (the untrained row has no loss)."""
    seeds = sorted(per_seed, key=int)
    by_size = sorted({k for s in seeds for k in per_seed[s] if k.startswith("knn_top1_") and "_at" in k})
    keys = [k for k in (*SUMMARY_KEYS, *by_size) if all(isinstance(per_seed[s].get(k), (int, float)) for s in seeds)]
    return {key: spread([per_seed[s][key] for s in seeds]) for key in keys}


def speedups(results: dict[str, dict[str, dict]], runs: list[str]) -> dict[str, dict[str, Any]]:
    """{run: {clock: spread of baseline time / run time}}, each ratio within one seed (one machine, one hour)."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        seeds = sorted(results[run], key=int)
        out[run] = {
            clock: spread([results[BASELINE][s][f"{clock}_s"] / results[run][s][f"{clock}_s"] for s in seeds])
            for clock in CLOCKS
        }
        if all("quiet_cpu_s" in results[r][s] for r in (BASELINE, run) for s in seeds):  # see quiet_cpu_seconds
            out[run]["quiet_cpu"] = spread(
                [results[BASELINE][s]["quiet_cpu_s"] / results[run][s]["quiet_cpu_s"] for s in seeds]
            )
    return out


def ablation_effects(results: dict[str, dict[str, dict]], ablation_rows: list[str]) -> dict[str, dict[str, Any]]:
    """Each ablation row beside the run it changes, on the ablation's own seeds: per seed, ablation - run for
    every accuracy and run time / ablation time on each clock, then mean and spread over those seeds (an
    ablation measured on fewer seeds than the study is compared with the same seeds of its run, not their mean)."""
    out: dict[str, dict[str, Any]] = {}
    for row in ablation_rows:
        run, seeds = split_row(row)[0], sorted(results[row], key=int)
        if not seeds:
            continue
        out[row] = {
            "run": run,
            "seeds": [int(s) for s in seeds],
            "minus_run": {
                key: spread([results[row][s][key] - results[run][s][key] for s in seeds])
                for key in ACCURACY_KEYS
                if all(key in results[row][s] for s in seeds)
            },
            "time_ratio": {
                clock: spread([results[run][s][f"{clock}_s"] / results[row][s][f"{clock}_s"] for s in seeds])
                for clock in CLOCKS
            },
            # the plan's own ratio: an ablation trained in another session than its run carries the
            # machine's drift in its time ratio, not in this one
            "flop_ratio": spread([results[run][s]["pflop"] / results[row][s]["pflop"] for s in seeds]),
        }
    return out


def ablation_table(summary: dict[str, dict], speedup: dict[str, dict], effects: dict[str, dict], clock: str) -> str:
    """The ablation rows, each accuracy beside its difference from the run it changes (same seeds)."""
    lines = [
        f"ablations: each value, then (ablation - its run) on the same seeds; time on the {clock} clock; "
        "time ratios between runs of different sessions carry the machine's drift, the FLOP ratio is the plan's",
        "",
        f"| row | seeds | {clock} s | speed-up vs baseline | its run's time / its time | its run's FLOPs / its "
        "FLOPs | kNN cls | kNN mean | linear | fine-tune |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, e in effects.items():
        s = summary[row]
        accuracies = [
            f"{s[k]['mean']:.2f} ({e['minus_run'][k]['mean']:+.2f})" if k in e["minus_run"] else "-"
            for k in ACCURACY_KEYS
        ]
        lines.append(
            f"| {row} | {', '.join(map(str, e['seeds']))} | {s[f'{clock}_s']['mean']:.1f} | "
            f"{speedup[row][clock]['mean']:.2f}x | {e['time_ratio'][clock]['mean']:.2f}x | "
            f"{e['flop_ratio']['mean']:.3f}x | " + " | ".join(accuracies) + " |"
        )
    return "\n".join(lines) + "\n"


def machines_note(results: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Which machine each seed ran on; a seed spread over several machines, or seeds on different ones, are named."""
    by_seed: dict[str, set] = {}
    for run in results:
        for seed, r in results[run].items():
            if "machine" in r:
                by_seed.setdefault(seed, set()).add((r["machine"]["device"], r["machine"]["host"]))
    notes = [
        f"seed {s}'s runs ran on {len(m)} machines ({'; '.join(f'{d} on {h}' for d, h in sorted(m))}): its speed-ups "
        "mix machines"
        for s, m in sorted(by_seed.items())
        if len(m) > 1
    ]
    distinct = {m for ms in by_seed.values() for m in ms}
    if len(by_seed) > 1 and len(distinct) > 1 and not notes:
        notes.append(
            "the seeds ran on different machines ("
            + "; ".join(f"seed {s}: {d} on {h}" for s, ms in sorted(by_seed.items()) for d, h in sorted(ms))
            + "): each speed-up is "
            "within one seed, the times are not comparable across seeds"
        )
    return {
        "by_seed": {s: [{"device": d, "host": h} for d, h in sorted(m)] for s, m in by_seed.items()},
        "notes": notes,
    }


def code_note(results: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Which code trained each run (runs from before this was recorded have none); more than one commit is named."""
    by_commit: dict[str, list[str]] = {}
    for row in results:
        for seed, r in sorted(results[row].items()):
            code = r.get("code")
            if code:
                label = code["commit"][:10] + (" with changes" if code["dirty"] else "")
                by_commit.setdefault(label, []).append(run_name(row, int(seed)))
    notes = []
    if len(by_commit) > 1:
        notes.append(
            "the runs were trained by "
            + str(len(by_commit))
            + " code versions ("
            + "; ".join(f"{c}: {', '.join(names)}" for c, names in sorted(by_commit.items()))
            + ")"
        )
    return {"by_commit": by_commit, "notes": notes}


def reference_check(study: Study, cfg, device_name: str, baseline_s_per_epoch: float) -> dict[str, Any]:
    """Our baseline's s/epoch vs the reference's; 'n/a' unless model, decoder, batch, crop and device all match."""
    ref = study.reference
    ours = {
        "model": cfg.model.size,
        "patch_size": cfg.model.patch_size,
        "decoder_embed_dim": cfg.model.decoder_embed_dim,
        "decoder_depth": cfg.model.decoder_depth,
        "batch_size": cfg.train.batch_size * cfg.train.accum_steps,
        "crop_size": cfg.data.crop_size,
    }
    differs = [f"{k} {ours[k]} vs {ref[k]}" for k in ours if ours[k] != ref[k]]
    if ref["device"] not in device_name:
        differs.append(f"device {device_name} vs {ref['device']}")
    out = {"ours_s_per_epoch": baseline_s_per_epoch, "reference_s_per_epoch": ref["s_per_epoch"], "differs": differs}
    if differs:
        return {**out, "verdict": "n/a", "ratio": None}
    ratio = baseline_s_per_epoch / ref["s_per_epoch"]
    return {**out, "verdict": "PASS" if ratio <= 1.0 else "FAIL", "ratio": ratio}


def verdicts(
    targets: dict[str, Any],
    clock: str,
    summary: dict[str, dict],
    speedup: dict[str, dict],
    reference: dict,
    equal_time_run: str | None = None,
) -> dict[str, Any]:
    """Each target of the study against the summary: pure arithmetic on the numbers given (tested on made-up ones).

    Per run of targets["runs"] (`run_targets`): speed-up >= its target, each accuracy of within_seed_range at or above
    the baseline's worst seed (mean - half-range), each of max_drop at most that many points below the baseline's mean;
    equal time (equal_time_run: the run given et's time): et's linear probe above that run's;
    floor: every trained encoder at least targets["min_gain_over_untrained"] points above the untrained one on every
    accuracy. {"clock", "runs": {row: ...}, "equal_time"?, "floor"?, "reference"}.
    """
    base = summary[BASELINE]
    out: dict[str, Any] = {"clock": clock, "runs": {}, "reference": reference}
    for row, t in targets["runs"].items():
        if row not in summary or row not in speedup:
            continue
        allowed = {**{k: base[k]["half_range"] for k in t["within_seed_range"]}, **t["max_drop"]}
        accuracy = {
            k: {
                "run": summary[row][k]["mean"],
                "baseline": base[k]["mean"],
                "allowed_drop": drop,
                "ok": summary[row][k]["mean"] >= base[k]["mean"] - drop,
            }
            for k, drop in allowed.items()
        }
        speed = speedup[row][clock]["mean"]
        out["runs"][row] = {
            "speedup": speed,
            "target_speedup": t["speedup"],
            "accuracy": accuracy,
            "within_seed_range": t["within_seed_range"],
            "max_drop": t["max_drop"],
            "pass": speed >= t["speedup"] and all(a["ok"] for a in accuracy.values()),
        }
    equal_run = equal_time_run
    if equal_run in summary and EQUAL_TIME_OF in summary:
        et_lin, eq_lin = summary[EQUAL_TIME_OF]["linear_top1"]["mean"], summary[equal_run]["linear_top1"]["mean"]
        out["equal_time"] = {
            "run": equal_run,
            "et_linear_top1": et_lin,
            "equal_time_linear_top1": eq_lin,
            "time_ratio": summary[equal_run][f"{clock}_s"]["mean"] / summary[EQUAL_TIME_OF][f"{clock}_s"]["mean"],
            "pass": et_lin > eq_lin,
        }
    if UNTRAINED in summary:
        margin = float(targets.get("min_gain_over_untrained", 0.0))
        trained = [r for r in summary if r != UNTRAINED and "+" not in r]
        floor = {
            run: {
                k: {
                    "run": summary[run][k]["mean"],
                    "untrained": summary[UNTRAINED][k]["mean"],
                    "ok": summary[run][k]["mean"] >= summary[UNTRAINED][k]["mean"] + margin,
                }
                for k in ACCURACY_KEYS
            }
            for run in trained
        }
        out["floor"] = {
            "margin": margin,
            "runs": floor,
            "pass": all(a["ok"] for per_run in floor.values() for a in per_run.values()),
        }
    return out


def verdict_lines(v: dict[str, Any]) -> list[str]:
    def word(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def acc(a: dict) -> str:
        return "; ".join(
            f"{k} {x['run']:.2f} vs {x['baseline']:.2f} (-{x['allowed_drop']:.2f} allowed) "
            f"{'ok' if x['ok'] else 'below'}"
            for k, x in a.items()
        )

    def bounds(t: dict) -> str:
        parts = (
            [f"{', '.join(t['within_seed_range'])} within the baseline's seed range or above"]
            if t["within_seed_range"]
            else []
        )
        parts += [f"{k} within {d:g} point{'s' if d != 1 else ''}" for k, d in t["max_drop"].items()]
        return "; ".join(parts)

    ref, clock = v["reference"], v["clock"]
    ref_detail = f"ours {ref['ours_s_per_epoch']:.2f} s/epoch vs reference {ref['reference_s_per_epoch']} s/epoch" + (
        f" ({'; '.join(ref['differs'])})" if ref["differs"] else f" (x{ref['ratio']:.2f})"
    )
    lines = [
        f"verdict {row} (>= {t['target_speedup']:g}x less {clock} time; {bounds(t)}): {word(t['pass'])} - speed-up "
        f"{t['speedup']:.3f}x; {acc(t['accuracy'])}"
        for row, t in v["runs"].items()
    ]
    if "equal_time" in v:
        eq = v["equal_time"]
        lines.append(
            f"verdict equal {clock} time (curriculum ahead on linear probe): {word(eq['pass'])} - et "
            f"{eq['et_linear_top1']:.2f} vs {eq['run']} {eq['equal_time_linear_top1']:.2f} (its {clock} time "
            f"{eq['time_ratio']:.2f}x et's)"
        )
    if "floor" in v:
        below = [
            f"{run} {k} {a['run']:.2f} vs {a['untrained']:.2f}"
            for run, per_run in v["floor"]["runs"].items()
            for k, a in per_run.items()
            if not a["ok"]
        ]
        lines.append(
            f"verdict trained vs untrained (every accuracy >= untrained + {v['floor']['margin']:g} points): "
            f"{word(v['floor']['pass'])}" + (f" - below: {'; '.join(below)}" if below else "")
        )
    lines.append(f"verdict baseline s/epoch vs reference: {ref['verdict']} - {ref_detail}")
    return lines


def markdown_table(summary: dict[str, dict], speedup: dict[str, dict], seeds: list[int]) -> str:
    def cell(stat: dict | None, digits: int) -> str:
        return "-" if stat is None else f"{stat['mean']:.{digits}f} ± {stat['half_range']:.{digits}f}"

    def ratio(run: str, clock: str) -> str:
        return cell(speedup[run][clock], 2) + "x" if clock in speedup.get(run, {}) else "-"

    lines = [
        f"mean ± half-range over seeds {', '.join(map(str, seeds))}; speed-up = baseline time / run time within each "
        "seed; times are the training loop's (wall, and process CPU = user + system); quiet CPU: each stage's "
        "fastest-decile window of CPU seconds per step times its steps (what other work cannot inflate)",
        "",
        "| run | epochs | steps | wall s | CPU s | speed-up (wall) | speed-up (CPU) | speed-up (quiet CPU) | final "
        "loss | "
        "kNN cls | kNN mean | linear | fine-tune |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in [r for r in summary if "+" not in r]:  # the runs, then the untrained row (ablations: their own table)
        s = summary[run]
        lines.append(
            f"| {run} | {cell(s['epochs'], 2)} | {cell(s['steps'], 0)} | {cell(s['wall_s'], 1)} | "
            f"{cell(s['cpu_s'], 1)} | {ratio(run, 'wall')} | {ratio(run, 'cpu')} | {ratio(run, 'quiet_cpu')} | "
            f"{cell(s.get('final_loss'), 4)} | "
            f"{cell(s['knn_top1_cls'], 2)} | {cell(s['knn_top1_mean'], 2)} | {cell(s['linear_top1'], 2)} | "
            f"{cell(s['finetune_top1'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def size_table(summary: dict[str, dict], sizes: list[int], train_size: int) -> str:
    """kNN top-1 (cls / mean) of every encoder at each test size, mean ± half-range over seeds."""

    def cell(stat: dict | None) -> str:
        return "-" if stat is None else f"{stat['mean']:.2f} ± {stat['half_range']:.2f}"

    head = " | ".join(f"{b} px{' (train)' if b == train_size else ''} cls | {b} px mean" for b in sizes)
    lines = [
        f"kNN top-1 across test sizes (trained at {train_size} px; positions as each encoder's pos_embed mode gives "
        "them; train bank and val queries at the test size)",
        "",
        f"| run | {head} |",
        "| --- |" + " --- | --- |" * len(sizes),
    ]
    for run, s in summary.items():
        if "+" in run:
            continue
        cells = " | ".join(
            f"{cell(s.get(f'knn_top1_cls_at{b}'))} | {cell(s.get(f'knn_top1_mean_at{b}'))}" for b in sizes
        )
        lines.append(f"| {run} | {cells} |")
    return "\n".join(lines) + "\n"


def stage_rates(results: dict[str, dict[str, dict]], cfg, clock: str) -> list[dict[str, Any]]:
    """Per decoder share, target and input size B, over every run and seed that trained so: images per second on the
    clock, against the full size's at the same share and target, beside the ratio of FLOPs per image (the decoder
    tokens really decoded, the head's width). Where the measured gain falls short of the FLOP ratio, the small sizes
    run less efficiently on this device (launch overhead, small matrices): the diagnosis of a speed-up below plan,
    measured rather than assumed."""
    key = "seconds" if clock == "wall" else "cpu_seconds"
    totals: dict[tuple[float, str, int], list[float]] = {}
    for seeds in results.values():
        for r in seeds.values():
            # records of the first edition: every masked patch, pixels
            kind = (float(r.get("decode_fraction", 1.0)), r.get("target", "pixel"))
            for st in r.get("stages", []):
                t = totals.setdefault((*kind, st["size"]), [0.0, 0.0])
                t[0] += st["steps"] * r["global_batch"]
                t[1] += st[key]
    if not totals:
        return []

    def flops(share: float, target: str, b: int) -> float:
        m = cfg.model
        return mae_train_flops_per_image(
            m.size,
            b,
            m.patch_size,
            m.decoder_embed_dim,
            m.decoder_depth,
            m.mask_ratio,
            decode_fraction=share,
            target=target,
            hog_cell_size=m.hog_cell_size,
            hog_bins=m.hog_bins,
        )

    out = []
    for share, target, b in sorted(totals, key=lambda k: (-k[0], k[1], k[2])):
        full = max(size for sh, tg, size in totals if (sh, tg) == (share, target))
        n, t = totals[(share, target, b)]
        rate, full_rate = n / t, totals[(share, target, full)][0] / totals[(share, target, full)][1]
        flop_ratio = flops(share, target, full) / flops(share, target, b)
        out.append(
            {
                "decode_fraction": share,
                "target": target,
                "size": b,
                "images": n,
                "seconds": t,
                "images_per_s": rate,
                "gain": rate / full_rate,
                "flop_ratio": flop_ratio,
                "efficiency": rate / full_rate / flop_ratio,
                "gflop_per_image": flops(share, target, b) / 1e9,
            }
        )
    return out


def stage_rate_table(rates: list[dict[str, Any]], clock: str) -> str:
    lines = [
        f"per decoder share, target and input size B, all runs and seeds ({clock} clock): measured speed vs the FLOP "
        "ratio",
        "",
        "| decoded share | target | B | GFLOP / image | images | img / s | gain vs full size | FLOP ratio | "
        "gain / FLOP ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rates:
        lines.append(
            f"| {r.get('decode_fraction', 1.0):g} | {r.get('target', 'pixel')} | {r['size']} | "
            f"{r['gflop_per_image']:.3f} | {r['images']:.0f} | "
            f"{r['images_per_s']:.1f} | {r['gain']:.2f}x | {r['flop_ratio']:.2f}x | {r['efficiency']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(
    results: dict[str, dict],
    summary: dict[str, dict],
    clock: str,
    path: Path,
    title: str,
    compare: tuple[str, dict[str, dict]] | None = None,
) -> None:
    """Accuracy vs pretraining time per run (seeds as light dots, mean ± half-range); compare = (label, summary of
    another edition): its runs as hollow grey-edged markers, their times from their own sessions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("knn_top1_cls", "kNN top-1, cls, k=20"),
        ("linear_top1", "linear probe top-1"),
        ("finetune_top1", "fine-tune top-1"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    time_key = f"{clock}_s"
    for ax, (key, label) in zip(axes, panels):
        for i, run in enumerate(r for r in results if r != UNTRAINED and "+" not in r):
            color, seeds = f"C{i}", results[run]
            ax.scatter(
                [seeds[s][time_key] for s in seeds], [seeds[s][key] for s in seeds], color=color, alpha=0.35, s=18
            )
            t, a = summary[run][time_key], summary[run][key]
            ax.errorbar(
                t["mean"],
                a["mean"],
                xerr=t["half_range"],
                yerr=a["half_range"],
                fmt="o",
                color=color,
                capsize=3,
                label=run,
            )
        if compare is not None:
            label_of, other = compare
            for j, (run, s) in enumerate((r, s) for r, s in other.items() if r != UNTRAINED and "+" not in r):
                if time_key in s and key in s:
                    ax.errorbar(
                        s[time_key]["mean"],
                        s[key]["mean"],
                        xerr=s[time_key]["half_range"],
                        yerr=s[key]["half_range"],
                        fmt="D",
                        mfc="none",
                        color=f"C{j}",
                        alpha=0.6,
                        capsize=2,
                        label=f"{label_of}: {run}",
                    )
        if UNTRAINED in summary:  # the floor: the same encoder at E = 0
            ax.axhline(summary[UNTRAINED][key]["mean"], color="gray", linestyle="--", label="untrained (E = 0)")
        ax.set_xlabel(f"pretraining {'CPU' if clock == 'cpu' else 'wall'} time (s)")
        ax.set_ylabel(f"{label} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: accuracy vs pretraining {clock} time (seeds: light dots; mean ± half-range)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the study state (resume)


def canonical(key: Any) -> Any:
    """A settings key with every list of override strings sorted: the order they were written in is no setting."""
    if isinstance(key, dict):
        return {k: canonical(v) for k, v in key.items()}
    if isinstance(key, list) and all(isinstance(x, str) for x in key):
        return sorted(key)
    return key


class StudyState:
    """state.json: every finished pretraining and evaluation, keyed by the settings that produced it, so a
    relaunch redoes nothing that still holds and everything whose settings changed.

    Several study processes may share one state (e.g. one per seed, each on its own core): every change is
    a read-modify-write of the file under an exclusive lock, written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.lock_path = path.with_suffix(".lock")
        self.data = self._read()

    def _read(self) -> dict[str, Any]:
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        data.setdefault("runs", {})
        data.setdefault("launches", {})
        return data

    @contextmanager
    def _locked(self):
        with open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.data = self._read()  # what the other processes wrote meanwhile
            yield self.data
            write_text_atomic(self.path, json.dumps(self.data, indent=2))  # a kill mid-write leaves the previous state

    def get(self, run: str, seed: int, kind: str, key: Any) -> dict | None:
        entry = self.data["runs"].get(run, {}).get(str(seed), {}).get(kind)
        return entry["value"] if entry and canonical(entry["key"]) == canonical(key) else None

    def reload(self) -> None:
        self.data = self._read()

    def key_of(self, run: str, seed: int, kind: str) -> Any:
        return self.data["runs"][run][str(seed)][kind]["key"]

    def put(self, run: str, seed: int, kind: str, key: Any, value: dict) -> None:
        with self._locked() as data:
            data["runs"].setdefault(run, {}).setdefault(str(seed), {})[kind] = {"key": key, "value": value}

    def count_launch(self, name: str) -> int:
        with self._locked() as data:
            n = data["launches"][name] = data["launches"].get(name, 0) + 1
        return n


# ----------------------------------------------------------------------------- main


def repo_relative(path: Path) -> str:
    """A path inside the repository as relative to it (the same on every checkout), any other as given."""
    path = Path(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def in_repo(path: str | Path) -> Path:
    """A path the study recorded (relative to the checkout, as `repo_relative` writes it; an absolute one as is)."""
    return REPO / path


def portable_command(command: list[str]) -> list[str]:
    """A launched command as results.json records it: `python` for this interpreter and every path inside the
    checkout relative to it, so a published file names no machine and reads the same after a rerun elsewhere."""

    def relative(path: str) -> str:
        return repo_relative(Path(os.path.normpath(path))) if path.startswith("/") else path

    def portable(arg: str) -> str:
        key, eq, value = arg.partition("=")
        if not eq:
            return relative(arg)
        quoted = len(value) > 1 and value[0] == value[-1] == '"'  # data.root="..." (JSON-quoted)
        plain = relative(value[1:-1] if quoted else value)
        return f"{key}=" + (f'"{plain}"' if quoted else plain)

    return ["python", *(portable(a) for a in command[1:])]


# Study roles: the pretraining (the default, and --pretrain-only) and the evaluation (the default, and
# --eval-only) each belong to one process at a time; a --pretrain-only and an --eval-only process share a study.
ROLE_LOCKS = {"pretrain": ".pretrain.lock", "eval": ".eval.lock"}


@contextmanager
def study_roles(out: Path, roles: list[str]):
    """Hold the study folder's lock of each role this process plays, for its whole life."""
    held = []
    try:
        for role in roles:
            held.append(
                RunFolderLock(
                    out,
                    what=f"study folder ({role})",
                    lock_name=ROLE_LOCKS[role],
                    ways_on=f"another study process is doing its {role} part; wait for it to end, "
                    "or give this study another --out",
                ).acquire()
            )
        yield
    finally:
        for lock in held:
            lock.release()


def settings_key(overrides: list[str]) -> list[str]:
    """The overrides that decide a run's numbers: the output folder does not, and the data root is kept relative
    to the repository, so a study resumed from another checkout path still finds its finished runs."""
    key = []
    for o in overrides:
        if o.startswith("output_dir="):
            continue
        if o.startswith("data.root="):
            o = f"data.root={repo_relative(json.loads(o.split('=', 1)[1]))}"
        key.append(o)
    return key


# What a report says about the session that wrote it, which state.json does not hold: --report-only keeps them
SESSION_KEYS = ("device", "date", "torch", "launch", "num_train_images", "compile_warmup_s")


def replaced_session(out: Path, published: Path) -> dict[str, Any] | None:
    """The session facts (SESSION_KEYS) of the report a --report-only rewrites: the study folder's results.json,
    else the published one; None when there is neither."""
    for path in (out / "results.json", published / "results.json"):
        if path.is_file():
            report = json.loads(path.read_text())
            return {key: report[key] for key in SESSION_KEYS}
    return None


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="configs/study/<name>.yaml")
    parser.add_argument(
        "--data", default=None, help="ImageFolder root with train/ and val/ (default: the study's data_root)"
    )
    parser.add_argument("--out", default=None, help="output folder (default: runs/study/<study name>/)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="train.seed of each repetition (default: the study's)"
    )
    parser.add_argument(
        "--launch",
        choices=("auto", "subprocess", "inprocess"),
        default="auto",
        help="pretraining runs as `python pretrain.py` subprocesses or in this process "
        "(auto: subprocess with a GPU, in-process without)",
    )
    parser.add_argument(
        "--pretrain-only",
        action="store_true",
        help="run (or resume) the pretraining runs of every seed and stop before evaluating (e.g. to settle "
        "the evaluation protocol on the baseline encoder meanwhile)",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="pretrain nothing: evaluate each run as soon as another study process (--pretrain-only) has "
        "pretrained it, waiting for the rest; the two share state.json, so evaluation runs beside "
        "pretraining, e.g. one process per core",
    )
    parser.add_argument("--poll-seconds", type=float, default=EVAL_ONLY_POLL_S, help=argparse.SUPPRESS)
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=[],
        help="ablations of the study config to add (rows '<run>+<name>', each pretrained and evaluated "
        "after the main runs of each seed); 'all' for every one",
    )
    parser.add_argument(
        "--ablation-seeds",
        nargs="+",
        default=None,
        metavar="SEED|NAME=SEED,SEED",
        help="the seeds that get the ablation rows (default: every seed), for all ('0') or per ablation "
        "('pos_extent=0,1 warmup20=0'; unnamed ones get the plain seeds given, else every seed); "
        "each must be one of --seeds, whose baseline and run the ablation is compared with",
    )
    parser.add_argument(
        "--recheck",
        nargs="+",
        default=None,
        metavar="ROW:SEED",
        help="evaluate these finished encoders again (into <out>/recheck/) and print each number beside "
        "the stored one; trains nothing, changes nothing in state.json",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train and evaluate nothing: write results.json, table.md and the plot from state.json (every row "
        "asked for must be in it, evaluated) and the study config; the session's date, device, torch, launch, "
        "image count and warm-up, which state.json does not hold, are kept from the results.json it replaces "
        "(--out's, else the published one)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="also copy results.json, table.md and the plot to benchmarks/results/<study name>/ (committed)",
    )
    parser.add_argument("--warm-compile", action="store_true", help=argparse.SUPPRESS)  # the warm-up's own process
    args = parser.parse_args(argv)
    if args.eval_only and args.pretrain_only:
        raise StudyError("--eval-only and --pretrain-only exclude each other: run one process with each")
    if args.report_only and (args.eval_only or args.pretrain_only or args.recheck):
        raise StudyError(
            "--report-only trains and evaluates nothing: give it without --pretrain-only, --eval-only or --recheck"
        )

    study = load_study(args.study)
    data_root = Path(args.data) if args.data else study.data_root
    if data_root is None or (
        not args.report_only and (not (data_root / "train").is_dir() or not (data_root / "val").is_dir())
    ):
        raise StudyError(
            f"data root '{data_root}' needs train/ and val/ class folders; pass --data /path/to/imagenette "
            "(for the full Imagenette: ../shared/data/README.md)"
        )
    data_root = data_root.resolve()
    out = Path(args.out).resolve() if args.out else REPO / "runs" / "study" / study.name
    try:
        check_output_folder(out, reads=[data_root], flag="--out")
    except FileError as e:
        raise StudyError(str(e)) from None
    if args.warm_compile:  # launched by a study process that holds the locks
        warm_compile(study, data_root, out)
        return {}
    out.mkdir(parents=True, exist_ok=True)
    roles = (
        []
        if args.recheck
        else ["pretrain"]
        if args.pretrain_only
        else ["eval"]
        if args.eval_only or args.report_only
        else ["pretrain", "eval"]
    )
    try:
        with study_roles(out, roles):
            return run_study(args, study, data_root, out)
    except RunFolderBusy as e:
        raise StudyError(str(e)) from None


def run_study(args: argparse.Namespace, study: Study, data_root: Path, out: Path) -> dict[str, Any]:
    """The study, once its folder is this process's (`main` checked the arguments and took the locks)."""
    seeds = args.seeds if args.seeds is not None else study.seeds
    if args.ablations == ["all"]:
        args.ablations = list(study.ablations)
    unknown = [a for a in args.ablations if a not in study.ablations]
    if unknown:
        raise StudyError(
            f"ablations {unknown} are not in {study.path.name}; it has: {', '.join(study.ablations) or 'none'}"
        )
    ablation_seeds = ablation_seed_plan(args.ablation_seeds or [], args.ablations, seeds)
    launch = args.launch if args.launch != "auto" else ("subprocess" if torch.cuda.is_available() else "inprocess")
    for sub in ("runs", "eval", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # a study-local inductor cache: filled by the warm-up below, shared by every run of this study
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache")}
    if study.threads:  # this process (in-process runs, evaluation) and every launched run
        torch.set_num_threads(study.threads)
        env["OMP_NUM_THREADS"] = str(study.threads)

    # every config checked before anything runs (the equal-time run's epochs are known only later); a report reads no
    # data, its configs only shape the report (model, batch, crop), so a checkout without the data still writes it
    reads_nothing = ["data.source=fractal"] if args.report_only else []
    cfgs = {
        run: load_pretrain_config(
            study.recipe,
            [
                *pretrain_overrides(
                    study, run, 0, study.epochs * (1.0 if spec.budget == EQUAL_TIME else spec.budget), data_root, out
                ),
                *reads_nothing,
            ],
        )
        for run, spec in study.runs.items()
    }
    base_cfg = cfgs[BASELINE]
    published = REPO / "benchmarks" / "results" / study.name
    session = replaced_session(out, published) if args.report_only else None
    if session is None and not (data_root / "train").is_dir():
        raise StudyError(
            f"--report-only: no results.json in {out} or {published} to take the session's facts from, and no "
            f"data root '{data_root}' to count the training images of; pass --data"
        )
    num_images = session["num_train_images"] if session else len(scan_image_folder(data_root / "train").samples)
    planned_spe = num_images // (base_cfg.train.batch_size * base_cfg.train.accum_steps)
    rate = study.peak_tflops * study.assumed_mfu * 1e12
    if not (out / STATE_FILE).is_file() and (published / STATE_FILE).is_file():
        # a new checkout: start from the published state, so finished (and evaluated) seeds are read back, not rerun
        shutil.copy2(published / STATE_FILE, out / STATE_FILE)
        print(f"starting from the published state {published / STATE_FILE}")
    state = StudyState(out / STATE_FILE)
    if args.recheck:
        return recheck(study, state, args.recheck, data_root, base_cfg.data.crop_size, out)
    print(
        f"study {study.name}: {base_cfg.model.size}/{base_cfg.model.patch_size} (decoder "
        f"{base_cfg.model.decoder_embed_dim} x "
        f"{base_cfg.model.decoder_depth}) at {base_cfg.data.crop_size} px, E = {study.epochs:g}, batch "
        f"{base_cfg.train.batch_size * base_cfg.train.accum_steps}, {base_cfg.train.precision}, compile "
        f"{base_cfg.train.compile}, "
        f"{num_images} training images, seeds {seeds}, launch {launch}, verdicts on {study.verdict_clock} time; out "
        f"{out}" + (" (resuming: finished runs and evaluations are read back)" if state.data["runs"] else "")
    )
    for run in [r for r, spec in study.runs.items() if spec.budget != EQUAL_TIME]:
        stages = planned_stages(cfgs[run], planned_spe)
        flops = train_flops(cfgs[run], stages)
        print(
            f"  plan {run}: {sum(n for _, n in stages)} steps at B {'/'.join(str(b) for b, _ in stages)}, "
            f"{flops / 1e15:.3g} PFLOP "
            f"(~{flops / rate:.0f} s at {100 * study.assumed_mfu:.0f}% of {study.peak_tflops:g} TFLOP/s)"
        )

    warmup_s = None
    # in-process, the first run would also pay this process's one-time costs (lazy kernels, allocator,
    # thread pools): the throwaway steps take them for every run, compiled or not
    if (base_cfg.train.compile != "none" or launch == "inprocess") and not (args.eval_only or args.report_only):
        t0 = time.perf_counter()
        if launch == "subprocess":
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--study",
                str(study.path),
                "--data",
                str(data_root),
                "--out",
                str(out),
                "--warm-compile",
            ]
            with open(out / "logs" / "compile_warmup.log", "w") as log:
                if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                    raise StudyError(f"the compile warm-up failed; see {out / 'logs' / 'compile_warmup.log'}")
        else:
            warm_compile(study, data_root, out)
        warmup_s = time.perf_counter() - t0
        print(f"warm-up (compile and first-use costs): {warmup_s:.0f}s (not part of any run)")

    ablation_rows = [f"{run}+{name}" for name in args.ablations for run in study.ablations[name].runs]
    rows = (*study.run_names, UNTRAINED, *ablation_rows)
    results: dict[str, dict[str, dict]] = {row: {} for row in rows}
    commands: dict[str, list[str]] = {}
    equal_time: dict[str, dict] = {}
    eval_settings = {"eval": study.eval, "finetune_recipe": repo_relative(study.finetune_recipe)}
    clock = study.verdict_clock
    read_only = args.eval_only or args.report_only

    def not_in_state(row: str, seed: int, what: str) -> StudyError:
        return StudyError(
            f"--report-only: {row} seed {seed} has no {what} in {state.path} with this study's settings; run the "
            "study without --report-only to make it"
        )

    def pretrain_row(row: str, seed: int, epochs: float, read_only: bool = False) -> bool:
        """Pretrain one row of one seed (or read it back from the state), into results; read_only: only read back."""
        overrides = pretrain_overrides(study, row, seed, epochs, data_root, out)
        commands[run_name(row, seed)] = portable_command(pretrain_command(study.recipe, overrides))
        key = settings_key(overrides)
        r = state.get(row, seed, "pretrain", key)
        # a finished run is read back; its folder is needed only while its evaluation is still to do
        evaluated = state.get(row, seed, "eval", {"encoder": key, **eval_settings}) is not None
        if r is not None and (evaluated or in_repo(r["run_dir"]).is_dir()):
            if str(seed) not in results[row]:  # (a waiting --eval-only pass keeps what it already evaluated)
                print(
                    f"pretrained {row} seed {seed}: read back ({r['wall_s']:.1f}s wall, {r['cpu_s']:.1f}s CPU)",
                    flush=True,
                )
                results[row][str(seed)] = backfill_quiet_cpu(r)
            return True
        if read_only:
            return False
        cfg = load_pretrain_config(study.recipe, overrides)
        clear_if_config_changed(cfg.run_dir, cfg)
        launches = state.count_launch(run_name(row, seed))
        process_s = launch_pretrain(
            study.recipe, overrides, out / "logs" / f"{run_name(row, seed)}.pretrain.log", launch, env
        )
        r = {
            "seed": seed,
            "machine": machine(),
            "code": code_version(),
            "launches": launches,
            **read_pretrain_run(cfg.run_dir, cfg, process_s),
        }
        state.put(row, seed, "pretrain", key, r)
        results[row][str(seed)] = r
        print(
            f"pretrained {row} seed {seed}: {r['epochs']:.4g} epochs, {r['steps']} steps, {r['wall_s']:.1f}s wall, "
            f"{r['cpu_s']:.1f}s CPU training ({r['process_s']:.1f}s launch{', resumed' if launches > 1 else ''}), "
            f"{r['images_per_sec']:.0f} img/s, final loss {r['final_loss']:.4f}"
        )
        print(
            "  per stage: "
            + ", ".join(
                f"B {st['size']}: {st['steps']} steps in {st['seconds']:.1f}s wall / {st['cpu_seconds']:.1f}s CPU"
                for st in r["stages"]
            ),
            flush=True,
        )
        return True

    def row_pos_embed(row: str, seed: int, r: dict) -> str:
        """The encoder's model.pos_embed: its pretraining record's, else its overrides' (the untrained: the
        baseline's)."""
        if r.get("pos_embed"):
            return r["pos_embed"]
        return load_pretrain_config(
            study.recipe, pretrain_overrides(study, row, seed, study.epochs, data_root, out)
        ).model.pos_embed

    def evaluate_row(row: str, seed: int) -> None:
        """Evaluate one row's encoder (or read it back), into results."""
        r = results[row][str(seed)]
        if "knn_top1_cls" in r:
            return  # done in an earlier pass of this process
        key = {"encoder": state.key_of(row, seed, "pretrain"), **eval_settings}
        ev = state.get(row, seed, "eval", key)
        if ev is None and args.report_only:
            raise not_in_state(row, seed, "evaluation")
        if ev is None:
            ev = {
                "eval_machine": machine(),
                "eval_code": code_version(),
                **evaluate_encoder(
                    study,
                    in_repo(r["run_dir"]),
                    data_root,
                    base_cfg.data.crop_size,
                    seed,
                    out,
                    out / "logs" / f"{run_name(row, seed)}.finetune.log",
                    pos_embed=row_pos_embed(row, seed, r),
                ),
            }
            state.put(row, seed, "eval", key, ev)
        r.update(ev)
        print(
            f"evaluated {row} seed {seed}: kNN cls {r['knn_top1_cls']:.2f} mean {r['knn_top1_mean']:.2f}, "
            f"linear {r['linear_top1']:.2f}, fine-tune {r['finetune_top1']:.2f} ("
            + ", ".join(
                f"{stage} {t['wall_s']:.0f}s wall / {t['cpu_s']:.0f}s CPU" for stage, t in ev["eval_seconds"].items()
            )
            + ")",
            flush=True,
        )

    def pretrain_runs(seed: int, read_only: bool) -> list[str]:
        """The pretraining runs of a seed (read_only: those finished), in the config's order, an equal-time run last:
        its budget comes from et's and the baseline's time on the verdict clock."""
        done = []
        for run in sorted(study.run_names, key=lambda r: study.runs[r].budget == EQUAL_TIME):  # equal time: last
            if study.runs[run].budget == EQUAL_TIME:
                if not {EQUAL_TIME_OF, BASELINE} <= set(done):
                    continue
                et, base = results[EQUAL_TIME_OF][str(seed)], results[BASELINE][str(seed)]
                epochs, steps = equal_time_budget(
                    study.epochs, et[f"{clock}_s"], base[f"{clock}_s"], base["steps_per_epoch"]
                )
                equal_time[str(seed)] = {
                    "clock": clock,
                    "et_s": et[f"{clock}_s"],
                    "baseline_s": base[f"{clock}_s"],
                    "ratio": et[f"{clock}_s"] / base[f"{clock}_s"],
                    "steps_per_epoch": base["steps_per_epoch"],
                    "epochs": epochs,
                    "steps": steps,
                }
            else:
                epochs = study.epochs * study.runs[run].budget
            if pretrain_row(run, seed, epochs, read_only):
                done.append(run)
        return done

    for seed in seeds:
        while True:
            # --- pretraining: baseline, et, etpp_half, then the baseline with et's time (on the verdict clock)
            ready = pretrain_runs(seed, read_only=read_only)
            if args.pretrain_only:
                break
            # --- the floor: the baseline's encoder at step 0
            if str(seed) not in results[UNTRAINED]:
                untrained_key = settings_key(pretrain_overrides(study, UNTRAINED, seed, study.epochs, data_root, out))
                r = state.get(UNTRAINED, seed, "pretrain", untrained_key)
                evaluated = state.get(UNTRAINED, seed, "eval", {"encoder": untrained_key, **eval_settings}) is not None
                if r is None or not (evaluated or in_repo(r["run_dir"]).is_dir()):
                    if args.report_only:
                        raise not_in_state(UNTRAINED, seed, "encoder")
                    r = {
                        "seed": seed,
                        "machine": machine(),
                        "code": code_version(),
                        "epochs": 0.0,
                        "steps": 0,
                        "wall_s": 0.0,
                        "cpu_s": 0.0,
                        "run_dir": repo_relative(save_untrained_encoder(study, seed, data_root, out)),
                    }
                    state.put(UNTRAINED, seed, "pretrain", untrained_key, r)
                results[UNTRAINED][str(seed)] = r
            # --- evaluation of every encoder, the same way (--eval-only: each as soon as another process pretrained it)
            for row in (*ready, UNTRAINED):
                evaluate_row(row, seed)
            if len(ready) == len(study.runs):
                break
            if args.report_only:
                raise not_in_state(next(r for r in study.runs if r not in ready), seed, "pretraining")
            print(
                f"seed {seed}: waiting for {', '.join(r for r in study.runs if r not in ready)} to be pretrained "
                f"(another process); checking every {args.poll_seconds:g}s",
                flush=True,
            )
            time.sleep(args.poll_seconds)
            state.reload()
        # --- then the ablations asked for, each pretrained and evaluated (split like the runs above: --pretrain-only
        # trains them one after another, --eval-only evaluates each as soon as the other process has trained it)
        for row in [r for r in ablation_rows if seed in ablation_seeds[split_row(r)[1]]]:
            while not pretrain_row(row, seed, study.epochs * study.runs[split_row(row)[0]].budget, read_only=read_only):
                if args.report_only:
                    raise not_in_state(row, seed, "pretraining")
                print(
                    f"seed {seed}: waiting for {row} to be pretrained (another process); checking every "
                    f"{args.poll_seconds:g}s",
                    flush=True,
                )
                time.sleep(args.poll_seconds)
                state.reload()
            if not args.pretrain_only:
                evaluate_row(row, seed)

    if args.pretrain_only:
        print(
            f"pretraining done for seeds {seeds}; {out / STATE_FILE} holds it. Run without --pretrain-only to evaluate."
        )
        return {"runs": results, "equal_time": equal_time}

    # --- summary
    summary = {row: summarise(results[row]) for row in rows}
    speedup = speedups(results, [*study.run_names, *ablation_rows])
    effects = ablation_effects(results, ablation_rows)
    if session is None:  # this session's report (a --report-only keeps the facts of the one it replaces)
        session = {
            "device": device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "launch": launch,
            "num_train_images": num_images,
            "compile_warmup_s": warmup_s,
        }
    device = session["device"]
    reference = reference_check(study, base_cfg, device, summary[BASELINE]["s_per_epoch"]["mean"])
    equal_time_run = next((r for r, spec in study.runs.items() if spec.budget == EQUAL_TIME), None)
    v = verdicts(study.targets, clock, summary, speedup, reference, equal_time_run)
    machines, code = machines_note(results), code_note(results)
    table = markdown_table(summary, speedup, seeds)
    if effects:
        table += "\n" + ablation_table(summary, speedup, effects, clock)
    rates = stage_rates(results, base_cfg, clock)
    table += "\n" + stage_rate_table(rates, clock)
    test_sizes = [int(b) for b in study.eval["knn"].get("sizes") or []]
    if test_sizes:
        table += "\n" + size_table(summary, test_sizes, base_cfg.data.crop_size)
    lines = verdict_lines(v) + [f"note: {n}" for n in machines["notes"] + code["notes"]]
    result = {
        "study": study.name,
        "study_config": repo_relative(study.path),
        "settings": study.raw,
        "device": device,
        "date": session["date"],
        "torch": session["torch"],
        "launch": session["launch"],
        "data_root": repo_relative(data_root),
        "num_train_images": session["num_train_images"],
        "seeds": seeds,
        "verdict_clock": clock,
        "compile_warmup_s": session["compile_warmup_s"],
        "runs": results,
        "summary": summary,
        "speedups": speedup,
        "equal_time": equal_time,
        "verdicts": v,
        "machines": machines,
        "code": code,
        "stage_rates": rates,
        "ablation_seeds": ablation_seeds,
        "ablations": effects,
        "commands": commands,
    }
    write_text_atomic(out / "results.json", json.dumps(result, indent=2))
    verdict_list = "\n".join(f"- {line}" for line in lines)
    write_text_atomic(out / "table.md", f"# {study.name} ({device}, {result['date']})\n\n{table}\n{verdict_list}\n")
    compare = None
    if study.raw.get("compare_with"):  # an earlier edition's published results.json, drawn beside this one
        other = json.loads((REPO / study.raw["compare_with"]).read_text())
        compare = (other["study"], other["summary"])
    plot(results, summary, clock, out / "accuracy_vs_time.png", study.name, compare)

    print()
    print(table)
    for c in CLOCKS:
        print(
            f"speed-ups ({c} time, baseline / run, within each seed): "
            + ", ".join(f"{run} {speedup[run][c]['mean']:.2f}x" for run in study.run_names)
        )
    if all("quiet_cpu" in speedup[run] for run in study.run_names):
        print(
            "speed-ups (quiet CPU time: each stage's fastest-decile window, what other work cannot inflate): "
            + ", ".join(f"{run} {speedup[run]['quiet_cpu']['mean']:.2f}x" for run in study.run_names)
        )
    for line in lines:
        print(line)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'accuracy_vs_time.png'}")
    if args.publish:
        published.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "table.md", "accuracy_vs_time.png", STATE_FILE):
            shutil.copy2(out / name, published / name)
        print(f"published to {published}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (StudyError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
