"""Fine-tune a pretrained MAE encoder on an ImageFolder classification set (the MAE recipe).

    mae-et launch finetune/finetune.py --config configs/finetune/<recipe>.yaml \
        model.checkpoint=runs/<pretraining run> data.root=/path/to/dataset [key=value ...]

Relaunching the same command resumes from the run's latest checkpoint; the best epoch (val top-1)
is kept in RUN/best/. The logic lives in `mae_et.evaluate.finetune`; this file only parses the command line.
"""

import sys

try:  # the installed package (pip install -e .), as for any script outside it: no sys.path entry of its own
    from mae_et.cli import run_training_script
    from mae_et.evaluate.config import load_finetune_config
    from mae_et.evaluate.finetune import finetune
except ModuleNotFoundError as e:
    if e.name != "mae_et":
        raise
    print("error: mae_et is not installed; run `pip install -e .` in the checkout (README: Set up)", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    run_training_script(
        "Fine-tune a pretrained MAE encoder (layer-wise lr decay AdamW, RandAugment, mixup/cutmix)",
        "configs/finetune/vit-base-p16_mae_100e_imagenet.yaml",
        load_finetune_config,
        finetune,
        script=__file__,
        argv=argv,
    )


if __name__ == "__main__":
    main()
