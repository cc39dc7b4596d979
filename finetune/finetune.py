"""Fine-tune a pretrained MAE encoder on an ImageFolder classification set (the MAE recipe).

    accelerate launch finetune/finetune.py --config configs/finetune/<recipe>.yaml \
        model.checkpoint=runs/<pretraining run> data.root=/path/to/dataset [key=value ...]

Relaunching the same command resumes from the run's latest checkpoint; the best epoch (val top-1)
is kept in RUN/best/. The logic lives in `mae_et.evaluate.finetune`; this file only parses the command line.
"""

import sys
from pathlib import Path

# run from anywhere as `python /path/to/finetune/<script>.py`: the checkout's mae_et, as pretrain.py gets it
# by sitting beside it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_et.cli import parse_args, run_user_command  # noqa: E402
from mae_et.evaluate.config import load_finetune_config  # noqa: E402
from mae_et.evaluate.finetune import finetune  # noqa: E402

DEFAULT_RECIPE = "configs/finetune/vit-base-p16_mae_100e_imagenet.yaml"


def main(argv=None) -> None:
    args = parse_args(
        argv,
        "Fine-tune a pretrained MAE encoder (layer-wise lr decay AdamW, RandAugment, mixup/cutmix)",
        DEFAULT_RECIPE,
    )
    run_user_command(lambda: finetune(load_finetune_config(args.config, args.overrides)))


if __name__ == "__main__":
    main()
