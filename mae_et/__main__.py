"""`mae-et`: the training launcher, and the tools that read a run, one subcommand each (also `python -m mae_et ...`).

    mae-et launch [accelerate launch options] pretrain.py ...   a training script under accelerate launch (mae_et.cli)
    mae-et knn RUN --data /path/to/imagenet        weighted kNN top-1 of the encoder (mae_et.evaluate.knn)
    mae-et export RUN out.safetensors              the encoder as a timm ViT state dict (mae_et.evaluate.export)
    mae-et visualize RUN img.jpg --out grid.png    reconstruction grid (mae_et.evaluate.visualize)

The study is no subcommand: it records the commit it trains, so it runs from its own checkout (docs/design.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from mae_et.cli import OneLineParser, launch, run_user_command

# subcommand -> (module whose main() runs it, one line of help)
TOOLS = {
    "knn": ("mae_et.evaluate.knn", "weighted kNN top-1 of a checkpoint's encoder on an ImageFolder"),
    "export": ("mae_et.evaluate.export", "export the encoder as a timm ViT .safetensors"),
    "visualize": ("mae_et.evaluate.visualize", "reconstruction grid of a pretrained MAE as a PNG"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="mae-et",
        description="launch: a training script under accelerate launch (mae-et launch --help); tools that read an "
        "MAE run: " + "; ".join(f"{name}: {h}" for name, (_, h) in TOOLS.items()),
        epilog="mae-et <tool> --help shows a tool's arguments",
    )
    parser.add_argument("tool", choices=["launch", *TOOLS], help="the tool to run")
    parser.add_argument("args", nargs="...", help="its arguments")
    ns = parser.parse_args(argv)
    if ns.tool == "launch":
        launch(ns.args)
    module, _ = TOOLS[ns.tool]
    tool = run_user_command(lambda: importlib.import_module(module))  # imported only when asked: torch is slow
    tool.main(ns.args, prog=f"mae-et {ns.tool}")  # each tool reports its own errors through run_user_command
    return 0


if __name__ == "__main__":
    main()
