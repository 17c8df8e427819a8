"""Callbacks that tests add to real runs with `+callbacks.<name>._target_=tests.helpers...`, and a reference
decoding loop to check generated text against."""

import lightning as L


class CrashOnRank(L.Callback):
    """Make one rank fail mid-training, as a bad node or an out-of-memory error would."""

    def __init__(self, rank: int = 1, step: int = 3) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank}")


def touch_marker(marker: str, **_) -> None:
    """A `_target_` that leaves a trace when something instantiates it."""
    open(marker, "w").close()


class SigtermInValidation(L.Callback):
    """Send this process a real SIGTERM, as SLURM does before pre-emption, during the validation at `step`."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_validation_batch_start(self, trainer: L.Trainer, *args) -> None:
        if not self.sent and not trainer.sanity_checking and trainer.global_step == self.step:
            import os
            import signal

            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def decode_by_hand(model, prompt: str, max_new_tokens: int, *, seed: int | None = None,
                   temperature: float = 1.0) -> str:
    """The decoding loop written out, as a reference for `InferenceModel.generate`: a full forward pass over the
    context for each new token (no cache), then its last position's argmax (`seed=None`: greedy) or a draw at
    `temperature` from a generator seeded with `seed`. A model with a context limit is re-primed with the latest
    three quarters of the text when the context is full, as lmkit.generate documents."""
    import torch

    limit = model.backbone.max_seq_len
    ids, start = model.tokenizer.encode(prompt), 0
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if limit and len(ids) - start > limit:
                start = len(ids) - (limit - limit // 4)
            logits = model(torch.tensor([ids[start:]], device=model.device))[:, -1].float()
            if generator is None:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
            ids.append(int(token))
    return model.tokenizer.decode(ids)
