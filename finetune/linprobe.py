"""Linear probe of a frozen pretrained MAE encoder: BatchNorm + Linear on its cls token, LARS.

    mae-et launch finetune/linprobe.py --config configs/linprobe/<recipe>.yaml \
        model.checkpoint=runs/<pretraining run> data.root=/path/to/dataset [linprobe.mode=cached] [key=value ...]

`linprobe.mode=cached` extracts the features once (centre crops) and trains the head on them: much
faster, the mode the benchmarks use. The final accuracies are written to RUN/result.json.
The logic lives in `mae_et.evaluate.linprobe`; this file only parses the command line.
"""

import sys

try:  # the installed package (pip install -e .), as for any script outside it: no sys.path entry of its own
    from mae_et.cli import run_training_script
    from mae_et.evaluate.config import load_linprobe_config
    from mae_et.evaluate.linprobe import linprobe
except ModuleNotFoundError as e:
    if e.name != "mae_et":
        raise
    print("error: mae_et is not installed; run `pip install -e .` in the checkout (README: Set up)", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    run_training_script(
        "Linear probe of a frozen pretrained MAE encoder (cls token, BatchNorm + Linear, LARS)",
        "configs/linprobe/vit-base-p16_mae_90e_imagenet.yaml",
        load_linprobe_config,
        linprobe,
        script=__file__,
        argv=argv,
    )


if __name__ == "__main__":
    main()
