"""The runtimes' grids (lmkit.blockquant), GPTQ and activation-aware scales, checked against what they promise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmkit
from lmkit.backbones import Transformer, TransformerConfig
from lmkit.blockquant import BlockQuantLinear, Grid, dequantize, round_to_nearest, set_kernel
from lmkit.compress import compress, training_context
from lmkit.errors import LmkitError
from lmkit.inference import InferenceModel
from lmkit.plugins import CompressContext, make, recipe
from lmkit.record import ModelRecord
from lmkit.builtin_plugins.awq import apply_awq
from lmkit.builtin_plugins.calibrate import collect
from lmkit.builtin_plugins.gptq import Unfactorizable, gptq
from lmkit.builtin_plugins.gridquant import calibrate, codes_of, nibbles_of, plan


def output_error(weight: torch.Tensor, value: torch.Tensor, gram: torch.Tensor) -> float:
    delta = weight - value
    return float(((delta @ gram) * delta).sum())


def test_round_to_nearest_is_llama_cpp_q4_0_and_q8_0():
    """rtn is what llama.cpp's own quantizer does (gguf-py's reference of it): the baseline every figure compares
    with. llama.cpp rounds with its fp32 scale, lmkit with the fp16 one it stores: they may differ by one step
    where a value falls within that rounding of a half step."""
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    for bits, qtype in ((4, gguf.GGMLQuantizationType.Q4_0), (8, gguf.GGMLQuantizationType.Q8_0)):
        grid = Grid(bits, True, 32)
        ours = dequantize(*round_to_nearest(w, grid), 32)
        theirs = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))
        scale = (ours - w).abs().max()
        assert (ours == theirs).float().mean() > 0.99, bits
        assert (ours - theirs).abs().max() <= 1.01 * 2 * scale, bits  # at most one step apart


def test_asymmetric_grid_spans_each_block_and_nibbles_round_trip():
    torch.manual_seed(0)
    w = torch.randn(8, 64) + 3  # all positive: a symmetric grid wastes half its codes here
    sym, asym = Grid(4, True, 32), Grid(4, False, 32)
    codes, d, m = round_to_nearest(w, asym)
    assert int(codes.min()) == 0 and int(codes.max()) == 15
    assert (dequantize(codes, d, m, 32) - w).abs().max() < (dequantize(*round_to_nearest(w, sym), 32) - w).abs().max()
    for grid in (sym, asym):
        codes = round_to_nearest(w - 3, grid)[0]
        assert torch.equal(codes_of(nibbles_of(codes, grid.symmetric), grid.symmetric), codes)


def test_gptq_with_uncorrelated_inputs_is_rounding_and_with_real_inputs_beats_it(transformer_model, context):
    """With H = I no column's error can be made up by another: GPTQ must reduce to rounding exactly. On a trained
    layer's real inputs it must lower the layer's output error (what it minimises) for every layer."""
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    grid = Grid(4, True, 32)
    codes, d, _ = gptq(w, torch.eye(128), grid)
    assert torch.equal(codes, round_to_nearest(w, grid)[0])
    backbone = transformer_model.backbone
    ids = context.calibration(transformer_model, 32)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight"):
        weight, gram = backbone.get_parameter(name).detach(), collect(backbone, name, ids, "gram")
        rounded = output_error(weight, dequantize(*round_to_nearest(weight, grid), 32), gram)
        for act_order in (False, True):
            calibrated = output_error(weight, dequantize(*gptq(weight, gram, grid, act_order=act_order), 32), gram)
            assert calibrated < 0.9 * rounded, (name, act_order, calibrated, rounded)


def test_gptq_keeps_pruned_weights_at_zero_and_refuses_a_broken_hessian():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    keep = torch.rand(16, 64) > 0.5
    x = torch.randn(500, 64)
    codes, d, _ = gptq(w * keep, x.T @ x, Grid(4, True, 32), keep=keep)
    assert (codes[~keep] == 0).all() and (codes[keep] != 0).float().mean() > 0.5
    with pytest.raises(Unfactorizable, match="NaN or infinite"):
        gptq(w, torch.full((64, 64), float("nan")), Grid(4, True, 32))
    with pytest.raises(Unfactorizable, match="not positive definite"):
        gptq(w, -torch.eye(64), Grid(4, True, 32))


def test_awq_scales_leave_the_float_model_unchanged_and_lower_the_rounding_error(transformer_model, context):
    model = lmkit.load(transformer_model.source)
    ids = context.calibration(model, 16)
    with torch.no_grad():
        before = model(ids[:4])
    lines = []
    details = apply_awq(model.backbone, ids, Grid(4, True, 32), lines.append)
    with torch.no_grad():
        after = model(ids[:4])
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # alpha = 0 (no scales) is one of the candidates: strictly below 1, some group found better scales
    assert details["awq_groups"] == 2 * model.backbone.config.n_layer and details["awq_error_ratio"] < 1.0
    assert len(lines) == 1 and lines[0].startswith("awq: scales folded into")


def test_awq_folds_into_rmsnorm_and_swiglus_up_projection_without_changing_the_function():
    """The Llama block: RMSNorm gains before q/k/v (grouped-query, with q/k/v biases) and SwiGLU's gate/up, and the
    up projection's rows before the down projection; random weights with uneven input channels, so scales move."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, norm="rmsnorm", mlp="swiglu",
                            mlp_hidden=128, position="rope", bias=False, qkv_bias=True)
    model = InferenceModel(Transformer(cfg), None, ModelRecord(backbone=cfg)).eval()
    with torch.no_grad():
        model.backbone.transformer.wte.weight.mul_(torch.rand(64) * 4)  # some residual channels carry more
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
        details = apply_awq(model.backbone, ids, Grid(4, True, 32), lambda line: None)
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert details["awq_groups"] == 3 * cfg.n_layer and details["awq_error_ratio"] < 1.0
    gains = model.backbone.transformer.h[0].ln_1.weight
    assert not torch.allclose(gains, torch.ones_like(gains))  # scales were folded in, not left at 1


def test_a_layer_whose_hessian_is_broken_falls_back_to_rounding_with_one_line(transformer_model, context):
    model = lmkit.load(transformer_model.source)
    with torch.no_grad():
        model.backbone.transformer.h[-1].ln_2.weight[0] = float("inf")  # the last MLP's inputs: infinite
    lines: list[str] = []
    quiet = CompressContext(cache_dir=context.cache_dir, log=lines.append, calibration=context.calibration)
    details = calibrate(model, plan("int4", 4, make("int4", {"quant_type": "sym", "method": "gptq"}).settings),
                        quiet, "int4", keep_zeros=True)
    mlp = f"transformer.h.{model.backbone.config.n_layer - 1}.mlp"
    assert details["fallback_to_rtn"] == [f"{mlp}.c_fc.weight", f"{mlp}.c_proj.weight"]  # c_proj reads GELU(inf)
    assert [line for line in lines if "rounded to nearest instead" in line] == [
        f"int4: {mlp}.{name}.weight: its Hessian holds NaN or infinite values; rounded to nearest instead"
        for name in ("c_fc", "c_proj")]
    assert isinstance(model.backbone.lm_head, BlockQuantLinear)  # the rest went on


@pytest.mark.parametrize("quant_type", ["sym", "asym"])
def test_packed_int4_kernel_agrees_with_the_exact_grid(quant_type):
    """A 384-wide model (where the packed kernel runs), head_bits=4: its 76-token head is no multiple of 16 rows, which
    the kernel cannot take (it runs exact); the 256-wide attention output keeps an fp32 copy."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=76, n_layer=1, n_embd=384, n_head=2, n_kv_head=1, norm="rmsnorm", mlp="swiglu",
                            mlp_hidden=512, position="rope", bias=False, head_dim=128)
    model = InferenceModel(Transformer(cfg), None, ModelRecord(backbone=cfg)).eval()
    make("int4", {"quant_type": quant_type, "head_bits": 4}).apply(model, CompressContext(cache_dir=""))
    backbone, x = model.backbone, torch.randn(2, 384)
    assert backbone.transformer.h[0].mlp.gate.path(x) == "int4pack" and backbone.lm_head.path(x) == "exact"
    assert backbone.transformer.h[0].attn.c_proj.path(torch.randn(2, 256)) == "dense"
    ids = torch.randint(0, 76, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = model(ids)
        set_kernel(backbone, "exact")
        exact = model(ids)
    # bf16 activations and scales in the packed kernel: within bf16's rounding (measured ~0.4%), not bit-exact
    assert (packed - exact).abs().max() < 0.02 * exact.abs().max()
    assert not torch.equal(packed, exact)


def test_bad_grid_settings_are_one_line_each(transformer_model, context):
    cases = {
        r"compression.int4.blocksize=24: the runtimes' grids take a power of two from 16": {"quant_type": "sym", "blocksize": 24},
        r"compression.int4.method='gptq' needs a runtime grid: quant_type=sym or asym": {"method": "gptq"},
        r"compression.int4.method='best' is not one of rtn, gptq": {"quant_type": "sym", "method": "best"},
        r"compression.int4.quant_type='q4' is not one of nf4, fp4, sym, asym": {"quant_type": "q4"},
    }
    for message, settings in cases.items():
        with pytest.raises(LmkitError, match=message):
            make("int4", settings)
    with pytest.raises(LmkitError, match=r"compression.int8.quant_type=asym: llama.cpp has no asymmetric 8-bit"):
        make("int8", {"quant_type": "asym"})
    with pytest.raises(LmkitError, match=r"int4 cannot follow int8 \(both quantize the weights"):
        recipe({"int8": {"quant_type": "sym"}, "int4": {"quant_type": "sym"}})
    with pytest.raises(LmkitError, match=r"is 48 wide, not a multiple of blocksize=32 \(blocksize=16 divides them all\)"):
        make("int4", {"quant_type": "sym"}).check_model(tiny_transformer(48))
    no_corpus = lmkit.load(transformer_model.source)
    no_corpus.record = no_corpus.record.replace(data=None)
    with pytest.raises(LmkitError, match=r"int4 calibrates \(method=gptq, awq=false\) on the model's training corpus.*"
                                         r"compression.int4.method=rtn compression.int4.awq=false"):
        compress(no_corpus, {"int4": {"quant_type": "sym", "method": "gptq"}}, context)
    with pytest.raises(LmkitError, match=r"quant_type=asym has no exact zero for prune's pruned weights; use "
                                         r"quant_type=sym after prune"):  # refused before prune's 200 steps
        compress(transformer_model, {"prune": {}, "int4": {"quant_type": "asym"}}, context)
    with pytest.raises(LmkitError, match=r"compression.int4.act_order=true orders GPTQ's columns: set "
                                         r"compression.int4.method=gptq"):
        make("int4", {"quant_type": "sym", "act_order": True})
    with pytest.raises(LmkitError, match=r"compression.int8.head_bits=4 must be 8"):
        make("int8", {"quant_type": "sym", "head_bits": 4})


def tiny_transformer(width: int) -> InferenceModel:
    cfg = TransformerConfig(vocab_size=64, n_layer=1, n_embd=width, n_head=2)
    return InferenceModel(Transformer(cfg), None, ModelRecord(backbone=cfg))


@pytest.fixture(scope="module")
def transformer_model(trained) -> InferenceModel:
    """The session's trained char Transformer (32 wide), remembering where it came from."""
    model = lmkit.load(trained["ckpt"])
    model.source = trained["ckpt"]
    return model


@pytest.fixture(scope="module")
def context(trained) -> CompressContext:
    return training_context(cache_dir=str(trained["cache"]), seed=1337)


def test_nibbles_of_every_code_round_trip():
    codes = torch.arange(-8, 8, dtype=torch.int8)
    assert torch.equal(codes_of(nibbles_of(codes, True), True), codes)
    assert np.array_equal(nibbles_of(codes, True).numpy(), (codes.numpy().astype(np.int16) & 15).astype(np.uint8))
