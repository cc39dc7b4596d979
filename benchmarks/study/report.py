"""The study's report, from the rows a `StudyRun` gathered: the summary over seeds, speed-ups, ablation effects,
verdicts and notes, assembled into results.json and table.md (and the plot), printed, and published; and the
report-only path, which rebuilds them from a state.json and the study config, training and evaluating nothing.

What a report says about the session that wrote it and state.json does not hold (when, on which device, with which
torch, how the runs were launched, how many training images, the compile warm-up) is its `Session`: a session
that trained or evaluated records its own; a report-only one keeps those of the report it replaces, so the same
state and config give the same files."""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import REPO
from benchmarks.study.clocks import device_name
from benchmarks.study.config import BASELINE, CLOCKS, EQUAL_TIME, Study
from benchmarks.study.flow import StudyOptions, StudyRun
from benchmarks.study.frontier import STEP_COSTS, frontier_result, frontier_table, plot_frontier
from benchmarks.study.paths import repo_relative
from benchmarks.study.plot import plot
from benchmarks.study.runs import pretrain_config
from benchmarks.study.state import STATE_FILE, StudyState
from benchmarks.study.summary import ablation_effects, code_note, machines_note, speedups, summarise
from benchmarks.study.tables import ablation_table, markdown_table, size_table, stage_rate_table, stage_rates
from benchmarks.study.verdicts import reference_check, verdict_lines, verdicts
from mae_et.files import write_text_atomic

REPORT_FILES = ("results.json", "table.md", "accuracy_vs_time.png", "frontier.png")  # the last with a frontier


@dataclass
class Session:
    """The facts of the session a report describes that state.json does not hold (the keys results.json gives them)."""

    device: str
    date: str
    torch: str
    launch: str
    num_train_images: int
    compile_warmup_s: float | None


def this_session(launch: str, num_train_images: int, compile_warmup_s: float | None) -> Session:
    """This process's session, dated now."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Session(device_name(), date, torch.__version__, launch, num_train_images, compile_warmup_s)


def replaced_session(out: Path, published: Path) -> Session | None:
    """The session of the report a --report-only rewrites: the study folder's results.json, else the published
    one; None when there is neither."""
    for path in (out / "results.json", published / "results.json"):
        if path.is_file():
            report = json.loads(path.read_text())
            return Session(**{f.name: report[f.name] for f in dataclasses.fields(Session)})
    return None


def checked_configs(study: Study, data_root: Path, out: Path, reads_data: bool = True) -> dict[str, Any]:
    """Every run's pretraining config, checked before anything runs (the equal-time run's epochs are known only
    later: E here). reads_data=False: a report reads no data, its configs only shape the report (model, batch, crop),
    so a checkout without the data still writes it."""
    return {
        run: pretrain_config(
            study,
            run,
            0,
            study.epochs * (1.0 if spec.budget == EQUAL_TIME else spec.budget),
            data_root,
            out,
            reads_data,
        )
        for run, spec in study.runs.items()
    }


@dataclass
class Report:
    study: Study
    result: dict[str, Any]  # results.json
    tables: str  # table.md's tables
    lines: list[str]  # the verdicts, then the notes

    @property
    def markdown(self) -> str:
        """table.md: a title naming the device and date, the tables, the verdicts and notes as a list."""
        verdict_list = "\n".join(f"- {line}" for line in self.lines)
        return (
            f"# {self.study.name} ({self.result['device']}, {self.result['date']})\n\n{self.tables}\n{verdict_list}\n"
        )


def report_tables(run: StudyRun, summary: dict, speedup: dict, effects: dict, rates: list, base_cfg) -> str:
    """The main table, then the ablations (if any), the per-size speed, and kNN across test sizes (if measured)."""
    clock = run.study.verdict_clock
    table = markdown_table(summary, speedup, run.options.seeds)
    if effects:
        table += "\n" + ablation_table(summary, speedup, effects, clock)
    table += "\n" + stage_rate_table(rates, clock)
    test_sizes = [int(b) for b in run.study.eval["knn"].get("sizes") or []]
    if test_sizes:
        table += "\n" + size_table(summary, test_sizes, base_cfg.data.crop_size)
    return table


def build_report(run: StudyRun, base_cfg, session: Session) -> Report:
    """Everything the rows give, with the session's facts: results.json's content, the tables, the verdict lines."""
    study, results, clock = run.study, run.results, run.study.verdict_clock
    summary = {row: summarise(results[row]) for row in run.rows}
    speedup = speedups(results, [*study.run_names, *run.ablation_rows])
    effects = ablation_effects(results, run.ablation_rows)
    reference = reference_check(study, base_cfg, session.device, summary[BASELINE]["s_per_epoch"]["mean"])
    equal_time_run = next((r for r, spec in study.runs.items() if spec.budget == EQUAL_TIME), None)
    frontier = frontier_result(study, summary)
    notes: list[str] = []
    verdict_speedup = speedup
    if frontier is not None and frontier["clock"] == STEP_COSTS and clock == "cpu":
        # the rows' own clocks come from different sessions: the frontier's runs take the step costs' speed-ups
        verdict_speedup = {**speedup, **{p["run"]: {clock: {"mean": p["speedup"]}} for p in frontier["points"]}}
        notes.append(
            f"the verdicts' speed-ups of the frontier's runs are from the step costs ({frontier['step_costs']}), "
            "not the rows' own clocks"
        )
    v = verdicts(study.targets, clock, summary, verdict_speedup, reference, equal_time_run)
    machines, code = machines_note(results), code_note(results)
    rates = stage_rates(results, base_cfg, clock)
    result = {
        "study": study.name,
        "study_config": repo_relative(study.path),
        "settings": study.raw,
        "device": session.device,
        "date": session.date,
        "torch": session.torch,
        "launch": session.launch,
        "data_root": repo_relative(run.data_root),
        "num_train_images": session.num_train_images,
        "seeds": run.options.seeds,
        "verdict_clock": clock,
        "compile_warmup_s": session.compile_warmup_s,
        "runs": results,
        "summary": summary,
        "speedups": speedup,
        "equal_time": run.equal_time,
        "verdicts": v,
        "machines": machines,
        "code": code,
        "stage_rates": rates,
        "ablation_seeds": run.options.ablation_seeds,
        "ablations": effects,
        "commands": run.commands,
    }
    tables = report_tables(run, summary, speedup, effects, rates, base_cfg)
    if frontier is not None:
        result["frontier"] = frontier
        tables += "\n" + frontier_table(frontier)
    notes += machines["notes"] + code["notes"]
    return Report(study, result, tables, verdict_lines(v) + [f"note: {n}" for n in notes])


def write_report(report: Report, to: Path) -> None:
    """results.json, table.md and accuracy_vs_time.png in `to`; with the study config's compare_with (an earlier
    edition's published results.json) that edition's runs are drawn beside this one's."""
    write_text_atomic(to / "results.json", json.dumps(report.result, indent=2))
    write_text_atomic(to / "table.md", report.markdown)
    compare = None
    if report.study.raw.get("compare_with"):
        other = json.loads((REPO / report.study.raw["compare_with"]).read_text())
        compare = (other["study"], other["summary"])
    r = report.result
    plot(r["runs"], r["summary"], r["verdict_clock"], to / "accuracy_vs_time.png", report.study.name, compare)
    if "frontier" in r:
        plot_frontier(r["frontier"], r["summary"], to / "frontier.png", report.study.name)


def print_report(report: Report, to: Path) -> None:
    """The tables, the speed-ups of every run on each clock, the verdicts and notes, and where they were written."""
    speedup, run_names = report.result["speedups"], report.study.run_names
    print()
    print(report.tables)
    for c in CLOCKS:
        print(
            f"speed-ups ({c} time, baseline / run, within each seed): "
            + ", ".join(f"{run} {speedup[run][c]['mean']:.2f}x" for run in run_names)
        )
    if all("quiet_cpu" in speedup[run] for run in run_names):
        print(
            "speed-ups (quiet CPU time: each stage's fastest-decile window, what other work cannot inflate): "
            + ", ".join(f"{run} {speedup[run]['quiet_cpu']['mean']:.2f}x" for run in run_names)
        )
    for line in report.lines:
        print(line)
    print(f"wrote {to / 'results.json'}, {to / 'table.md'}, {to / 'accuracy_vs_time.png'}")


def publish(out: Path, published: Path) -> None:
    """The report and state.json copied to benchmarks/results/<study name>/ (committed)."""
    published.mkdir(parents=True, exist_ok=True)
    for name in (*REPORT_FILES, STATE_FILE):
        if (out / name).is_file() or name != "frontier.png":
            shutil.copy2(out / name, published / name)
    print(f"published to {published}")


def report_from_state(
    study: Study,
    state: StudyState,
    options: StudyOptions,
    session: Session,
    data_root: Path,
    out: Path,
    to: Path,
) -> Report:
    """The report of `state` rebuilt and written to `to`, training and evaluating nothing: every row and seed of
    `options` read back from the state (a missing one stops it with one line). `out` is the study folder the runs
    were written under, which the recorded commands name; `data_root` the data they read, which their settings
    name (nothing is read from it)."""
    base_cfg = checked_configs(study, data_root, out, reads_data=False)[BASELINE]
    run = StudyRun(study, data_root, out, state, dataclasses.replace(options, part="report"), base_cfg.data.crop_size)
    run.run()
    report = build_report(run, base_cfg, session)
    write_report(report, to)
    return report
