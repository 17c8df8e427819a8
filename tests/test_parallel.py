"""trainer=fsdp: FSDP2, tensor parallel and 2D on CPU processes (gloo), as subprocesses of train.py.

Every sharded run here is checked against one process on the same global batch: the same losses and
gradient norms step by step (clipping engages at every step: the norms are above optim.grad_clip=1), and
the same weights at the end, read back from the sharded folder without any training process.
"""

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import lmkit
from lmkit.checkpoint import read_checkpoint
from lmkit.errors import LmkitError
from lmkit.sharded_checkpoint import read_metadata
from tests.helpers import (FSDP2, HALF, TINY, TINY_TRANSFORMER, free_port, lmkit_main, logged, run_in_process,
                           run_train_py, run_train_py_each, sigterm_train_py_when, train_py_args)

pytestmark = pytest.mark.slow

# A fixed schedule (it must not depend on max_steps: interrupted and resumed runs set other ones), every step logged.
# Samples of 16 tokens: a sharded model is sampled by all its ranks together, without a cache, a collective per
# layer and token (200 tokens, the default, took ~3.5 s per validation of a tensor-parallel run).
SAMPLE = ["callbacks.text_sampler.max_new_tokens=16"]
COMMON = ["model=transformer", *TINY_TRANSFORMER, "optim.warmup_steps=5", "optim.decay_steps=100",
          "trainer.log_every_n_steps=1", "trainer.val_check_interval=10", *SAMPLE]


def train(*overrides: str, run_dir: Path, cache_dir: Path) -> dict:
    result = run_train_py(*COMMON, *overrides, run_dir=run_dir, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(checkpoint)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("attn.c_attn.bias"):
            # The key bias gets no gradient (softmax ignores what it adds to every score of a query), so AdamW
            # moves it by rounding noise divided by the root of that noise's square: ~1e-4 steps, different in
            # every summation order. Both runs must keep it at noise level; q and v biases compare as weights do.
            q, k, v = x.chunk(3)
            assert k.abs().max() < 1e-3 and y.chunk(3)[1].abs().max() < 1e-3, name
            x, y = torch.cat([q, v]), torch.cat([y.chunk(3)[0], y.chunk(3)[2]])
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir) -> Path:
    """One process, batch 8, 20 steps: the reference every sharded run is compared with."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run_in_process(*COMMON, "trainer.max_steps=20", run_dir=run_dir, cache_dir=cache_dir)
    return run_dir


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, cache_dir) -> Path:
    """FSDP over two processes at batch 4 each, 20 steps, sharded checkpoints (the default)."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    train(*FSDP2, *HALF, "trainer.max_steps=20", run_dir=run_dir, cache_dir=cache_dir)
    return run_dir


def test_fsdp_on_two_processes_matches_one_process_at_twice_the_batch(single, fsdp):
    assert logged(fsdp) == pytest.approx(logged(single), rel=1e-5)
    assert logged(fsdp, "grad_norm") == pytest.approx(logged(single, "grad_norm"), rel=1e-5)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (fsdp, single))
    assert (a["world_size"], a["steps"]) == (2, 20)
    for key in ("val_loss", "test_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    folder = Path(a["last_ckpt"])
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["best-step20.ckpt", "last.ckpt"]  # no temp folders
    assert_same_weights(weights(folder), weights(b["last_ckpt"]))
    samples = (fsdp / "samples.txt").read_text()  # the sharded model sampled text at each validation
    assert "=== step 10" in samples and "=== step 20" in samples


def test_tensor_parallel_matches_one_process_and_resumes_from_its_folder(single, tmp_path, cache_dir):
    """TP x2 (both ranks see the same batch of 8) for 10 steps, then resumed from its sharded folder: the fused
    q/k/v rows are stored gathered (GPT-2's layout) and split again per rank as they load."""
    run_dir, tp = tmp_path / "run", [*FSDP2, "trainer.strategy.tensor_parallel_size=2"]
    train(*tp, "trainer.max_steps=10", run_dir=run_dir, cache_dir=cache_dir)
    assert logged(run_dir) == pytest.approx(logged(single)[:10], rel=1e-5)
    assert logged(run_dir, "grad_norm") == pytest.approx(logged(single, "grad_norm")[:10], rel=1e-5)
    shutil.move(run_dir / "metrics.csv", tmp_path / "first.csv")  # the resumed run's own steps only
    m = train(*tp, "trainer.max_steps=20", "resume=true", run_dir=run_dir, cache_dir=cache_dir)
    assert m["steps"] == 20
    assert logged(run_dir) == pytest.approx(logged(single)[10:], rel=1e-5)
    assert_same_weights(weights(m["last_ckpt"]), weights(single / "checkpoints" / "last.ckpt"))


def test_a_full_checkpoint_file_resumes_exactly_at_another_tensor_parallel_size(single, tmp_path, cache_dir):
    """FSDP x2 writing one full .ckpt, resumed by TP x2 (which writes full files too): the file holds the whole
    model and optimizer in the single-process layout, and each strategy splits it as it loads."""
    run_dir = tmp_path / "run"
    full = ["trainer.strategy.save_distributed_checkpoint=false"]
    m = train(*FSDP2, *HALF, *full, "trainer.max_steps=10", run_dir=run_dir, cache_dir=cache_dir)
    checkpoint = torch.load(m["last_ckpt"], weights_only=True)  # one ordinary file, today's layout
    assert checkpoint["global_step"] == 10 and "backbone.transformer.h.0.attn.c_attn.weight" in checkpoint["state_dict"]
    shutil.move(run_dir / "metrics.csv", tmp_path / "first.csv")
    m = train(*FSDP2, "trainer.strategy.tensor_parallel_size=2", *full, "trainer.max_steps=20", "resume=true",
              run_dir=run_dir, cache_dir=cache_dir)
    assert Path(m["last_ckpt"]).is_file()
    assert logged(run_dir) == pytest.approx(logged(single)[10:], rel=1e-5)
    assert_same_weights(weights(m["last_ckpt"]), weights(single / "checkpoints" / "last.ckpt"))


def test_2d_fsdp_by_tensor_parallel_on_four_processes(single, tmp_path, cache_dir):
    """2 data-parallel x 2 tensor-parallel ranks at batch 4 per replica: the single run's global batch of 8. The
    clipped gradient norm is the global one over both meshes (blocks on the 2D mesh, embedding and norms on the
    data-parallel one). Its checkpoint folder (sharded over both dimensions) then resumes as FSDP x2."""
    run_dir = tmp_path / "run"
    m = train("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=4", "trainer.strategy.tensor_parallel_size=2",
              *HALF, "trainer.max_steps=6", "trainer.val_check_interval=6", run_dir=run_dir, cache_dir=cache_dir)
    assert m["world_size"] == 4 and m["steps"] == 6
    assert logged(run_dir) == pytest.approx(logged(single)[:6], rel=1e-5)
    assert logged(run_dir, "grad_norm") == pytest.approx(logged(single, "grad_norm")[:6], rel=1e-5)
    shutil.move(run_dir / "metrics.csv", tmp_path / "first.csv")
    train(*FSDP2, *HALF, "trainer.max_steps=10", "resume=true", run_dir=run_dir, cache_dir=cache_dir)
    assert logged(run_dir) == pytest.approx(logged(single)[6:10], rel=1e-5)


def test_bf16_mixed_under_fsdp_then_compression(single, tmp_path, cache_dir):
    """precision=bf16-mixed is FSDP2's bf16 compute over fp32 master weights: near fp32, not equal to it. Then the
    sharded model is gathered and compressed once, on rank zero."""
    run_dir = tmp_path / "run"
    result = run_train_py(*COMMON, *FSDP2, *HALF, "trainer.max_steps=20", "trainer.precision=bf16-mixed",
                          "compression=[prune,int8]", "compression.prune.finetune_steps=4", run_dir=run_dir,
                          cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    bf16, fp32 = logged(run_dir), logged(single)
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != pytest.approx(fp32, rel=1e-6)
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert {t.dtype for t in checkpoint["state_dict"].values()} == {torch.float32}  # fp32 master weights
    assert (result.stdout + result.stderr).count("compression: int8") == 1
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["export_bytes_ratio"] < 0.3 and (run_dir / "model" / "report.json").is_file()
    assert len(lmkit.load(run_dir / "model").generate("ROMEO:", max_new_tokens=8, seed=0)) > len("ROMEO:")


def test_everything_downstream_reads_a_sharded_folder(fsdp, tmp_path, cache_dir):
    folder = fsdp / "checkpoints" / "last.ckpt"
    model = lmkit.load(folder)  # consolidated in memory, no processes
    result = lmkit_main("export", f"model={folder}", f"out={tmp_path / 'model'}")
    assert result.returncode == 0, result.stderr[-2000:]
    exported = lmkit.load(tmp_path / "model")
    ids = torch.tensor([model.tokenizer.encode("ROMEO: what")])
    torch.testing.assert_close(exported(ids), model(ids))
    result = lmkit_main("generate", f"model={folder}", "prompt=ROMEO:", "max_new_tokens=20", "seed=1")
    assert result.returncode == 0 and result.stdout.strip() == model.generate("ROMEO:", max_new_tokens=20, seed=1)
    result = lmkit_main("eval", f"model={folder}", f"paths.cache_dir={cache_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    test_loss = json.loads((fsdp / "metrics.json").read_text())["test_loss"]
    assert json.loads(result.stdout)["loss"] == pytest.approx(test_loss, rel=1e-4)  # its own test split
    # init_from a sharded folder: one process fine-tunes from its weights (its first loss, on a training batch, is
    # near the trained model's test loss, far below the fresh model's first)
    m = run_in_process(*COMMON, "trainer.max_steps=2", f"init_from={folder}", run_dir=tmp_path / "tuned",
                       cache_dir=cache_dir)
    first = logged(tmp_path / "tuned")[0]
    assert m["steps"] == 2 and first == pytest.approx(test_loss, rel=0.1) and first < logged(fsdp)[0] - 0.5


def test_reading_a_sharded_folder_never_runs_code_and_names_a_missing_shard(fsdp, tmp_path):
    folder = tmp_path / "last.ckpt"
    shutil.copytree(fsdp / "checkpoints" / "last.ckpt", folder)
    (folder / "__1_0.distcp").unlink()
    result = lmkit_main("eval", f"model={folder}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: sharded checkpoint {folder} is incomplete: __1_0.distcp missing (it has 2 shard "
                      "files, one per rank that wrote it)"]

    class Hostile:  # what a stranger's .metadata could hold: unpickling it would run a command
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'ran')!r}, 'w')",))

    (folder / ".metadata").write_bytes(pickle.dumps(Hostile()))
    result = lmkit_main("eval", f"model={folder}")  # in this process: code it ran would run here
    assert result.returncode == 2 and ".metadata is not checkpoint metadata (builtins.exec" in result.stderr
    assert not (tmp_path / "ran").exists()


def test_a_save_killed_at_any_point_leaves_a_whole_checkpoint_to_resume(fsdp, tmp_path):
    """ShardedStrategy.save_checkpoint's states on disk wherever a SIGKILL stops it: every rank's shards written
    into .last.ckpt.tmp, then the previous last.ckpt moved to .last.ckpt.old, then the new one renamed into place.
    resume=true finds a whole checkpoint in each: the previous one, or the new one once every rank has written."""
    from lmkit.preflight import _resume_checkpoint

    saved = fsdp / "checkpoints" / "last.ckpt"
    checkpoints = tmp_path / "run" / "checkpoints"
    last, tmp, old = checkpoints / "last.ckpt", checkpoints / ".last.ckpt.tmp", checkpoints / ".last.ckpt.old"

    def resume_after_a_kill(*, shards_written: bool, previous_moved_aside: bool) -> bool:
        """Resume from the state the kill left; whether it resumes from the new checkpoint."""
        shutil.rmtree(checkpoints, ignore_errors=True)
        shutil.copytree(saved, old if previous_moved_aside else last)
        shutil.copytree(saved, tmp)
        (tmp / "new").touch()  # (the two folders hold the same tensors: this tells them apart)
        if not shards_written:  # killed while the ranks wrote: neither the index nor Lightning's meta.pt yet
            (tmp / ".metadata").unlink()
            (tmp / "meta.pt").unlink()
        assert _resume_checkpoint(True, tmp_path / "run", sharded=True) == last
        assert_same_weights(weights(last), weights(saved))  # whole: every shard there, read back
        return (last / "new").exists()

    assert not resume_after_a_kill(shards_written=False, previous_moved_aside=False)  # the previous one, untouched
    assert not resume_after_a_kill(shards_written=True, previous_moved_aside=False)  # (renames not reached)
    assert resume_after_a_kill(shards_written=True, previous_moved_aside=True)  # between the renames: the new one
    assert not tmp.exists() and old.exists()  # (the next save clears the previous one)
    # A new folder that is not whole never stands beside a previous one moved aside; if it did, the previous returns
    assert not resume_after_a_kill(shards_written=False, previous_moved_aside=True)


def test_a_dotted_name_in_metadata_cannot_reach_an_unrestricted_unpickler(tmp_path):
    """Protocol 4 resolves dotted names: `<allowed module>.pickle.Unpickler` would unpickle a second, unchecked
    payload. Only exact names of checkpoint-metadata classes are rebuilt."""

    class Hostile:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'ran')!r}, 'w')",))

    def global_(module: str, name: str) -> bytes:  # SHORT_BINUNICODE x2, STACK_GLOBAL
        return b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93"

    inner, fs = pickle.dumps(Hostile()), "torch.distributed.checkpoint.filesystem"
    payload = (b"\x80\x04" + global_(fs, "operator.methodcaller") + b"\x8c\x04load\x85R"
               + global_(fs, "pickle.Unpickler") + global_(fs, "io.BytesIO")
               + b"B" + len(inner).to_bytes(4, "little") + inner + b"\x85R\x85R\x85R.")
    (tmp_path / ".metadata").write_bytes(payload)
    with pytest.raises(LmkitError, match="operator.methodcaller is not checkpoint metadata"):
        read_metadata(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_the_bf16_policy_computes_in_bf16_over_fp32_master_weights():
    """One rank, in process: parallelize with param_dtype=bf16 keeps fp32 parameters and computes in bf16."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmkit.backbones import Transformer, TransformerConfig
    from lmkit.parallel.parallelize import parallelize

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        model = Transformer(TransformerConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, max_seq_len=8))
        reference = Transformer(model.config)
        reference.load_state_dict(model.state_dict())
        parallelize(model, mesh, param_dtype=torch.bfloat16)
        ids = torch.randint(0, 50, (2, 8))
        logits, _ = model(ids)
        logits.float().logsumexp(-1).mean().backward()  # (after backward every unit holds its fp32 shard again)
        assert logits.dtype == torch.bfloat16
        assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters()} == {torch.float32}
        torch.testing.assert_close(logits.float(), reference(ids)[0], atol=0.05, rtol=0.05)
    finally:
        dist.destroy_process_group()


def test_an_lstm_sweep_under_fsdp_launches_each_jobs_ranks_once(tmp_path, cache_dir):
    """An LSTM is one FSDP unit; a Hydra multirun of fsdp jobs gives one folder per point, each trained once."""
    sweep = tmp_path / "sweep"
    result = run_train_py("-m", "model=lstm", *TINY, *FSDP2, *SAMPLE, "trainer.max_steps=6", "trainer.val_check_interval=3",
                          "model.n_embd=32,48", f"hydra.sweep.dir={sweep}", run_dir=tmp_path / "unused",
                          cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [json.loads((j / "metrics.json").read_text())["world_size"] for j in jobs] == [2, 2]
    widths = [read_checkpoint(j / "checkpoints" / "last.ckpt")["hyper_parameters"]["model"]["n_embd"] for j in jobs]
    assert widths == [32, 48]
    assert (result.stdout + result.stderr).count("Metrics:") == 2 and not list(tmp_path.rglob("multirun"))


def test_sigterm_under_fsdp_saves_a_sharded_folder_and_resume_continues(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    common = ["model=lstm", *TINY, *FSDP2, "trainer.val_check_interval=10", "callbacks.text_sampler=null",
              "optim.warmup_steps=5", "optim.decay_steps=1000"]
    folder = run_dir / "checkpoints" / "last.ckpt"
    code, log = sigterm_train_py_when(lambda: (folder / "meta.pt").exists(), *common, "trainer.max_steps=100000",
                                      run_dir=run_dir, cache_dir=cache_dir)
    assert code == 143 and "Traceback" not in log, log[-2000:]
    step = read_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights=False)["global_step"]
    assert step >= 10
    result = run_train_py(*common, f"trainer.max_steps={step + 5}", "resume=true", run_dir=run_dir, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == step + 5


CANNOT_SPLIT = [
    (["model=lstm", *TINY, "trainer.strategy.tensor_parallel_size=2"],
     "a recurrent model (model.kind=lstm) has no heads"),
    ([*COMMON, "trainer.devices=4", "trainer.strategy.tensor_parallel_size=4"],
     "does not divide the 2 attention heads"),
    ([*COMMON, "model.n_head=4", "trainer.strategy.tensor_parallel_size=4"], "does not divide the 2 processes"),
    (["model=llama", *TINY_TRANSFORMER, "model.n_kv_head=1", "trainer.strategy.tensor_parallel_size=2"],
     "grouped-query attention (model.n_kv_head=1, model.n_head=2) is not split yet"),
    ([*COMMON, "data.val_windows=1"], "data.val_windows=1 is fewer than the 2 data-parallel ranks"),
    ([*COMMON, "model.n_layer=64", "model.n_embd=4096", "model.n_head=32"],  # 12.9B parameters: 206 GB of state
     "GiB for its weights, gradients and AdamW state (12,"),
]
CANNOT_RESUME = [  # a sharded folder (the fsdp fixture's last.ckpt) resumed without fsdp, or by another model
    ([], "is a sharded checkpoint folder: resume it with trainer=fsdp"),
    ([*FSDP2, "model.n_embd=48"], "is for a different model: model.n_embd: checkpoint 32 vs run 48"),
]


@pytest.fixture(scope="module")
def refused(fsdp, tmp_path_factory, cache_dir) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """`python train.py` with each command line of CANNOT_SPLIT and CANNOT_RESUME, which it must refuse before any
    process starts: name -> (what it printed and its exit code, its run folder). All in one interpreter, one after
    the other, each as train.py's __main__ with its own arguments and output (run_train_py_each)."""
    base = tmp_path_factory.mktemp("refused")
    folder = fsdp / "checkpoints" / "last.ckpt"
    cases = {**{f"split_{i}": [*FSDP2, *overrides] for i, (overrides, _) in enumerate(CANNOT_SPLIT)},
             **{f"resume_{i}": [*COMMON, *overrides, f"resume={folder}"] for i, (overrides, _) in enumerate(CANNOT_RESUME)}}
    results = run_train_py_each({name: train_py_args(*overrides, run_dir=base / name / "run", cache_dir=cache_dir)
                                 for name, overrides in cases.items()}, cwd=base, timeout=300)
    return {name: (results[name], base / name / "run") for name in cases}


@pytest.mark.parametrize("index", range(len(CANNOT_SPLIT)), ids=[message for _, message in CANNOT_SPLIT])
def test_what_cannot_be_split_is_one_line_before_any_process_starts(index, refused):
    (result, run_dir), message = refused[f"split_{index}"], CANNOT_SPLIT[index][1]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not list(run_dir.rglob("*.ckpt"))


def test_resuming_a_sharded_folder_needs_fsdp_and_the_same_model(refused):
    for index, (_, message) in enumerate(CANNOT_RESUME):
        result, _ = refused[f"resume_{index}"]
        assert result.returncode == 2 and "error: " in result.stderr and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_fsdp_alone_runs_a_llama_block_with_grouped_query_attention():
    """One rank, in process: FSDP2 (tensor-parallel size 1) over RMSNorm, SwiGLU and GQA computes the plain model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmkit.backbones import Transformer, TransformerConfig
    from lmkit.parallel.parallelize import check_tensor_parallel, parallelize

    config = TransformerConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, max_seq_len=8, bias=False,
                               norm="rmsnorm", mlp="swiglu", mlp_hidden=24, position="rope")
    assert check_tensor_parallel(config, 1) is None and "n_kv_head=2" in check_tensor_parallel(config, 2)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        model = Transformer(config)
        reference = Transformer(config)
        reference.load_state_dict(model.state_dict())
        parallelize(model, mesh)
        ids = torch.randint(0, 50, (2, 8))
        logits, _ = model(ids)
        logits.logsumexp(-1).mean().backward()
        assert all(p.grad is not None for p in model.parameters())
        torch.testing.assert_close(logits, reference(ids)[0], atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


LLAMA_MHA = dict(vocab_size=50, n_layer=2, n_head=4, n_kv_head=4, n_embd=16, max_seq_len=8, bias=False,
                 norm="rmsnorm", mlp="swiglu", mlp_hidden=24, position="rope")


def _tensor_parallel_rank(rank: int, port: int, out: str) -> None:
    """One of two tensor-parallel ranks: the Llama block split over both, its logits and gradients gathered whole."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lmkit.backbones import Transformer, TransformerConfig
    from lmkit.parallel.parallelize import parallelize

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same weights and batch on both ranks
        model = Transformer(TransformerConfig(**LLAMA_MHA))
        parallelize(model, init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel")))
        ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
        logits, _ = model(ids)
        logits.logsumexp(-1).mean().backward()
        split = [n for n, p in model.named_parameters() if isinstance(p, DTensor) and
                 any(placement.is_shard() for placement in p.grad.placements)]
        grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"logits": logits.detach(), "grads": grads, "split": split}, out)
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_splits_a_llama_block_over_two_processes(tmp_path):
    """Two real processes split RMSNorm/SwiGLU/RoPE blocks (gate and up by columns, the output projections by rows):
    the logits and every gradient are the one-process model's."""
    from lmkit.backbones import Transformer, TransformerConfig

    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_tensor_parallel_rank, args=(free_port(), str(out)), nprocs=2)
    torch.manual_seed(0)
    reference = Transformer(TransformerConfig(**LLAMA_MHA))
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    logits, _ = reference(ids)
    logits.logsumexp(-1).mean().backward()
    got = torch.load(out, weights_only=True)
    assert {"transformer.h.0.mlp.gate.weight", "transformer.h.0.mlp.up.weight", "transformer.h.0.mlp.c_proj.weight",
            "transformer.h.1.attn.c_attn.weight"} <= set(got["split"]), got["split"]
    torch.testing.assert_close(got["logits"], logits.detach(), atol=1e-5, rtol=1e-5)
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(got["grads"][name], parameter.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compile_leaves_parameter_names_and_so_checkpoints_as_they_are():
    """`model.compile=true` compiles each block in place (no `_orig_mod.` in any name), under FSDP2 and without."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmkit.backbones import Transformer, TransformerConfig
    from lmkit.parallel.parallelize import parallelize

    plain = Transformer(TransformerConfig(**LLAMA_MHA)).state_dict().keys()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = Transformer(TransformerConfig(**LLAMA_MHA))
        parallelize(model, init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel")),
                    compile=True)
        assert all(block._compiled_call_impl is not None for block in model.transformer.h)
        assert model.state_dict().keys() == plain
    finally:
        dist.destroy_process_group()
    from lmkit.lightning_module import LitLanguageModel

    module = LitLanguageModel(model={"kind": "transformer", **{k: v for k, v in LLAMA_MHA.items() if k != "vocab_size"}},
                              optim={"name": "adamw", "lr": 1e-3}, vocab_size=50, compile=True)
    module.configure_model()  # one process or DDP: the whole backbone compiled in place
    assert module.backbone._compiled_call_impl is not None
    assert module.backbone.state_dict().keys() == plain
