"""The `lmkit` command: `lmkit <command> key=value ...`, Hydra-style like `python train.py`.

Each command's keys and defaults are in conf/<command>.yaml (train: conf/train.yaml).

    lmkit train     [overrides]                       same as python train.py
    lmkit export    model=PATH out=DIR [format=lmkit|hf|gguf|onnx|peft] [dtype=fp32|bf16|fp16] [overwrite=true]
                    [gguf.type=f32|f16|q8_0|q4_0]
                    [compression=[prune,int8] compression.prune.amount=0.7 eval_windows=N gen_tokens=100
                    paths.cache_dir=DIR]
    lmkit generate  model=PATH prompt="ROMEO:" [max_new_tokens=200 temperature=0.8 top_k=50 top_p=0.95
                    num_samples=1 seed=1 stream=true]
    lmkit eval      model=PATH [data=text data.path=...]
    lmkit import-hf src=HF_DIR out=DIR
    lmkit serve     model=PATH [host=127.0.0.1 port=8000 runtime=torch max_batch_size=32 workers=1 api_key=...]
                                                      an OpenAI-compatible HTTP server (needs lmkit[serve])
    lmkit plugins                                     the installed compression plugins
    lmkit --version                                   lmkit's version; lmkit <command> --help: its keys
    lmkit report    DIR [DIR ...] [out=pareto.png]    compare compressed exports of one model
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from lmkit.conf import CONF_DIR, check_conf_dir, compose, load_flat
from lmkit.errors import LmkitError, exit_on_user_error, first_line


# The commands' option types (serve's: lmkit.serve.settings.ServeSettings). Their defaults are in
# conf/<command>.yaml, and only there.
@dataclass
class ExportArgs:
    model: str
    out: str
    format: str
    dtype: str
    overwrite: bool
    eval_windows: Optional[int]
    gen_tokens: int
    seed: int


@dataclass
class GenerateArgs:
    model: str
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    num_samples: int
    seed: Optional[int]
    stream: bool
    unknown: str
    device: Optional[str]
    dtype: Optional[str]


@dataclass
class EvalArgs:
    model: str
    split: str
    batch_size: int
    max_windows: Optional[int]
    device: Optional[str]


@dataclass
class ImportArgs:
    src: str
    out: str
    overwrite: bool


def parse(schema: type, command: str, args: list[str], groups: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """key=value arguments over `conf/<command>.yaml` (`import-hf`: import_hf.yaml), checked against `schema`'s types.

    Unknown keys and bad types are one-line errors. Text fields take the value verbatim
    (`prompt=ROMEO:` must stay text, not become YAML), except that an optional one (`Optional[str]`:
    device, api_key, name, ...) is unset by `null` (any case, as in Hydra's overrides). Returns the typed
    options and the composed config (whose `groups`, e.g. paths, data or compression, hold the rest)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_name = command.replace("-", "_")
    optional = ("Optional[str]", "str | None")
    text = {f.name: f.type in optional for f in fields(schema) if f.type == "str" or f.type in optional}
    verbatim, overrides = {}, []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise LmkitError(f"lmkit {command}: arguments are key=value, got {arg!r}")
        if key in text:
            verbatim[key] = None if text[key] and value.lower() == "null" else value
        else:
            overrides.append(arg)
    if groups:
        cfg = compose(config_name, [*overrides, "paths.output_dir=unused"] if "paths" in groups else overrides)
    else:
        cfg = load_flat(config_name, overrides)
    try:
        for key, value in verbatim.items():
            cfg[key] = value
        options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema),
                                                      {f.name: cfg[f.name] for f in fields(schema)}))
    except OmegaConfBaseException as e:
        raise LmkitError(f"lmkit {command}: {first_line(e, limit=None)}") from None
    return options, cfg


def _groups(cfg: Any, *names: str) -> dict[str, Any]:
    """The named config groups as plain values (None where not selected)."""
    from omegaconf import OmegaConf

    return {name: OmegaConf.to_container(cfg[name], resolve=True, throw_on_missing=True) if cfg.get(name) else None
            for name in names}


def _export(args: list[str]) -> None:
    from lmkit.deploy.onnx_runtime import OnnxBackbone
    from lmkit.export import load, save
    from lmkit.hf import export_hf
    from lmkit.lora import merged

    a, cfg = parse(ExportArgs, "export", args, groups=("paths", "compression"))
    if a.format not in ("lmkit", "hf", "gguf", "onnx", "peft"):
        raise LmkitError(f"format={a.format!r} is not one of lmkit, hf, gguf, onnx, peft")
    groups = _groups(cfg, "paths", "compression")
    model = load(a.model)
    if isinstance(model.backbone, OnnxBackbone):
        raise LmkitError(f"model={a.model} is an ONNX export: export from the lmkit model or checkpoint it came from")
    if a.format == "peft":  # the adapters alone, so before the merge
        print(f"wrote {_export_peft(model, a, groups['compression'])}")
        return
    model = merged(model)  # a LoRA checkpoint exports as the dense model it computes
    if a.format == "onnx":
        out = _export_onnx(model, groups["compression"] or {}, a, groups["paths"]["cache_dir"])
    elif groups["compression"]:
        from lmkit.compress import compress_and_export, training_context

        if a.format != "lmkit" or a.dtype != "fp32":
            raise LmkitError("compression writes format=lmkit with the dtypes its plugins choose (drop format/dtype)")
        context = training_context(cache_dir=groups["paths"]["cache_dir"], seed=a.seed)
        _, report = compress_and_export(model, groups["compression"], a.out, context, overwrite=a.overwrite,
                                        eval_windows=a.eval_windows, gen_tokens=a.gen_tokens)
        print(report_summary(report))
        out = a.out
    elif a.format == "lmkit":
        out = save(model, a.out, dtype=a.dtype, overwrite=a.overwrite)
    elif a.format == "gguf":
        from lmkit.deploy.gguf import export_gguf

        exported = export_gguf(model, a.out, type=str(cfg.gguf.type), overwrite=a.overwrite)
        for line in exported.warnings:
            print(f"warning: {line}", file=sys.stderr)
        out = exported.path
    else:
        out = export_hf(model, a.out, overwrite=a.overwrite)
    print(f"wrote {out}")


def _export_peft(model: Any, a: ExportArgs, compression: Any) -> Path:
    from lmkit.lora import is_adapted
    from lmkit.hf import export_peft, hf_source_of_base

    if compression or a.dtype != "fp32":
        raise LmkitError("format=peft writes the adapters in float32 as trained (drop compression/dtype)")
    base = hf_source_of_base(a.model) if is_adapted(model.backbone) else None  # (only checkpoints hold adapters)
    return export_peft(model, a.out, base_model=base, overwrite=a.overwrite)


def _export_onnx(model: Any, spec: dict[str, Any], a: ExportArgs, cache_dir: str) -> str:
    """Steps that do not quantize (prune, prune_structured) run in torch as for lmkit artifacts; a quantizing
    last step is onnxruntime's quantizer on the exported graph, or, on a runtime grid (quant_type=sym|asym),
    lmkit's own in torch, exported as it is."""
    from lmkit.deploy.onnx import export_onnx, split_recipe
    from lmkit.files import check_free

    if a.dtype != "fp32":
        raise LmkitError(f"dtype={a.dtype}: format=onnx exports float32 (quantize with compression=int8 or int4)")
    in_torch, quantization = split_recipe(model, spec)
    check_free(Path(a.out), a.overwrite)  # before minutes of fine-tuning, not after
    files = {}
    if in_torch:
        from lmkit.compress import compress, training_context

        context = training_context(cache_dir=cache_dir, seed=a.seed)
        model, report = compress(model, in_torch, context, eval_windows=a.eval_windows, gen_tokens=a.gen_tokens)
        print(report_summary(report))
        files["report.json"] = (json.dumps(report, indent=2) + "\n").encode()
    return export_onnx(model, a.out, quantization=quantization, overwrite=a.overwrite, files=files)


def report_summary(report: dict[str, Any]) -> str:
    from lmkit.compress import rows, table

    return table(rows(report), report["before"]).rstrip()


def _generate(args: list[str]) -> None:
    import lmkit

    a, _ = parse(GenerateArgs, "generate", args)
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
    samples = model.generate(prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                             top_p=a.top_p, num_samples=a.num_samples, seed=a.seed, on_text=on_text)
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

    a, cfg = parse(EvalArgs, "eval", args, groups=("paths", "data"))
    if a.split not in ("train", "val", "test"):
        raise LmkitError(f"split={a.split!r} is not one of train, val, test")
    groups = _groups(cfg, "paths", "data")
    model = lmkit.load(a.model, device=a.device)
    datamodule = own_datamodule(model, groups["paths"]["cache_dir"], groups["data"])
    datamodule.prepare_data()
    windows = a.max_windows or getattr(datamodule, f"{a.split}_windows", None)  # as the training run read it
    result = evaluate(model, datamodule.cache.split(a.split), seq_len=datamodule.seq_len, batch_size=a.batch_size,
                      max_windows=windows)
    print(json.dumps({"split": a.split, **result}, indent=2))


def _plugins(args: list[str]) -> None:
    from lmkit.plugins import installed, plugin_class

    if args:
        raise LmkitError(f"lmkit plugins takes no arguments, got {' '.join(args)}")
    for name, entry_point in sorted(installed().items()):
        try:
            summary = plugin_class(name).summary
        except Exception as e:  # a broken third-party plugin must not hide the others
            summary = f"(cannot load {entry_point.value}: {first_line(e, limit=None)})"
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

    a, _ = parse(ImportArgs, "import-hf", args)
    model = import_hf(a.src)
    out = save(model, a.out, overwrite=a.overwrite)
    note = "" if model.has_tokenizer else " (no tokenizer found beside it: the model takes token ids only)"
    if not model.has_tokenizer and (Path(a.src) / "tokenizer.model").is_file():
        note = (" (its tokenizer.model is SentencePiece, which lmkit does not read: write tokenizer.json with "
                "transformers' AutoTokenizer.from_pretrained(src).save_pretrained(src) and import again; until "
                "then the model takes token ids only)")
    print(f"wrote {out}{note}")


def _serve(args: list[str]) -> None:
    from lmkit.serve import serve
    from lmkit.serve.settings import ServeSettings  # the server's own record: its keys are written once

    settings, _ = parse(ServeSettings, "serve", args)
    serve(settings)


def _train(args: list[str]) -> None:
    check_conf_dir()
    from lmkit.train import main

    # The same @hydra.main as train.py. Lightning re-launches DDP ranks as `python -m <__main__'s module> ...`
    # when __main__ has a module spec (else as `python sys.argv[0] ...`, here the `lmkit` script, which would
    # take the first override for a command): make that `python -m lmkit.train`, in a checkout and a wheel alike.
    sys.modules["__main__"].__spec__ = importlib.util.find_spec("lmkit.train")
    sys.argv = ["lmkit train", *args]
    main()


COMMANDS = {"train": _train, "export": _export, "generate": _generate, "eval": _eval, "import-hf": _import_hf,
            "plugins": _plugins, "report": _report, "serve": _serve}


def command_help(command: str) -> str:
    """What `lmkit <command> --help` prints: its usage line, then its keys with their defaults and comments,
    which is its conf/<command>.yaml as written (one place for both)."""
    lines = __doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"lmkit {command} "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" " * 8)), len(lines))
    usage = textwrap.dedent("\n".join(lines[start:end]))  # its line, and the lines that continue it
    conf = CONF_DIR / f"{command.replace('-', '_')}.yaml"
    if not conf.is_file():
        return usage + "\n"
    return f"{usage}\n\nKeys, their defaults and what they do ({conf.name}; set any with key=value):\n\n" + \
        conf.read_text(encoding="utf-8")


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__.split("\n", 2)[2], end="")
        return
    if args[0] in ("--version", "-V"):
        from lmkit.version import __version__

        print(f"lmkit {__version__}")
        return
    with exit_on_user_error():
        command = COMMANDS.get(args[0])
        if command is None:
            raise LmkitError(f"unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}")
        if args[0] != "train" and any(a in ("-h", "--help") for a in args[1:]):  # train's is Hydra's own
            print(command_help(args[0]), end="")
            return
        command(args[1:])
