"""gpu_check's report as Markdown tables, and the targets it reports against what was measured (never asserted)."""

from __future__ import annotations

from benchmarks.gpu.plan import Plan


def targets(data: dict, plan: Plan, crop: int) -> list[dict]:
    """The GPU targets against what was measured (never asserted). The thresholds are for the H200."""
    main_size, main_batch, _ = plan.models[0]
    ours = {(r["model"], r["batch"], r["size"], r["compile"]): r for r in data["step"] if r["impl"] == "ours"}
    hf = {(r["model"], r["batch"], r["size"]): r for r in data["step"] if r["impl"] == "hf"}

    def best(model, batch, size):
        rows = [r for (m, b, s, _), r in ours.items() if (m, b, s) == (model, batch, size)]
        return max(rows, key=lambda r: r["img_s"], default=None)

    modes = sorted({mode for (_, _, _, mode) in ours})
    out = []

    def add(name, value, goal, met, note=""):
        out.append(
            {"target": name, "measured": value, "goal": goal, "met": met if value is not None else None, "note": note}
        )

    full = best(main_size, main_batch, crop)
    peer = hf.get((main_size, main_batch, crop))
    ratio = full["img_s"] / peer["img_s"] if full and peer else None
    add(
        f"{main_size} b{main_batch} B={crop}: ours / HF",
        ratio,
        ">= 2.0",
        ratio is not None and ratio >= 2.0,
        f"ours {full['compile']}" if full else "",
    )
    partial = max(
        (
            r
            for r in data["step"]
            if r["impl"] == "ours_partial" and (r["model"], r["batch"], r["size"]) == (main_size, main_batch, crop)
        ),
        key=lambda r: r["img_s"],
        default=None,
    )
    p_ratio = partial["img_s"] / peer["img_s"] if partial and peer else None
    add(
        f"{main_size} b{main_batch} B={crop}: ours partial ({plan.partial_fraction:g} decoded) / HF full",
        p_ratio,
        ">= 1.5 (the CPU target at ViT-S/16; none set for the GPU)",
        p_ratio is not None and p_ratio >= 1.5,
        f"ours {partial['compile']}" if partial else "",
    )
    for size, goal in ((round(crop * 160 / 224), 1.8), (round(crop * 96 / 224), 3.5)):
        for mode in modes:
            a, b = ours.get((main_size, main_batch, size, mode)), ours.get((main_size, main_batch, crop, mode))
            if a and b:
                v = a["img_s"] / b["img_s"]
                add(f"{main_size} B={size} / B={crop} (compile {mode})", v, f">= {goal}", v >= goal)
    if len(plan.models) > 1:
        l_size, l_batch, _ = plan.models[1]
        r = best(l_size, l_batch, crop)
        add(
            f"{l_size} b{l_batch} B={crop} img/s",
            r["img_s"] if r else None,
            ">= 2600",
            r is not None and r["img_s"] >= 2600,
        )
    for h in data["hog"]:
        add(
            f"{h['model']} b{h['batch']} B={h['size']}: HOG target / HOG step",
            h["target_share"],
            "<= 0.05",
            h["target_share"] <= 0.05,
        )
    for e in data["e2e"]:
        v = e["fraction_of_step"]
        add(f"end to end {e['pipeline']} B={e['size']} / step", v, ">= 0.90", v is not None and v >= 0.9)
    for mode in modes:
        r = ours.get((main_size, main_batch, crop, mode))
        if r:
            add(
                f"{main_size} b{main_batch} B={crop} peak GiB (compile {mode})",
                r["peak_mem_gib"],
                "<= 14.4",
                r["peak_mem_gib"] is not None and r["peak_mem_gib"] <= 14.4,
                "" if r["peak_mem_gib"] is not None else "CUDA only",
            )
    return out


def fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


STEP_HEAD = ("impl", "model", "batch", "B", "compile", "img/s", "ms/step", "GFLOP/img", "MFU", "peak GiB", "compile s")


def table(title: str, head: tuple[str, ...], rows: list[list]) -> list[str]:
    """A Markdown section: title, header, separator, one line per row (cells already formatted)."""
    lines = ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def step_cells(r: dict) -> list:
    return [
        r["impl"],
        r["model"],
        r["batch"],
        r["size"],
        r["compile"],
        fmt(r["img_s"]),
        f"{r['step_ms']:.1f}",
        f"{r['gflop_per_image']:.2f}",
        f"{100 * r['mfu']:.1f}%",
        fmt(r["peak_mem_gib"], ".2f"),
        fmt(r.get("compile_s"), ".0f"),
    ]


def format_step_row(r: dict) -> str:
    return "| " + " | ".join(str(c) for c in step_cells(r)) + " |"


def compiled_over_hf(r: dict, impl: str = "ours") -> float | None:
    return next(
        (
            v
            for k, v in r.items()
            if k.startswith(f"{impl}_")
            and k.endswith("_over_hf")
            and k != f"{impl}_none_over_hf"
            and (impl == "ours_partial" or not k.startswith("ours_partial_"))
        ),
        None,
    )


def markdown(d: dict) -> str:
    lines = [
        f"# gpu_check: {d['device']}",
        "",
        f"torch {d['torch']}, transformers {d['transformers'] or 'not installed'}, {d['date']}; "
        f"matmul {fmt(d.get('matmul_tflops'), '.4g')} TFLOP/s (MFU denominator {fmt(d.get('peak_tflops'), '.4g')}); "
        f"{d['elapsed_s']:.0f} s of a {d['budget_s']:.0f} s budget"
        + ("; DRY RUN (CPU, tiny)" if d.get("dry_run") else ""),
    ]
    lines += table("Train step (input on the device)", STEP_HEAD, [step_cells(r) for r in d["step"]])
    lines += table(
        "Ours / Hugging Face ViTMAE, same run",
        (
            "model",
            "batch",
            "B",
            "HF img/s",
            "ours eager / HF",
            "ours compiled / HF",
            "ours partial eager / HF",
            "ours partial compiled / HF",
        ),
        [
            [
                r["model"],
                r["batch"],
                r["size"],
                fmt(r["hf_img_s"]),
                fmt(r.get("ours_none_over_hf"), ".2f"),
                fmt(compiled_over_hf(r), ".2f"),
                fmt(r.get("ours_partial_none_over_hf"), ".2f"),
                fmt(compiled_over_hf(r, "ours_partial"), ".2f"),
            ]
            for r in d["ratios"]
        ],
    )
    lines += table(
        "Each B against the full size, same implementation",
        ("impl", "model", "compile", "B", "x full size"),
        [[r["impl"], r["model"], r["compile"], r["size"], f"{r['over_full_size']:.2f}"] for r in d["size_speedups"]],
    )
    lines += table(
        "End to end",
        ("pipeline", "B", "step", "img/s", "data wait", "x step"),
        [
            [
                r["pipeline"],
                r["size"],
                r["compile"],
                fmt(r["img_s"]),
                f"{100 * r['data_wait']:.0f}%",
                fmt(r["fraction_of_step"], ".2f"),
            ]
            for r in d["e2e"]
        ],
    )
    lines += table(
        "HOG target (model.target=hog), eager",
        ("model", "batch", "B", "HOG step ms", "target ms", "target / HOG step", "pixel step ms", "HOG / pixel step"),
        [
            [
                r["model"],
                r["batch"],
                r["size"],
                f"{r['hog_step_ms']:.1f}",
                f"{r['hog_target_ms']:.2f}",
                f"{100 * r['target_share']:.1f}%",
                fmt(r["pixel_step_ms"], ".1f"),
                fmt(r["hog_over_pixel_step"], ".3f"),
            ]
            for r in d.get("hog", [])
        ],
    )
    lines += table(
        "Fractal renderer, batched",
        ("B", "batch", "device", "img/s"),
        [[r["size"], r["batch"], r["device"], fmt(r["img_s"])] for r in d["fractal"]],
    )
    runs = d["probe"]["runs"] if d["probe"] else {}
    lines += table(
        "Training probe: baseline vs et, same images",
        ("run", "steps", "images", "train s", "img/s", "loss first -> last"),
        [
            [
                name,
                r["steps"],
                r["images"],
                f"{r['train_s']:.1f}",
                fmt(r["img_s"]),
                f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}",
            ]
            for name, r in runs.items()
        ],
    )
    if d["probe"] and "wall_ratio" in d["probe"]:
        lines += [
            "",
            f"et / baseline wall time: {d['probe']['wall_ratio']:.3f} "
            f"(FLOPs ratio of the schedule: {d['probe']['planned_flops_ratio']:.3f})",
        ]
    lines += table(
        "Targets (reported, not asserted)",
        ("target", "measured", "goal", "met"),
        [
            [t["target"], fmt(t["measured"], ",.2f"), t["goal"], f"{fmt(t['met'], '')} {t['note']}"]
            for t in d["targets"]
        ],
    )
    lines += ["", "## Skipped", ""] + [f"- {s['section']} {s['item']}: {s['reason']}" for s in d["skipped"]]
    lines += ["", "## Failed", ""] + [f"- {s['section']} {s['item']}: {s['error']}" for s in d["failed"]]
    return "\n".join(lines) + "\n"
