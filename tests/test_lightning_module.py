import pytest
import torch
from torchmetrics.text import Perplexity

from lmkit.lightning_module import LitLanguageModel, warmup_cosine

OPTIM = dict(name="adamw", lr=1e-3, betas=[0.9, 0.99], eps=1e-8, weight_decay=0.1, warmup_steps=10,
             decay_steps=None, min_lr_ratio=0.1, grad_clip=1.0)


def test_perplexity_equals_torchmetrics_perplexity():
    torch.manual_seed(0)
    module = LitLanguageModel(model=dict(kind="lstm", n_layer=1, n_embd=16), optim=OPTIM, vocab_size=30)
    reference = Perplexity()
    batches = [(torch.randint(0, 30, (4, 9)), torch.randint(0, 30, (4, 9))) for _ in range(3)]
    batches.append((torch.randint(0, 30, (1, 9)), torch.randint(0, 30, (1, 9))))  # uneven last batch
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            module.validation_step((x, y), i)
            reference.update(module(x), y)
    ours = module.val_nll.compute().exp()
    torch.testing.assert_close(ours, reference.compute(), rtol=1e-5, atol=1e-5)


def test_warmup_then_cosine_to_the_floor_as_transformers_schedules_it():
    """Warm-up from lr/warmup_steps to lr, then transformers' cosine with a floor (get_cosine_with_min_lr_schedule_
    with_warmup), held at the floor past the horizon."""
    transformers = pytest.importorskip("transformers")
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = transformers.get_cosine_with_min_lr_schedule_with_warmup(optimizer, 10, 110, min_lr_rate=0.1).lr_lambdas[0]
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert [f(s) for s in range(10, 111)] == pytest.approx([theirs(s) for s in range(10, 111)])
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert warmup_cosine(10, None, 0.1)(500) == 1.0  # no horizon: constant after warm-up


def test_weight_decay_only_on_matrices_and_embeddings():
    import lightning as L

    module = LitLanguageModel(model=dict(kind="transformer", n_layer=1, n_head=2, n_embd=16, max_seq_len=8),
                           optim=OPTIM, vocab_size=30)
    module.trainer = L.Trainer(max_steps=100, logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_unique = len({id(p) for p in module.parameters()})  # the tied head is counted once
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique
