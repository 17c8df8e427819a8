"""`run(cfg)`: build data, model, callbacks, loggers and trainer from a composed config; fit; evaluate.

A pure function of the config (no globals, no chdir), so tests and sweeps call it as they like;
`main` (the one `@hydra.main` around it, behind a check of the command line) is what `train.py` and `lmkit
train` both call.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lmkit.backbones.init import rng_untouched
from lmkit.callbacks import CheckpointOnInterrupt, TextSampler, Throughput, use_atomic_checkpoints
from lmkit.checkpoint import check_compatible, check_same_base, read_checkpoint
from lmkit.distributed import check_launch, ddp_children_run_this_job, die_with_launcher
from lmkit.conf import CONF_DIR, check_config_dirs, check_sweeper
from lmkit.data.tokenizer import Tokenizer
from lmkit.errors import LmkitError, exit_on_user_error
from lmkit.console import known_warnings, quiet_console
from lmkit.files import atomic_write_text, check_writable
from lmkit.inference import InferenceModel
from lmkit.lightning_module import LitLanguageModel
from lmkit.lora import attach, fingerprint_of, lora_settings, merged
from lmkit.memory_check import check_memory
from lmkit.parallel.checkpoint import is_sharded_checkpoint
from lmkit.parallel.parallelize import gather
from lmkit.parallel.strategy import ShardedStrategy
from lmkit.plugins import recipe
from lmkit.preference import PreferenceModel, check_reference, objective_settings
from lmkit.record import ModelRecord

log = logging.getLogger("lmkit")


def _container(node: Any) -> Any:
    """A plain dict; a required key left at `???` is a one-line error naming it."""
    if not isinstance(node, DictConfig):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise LmkitError(f"{e.full_key} is required (e.g. {e.full_key}=...)") from None


def build(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with what the target raises turned into one line, not a traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, LmkitError):
            raise cause from None
        raise LmkitError(str(cause or e).strip().splitlines()[0]) from None


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate each named entry of a config group that holds several (callbacks, logger)."""
    return [build(entry) for entry in (group or {}).values() if entry is not None and "_target_" in entry]


def resume_checkpoint(resume: bool | str | None, output_dir: Path) -> Path | None:
    """`resume=true`: this run directory's last.ckpt if there is one; `resume=PATH`: that file."""
    if resume in (None, False):
        return None
    if resume is True:
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            return last
        log.info("resume=true but %s does not exist yet: starting fresh", last)
        return None
    return Path(str(resume)).expanduser()


def _init_from(path: str | None, *, whole: bool = True):
    """The pretrained model named by `init_from` (an lmkit model directory or a checkpoint), or None: loaded whole, or
    (`whole=False`, trainer=fsdp) described, its tensors to be read one at a time into the shards."""
    if not path:
        return None
    if whole:
        from lmkit.export import load

        with rng_untouched():  # (building it draws initial weights its file replaces: as if it had not, as under fsdp)
            model = load(path)
    else:
        from lmkit.parallel.materialize import Pretrained, describe_pretrained

        record, tokenizer, adapters_only = describe_pretrained(path)
        if adapters_only:
            raise LmkitError(f"init_from={path} holds LoRA adapters alone, which trainer=fsdp and QLoRA do not read "
                             "tensor by tensor: export their merge first (lmkit export model=... out=DIR) and start "
                             "from DIR")
        model = Pretrained(record, tokenizer)
    if model.record.compressed:
        raise LmkitError(f"init_from={path} is a compressed model; fine-tune from the checkpoint it was exported from")
    if not model.has_tokenizer:
        raise LmkitError(f"init_from={path} has no tokenizer to train with: import it with its vocab.json and "
                         "merges.txt (or tokenizer.json) beside the checkpoint")
    return model


def _end_of_text_tokens(tokenizer: Tokenizer) -> dict[str, Any] | None:
    """A model trained from scratch ends a text where its corpus ended each document: at END_OF_TEXT, when the
    tokenizer has it (lmkit.data.tokenizer), so generation and `lmkit serve` stop there."""
    eot = tokenizer.end_of_text_id
    return None if eot is None else {"eos_token_ids": [eot]}


def _is_sharded(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer config names lmkit's sharded strategy (trainer=fsdp), read before anything is built: its
    model is built on the meta device."""
    from hydra.utils import get_class

    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_") if isinstance(strategy, DictConfig) else None
    try:
        return bool(target) and issubclass(get_class(target), ShardedStrategy)
    except Exception:  # (a target that does not import fails with its own line when the trainer is built)
        return False


def run(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and evaluate as `cfg` says. Returns `(metrics, objects)`; writes metrics.json on rank zero."""
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    quiet_console()  # each message once, no adverts (Hydra has configured logging by now)
    check_launch(cfg.trainer)  # before any tokenization: a bad launch setting fails at once
    check_writable(output_dir)  # and so does an unwritable run folder
    compression = _container(cfg.get("compression")) or {}
    plugins = recipe(compression)  # an unknown plugin or a bad setting fails now, not after training
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: same accuracy class as bf16 training

    model_cfg, tokenizer_spec = _container(cfg.model), _container(cfg.tokenizer)
    compile_model = bool(model_cfg.pop("compile", False))
    checkpoint_every = model_cfg.pop("activation_checkpointing", 0)  # (like compile: how to train, not the model)
    sharded = _is_sharded(cfg.trainer)  # then no rank builds the whole model: it is built on the meta device
    finetune = _container(cfg.get("finetune")) or {"kind": "full"}
    lora = lora_settings(finetune, init_from=cfg.get("init_from"))
    # QLoRA's base is quantized part by part as it is read (lmkit.lora.quantized_base): built on the meta device too
    by_tensor = sharded or (lora is not None and lora.base is not None)
    init = _init_from(cfg.get("init_from"), whole=not by_tensor)
    if init is not None:  # fine-tuning: the pretrained model brings its shape and its tokenizer
        model_cfg = init.record.model_settings
        tokenizer_spec = {"kind": "json", "json": init.tokenizer.to_json()}
    data_cfg = _container(cfg.data)
    preference = objective_settings(finetune, data_cfg)  # finetune.objective=dpo: DPO on data=preference pairs
    if preference is not None:
        check_reference(preference, lora=lora, sharded=sharded, init_from=cfg.get("init_from"))
    # (lmkit.data.chat_datamodule, lmkit.data.preference: they render with the model's chat template)
    chat = data_cfg.get("source") in ("chat", "preference")
    datamodule = build(data_cfg, tokenizer=tokenizer_spec, cache_dir=cfg.paths.cache_dir, seed=cfg.seed,
                       _convert_="all", **({"model_tokens": init.record.tokens if init else {}} if chat else {}))
    tokenizer = datamodule.tokenizer
    # A pretrained model's embedding may have rows its tokenizer never uses (Qwen2.5: 151,936 for 151,665 tokens)
    vocab_size = init.record.backbone.vocab_size if init is not None else tokenizer.vocab_size
    rng = torch.get_rng_state()
    try:
        parameters = ModelRecord.from_settings(model_cfg, vocab_size).backbone.num_parameters()
        check_memory(parameters, cfg.trainer, sharded=sharded, frozen=lora is not None)  # before anything is built
        objective = PreferenceModel if preference is not None else LitLanguageModel
        module = objective(model=model_cfg, optim=_container(cfg.optim), vocab_size=vocab_size,
                           data=data_cfg, compile=compile_model, activation_checkpointing=checkpoint_every,
                           tokens=datamodule.tokens if chat else
                           init.record.tokens if init else _end_of_text_tokens(tokenizer),
                           finetune=finetune, meta_init=by_tensor)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise LmkitError(f"model: {e}") from None
    module.tokenizer = tokenizer
    if preference is not None:
        module.init_from = cfg.get("init_from")  # (a live reference for finetune=full is loaded from there)
    for plugin in plugins:  # a recipe this model cannot take fails now, not after training
        plugin.check_model(InferenceModel(module.backbone, tokenizer, module.record))
    base_fingerprint = pretrained = None
    if init is not None and sharded:  # read into the shards when the trainer configures the model
        from lmkit.parallel.materialize import read_pretrained

        module.pretrained = read_pretrained(cfg.init_from, module.backbone)
        if lora is not None:
            base_fingerprint = fingerprint_of(module.pretrained.items(sorted(module.backbone.state_dict())))
        log.info("Initialising from %s, shard by shard", cfg.init_from)
    elif init is not None and by_tensor:  # QLoRA: `attach` quantizes each part of the base as it reads it
        from lmkit.parallel.materialize import read_pretrained

        pretrained = read_pretrained(cfg.init_from, module.backbone)
        base_fingerprint = fingerprint_of(pretrained.items(sorted(module.backbone.state_dict())))
        log.info("Initialising from %s, quantized part by part as it is read", cfg.init_from)
    elif init is not None:
        module.backbone.load_state_dict(init.backbone.state_dict())  # same config, so the same shapes
        # The random weights just drawn are replaced: the run's random stream goes on as if they had never been
        # drawn, as under trainer=fsdp, which never draws them (the same LoRA adapters and dropout either way).
        torch.set_rng_state(rng)
        log.info("Initialised from %s", cfg.init_from)
    del init  # its weights are copied: a second model held for the whole run is memory a fine-tune needs
    if lora is not None:
        if sharded and lora.base is not None:
            raise LmkitError(f"finetune.base={lora.base} (QLoRA) under trainer=fsdp: a quantized base's packed weights "
                             "are not tensors FSDP2 can shard; use finetune.base=null (LoRA on the float base, "
                             "sharded) or trainer=ddp")
        if sharded and lora.trainable_tokens:
            raise LmkitError("finetune.trainable_tokens under trainer=fsdp: named rows are not sharded yet; use "
                             "finetune.train_embeddings=true (every row, sharded with the embedding) or trainer=ddp")
        attach(module, lora, base=cfg.init_from, base_fingerprint=base_fingerprint, pretrained=pretrained)
    context = module.backbone.max_seq_len
    if context is not None and datamodule.seq_len > context:
        raise LmkitError(f"data.seq_len={datamodule.seq_len} exceeds the model's context model.max_seq_len={context}")

    callbacks = _instantiate_group(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar") is False:  # the flag wins over the bar in the callbacks group
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    during_training = {plugin.name: plugin.callbacks(module) for plugin in plugins}
    during_training = {name: hooks for name, hooks in during_training.items() if hooks}
    if lora is not None and during_training:  # (they would prune the frozen base, under the adapters)
        name = next(iter(during_training))
        raise LmkitError(f"compression.{name} works during training, which finetune=lora does not support: set "
                         f"compression.{name}.during_training=false (it then compresses the merged model)")
    callbacks += [callback for hooks in during_training.values() for callback in hooks]
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if isinstance(trainer.strategy, FSDPStrategy):
        raise LmkitError("trainer.strategy=fsdp is Lightning's FSDP1, which lmkit does not run: use trainer=fsdp "
                         "(FSDP2 through ModelParallelStrategy)")
    if sharded != isinstance(trainer.strategy, ShardedStrategy):  # (a strategy given otherwise than by _target_)
        raise LmkitError(f"trainer.strategy={type(trainer.strategy).__name__}: name lmkit's sharded strategy as "
                         "trainer=fsdp does (_target_: lmkit.parallel.strategy.ShardedStrategy)")
    if sharded:  # what cannot be split is refused here, once, before any process starts
        trainer.strategy.check(module.record.backbone, trainer.num_devices * trainer.num_nodes)
        if lora is not None and trainer.strategy.tensor_parallel_size > 1:
            raise LmkitError(f"finetune=lora with trainer.strategy.tensor_parallel_size="
                             f"{trainer.strategy.tensor_parallel_size}: adapters are not split over tensor-parallel "
                             "ranks yet; use tensor_parallel_size=1 (FSDP alone shards base and adapters)")
        if during_training:  # (their masks are computed over whole tensors, which no rank holds)
            name = next(iter(during_training))
            raise LmkitError(f"compression.{name} works during training, which trainer=fsdp does not support: "
                             f"set compression.{name}.during_training=false (after training), or use trainer=ddp")

    replicas = trainer.num_devices * trainer.num_nodes // (trainer.strategy.tensor_parallel_size if sharded else 1)
    for split in ("val", "test"):  # (an evaluation shards its windows over the data-parallel ranks)
        windows = getattr(datamodule, f"{split}_windows", None)
        if windows and windows < replicas:
            raise LmkitError(f"data.{split}_windows={windows} is fewer than the {replicas} data-parallel ranks, each of "
                             f"which evaluates its own windows: set data.{split}_windows={replicas} or more")

    ckpt_path = resume_checkpoint(cfg.get("resume"), output_dir)
    if ckpt_path is not None:
        if is_sharded_checkpoint(ckpt_path) and not sharded:
            raise LmkitError(f"resume={ckpt_path} is a sharded checkpoint folder: resume it with trainer=fsdp, or "
                             f"start from its weights with init_from={ckpt_path}")
        saved = read_checkpoint(ckpt_path, weights=False)
        check_compatible(ckpt_path, saved, module.record, tokenizer.to_json())
        check_same_base(ckpt_path, saved, module.lora_base)
        log.info("Resuming from %s", ckpt_path)
    use_atomic_checkpoints(trainer)  # a full disk: one line, and the previous checkpoint stays whole
    interrupt = next((c for c in callbacks if isinstance(c, CheckpointOnInterrupt)), None)

    # SIGTERM and Ctrl-C: every rank stops after the same step, saves last.ckpt, exits 143 or 130
    with (ddp_children_run_this_job(), known_warnings(output_dir, resuming=ckpt_path is not None),
          interrupt.interrupts(trainer) if interrupt else nullcontext()):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        train_loss = _float(trainer.callback_metrics.get("train_loss"))
        # (an empty list when trainer.limit_val_batches / limit_test_batches is 0)
        val = (trainer.validate(module, datamodule=datamodule, verbose=False) or [{}])[0]
        test = (trainer.test(module, datamodule=datamodule, verbose=False) or [{}])[0]
        sampler = next((c for c in callbacks if isinstance(c, TextSampler)), None)
        to_sample = sampler is not None and module.tokenizer is not None and sampler.step != trainer.global_step
        backbone = module.backbone
        if sharded and (plugins or to_sample):  # (while the ranks are still connected)
            backbone = gather(module.backbone, lora=lora)  # every rank sends its shards; rank zero gets the whole model

    throughput = next((c for c in callbacks if isinstance(c, Throughput)), None)
    checkpoint = trainer.checkpoint_callback
    metrics = {
        "train_loss": train_loss,
        "val_loss": val.get("val_loss"), "val_ppl": val.get("val_ppl"),
        "test_loss": test.get("test_loss"), "test_ppl": test.get("test_ppl"),
        "tokens_per_s": throughput.tokens_per_s if throughput else None,
        "world_size": trainer.world_size,
        "best_ckpt": _abspath(checkpoint.best_model_path if checkpoint else None),
        "last_ckpt": _abspath(checkpoint.last_model_path if checkpoint else None),
        "steps": trainer.global_step,
        "wall_s": round(time.perf_counter() - started, 2),
        **getattr(datamodule, "stats", {}),  # data=chat: the masked fraction, how full the rows are
        # every other evaluation metric (finetune.objective=dpo: val_reward_margin, val_preference_accuracy, ...)
        **{k: _float(v) for k, v in {**val, **test}.items() if not k.endswith(("_loss", "_ppl"))},
    }
    if trainer.is_global_zero:  # written before compressing, and again with the export's figures after
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if plugins and trainer.is_global_zero:
        metrics.update(_compress(module, backbone, compression, output_dir, cfg))
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if trainer.is_global_zero:
        if sampler is not None and sampler.step == trainer.global_step:
            log.info("Sample from the final model: the one at step %d above", sampler.step)
        elif to_sample:
            log.info("Sample from the final model:\n%s", sampler.sample(backbone, module.tokenizer))
        log.info("Metrics: %s", json.dumps(metrics))
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def _compress(module: LitLanguageModel, backbone: torch.nn.Module, compression: dict[str, Any], output_dir: Path,
              cfg: DictConfig) -> dict[str, Any]:
    """Compress the trained `backbone` as `compression` says and export it to `output_dir/model`."""
    from lmkit.compress import compress_and_export, training_context

    record = module.record.replace(source={"run": str(output_dir.resolve()), "step": module.trainer.global_step})
    model = merged(InferenceModel(backbone, module.tokenizer, record))  # (a LoRA run: compressed as its merge)
    out = output_dir / "model"
    # Lightning has moved the model to the CPU after fit: it is measured there (the report's CPU
    # figures), while recovery fine-tunes go back to the device the run trained on.
    context = training_context(cache_dir=cfg.paths.cache_dir, seed=cfg.seed, log=log.info,
                               train_device=str(module.trainer.strategy.root_device))
    _, report = compress_and_export(model, compression, out, context, overwrite=True)
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
    with exit_on_user_error():
        try:
            metrics, _ = run(cfg)
        except SIGTERMException:  # Lightning's is a SystemExit with code 0: a terminated run says so (128 + 15)
            raise SystemExit(143) from None
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
