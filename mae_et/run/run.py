"""What every run needs around its loop, for the three engines (pretraining, fine-tuning, linear probe).

    with Run(cfg.run_spec()) as run:              # accelerator (devices, precision, DDP), the run folder, locked
        found = run.resume(raw_model, optimizer)  # latest checkpoint (if any) -> weights, optimizer, scaler, clocks
        run.clock.start(); run.progress(total, done, desc)
        ...the loop: run.log(step, metrics, line); run.checkpoint(step, model, state, meta)

The run folder, its lock, resuming and starting over, Ctrl-C and the clocks: docs/design.md, "The run layer".
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list

from mae_et import checkpoint as ckpt_lib
from mae_et.errors import RunStopped, UserError
from mae_et.files import LOCK_FILE, FileError, RunFolderLock, check_output_folder, move_into, write_text_atomic
from mae_et.notices import progress
from mae_et.recipes import ConfigError, flatten_dict, merge_dicts
from mae_et.run.config import RunSpec
from mae_et.run.resume import resume_latest
from mae_et.run.tracking import METRICS_FILE, WANDB_ID_FILE, RunTracker, resolve_wandb_mode

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"  # fine-tuning's best epoch (mae_et.evaluate.engine)
RESULT_FILE = "result.json"  # an evaluation's result (mae_et.evaluate.engine)
RECONSTRUCTIONS_DIR = "reconstructions"  # pretraining's grids (mae_et.train.monitors)
# What a run writes in its folder: the folders, and the files; moved together when a run starts over
RUN_FOLDERS = (CHECKPOINTS_DIR, BEST_DIR, RECONSTRUCTIONS_DIR)
RUN_FILES = (ckpt_lib.CONFIG_FILE, METRICS_FILE, RESULT_FILE, WANDB_ID_FILE)


class Run:
    """One run of any stage (see the module docstring), from what its config gives (`RunSpec`)."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.wandb_mode = resolve_wandb_mode(spec.wandb)
        self.accelerator = build_accelerator(spec.precision, spec.accum_steps, use_wandb=self.wandb_mode is not None)
        self.run_dir, self.lock, self._created = prepare_run_dir(spec, self.accelerator)
        self.main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.bar = None  # the loop's progress bar, once `progress` opened it
        self.clock = LoopClock()
        self.tracker: RunTracker | None = None
        self._tracker_closed = False
        self.config_yaml = ""
        self.last_checkpoint: Path | None = None
        self.ctrl_c = CtrlC().install()  # last: __exit__ restores it

    def resume(
        self, raw_model: torch.nn.Module, optimizer, start: Callable[[torch.nn.Module], dict] | None = None
    ) -> ckpt_lib.Checkpoint | None:
        """The latest checkpoint into the model, optimizer, scaler and clocks, or at a fresh start `start` (its keys
        recorded in the config); then the config is saved and the tracker opened. `checkpoint.resume=false` sets an
        earlier run in the folder aside first."""
        if not self.spec.checkpoint.resume:
            if self.main:
                moved = set_earlier_run_aside(self.run_dir)
                if moved is not None:
                    self.say(f"checkpoint.resume=false: starting over; the earlier run in this folder {moved}")
            self.accelerator.wait_for_everyone()
        found = resume_latest(self.spec, self.run_dir / CHECKPOINTS_DIR, raw_model, optimizer, self.accelerator)
        config = self.spec.config
        if found is not None:
            self.clock.restore(found.training_state)
            self.last_checkpoint = found.path
        elif start is not None:
            config = merge_dicts(config, start(raw_model))
        self.config_yaml = yaml.safe_dump(config, sort_keys=False)
        if self.main:
            write_text_atomic(self.run_dir / ckpt_lib.CONFIG_FILE, self.config_yaml)  # never half a config
        resume_step = int(found.training_state["step"]) if found is not None else None
        s = self.spec
        self.tracker = RunTracker(
            self.accelerator, self.run_dir, s.project, s.name, flatten_dict(config), self.wandb_mode, resume_step
        )
        return found

    def say(self, line: str) -> None:
        """One line on the main rank (above the progress bar when there is one)."""
        if not self.main:
            return
        if self.bar is not None and hasattr(self.bar, "write"):  # a tqdm bar on a terminal
            self.bar.write(line)
        else:
            print(line, flush=True)

    def progress(self, total: int, initial: int, desc: str):
        """The loop's bar over its optimizer steps: main rank only; plain lines when stderr is not a terminal."""
        self.bar = progress(total=total, initial=initial, desc=desc, unit="step", enabled=self.main)
        return self.bar

    def check_interrupt(self) -> None:
        """At every step of a loop: a Ctrl-C whose KeyboardInterrupt was lost stops the run here."""
        self.ctrl_c.check()

    def log(self, step: int, metrics: dict[str, Any], line: str | None = None) -> None:
        self.tracker.log(metrics, step)
        if line is not None:
            self.say(line)

    def checkpoint(self, step: int, model: torch.nn.Module, training_state: dict, meta: dict) -> Path:
        """RUN/checkpoints/step_N with the loop's clocks added, written by the main rank while every rank waits; its
        time counts as bookkeeping, not training."""
        accelerator = self.accelerator
        with self.clock.overhead():
            model_state = accelerator.get_state_dict(model)  # a collective under some sharding: every rank calls it
            path, error = None, None
            if self.main:
                try:
                    path = ckpt_lib.save_checkpoint(
                        self.run_dir / CHECKPOINTS_DIR,
                        step,
                        model_state,
                        {**training_state, **self.clock.state()},
                        self.config_yaml,
                        meta,
                        self.spec.checkpoint.keep_last,
                    )
                except ckpt_lib.CheckpointWriteError as e:  # a full disk: every rank stops with it, none waits forever
                    error = str(e)
            accelerator.wait_for_everyone()
            if self.world > 1:
                box = [str(path) if path else None, error]
                broadcast_object_list(box)
                path, error = (Path(box[0]) if box[0] else None), box[1]
        if error:
            raise ckpt_lib.CheckpointWriteError(error)
        self.last_checkpoint = path
        return path

    def stop_nonfinite(self, problem: str, fix: str) -> NoReturn:
        raise NonFiniteLossError(
            f"{problem}; the last good checkpoint ({self.last_checkpoint or 'none yet'}) is untouched. {fix}",
            say=self.main,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tracker is not None and not self._tracker_closed:
            self.tracker.close()
            self._tracker_closed = True

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, *_) -> None:
        where = (self.bar.n, self.bar.total) if self.bar is not None else None
        try:
            self.close()
        finally:
            self._release_folder()
            self.ctrl_c.restore()
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            raise RunInterrupted(self._interrupted_line(where), say=self.main) from None

    def _interrupted_line(self, where: tuple[int, int] | None) -> str:
        at = f"interrupted at step {where[0]} of {where[1]}" if where else "interrupted before the first step"
        # what a relaunch resumes from: the newest on disk (an interrupted save may have finished its rename)
        on_disk = ckpt_lib.list_checkpoints(self.run_dir / CHECKPOINTS_DIR)
        last = on_disk[-1] if on_disk else None
        kept = (
            f"the last checkpoint is {last} (step {ckpt_lib.checkpoint_step(last)})"
            if last is not None
            else "no checkpoint was written yet"
        )
        return f"{at}; {kept}; relaunch the same command to resume"

    def _release_folder(self) -> None:
        """Drop the run lock; remove the run folder (and parents) this launch created and left empty."""
        if self.lock is None:
            return
        self.lock.release()
        self.lock = None
        for folder in self._created:
            try:
                if {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
                    (folder / LOCK_FILE).unlink(missing_ok=True)
                folder.rmdir()
            except OSError:  # not empty: a failed start that wrote something, or a folder another run uses
                break


MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


class CtrlC:
    """SIGINT for a run's life: a KeyboardInterrupt and a note of it, which `check()` raises again at every step
    (one raised inside a finaliser is discarded). Installed only over Python's default handler, from the main
    thread."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def install(self) -> CtrlC:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class NonFiniteLossError(RunStopped):
    """Too many non-finite losses in a row; the last good checkpoint is left as it was."""


class RunInterrupted(RunStopped):
    """Ctrl-C (SIGINT): the run stopped where it was; the last checkpoint resumes it."""

    exit_code = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


def fresh_accelerate_state() -> None:
    """Forget this process's Accelerate state, so that the next Accelerator is built from its own arguments (a
    second one silently inherits the first one's precision and tracker): called before each run of a process that
    runs several. The one place that touches Accelerate's private reset."""
    AcceleratorState._reset_state(True)


def build_accelerator(precision: str, accum_steps: int, use_wandb: bool) -> Accelerator:
    cpu = not torch.cuda.is_available()
    if cpu and precision == "fp16":
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    # cpu=True without CUDA: `--multi_gpu` starts a real gloo group (else each rank would silently train alone)
    return Accelerator(
        cpu=cpu,
        mixed_precision=MIXED_PRECISION[precision],
        gradient_accumulation_steps=accum_steps,
        log_with="wandb" if use_wandb else None,
    )


def prepare_run_dir(spec: RunSpec, accelerator: Accelerator) -> tuple[Path, RunFolderLock | None, list[Path]]:
    """Check the run folder (as every output folder) and its outputs' names, create it and lock it (main rank);
    every rank gets the same error. Returns the folder, the lock (None on other ranks) and the folders created."""
    run_dir = spec.run_dir
    error, lock, created = [None], None, []
    if accelerator.is_main_process:
        try:
            check_output_folder(run_dir, reads=local_paths(spec.reads), flag="the run folder (output_dir=, name=)")
            check_run_outputs(run_dir)
            created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunFolderLock(run_dir).acquire()  # writes the holder's record: proves the folder writable now
        except UserError as e:
            error[0] = str(e)
        except OSError as e:
            error[0] = (
                f"output folder '{run_dir}' is not writable ({type(e).__name__}: {e}); pass "
                "output_dir=/a/writable/folder"
            )
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0]:
        raise ConfigError(error[0])
    return run_dir, lock, created


def local_paths(paths: tuple[str | None, ...]) -> list[str]:
    """The local ones of the paths a run reads (data.root: a folder, or a shard set's index; an encoder)."""
    return [str(p) for p in paths if p and "://" not in str(p)]


def check_run_outputs(run_dir: Path) -> None:
    """Each name a run writes in its folder is free for it (a file at RUN/checkpoints would stop the run at its
    first save, the work before it lost)."""
    for name in RUN_FOLDERS:
        if (run_dir / name).exists() and not (run_dir / name).is_dir():
            raise FileError(
                f"'{run_dir / name}' is a file, where this run keeps its {name}/ folder; move it away, or give this "
                "run another output_dir= or name="
            )
    for name in RUN_FILES:
        if (run_dir / name).is_dir():
            raise FileError(
                f"'{run_dir / name}' is a folder, where this run writes its {name}; move it away, or give this run "
                "another output_dir= or name="
            )


def set_earlier_run_aside(run_dir: Path) -> str | None:
    """Starting over: an earlier run's outputs move to RUN/old-N, a run folder of its own, so the two never mix.
    Returns what was done, for the line the run says; None when there was no earlier run."""
    earlier = ckpt_lib.list_checkpoints(run_dir / CHECKPOINTS_DIR) + ckpt_lib.list_checkpoints(run_dir / BEST_DIR)
    if not earlier:
        return None
    n = 1
    while (run_dir / f"old-{n}").exists():
        n += 1
    aside = run_dir / f"old-{n}"
    aside.mkdir()
    move_into(run_dir, (*RUN_FOLDERS, *RUN_FILES), aside)
    last = max(ckpt_lib.checkpoint_step(p) for p in earlier)
    return f"(up to step {last}) was moved to {aside}"


class LoopClock:
    """Wall and process CPU seconds of the loop (this process's threads, not its loader workers), and the share
    of bookkeeping (`overhead()`: checkpoints, grids, the kNN monitor); carried across resumes (`state`, `restore`)."""

    KEYS = ("elapsed_seconds", "cpu_seconds", "overhead_seconds", "overhead_cpu_seconds")

    def __init__(self) -> None:
        self.before = dict.fromkeys(self.KEYS, 0.0)  # totals of earlier launches of this run
        self.overhead_wall = self.overhead_cpu = 0.0  # this launch
        self.wall0 = self.cpu0 = None

    def restore(self, training_state: dict) -> None:
        self.before = {k: float(training_state.get(k, 0.0)) for k in self.KEYS}

    def start(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    @contextmanager
    def overhead(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.overhead_wall += time.perf_counter() - wall
            self.overhead_cpu += time.process_time() - cpu

    def state(self) -> dict[str, float]:
        b = self.before
        return {
            "elapsed_seconds": b["elapsed_seconds"] + time.perf_counter() - self.wall0,
            "cpu_seconds": b["cpu_seconds"] + time.process_time() - self.cpu0,
            "overhead_seconds": b["overhead_seconds"] + self.overhead_wall,
            "overhead_cpu_seconds": b["overhead_cpu_seconds"] + self.overhead_cpu,
        }

    def read(self) -> dict[str, float]:
        """The metrics.jsonl fields: elapsed_s / cpu_s (the whole loop) and their bookkeeping share."""
        s = self.state()
        return {
            "elapsed_s": s["elapsed_seconds"],
            "cpu_s": s["cpu_seconds"],
            "overhead_s": s["overhead_seconds"],
            "overhead_cpu_s": s["overhead_cpu_seconds"],
        }
