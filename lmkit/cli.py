"""The `lmkit` command: `lmkit <command> key=value ...`, Hydra-style like `python train.py`.

    lmkit train     [overrides]                       same as python train.py
    lmkit export    model=PATH out=DIR [format=lmkit|hf] [dtype=fp32|bf16|fp16] [overwrite=true]
                    [compression=[prune,int8] compression.prune.amount=0.7 eval_windows=N gen_tokens=100
                    paths.cache_dir=DIR]
    lmkit generate  model=PATH prompt="ROMEO:" [max_new_tokens=200 temperature=0.8 top_k=50 top_p=0.95
                    num_samples=1 seed=1 stream=true]
    lmkit eval      model=PATH [data=text data.path=...]
    lmkit import-hf src=HF_DIR out=DIR
    lmkit plugins                                     the installed compression plugins
    lmkit report    DIR [DIR ...] [out=pareto.png]    compare compressed exports of one model
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lmkit.errors import LmkitError, exit_on_user_error

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ExportArgs:
    model: str  # a checkpoint or an lmkit model directory
    out: str  # the folder to write
    format: str = "lmkit"  # lmkit | hf
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (format=lmkit)
    overwrite: bool = False
    eval_windows: Optional[int] = None  # with compression: test windows per perplexity (default: the data config's)
    gen_tokens: int = 100  # with compression: tokens generated to time generation (0: skip)
    seed: int = 1337  # with compression: seeds the recovery fine-tunes


@dataclass
class GenerateArgs:
    model: str
    prompt: str = "\n"  # the text to continue; @file.txt reads it from a file
    max_new_tokens: int = 200  # past a Transformer's context the window slides (the latest 3/4 is kept)
    temperature: float = 0.8  # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    num_samples: int = 1
    seed: Optional[int] = None
    stream: bool = False  # print text as it is produced (first sample)
    unknown: str = "error"  # prompt characters a char tokenizer lacks: error | skip
    device: Optional[str] = None
    dtype: Optional[str] = None


@dataclass
class EvalArgs:
    model: str
    batch_size: int = 32
    max_windows: Optional[int] = None  # at most this many windows (default: the data config's val/test_windows)
    split: str = "test"  # test | val | train
    device: Optional[str] = None


@dataclass
class ImportArgs:
    src: str  # a directory written by transformers' save_pretrained
    out: str
    overwrite: bool = False


def parse(schema: type, args: list[str], command: str) -> Any:
    """key=value arguments checked against a dataclass: unknown keys and bad types are one-line errors.

    Text fields take the value verbatim (`prompt=ROMEO:` must stay text, not become YAML).
    """
    from dataclasses import fields

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    text_fields = {f.name for f in fields(schema) if f.type in ("str", "Optional[str]")}
    pairs = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise LmkitError(f"lmkit {command}: arguments are key=value, got {arg!r}")
        pairs.append((key, value))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema),
                              OmegaConf.from_dotlist([f"{k}={v}" for k, v in pairs if k not in text_fields]))
        for key, value in pairs:
            if key in text_fields:
                cfg[key] = value
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise LmkitError(f"lmkit {command}: {str(e).splitlines()[0]}") from None


def _export(args: list[str]) -> None:
    from lmkit.export import load, save
    from lmkit.hf import export_hf

    group_args = [x for x in args if x.lstrip("+~").split("=")[0].split(".")[0] in ("compression", "paths")]
    a = parse(ExportArgs, [x for x in args if x not in group_args], "export")
    if a.format not in ("lmkit", "hf"):
        raise LmkitError(f"format={a.format!r} is not one of lmkit, hf")
    cfg = _compose(group_args) if group_args else {}
    model = load(a.model)
    if cfg.get("compression"):
        from lmkit.compress import compress_and_export
        from lmkit.plugins import CompressContext

        if a.format != "lmkit" or a.dtype != "fp32":
            raise LmkitError("compression writes format=lmkit with the dtypes its plugins choose (drop format/dtype)")
        context = CompressContext(cache_dir=cfg["paths"]["cache_dir"], seed=a.seed)
        _, report = compress_and_export(model, cfg["compression"], a.out, context, a.overwrite,
                                        eval_windows=a.eval_windows, gen_tokens=a.gen_tokens)
        print(report_summary(report))
        out = a.out
    elif a.format == "lmkit":
        out = save(model, a.out, dtype=a.dtype, overwrite=a.overwrite)
    else:
        out = export_hf(model, a.out, overwrite=a.overwrite)
    print(f"wrote {out}")


def report_summary(report: dict[str, Any]) -> str:
    from lmkit.compress import rows, table

    return table(rows(report), report["before"]).rstrip()


def _generate(args: list[str]) -> None:
    import lmkit

    a = parse(GenerateArgs, args, "generate")
    prompt = a.prompt
    if prompt.startswith("@"):
        path = Path(prompt[1:])
        if not path.is_file():
            raise LmkitError(f"prompt={prompt}: no such file {path}")
        prompt = path.read_text(encoding="utf-8")
    model = lmkit.load(a.model, device=a.device, dtype=a.dtype)
    prompt = model.clean_prompt(prompt, a.unknown)
    on_text = (lambda text: print(text, end="", flush=True)) if a.stream else None
    if on_text:
        print(prompt, end="", flush=True)
    samples = model.generate(prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.num_samples, a.seed,
                             on_text=on_text)
    samples = [samples] if isinstance(samples, str) else samples
    for i, text in enumerate(samples):
        if a.stream and i == 0:
            print()
            continue
        if len(samples) > 1:
            print(f"--- sample {i + 1}")
        print(text)


def _eval(args: list[str]) -> None:
    import lmkit
    from lmkit.evaluate import evaluate, own_datamodule

    data_args = [x for x in args if x.split("=")[0].split(".")[0] == "data"]
    a = parse(EvalArgs, [x for x in args if x not in data_args], "eval")
    if a.split not in ("train", "val", "test"):
        raise LmkitError(f"split={a.split!r} is not one of train, val, test")
    model = lmkit.load(a.model, device=a.device)
    cfg = _compose(data_args)
    datamodule = own_datamodule(model, cfg["paths"]["cache_dir"], cfg["data"] if data_args else None)
    datamodule.prepare_data()
    windows = a.max_windows or getattr(datamodule, f"{a.split}_windows", None)  # as the training run read it
    result = evaluate(model, datamodule.cache.split(a.split), datamodule.seq_len, a.batch_size, windows)
    print(json.dumps({"split": a.split, **result}, indent=2))


def _compose(overrides: list[str]) -> dict[str, Any]:
    """The `data`, `compression` and `paths` groups as train.py would compose them with these overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, "paths.output_dir=unused"])
        return {key: OmegaConf.to_container(cfg[key], resolve=True, throw_on_missing=True) if cfg.get(key) else None
                for key in ("data", "compression", "paths")}
    except (HydraException, OmegaConfBaseException) as e:
        message = str(e).splitlines()[0]
        missing = re.search(r"Could not find 'compression/([^']+)'", message)
        if missing:
            from lmkit.plugins import installed

            if missing[1] in installed():  # a plugin installed without a file in conf/compression/
                raise LmkitError(f"compression={missing[1]}: the plugin has no conf/compression/{missing[1]}.yaml; "
                                 f"select it with +compression.{missing[1]}={{}} (or +compression.{missing[1]}.KEY=...)")
            raise LmkitError(f"unknown compression plugin {missing[1]!r}; installed: {', '.join(sorted(installed()))}")
        raise LmkitError(f"lmkit: {message}") from None


def _plugins(args: list[str]) -> None:
    from lmkit.plugins import installed, plugin_class

    if args:
        raise LmkitError(f"lmkit plugins takes no arguments, got {' '.join(args)}")
    for name, entry_point in sorted(installed().items()):
        try:
            summary = plugin_class(name).summary
        except Exception as e:  # a broken third-party plugin must not hide the others
            summary = f"(cannot load {entry_point.value}: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
        print(f"{name:<18} {summary}")


def _report(args: list[str]) -> None:
    from lmkit.compress import gather, pareto, plot, table
    from lmkit.files import atomic_write_bytes

    dirs = [x for x in args if "=" not in x]
    options = dict(x.split("=", 1) for x in args if "=" in x)
    if not dirs or set(options) - {"out"}:
        raise LmkitError("usage: lmkit report DIR [DIR ...] [out=pareto.png]")
    points, base = gather(dirs)
    print(table(points, base), end="")
    print("Pareto front (smallest first): " + ", ".join(label for label, _ in pareto(points)))
    if "out" in options:
        if Path(options["out"]).is_dir():
            raise LmkitError(f"out={options['out']} is a folder: name the PNG file to write")
        atomic_write_bytes(Path(options["out"]), plot(points, "size vs perplexity", frontier=True))
        print(f"wrote {options['out']}")


def _import_hf(args: list[str]) -> None:
    from lmkit.export import save
    from lmkit.hf import import_hf

    a = parse(ImportArgs, args, "import-hf")
    model = import_hf(a.src)
    out = save(model, a.out, overwrite=a.overwrite)
    note = "" if model.has_tokenizer else " (no tokenizer found beside it: the model takes token ids only)"
    print(f"wrote {out}{note}")


def _train(args: list[str]) -> None:
    if not CONF_DIR.is_dir():
        raise LmkitError(f"lmkit train needs the configs in {CONF_DIR} (install lmkit from a source checkout)")
    import hydra
    from omegaconf import DictConfig

    from lmkit.train import run

    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def train(cfg: DictConfig) -> float | None:
        with exit_on_user_error():
            metrics, _ = run(cfg)
        return metrics.get(cfg.get("optimized_metric") or "val_loss")

    # Lightning re-launches DDP ranks as `python sys.argv[0] ...`: make that train.py itself.
    sys.argv = [str(CONF_DIR.parent / "train.py"), *args]
    train()


COMMANDS = {"train": _train, "export": _export, "generate": _generate, "eval": _eval, "import-hf": _import_hf,
            "plugins": _plugins, "report": _report}


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__.split("\n", 2)[2], end="")
        return
    with exit_on_user_error():
        command = COMMANDS.get(args[0])
        if command is None:
            raise LmkitError(f"unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}")
        command(args[1:])
