"""`check_run(cfg)`: every refusal that a training config decides, before any data, model or trainer is built.

A mistake in the config is one line within a second, not a traceback after minutes of tokenizing and building. What
this reads is the config itself and, for `init_from`, the pretrained model's description without its weights
(lmkit.parallel.materialize.describe_pretrained); the one thing it changes on disk is a sharded checkpoint that a
killed save left aside, put back for `resume` (lmkit.sharded_checkpoint.recover_interrupted_save). Checks that need what the run builds stay with what they check:
the memory estimate needs the tokenizer's vocabulary, a plugin's `check_model` the built model, and `resume`'s
compatibility the checkpoint against that model (lmkit.train).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lmkit.backbones import BackboneConfig
from lmkit.distributed import check_launch
from lmkit.errors import LmkitError
from lmkit.files import check_writable
from lmkit.lora import LoRASettings, lora_settings
from lmkit.memory_check import processes_per_node
from lmkit.parallel.strategy import ShardedStrategy, check_split, checked_tensor_parallel_size
from lmkit.plugins import Plugin, recipe
from lmkit.preference import DPOSettings, check_reference, objective_settings
from lmkit.record import ModelRecord
from lmkit.sharded_checkpoint import is_sharded_checkpoint, recover_interrupted_save

log = logging.getLogger("lmkit")


@dataclass
class RunPlan:
    """What a checked config says the run is: each setting read once, in the form the builders take."""

    output_dir: Path
    model: dict[str, Any]  # the backbone's settings (init_from's, when fine-tuning)
    tokenizer: dict[str, Any]
    data: dict[str, Any]
    optim: dict[str, Any]
    finetune: dict[str, Any]
    compression: dict[str, Any]
    plugins: list[Plugin]
    compile: bool  # (like activation_checkpointing: how to train, not the model)
    activation_checkpointing: int
    sharded: bool  # trainer=fsdp: no rank builds the whole model; it is built on the meta device
    lora: LoRASettings | None
    preference: DPOSettings | None
    init_from: str | None
    init: ModelRecord | None  # init_from's record, read without its weights
    resume: Path | None  # the checkpoint to continue (resume=true's last.ckpt, or resume=PATH)

    @property
    def by_tensor(self) -> bool:
        """Whether the pretrained weights are read tensor by tensor into a meta-device model: into FSDP's shards,
        or quantized part by part (QLoRA's base, lmkit.lora.quantized_base)."""
        return self.sharded or (self.lora is not None and self.lora.base is not None)

    @property
    def chat(self) -> bool:
        """Whether the data is rendered with the model's chat template (lmkit.data.chat_datamodule, .preference)."""
        return self.data.get("source") in ("chat", "preference")


def container(node: Any) -> Any:
    """A plain dict; a required key left at `???` is a one-line error naming it."""
    if not isinstance(node, DictConfig):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise LmkitError(f"{e.full_key} is required (e.g. {e.full_key}=...)") from None


def check_run(cfg: DictConfig) -> RunPlan:
    """The run `cfg` describes, or the first thing wrong with it as an LmkitError."""
    check_launch(cfg.trainer)  # before any tokenization: a bad launch setting fails at once
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir)  # and so does an unwritable run folder
    compression = container(cfg.get("compression")) or {}
    plugins = recipe(compression)  # an unknown plugin or a bad setting fails now, not after training
    model, tokenizer = container(cfg.model), container(cfg.tokenizer)
    compile_model = bool(model.pop("compile", False))
    checkpoint_every = model.pop("activation_checkpointing", 0)
    finetune = container(cfg.get("finetune")) or {"kind": "full"}
    init_from = cfg.get("init_from")
    lora = lora_settings(finetune, init_from=init_from)
    data = container(cfg.data)
    sharded = _check_strategy(cfg.trainer)
    preference = objective_settings(finetune, data)  # finetune.objective=dpo: DPO on data=preference pairs
    if preference is not None:
        check_reference(preference, lora=lora, sharded=sharded, init_from=init_from)
    init, init_tokenizer = _check_init_from(init_from, adapters_allowed=not (sharded or (lora and lora.base)))
    if init is not None:  # fine-tuning: the pretrained model brings its shape and its tokenizer
        model, tokenizer = init.model_settings, {"kind": "json", "json": init_tokenizer.to_json()}
    plan = RunPlan(output_dir, model, tokenizer, data, container(cfg.optim), finetune, compression, plugins,
                   compile_model, checkpoint_every, sharded, lora, preference, init_from, init,
                   _resume_checkpoint(cfg.get("resume"), output_dir, sharded))
    # (the vocabulary's size is the tokenizer's, known once it is built; no check here depends on it)
    backbone = init.backbone if init is not None else ModelRecord.from_settings(model, vocab_size=1).backbone
    _check_parallel(plan, backbone, cfg.trainer)
    context = getattr(backbone, "max_seq_len", None)  # (a recurrent model has no limit)
    if context is not None and data.get("seq_len", 0) > context:
        raise LmkitError(f"data.seq_len={data['seq_len']} exceeds the model's context model.max_seq_len={context}")
    return plan


def _check_strategy(trainer: DictConfig) -> bool:
    """Whether the trainer names lmkit's sharded strategy (trainer=fsdp); Lightning's FSDP1 refused."""
    from hydra.utils import get_class
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer.get("strategy")
    if isinstance(strategy, str) and strategy.startswith("fsdp"):
        cls: type | None = FSDPStrategy
    else:
        target = strategy.get("_target_") if isinstance(strategy, DictConfig) else None
        try:
            cls = get_class(target) if target else None
        except Exception:  # (a target that does not import fails with its own line when the trainer is built)
            cls = None
    if cls is not None and issubclass(cls, FSDPStrategy):
        raise LmkitError("trainer.strategy=fsdp is Lightning's FSDP1, which lmkit does not run: use trainer=fsdp "
                         "(FSDP2 through ModelParallelStrategy)")
    return cls is not None and issubclass(cls, ShardedStrategy)


def _check_init_from(path: str | None, *, adapters_allowed: bool) -> tuple[ModelRecord | None, Any]:
    """The record and tokenizer of the pretrained model `init_from` names, refused where it cannot start a run."""
    if not path:
        return None, None
    from lmkit.parallel.materialize import describe_pretrained

    record, tokenizer, adapters_only = describe_pretrained(path)
    if adapters_only and not adapters_allowed:
        raise LmkitError(f"init_from={path} holds LoRA adapters alone, which trainer=fsdp and QLoRA do not read "
                         "tensor by tensor: export their merge first (lmkit export model=... out=DIR) and start "
                         "from DIR")
    if record.compressed:
        raise LmkitError(f"init_from={path} is a compressed model; fine-tune from the checkpoint it was exported from")
    if tokenizer is None:
        raise LmkitError(f"init_from={path} has no tokenizer to train with: import it with its vocab.json and "
                         "merges.txt (or tokenizer.json) beside the checkpoint")
    return record, tokenizer


def _check_parallel(plan: RunPlan, backbone: BackboneConfig, trainer: DictConfig) -> None:
    """What the processes the trainer starts cannot split, or cannot do together."""
    processes = processes_per_node(trainer) * int(trainer.get("num_nodes") or 1)
    strategy = trainer.get("strategy")
    tensor_parallel = checked_tensor_parallel_size(strategy.get("tensor_parallel_size", 1)) if plan.sharded else 1
    during_training = next((plugin.name for plugin in plan.plugins if plugin.during_training), None)
    lora = plan.lora
    if lora is not None and during_training:  # (they would prune the frozen base, under the adapters)
        raise LmkitError(f"compression.{during_training} works during training, which finetune=lora does not "
                         f"support: set compression.{during_training}.during_training=false (it then compresses the "
                         "merged model)")
    if plan.sharded:
        if lora is not None and lora.base is not None:
            raise LmkitError(f"finetune.base={lora.base} (QLoRA) under trainer=fsdp: a quantized base's packed weights "
                             "are not tensors FSDP2 can shard; use finetune.base=null (LoRA on the float base, "
                             "sharded) or trainer=ddp")
        if lora is not None and lora.trainable_tokens:
            raise LmkitError("finetune.trainable_tokens under trainer=fsdp: named rows are not sharded yet; use "
                             "finetune.train_embeddings=true (every row, sharded with the embedding) or trainer=ddp")
        check_split(backbone, tensor_parallel, processes)
        if lora is not None and tensor_parallel > 1:
            raise LmkitError(f"finetune=lora with trainer.strategy.tensor_parallel_size={tensor_parallel}: adapters "
                             "are not split over tensor-parallel ranks yet; use tensor_parallel_size=1 (FSDP alone "
                             "shards base and adapters)")
        if during_training:  # (their masks are computed over whole tensors, which no rank holds)
            raise LmkitError(f"compression.{during_training} works during training, which trainer=fsdp does not "
                             f"support: set compression.{during_training}.during_training=false (after training), or "
                             "use trainer=ddp")
    replicas = processes // tensor_parallel
    for split in ("val", "test"):  # (an evaluation shards its windows over the data-parallel ranks)
        windows = plan.data.get(f"{split}_windows")
        if windows and windows < replicas:
            raise LmkitError(f"data.{split}_windows={windows} is fewer than the {replicas} data-parallel ranks, each of "
                             f"which evaluates its own windows: set data.{split}_windows={replicas} or more")


def _resume_checkpoint(resume: bool | str | None, output_dir: Path, sharded: bool) -> Path | None:
    """`resume=true`: this run folder's last.ckpt if there is one; `resume=PATH`: that file (or sharded folder)."""
    if resume in (None, False):
        return None
    if resume is True:
        last = output_dir / "checkpoints" / "last.ckpt"
        recover_interrupted_save(last)  # (a sharded save killed between its renames has put last.ckpt aside)
        if not last.exists():
            log.info("resume=true but %s does not exist yet: starting fresh", last)
            return None
        path = last
    else:
        path = Path(str(resume)).expanduser()
        recover_interrupted_save(path)
    if is_sharded_checkpoint(path) and not sharded:
        raise LmkitError(f"resume={path} is a sharded checkpoint folder: resume it with trainer=fsdp, or start from "
                         f"its weights with init_from={path}")
    return path
