"""InferenceModel: a backbone with its tokenizer, ready for inference. This is what `lmkit.load` returns.

Free of Lightning and Hydra on purpose: an exported model runs with torch, safetensors and
tokenizers alone.
"""

from __future__ import annotations

from collections.abc import Callable
import torch
import torch.nn as nn

from lmkit.data.tokenizer import Tokenizer
from lmkit.errors import LmkitError
from lmkit.generate import seeded_generator, stream_tokens
from lmkit.record import ModelRecord

NO_TOKENIZER = ("this model has no tokenizer, so it takes and returns token ids only: call model(ids), or attach "
                "one with model.tokenizer = lmkit.data.load_tokenizer('tokenizer.json') (or re-import it with "
                "vocab.json + merges.txt beside the checkpoint)")


class InferenceModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer: Tokenizer | None, record: ModelRecord) -> None:
        super().__init__()
        self.backbone = backbone
        self._tokenizer = tokenizer
        self.record = record  # what config.json holds: shape, tokenizer kind, compression, data, provenance

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise LmkitError(NO_TOKENIZER)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer | None) -> None:
        self._tokenizer = tokenizer

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    @property
    def device(self) -> torch.device:
        weight = next(self.parameters(), None)  # none in a backbone that onnxruntime runs
        return weight.device if weight is not None else torch.device("cpu")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab)."""
        return self.backbone(ids)[0]

    def clean_prompt(self, prompt: str, unknown: str = "error") -> str:
        """Characters a char tokenizer lacks: `error` names them, `skip` drops them."""
        if unknown not in ("error", "skip"):
            raise LmkitError(f"unknown={unknown!r} is not one of error, skip")
        chars = getattr(self.tokenizer, "chars", None)
        if unknown == "skip" and chars is not None:
            return "".join(c for c in prompt if c in chars)
        return prompt

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise LmkitError("the prompt is empty: give at least one character")
        return ids

    @torch.no_grad()
    def generate(self, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = None, num_samples: int = 1, seed: int | None = None, use_cache: bool = True,
                 on_text: Callable[[str], None] | None = None) -> str | list[str]:
        """Continue `prompt`; returns prompt + continuation (a list when `num_samples` > 1). A sample ends at the
        model's end-of-sequence token, when its tokenizer brought one (`record.tokens`), without that token's text.

        The defaults are conf/generate.yaml's (`lmkit generate`), checked by tests/test_defaults.py.
        `on_text`, if given, receives each piece of new text of the first sample as it is produced.
        """
        if max_new_tokens < 0 or num_samples < 1 or temperature < 0:
            raise LmkitError(f"max_new_tokens={max_new_tokens}, num_samples={num_samples} and "
                             f"temperature={temperature} must not be negative (num_samples at least 1)")
        if (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise LmkitError(f"top_k={top_k} must be at least 1 and top_p={top_p} in (0, 1]")
        prompt_ids = self.encode(prompt)
        ids = torch.tensor([prompt_ids] * num_samples, device=self.device)
        generator = seeded_generator(self.device, seed)
        eos = torch.tensor(self.record.tokens.get("eos_token_ids", []), dtype=torch.long, device=self.device)
        ended = torch.zeros(num_samples, dtype=torch.bool, device=self.device)
        rows = [list(prompt_ids) for _ in range(num_samples)]
        shown = ""
        for token in stream_tokens(self.backbone, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, generator=generator, use_cache=use_cache):
            values, at_end = token[:, 0].tolist(), torch.isin(token[:, 0], eos)
            for row, value, done in zip(rows, values, (ended | at_end).tolist()):
                if not done:
                    row.append(value)
            ended |= at_end
            if on_text is not None:  # decode the whole tail: a BPE piece may complete a character later
                text = self.tokenizer.decode(rows[0][len(prompt_ids):])
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    on_text(text[len(shown):])
                    shown = text
            if ended.all():
                break
        texts = [self.tokenizer.decode(row) for row in rows]
        return texts[0] if num_samples == 1 else texts
