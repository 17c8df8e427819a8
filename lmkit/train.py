"""`run(cfg)`: build data, model, callbacks, loggers and trainer from a composed config; fit; evaluate.

A pure function of the config (no globals, no chdir), so tests and sweeps call it as they like. Every refusal the
config alone decides comes first, from one function (lmkit.preflight.check_run); then the builders below, each for
one thing, with the few checks that need what they build (the memory estimate, a plugin's check of the model,
resume's match with the model). `main` (the one `@hydra.main` around `run`, behind a check of the command line) is what `train.py` and
`lmkit train` both call.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig

from lmkit.backbones.init import rng_untouched
from lmkit.callbacks import TextSampler, Throughput, use_atomic_checkpoints
from lmkit.checkpoint import check_compatible, check_same_base, read_checkpoint
from lmkit.conf import CONF_DIR, check_config_dirs, check_sweeper
from lmkit.console import known_warnings, quiet_console
from lmkit.data.tokenizer import Tokenizer
from lmkit.distributed import ddp_children_run_this_job, die_with_launcher
from lmkit.errors import LmkitError, exit_on_user_error, first_line
from lmkit.files import atomic_write_text
from lmkit.inference import InferenceModel
from lmkit.interrupts import sigterm_exits_143, stop_on_interrupts
from lmkit.lightning_module import LitLanguageModel
from lmkit.lora import attach, fingerprint_of, merged
from lmkit.memory_check import check_memory
from lmkit.parallel.parallelize import gather
from lmkit.parallel.strategy import ShardedStrategy
from lmkit.preflight import RunPlan, check_run
from lmkit.preference import PreferenceModel
from lmkit.record import ModelRecord

log = logging.getLogger("lmkit")


def run(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and evaluate as `cfg` says. Returns `(metrics, objects)`; writes metrics.json on rank zero."""
    started = time.perf_counter()
    quiet_console()  # each message once, no adverts (Hydra has configured logging by now)
    plan = check_run(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: same accuracy class as bf16 training
    # (data=chat and data=preference render with the model's chat template: lmkit.data.chat_datamodule)
    datamodule = build(plan.data, tokenizer=plan.tokenizer, cache_dir=cfg.paths.cache_dir, seed=cfg.seed,
                       _convert_="all", **({"model_tokens": plan.init.tokens if plan.init else {}} if plan.chat else {}))
    module = build_module(plan, datamodule, cfg.trainer)
    ckpt_path = resume_checkpoint(plan, module)  # (before the trainer, whose checkpoint callback makes its folder)
    trainer = build_trainer(cfg, plan, module)

    # SIGTERM and Ctrl-C: every rank stops after the same step, saves last.ckpt, exits 143 or 130
    with (ddp_children_run_this_job(), known_warnings(plan.output_dir, resuming=ckpt_path is not None),
          stop_on_interrupts(trainer)):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        train_loss = _float(trainer.callback_metrics.get("train_loss"))
        # (an empty list when trainer.limit_val_batches / limit_test_batches is 0)
        val = (trainer.validate(module, datamodule=datamodule, verbose=False) or [{}])[0]
        test = (trainer.test(module, datamodule=datamodule, verbose=False) or [{}])[0]
        sampler = next((c for c in trainer.callbacks if isinstance(c, TextSampler)), None)
        to_sample = sampler is not None and module.tokenizer is not None and sampler.step != trainer.global_step
        backbone = module.backbone
        if plan.sharded and (plan.plugins or to_sample):  # (while the ranks are still connected)
            backbone = gather(module.backbone, lora=plan.lora)  # every rank sends its shards; rank zero gets all

    metrics = {"train_loss": train_loss, **_metrics(trainer, datamodule, val, test),
               "wall_s": round(time.perf_counter() - started, 2)}
    if trainer.is_global_zero:  # written before compressing, and again with the export's figures after
        atomic_write_text(plan.output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if plan.plugins:
            metrics.update(_compress(module, backbone, plan, cfg))
            atomic_write_text(plan.output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if sampler is not None and sampler.step == trainer.global_step:
            log.info("Sample from the final model: the one at step %d above", sampler.step)
        elif to_sample:
            log.info("Sample from the final model:\n%s", sampler.sample(backbone, module.tokenizer))
        log.info("Metrics: %s", json.dumps(metrics))
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def build(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with what the target raises turned into one line, not a traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, LmkitError):
            raise cause from None
        raise LmkitError(first_line(cause or e, limit=None)) from None


def build_module(plan: RunPlan, datamodule: L.LightningDataModule, trainer_cfg: DictConfig) -> LitLanguageModel:
    """The LightningModule: its backbone (the pretrained weights in it, when fine-tuning), LoRA adapters attached."""
    tokenizer = datamodule.tokenizer
    # A pretrained model's embedding may have rows its tokenizer never uses (Qwen2.5: 151,936 for 151,665 tokens)
    vocab_size = plan.init.backbone.vocab_size if plan.init is not None else tokenizer.vocab_size
    parameters = ModelRecord.from_settings(plan.model, vocab_size).backbone.num_parameters()
    check_memory(parameters, trainer_cfg, sharded=plan.sharded, frozen=plan.lora is not None)  # before building it
    rng = torch.get_rng_state()
    objective = PreferenceModel if plan.preference is not None else LitLanguageModel
    try:
        module = objective(model=plan.model, optim=plan.optim, vocab_size=vocab_size, data=plan.data,
                           compile=plan.compile, activation_checkpointing=plan.activation_checkpointing,
                           tokens=datamodule.tokens if plan.chat else
                           plan.init.tokens if plan.init else _end_of_text_tokens(tokenizer),
                           finetune=plan.finetune, meta_init=plan.by_tensor)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise LmkitError(f"model: {e}") from None
    module.tokenizer = tokenizer
    if plan.preference is not None:
        module.init_from = plan.init_from  # (a live reference for finetune=full is loaded from there)
    for plugin in plan.plugins:  # a recipe this model cannot take fails now, not after training
        plugin.check_model(InferenceModel(module.backbone, tokenizer, module.record))
    base_fingerprint = pretrained = None
    if plan.init is not None and plan.by_tensor:
        from lmkit.parallel.materialize import read_pretrained

        pretrained = read_pretrained(plan.init_from, module.backbone)
        if plan.lora is not None:
            base_fingerprint = fingerprint_of(pretrained.items(sorted(module.backbone.state_dict())))
        if plan.sharded:  # read into the shards when the trainer configures the model
            module.pretrained, pretrained = pretrained, None
        # (otherwise QLoRA: `attach` quantizes each part of the base as it reads it)
        log.info("Initialising from %s, %s", plan.init_from,
                 "shard by shard" if plan.sharded else "quantized part by part as it is read")
    elif plan.init is not None:
        from lmkit.export import load

        with rng_untouched():  # (building it draws initial weights its file replaces: as if it had not)
            module.backbone.load_state_dict(load(plan.init_from).backbone.state_dict())  # same config, same shapes
        # The random weights just drawn are replaced: the run's random stream goes on as if they had never been
        # drawn, as under trainer=fsdp, which never draws them (the same LoRA adapters and dropout either way).
        torch.set_rng_state(rng)
        log.info("Initialised from %s", plan.init_from)
    if plan.lora is not None:
        attach(module, plan.lora, base=plan.init_from, base_fingerprint=base_fingerprint, pretrained=pretrained)
    return module


def build_trainer(cfg: DictConfig, plan: RunPlan, module: LitLanguageModel) -> L.Trainer:
    """The trainer with the config's callbacks and loggers, and the compression plugins' callbacks that work during
    training; its checkpoints written whole or not at all (lmkit.callbacks.AtomicCheckpointIO)."""
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    if cfg.trainer.get("enable_progress_bar") is False:  # the flag wins over the bar in the callbacks group
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    for plugin in plan.plugins:
        hooks = plugin.callbacks(module)
        if hooks and not plugin.during_training:  # (its refusals under lora and fsdp were decided on that flag)
            raise LmkitError(f"compression.{plugin.name}: a plugin with training callbacks must say so with "
                             "during_training (lmkit.plugins.Plugin.during_training)")
        callbacks += hooks
    loggers = [build(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None and "_target_" in lg]
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if plan.sharded != isinstance(trainer.strategy, ShardedStrategy):  # (a strategy given otherwise than by _target_)
        raise LmkitError(f"trainer.strategy={type(trainer.strategy).__name__}: name lmkit's sharded strategy as "
                         "trainer=fsdp does (_target_: lmkit.parallel.strategy.ShardedStrategy)")
    use_atomic_checkpoints(trainer)  # a full disk: one line, and the previous checkpoint stays whole
    return trainer


def resume_checkpoint(plan: RunPlan, module: LitLanguageModel) -> Path | None:
    """`resume=true`'s last.ckpt (or `resume=PATH`), checked against the model it is to continue."""
    if plan.resume is None:
        return None
    saved = read_checkpoint(plan.resume, weights=False)
    check_compatible(plan.resume, saved, module.record, module.tokenizer.to_json())
    check_same_base(plan.resume, saved, module.lora_base)
    log.info("Resuming from %s", plan.resume)
    return plan.resume


def _end_of_text_tokens(tokenizer: Tokenizer) -> dict[str, Any] | None:
    """A model trained from scratch ends a text where its corpus ended each document: at END_OF_TEXT, when the
    tokenizer has it (lmkit.data.tokenizer), so generation and `lmkit serve` stop there."""
    eot = tokenizer.end_of_text_id
    return None if eot is None else {"eos_token_ids": [eot]}


def _metrics(trainer: L.Trainer, datamodule: Any, val: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json records of a finished run."""
    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    checkpoint = trainer.checkpoint_callback
    return {
        "val_loss": val.get("val_loss"), "val_ppl": val.get("val_ppl"),
        "test_loss": test.get("test_loss"), "test_ppl": test.get("test_ppl"),
        "tokens_per_s": throughput.tokens_per_s if throughput else None,
        "world_size": trainer.world_size,
        "best_ckpt": _abspath(checkpoint.best_model_path if checkpoint else None),
        "last_ckpt": _abspath(checkpoint.last_model_path if checkpoint else None),
        "steps": trainer.global_step,
        **getattr(datamodule, "stats", {}),  # data=chat: the masked fraction, how full the rows are
        # every other evaluation metric (finetune.objective=dpo: val_reward_margin, val_preference_accuracy, ...)
        **{k: _float(v) for k, v in {**val, **test}.items() if not k.endswith(("_loss", "_ppl"))},
    }


def _compress(module: LitLanguageModel, backbone: torch.nn.Module, plan: RunPlan, cfg: DictConfig) -> dict[str, Any]:
    """Compress the trained `backbone` as `plan.compression` says and export it to `plan.output_dir/model`."""
    from lmkit.compress import compress_and_export, training_context

    record = module.record.replace(source={"run": str(plan.output_dir.resolve()), "step": module.trainer.global_step})
    model = merged(InferenceModel(backbone, module.tokenizer, record))  # (a LoRA run: compressed as its merge)
    out = plan.output_dir / "model"
    # Lightning has moved the model to the CPU after fit: it is measured there (the report's CPU
    # figures), while recovery fine-tunes go back to the device the run trained on.
    context = training_context(cache_dir=cfg.paths.cache_dir, seed=cfg.seed, log=log.info,
                               train_device=str(module.trainer.strategy.root_device))
    _, report = compress_and_export(model, plan.compression, out, context, overwrite=True)
    log.info("Compressed model written to %s", out)
    after = report["after"]
    return {"export_dir": str(out.resolve()), "export_bytes": after["bytes"], "export_ppl": after["perplexity"],
            "export_bytes_ratio": report["after_vs_before"]["bytes"]}


def main() -> None:
    """The entry point of `python train.py` and `lmkit train`."""
    die_with_launcher()  # first: armed before Hydra's seconds of start-up, which a rank of a dead launcher skips
    with exit_on_user_error():
        check_sweeper(sys.argv[1:])
        check_config_dirs(sys.argv[1:])
    _main()


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    with exit_on_user_error(), sigterm_exits_143():
        metrics, _ = run(cfg)
        # A sweeper (hparams_search=optuna) optimises the value returned here.
        name = cfg.get("optimized_metric") or "val_loss"
        if name not in metrics:
            raise LmkitError(f"optimized_metric={name} is not a metric of this run: one of {', '.join(metrics)}")
        if metrics[name] is None and "hparams_search" in cfg:  # (Optuna would fail every trial, then the study)
            raise LmkitError(f"hparams_search optimises {name}, which this run did not measure "
                             "(trainer.limit_val_batches=0?)")
    return metrics[name]


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None


def _abspath(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


if __name__ == "__main__":  # `python -m lmkit.train ...`: how Lightning re-launches ranks of an `lmkit train` run
    main()
