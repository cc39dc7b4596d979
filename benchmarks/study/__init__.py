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
