"""One process's part of a study, row by row: per seed, the pretraining runs in the config's order (the equal-time
run last), the untrained floor, the evaluation of every encoder, then the ablations asked for; each finished step
read back from state.json instead of redone, and, with --eval-only, a wait for what another process pretrains."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks.study.clocks import backfill_quiet_cpu, code_version, machine
from benchmarks.study.config import (
    BASELINE,
    EQUAL_TIME,
    EQUAL_TIME_OF,
    UNTRAINED,
    Study,
    StudyError,
    ablation_seed_plan,
    run_name,
    split_row,
)
from benchmarks.study.evaluation import evaluate_encoder
from benchmarks.study.paths import in_repo, portable_command, repo_relative
from benchmarks.study.runs import (
    clear_if_config_changed,
    equal_time_budget,
    holds_finished_encoder,
    launch_pretrain,
    pretrain_command,
    pretrain_config,
    pretrain_overrides,
    read_pretrain_run,
    save_untrained_encoder,
)
from benchmarks.study.state import StudyState, settings_key


@dataclass
class StudyOptions:
    """What this process is asked to do: which seeds and ablations, which part of the study, how runs launch."""

    seeds: list[int]
    ablations: list[str]  # names of the study's ablations, in the order asked for
    ablation_seeds: dict[str, list[int]]  # the seeds each ablation gets (`ablation_seed_plan`)
    # the default, --pretrain-only (trains only), --eval-only (trains nothing), --report-only (evaluates nothing)
    part: Literal["all", "pretrain", "eval", "report"] = "all"
    launch: str = "inprocess"  # subprocess | inprocess
    poll_seconds: float = 30.0  # --eval-only: how often to look for what the other process pretrained

    @property
    def read_only(self) -> bool:
        """Pretraining only read back from the state, never run."""
        return self.part in ("eval", "report")


def study_options(study: Study, seeds: list[int] | None, ablations: list[str], ablation_seeds: list[str], **rest):
    """The options of a command line: the study's seeds unless others are given, 'all' for every ablation, each
    ablation checked and given its seeds; `rest`: the other StudyOptions fields."""
    seeds = seeds if seeds is not None else study.seeds
    ablations = list(study.ablations) if ablations == ["all"] else ablations
    unknown = [a for a in ablations if a not in study.ablations]
    if unknown:
        raise StudyError(
            f"ablations {unknown} are not in {study.path.name}; it has: {', '.join(study.ablations) or 'none'}"
        )
    return StudyOptions(seeds, ablations, ablation_seed_plan(ablation_seeds or [], ablations, seeds), **rest)


def print_trained(row: str, seed: int, r: dict[str, Any]) -> None:
    print(
        f"pretrained {row} seed {seed}: {r['epochs']:.4g} epochs, {r['steps']} steps, {r['wall_s']:.1f}s wall, "
        f"{r['cpu_s']:.1f}s CPU training ({r['process_s']:.1f}s launch{', resumed' if r['launches'] > 1 else ''}), "
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


def print_evaluated(row: str, seed: int, r: dict[str, Any]) -> None:
    print(
        f"evaluated {row} seed {seed}: kNN cls {r['knn_top1_cls']:.2f} mean {r['knn_top1_mean']:.2f}, "
        f"linear {r['linear_top1']:.2f}, fine-tune {r['finetune_top1']:.2f} ("
        + ", ".join(
            f"{stage} {t['wall_s']:.0f}s wall / {t['cpu_s']:.0f}s CPU" for stage, t in r["eval_seconds"].items()
        )
        + ")",
        flush=True,
    )


class StudyRun:
    """The rows of one process's part of a study, gathered into `results` ({row: {seed: record}}), with the
    command of every pretraining (`commands`) and each seed's equal-time budget (`equal_time`): what the report is
    made from. `img_size`: the size encoders are evaluated at (the baseline's crop); `env`: launched runs'."""

    def __init__(
        self,
        study: Study,
        data_root: Path,
        out: Path,
        state: StudyState,
        options: StudyOptions,
        img_size: int,
        env: dict[str, str] | None = None,
    ):
        self.study, self.data_root, self.out, self.state, self.options = study, data_root, out, state, options
        self.img_size = img_size
        self.env = env if env is not None else dict(os.environ)
        self.ablation_rows = [f"{run}+{name}" for name in options.ablations for run in study.ablations[name].runs]
        self.rows = (*study.run_names, UNTRAINED, *self.ablation_rows)
        self.results: dict[str, dict[str, dict]] = {row: {} for row in self.rows}
        self.commands: dict[str, list[str]] = {}
        self.equal_time: dict[str, dict] = {}
        self.eval_settings = {"eval": study.eval, "finetune_recipe": repo_relative(study.finetune_recipe)}

    def run(self) -> None:
        for seed in self.options.seeds:
            self.main_rows(seed)
            self.ablation_rows_of(seed)

    # ------------------------------------------------------------------------- per seed

    def main_rows(self, seed: int) -> None:
        """Pretraining (baseline, et, etpp_half, then the baseline with et's time, on the verdict clock), the floor,
        and the evaluation of every encoder the same way (--eval-only: each as soon as another process pretrained
        it, waiting for the rest)."""
        while True:
            ready = self.pretrain_runs(seed)
            if self.options.part == "pretrain":
                return
            self.untrained_row(seed)
            for row in (*ready, UNTRAINED):
                self.evaluate_row(row, seed)
            waiting = [r for r, spec in self.study.runs.items() if spec.runs_on(seed) and r not in ready]
            if not waiting:
                return
            if self.options.part == "report":
                raise self.not_in_state(waiting[0], seed, "pretraining")
            self.wait(f"seed {seed}: waiting for {', '.join(waiting)} to be pretrained (another process)")

    def ablation_rows_of(self, seed: int) -> None:
        """The ablations asked for, each pretrained and evaluated, split like the main rows: --pretrain-only trains
        them one after another, --eval-only evaluates each as soon as the other process has trained it."""
        for row in [r for r in self.ablation_rows if seed in self.options.ablation_seeds[split_row(r)[1]]]:
            while not self.pretrain_row(row, seed, self.study.epochs * self.study.runs[split_row(row)[0]].budget):
                if self.options.part == "report":
                    raise self.not_in_state(row, seed, "pretraining")
                self.wait(f"seed {seed}: waiting for {row} to be pretrained (another process)")
            if self.options.part != "pretrain":
                self.evaluate_row(row, seed)

    def wait(self, waiting_for: str) -> None:
        print(f"{waiting_for}; checking every {self.options.poll_seconds:g}s", flush=True)
        time.sleep(self.options.poll_seconds)
        self.state.reload()

    def not_in_state(self, row: str, seed: int, what: str) -> StudyError:
        return StudyError(
            f"--report-only: {row} seed {seed} has no {what} in {self.state.path} with this study's settings; run the "
            "study without --report-only to make it"
        )

    # ------------------------------------------------------------------------- pretraining

    def pretrain_runs(self, seed: int) -> list[str]:
        """The pretraining runs of a seed (read only: those finished), in the config's order, an equal-time run last:
        its budget comes from et's and the baseline's time on the verdict clock."""
        done = []
        runs = [r for r in self.study.run_names if self.study.runs[r].runs_on(seed)]
        for run in sorted(runs, key=lambda r: self.study.runs[r].budget == EQUAL_TIME):
            if self.study.runs[run].budget == EQUAL_TIME:
                if not {EQUAL_TIME_OF, BASELINE} <= set(done):
                    continue
                epochs = self.equal_time_epochs(seed)
            else:
                epochs = self.study.epochs * self.study.runs[run].budget
            if self.pretrain_row(run, seed, epochs):
                done.append(run)
        return done

    def equal_time_epochs(self, seed: int) -> float:
        """E' of the run given et's time on this seed (`equal_time_budget`), recorded in `equal_time`."""
        clock = self.study.verdict_clock
        et, base = self.results[EQUAL_TIME_OF][str(seed)], self.results[BASELINE][str(seed)]
        epochs, steps = equal_time_budget(
            self.study.epochs, et[f"{clock}_s"], base[f"{clock}_s"], base["steps_per_epoch"]
        )
        self.equal_time[str(seed)] = {
            "clock": clock,
            "et_s": et[f"{clock}_s"],
            "baseline_s": base[f"{clock}_s"],
            "ratio": et[f"{clock}_s"] / base[f"{clock}_s"],
            "steps_per_epoch": base["steps_per_epoch"],
            "epochs": epochs,
            "steps": steps,
        }
        return epochs

    def pretrain_row(self, row: str, seed: int, epochs: float) -> bool:
        """Pretrain one row of one seed (or read it back from the state), into results; False when the options only
        read back and it is not finished."""
        overrides = pretrain_overrides(self.study, row, seed, epochs, self.data_root, self.out)
        self.commands[run_name(row, seed)] = portable_command(pretrain_command(self.study.recipe, overrides))
        key = settings_key(overrides)
        r = self.state.get(row, seed, "pretrain", key)
        # a finished run is read back; its folder is needed only while its evaluation is still to do
        evaluated = self.state.get(row, seed, "eval", {"encoder": key, **self.eval_settings}) is not None
        if r is not None and (evaluated or holds_finished_encoder(in_repo(r["run_dir"]), r["steps"])):
            if str(seed) not in self.results[row]:  # (a waiting --eval-only pass keeps what it already evaluated)
                print(
                    f"pretrained {row} seed {seed}: read back ({r['wall_s']:.1f}s wall, {r['cpu_s']:.1f}s CPU)",
                    flush=True,
                )
                self.results[row][str(seed)] = backfill_quiet_cpu(r)
            return True
        if self.options.read_only:
            return False
        self.train_row(row, seed, epochs, overrides, key)
        return True

    def train_row(self, row: str, seed: int, epochs: float, overrides: list[str], key: list[str]) -> None:
        name = run_name(row, seed)
        cfg = pretrain_config(self.study, row, seed, epochs, self.data_root, self.out)
        clear_if_config_changed(cfg.run_dir, cfg)
        launches = self.state.count_launch(name)
        log = self.out / "logs" / f"{name}.pretrain.log"
        process_s = launch_pretrain(self.study.recipe, overrides, log, self.options.launch, self.env)
        r = {
            "seed": seed,
            "machine": machine(),
            "code": code_version(),
            "launches": launches,
            **read_pretrain_run(cfg.run_dir, cfg, process_s),
        }
        self.state.put(row, seed, "pretrain", key, r)
        self.results[row][str(seed)] = r
        print_trained(row, seed, r)

    def untrained_row(self, seed: int) -> None:
        """The floor: the baseline's encoder at step 0, saved once (or read back)."""
        if str(seed) in self.results[UNTRAINED]:
            return
        overrides = pretrain_overrides(self.study, UNTRAINED, seed, self.study.epochs, self.data_root, self.out)
        key = settings_key(overrides)
        r = self.state.get(UNTRAINED, seed, "pretrain", key)
        evaluated = self.state.get(UNTRAINED, seed, "eval", {"encoder": key, **self.eval_settings}) is not None
        if r is None or not (evaluated or holds_finished_encoder(in_repo(r["run_dir"]), r["steps"])):
            if self.options.part == "report":
                raise self.not_in_state(UNTRAINED, seed, "encoder")
            r = {
                "seed": seed,
                "machine": machine(),
                "code": code_version(),
                "epochs": 0.0,
                "steps": 0,
                "wall_s": 0.0,
                "cpu_s": 0.0,
                "run_dir": repo_relative(save_untrained_encoder(self.study, seed, self.data_root, self.out)),
            }
            self.state.put(UNTRAINED, seed, "pretrain", key, r)
        self.results[UNTRAINED][str(seed)] = r

    # ------------------------------------------------------------------------- evaluation

    def row_pos_embed(self, row: str, seed: int, r: dict) -> str:
        """The encoder's model.pos_embed: its pretraining record's, else its overrides' (the untrained: the
        baseline's)."""
        if r.get("pos_embed"):
            return r["pos_embed"]
        return pretrain_config(self.study, row, seed, self.study.epochs, self.data_root, self.out).model.pos_embed

    def evaluate_row(self, row: str, seed: int) -> None:
        """Evaluate one row's encoder (or read it back), into results."""
        r = self.results[row][str(seed)]
        if "knn_top1_cls" in r:
            return  # done in an earlier pass of this process
        key = {"encoder": self.state.key_of(row, seed, "pretrain"), **self.eval_settings}
        ev = self.state.get(row, seed, "eval", key)
        if ev is None:
            if self.options.part == "report":
                raise self.not_in_state(row, seed, "evaluation")
            ev = {
                "eval_machine": machine(),
                "eval_code": code_version(),
                **evaluate_encoder(
                    self.study,
                    in_repo(r["run_dir"]),
                    self.data_root,
                    self.img_size,
                    seed,
                    self.out,
                    self.out / "logs" / f"{run_name(row, seed)}.finetune.log",
                    pos_embed=self.row_pos_embed(row, seed, r),
                ),
            }
            self.state.put(row, seed, "eval", key, ev)
        r.update(ev)
        print_evaluated(row, seed, r)
