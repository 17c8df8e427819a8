"""lmkit: train LSTM and Transformer language models with Lightning and Hydra, and ship them small."""

__version__ = "0.1.0"
