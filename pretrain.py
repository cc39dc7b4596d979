"""Pretrain an MAE ViT, with or without the EfficientTrain frequency curriculum.

    mae-et launch pretrain.py --config configs/pretrain/<recipe>.yaml data.root=/path/to/imagefolder [key=value ...]

Relaunching the same command resumes from the run's latest checkpoint. The logic lives in
`mae_et.train.pretrain`; this file only parses the command line.
"""

from mae_et.cli import run_training_script
from mae_et.train.config import load_pretrain_config
from mae_et.train.pretrain import pretrain


def main(argv=None) -> None:
    run_training_script(
        "MAE pretraining with the EfficientTrain frequency curriculum",
        "configs/pretrain/mae_vit-tiny-p8_et_20e_fractal.yaml",
        load_pretrain_config,
        pretrain,
        argv=argv,
    )


if __name__ == "__main__":
    main()
