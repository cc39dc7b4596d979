"""mae_et: masked-autoencoder pretraining for ViTs with the EfficientTrain frequency curriculum."""

from mae_et.notices import one_line_warnings

__version__ = "0.1.0"

one_line_warnings()  # our warnings print as one line (which file, why), in every process that imports us
