"""Corpora, tokenizers, the token cache and the LightningDataModule."""

from lmkit.data.datamodule import LMDataModule
from lmkit.data.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer, tokenizer_from_json

__all__ = ["LMDataModule", "BPETokenizer", "CharTokenizer", "Tokenizer", "load_tokenizer", "tokenizer_from_json"]
