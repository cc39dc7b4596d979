"""mae_et: masked-autoencoder pretraining for ViTs with the EfficientTrain frequency curriculum."""

__version__ = "0.1.0"
