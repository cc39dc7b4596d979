"""Linear probe of a frozen pretrained MAE encoder: BatchNorm + Linear on its cls token, LARS.

    accelerate launch finetune/linprobe.py --config configs/linprobe/<recipe>.yaml \
        model.checkpoint=runs/<pretraining run> data.root=/path/to/dataset [linprobe.mode=cached] [key=value ...]

`linprobe.mode=cached` extracts the features once (centre crops) and trains the head on them: much
faster, the mode the benchmarks use. The final accuracies are written to RUN/result.json.
The logic lives in `mae_et.evaluate.linprobe`; this file only parses the command line.
"""

import sys
from pathlib import Path

# run from anywhere as `python /path/to/finetune/<script>.py`: the checkout's mae_et, as pretrain.py gets it
# by sitting beside it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_et.cli import parse_args, run_user_command  # noqa: E402
from mae_et.evaluate.config import load_linprobe_config  # noqa: E402
from mae_et.evaluate.linprobe import linprobe  # noqa: E402

DEFAULT_RECIPE = "configs/linprobe/vit-base-p16_mae_90e_imagenet.yaml"


def main(argv=None) -> None:
    args = parse_args(
        argv, "Linear probe of a frozen pretrained MAE encoder (cls token, BatchNorm + Linear, LARS)", DEFAULT_RECIPE
    )
    run_user_command(lambda: linprobe(load_linprobe_config(args.config, args.overrides)))


if __name__ == "__main__":
    main()
