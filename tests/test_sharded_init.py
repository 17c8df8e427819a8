"""trainer=fsdp builds no whole model: the backbone is built on the meta device, sharded, then filled shard by shard
from its own initialisation or from `init_from`'s files, one tensor at a time (lmkit.parallel.materialize).

The runs here are subprocesses of train.py on two CPU ranks, each checked against one process on the same global
batch: the same losses step by step, so the shards held what one process's whole model held.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmkit
from lmkit.backbones import TransformerConfig, build_backbone
from lmkit.checkpoint import read_checkpoint
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.parallel.materialize import initial_values, materialize, read_pretrained, shared_parameters
from lmkit.record import ModelRecord
from tests.helpers import (FSDP2, HALF, SHORT_FINETUNE, finetune, finetune_here, lmkit_main, logged, run_train_py_each,
                           train_py_args)

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def base(trained, tmp_path_factory) -> Path:
    """The session's trained model as an lmkit folder (init_from reads its safetensors one tensor at a time)."""
    folder = tmp_path_factory.mktemp("base") / "model"
    save(lmkit.load(trained["ckpt"]), folder)
    return folder


def test_a_meta_built_model_materialises_to_the_weights_one_process_draws():
    config = TransformerConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, max_seq_len=8,
                               bias=False, norm="rmsnorm", mlp="swiglu", mlp_hidden=24, position="rope")
    torch.manual_seed(3)
    whole = build_backbone(config)
    after_whole = torch.get_rng_state()
    torch.manual_seed(3)
    with torch.device("meta"):
        meta = build_backbone(config)
    materialize(meta, "cpu", initial_values(meta))
    assert torch.equal(torch.get_rng_state(), after_whole)  # the same draws, so dropout goes on alike
    assert meta.lm_head.weight is meta.transformer.wte.weight  # still tied
    for (name, a), (_, b) in zip(whole.state_dict().items(), meta.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    torch.testing.assert_close(meta.rope_cos, whole.rope_cos, rtol=0, atol=0)  # computed buffers rebuilt


def test_init_from_under_fsdp_starts_and_ends_where_one_process_does(base, trained, tmp_path):
    one = tmp_path / "one"
    finetune_here(f"init_from={base}", run_dir=one, cache_dir=trained["cache"])
    two = tmp_path / "fsdp"
    metrics = finetune(*FSDP2, *HALF, f"init_from={base}", run_dir=two, cache_dir=trained["cache"])
    assert metrics["world_size"] == 2
    assert logged(two) == pytest.approx(logged(one), rel=1e-5)
    # the first loss is the pretrained model's, not a random one's (a random one starts near ln(vocab), 4.2)
    assert logged(one)[0] < trained["metrics"]["train_loss"] + 0.2


def test_lora_under_fsdp_trains_sharded_adapters_equal_to_one_process(trained, tmp_path):
    lora = ["finetune=lora", "finetune.dropout=0", f"init_from={trained['ckpt']}", "trainer.val_check_interval=2"]
    one = tmp_path / "one"
    a = finetune_here(*lora, "trainer.max_steps=6", run_dir=one, cache_dir=trained["cache"])
    two = tmp_path / "fsdp"
    finetune(*FSDP2, *HALF, *lora, run_dir=two, cache_dir=trained["cache"])  # 4 steps, then resumed to 6
    first = logged(two)
    (two / "metrics.csv").unlink()  # the resumed run's own steps only
    b = finetune(*FSDP2, *HALF, *lora, "trainer.max_steps=6", "resume=true", run_dir=two, cache_dir=trained["cache"])
    assert first + logged(two) == pytest.approx(logged(one), rel=1e-5)
    assert len(logged(one)) == 6 and a["last_ckpt"].endswith("last.ckpt")
    assert read_checkpoint(a["last_ckpt"])["global_step"] == read_checkpoint(b["last_ckpt"])["global_step"] == 6
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    folder = Path(b["last_ckpt"])
    saved = read_checkpoint(folder)
    assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"])  # the adapters alone
    assert saved["lmkit"]["lora_base"] == read_checkpoint(a["last_ckpt"])["lmkit"]["lora_base"]
    result = lmkit_main("export", f"model={folder}", f"out={tmp_path / 'merged'}")
    assert result.returncode == 0, result.stderr[-2000:]
    merged, reference = lmkit.load(tmp_path / "merged"), lmkit.load(a["last_ckpt"])
    ids = torch.tensor([reference.tokenizer.encode("ROMEO: what")])
    torch.testing.assert_close(merged(ids), reference(ids), atol=1e-5, rtol=1e-5)


def test_init_from_files_that_do_not_fit_the_model_is_one_line(base, tmp_path):
    record = ModelRecord.from_file(base / "config.json")
    with torch.device("meta"):
        backbone = build_backbone(record.backbone)
    tensors = read_pretrained(base, backbone)  # it fits
    assert set(shared_parameters(backbone)) == {"lm_head.weight"}
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])  # a tied head reads as stored
    with torch.device("meta"):
        other = build_backbone(TransformerConfig(**{**vars(record.backbone), "n_embd": 64}))
    with pytest.raises(LmkitError, match=r"init_from=.*: transformer\.wte\.weight is \[\d+, 32\], this model's is "
                                         r"\[\d+, 64\]"):
        read_pretrained(base, other)


def test_qlora_and_lora_with_tensor_parallel_under_fsdp_are_refused_in_one_line(trained, tmp_path):
    cases = {"finetune.base=int4 (QLoRA) under trainer=fsdp": ["finetune.base=int4"],
             "adapters are not split over": ["trainer.strategy.tensor_parallel_size=2"]}
    lora = [*SHORT_FINETUNE, *FSDP2, "finetune=lora", f"init_from={trained['ckpt']}"]
    results = run_train_py_each({message: train_py_args(*lora, *extra, run_dir=tmp_path / f"run{i}",
                                                        cache_dir=trained["cache"])
                                 for i, (message, extra) in enumerate(cases.items())}, cwd=tmp_path)
    for message, result in results.items():
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
