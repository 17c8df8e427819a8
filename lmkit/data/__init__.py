"""Corpora, tokenizers, the token cache and the LightningDataModule (`lmkit.data.datamodule`).

Only the tokenizers are re-exported here: importing them must not pull in Lightning, because
loading an exported model uses them without the training stack.
"""

from lmkit.data.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer, tokenizer_from_json

__all__ = ["BPETokenizer", "CharTokenizer", "Tokenizer", "load_tokenizer", "tokenizer_from_json"]
