"""The README and docs/*.md as a user reads them: every command they show is one lmkit takes, as written.

Each shell command in a fenced code block (```bash, ```sh, ```console after its `$ ` prompts, and plain ``` blocks'
lines that start with a program), and each inline `python train.py ...` / `lmkit ...` span, is split as a shell
splits it (quotes, backslash continuations, comments, `&&`, environment prefixes such as `CUDA_VISIBLE_DEVICES=0`):

- `python train.py ...`, `lmkit train ...`, `python -m lmkit.train ...`, behind `torchrun ...` or `srun ...` too:
  its overrides compose with Hydra over conf/train.yaml (lmkit.conf.compose); a `-m` sweep once per choice of a
  config group, every other list at its first value; `--config-dir DIR` is the folder the docs draw as a tree.
- `lmkit generate|eval|export|import-hf|serve ...`: its key=value arguments go through the command's own parser
  (lmkit.cli.parse over conf/<command>.yaml), which checks keys and types and runs nothing.
- `lmkit plugins`, `lmkit report`, `python bench/run.py NAME`, `python SCRIPT.py`: their arguments' shape, the
  script's file.
- every argument with `[`, `]`, `*` or `?` outside quotes is refused: a glob, which zsh refuses when no file matches
  (`'compression=[prune,int8]'`, `data.path='notes/*.txt'`).

Files a command names (a corpus, a model folder) need not exist: the keys and the config syntax are what is checked.
Relative links (`[text](docs/x.md)`, `(../bench/README.md#anchor)`) must reach a file (and a heading).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "zsh", "console", "")
PROGRAMS = ("python", "python3", "lmkit", "torchrun", "srun", "pip", "pip3", "pytest", "curl", "bash", "time")
README_MAX_LINES = 260


# --- reading commands out of Markdown ----------------------------------------------------------------------------

@dataclass
class Word:
    text: str  # as the program receives it: quotes removed
    bare_glob: bool = False  # `[`, `]`, `*` or `?` outside quotes: a glob, which zsh refuses when nothing matches


@dataclass
class Command:
    where: str  # file:line
    source: str  # the line as written
    words: list[Word] = field(default_factory=list)
    inline: bool = False  # a span in prose, which may leave out what the surrounding text names (model=...)

    @property
    def args(self) -> list[str]:
        return [w.text for w in self.words]


def shell_commands(line: str) -> list[list[Word]]:
    """`line` split as a POSIX shell splits it: commands (at `&&`, `||`, `;`, `|`, `&`) of words; `$VAR` is kept."""
    commands: list[list[Word]] = [[]]
    word: Word | None = None
    quote = ""
    i = 0
    while i < len(line):
        c = line[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                word.text += c
        elif quote == '"':
            if c == '"':
                quote = ""
            elif c == "\\" and i + 1 < len(line) and line[i + 1] in '"\\$`':
                i += 1
                word.text += line[i]
            else:
                word.text += c
        elif c in " \t":
            word = None
        elif c == "#" and word is None:
            break  # a comment
        elif c in ";|&":
            word = None
            if commands[-1]:
                commands.append([])
            if line[i + 1:i + 2] == c:
                i += 1
        else:
            if word is None:
                word = Word("")
                commands[-1].append(word)
            if c in "'\"":
                quote = c
            elif c == "\\":
                i += 1
                word.text += line[i:i + 1]
            else:
                word.text += c
                word.bare_glob |= c in "[]*?"
        i += 1
    if quote:
        raise ValueError(f"unterminated {quote} quote")
    return [c for c in commands if c]


def fenced_blocks(text: str):
    """(info string, first line number, lines) of each fenced code block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"\s*(```+)\s*([\w+-]*)", lines[i])
        if opening:
            fence, start, body = opening[1], i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i])
                i += 1
            yield opening[2].lower(), start, body
        i += 1


def block_lines(lang: str, start: int, body: list[str]):
    """(line number, logical line) of the commands in a shell block: continuations joined, console prompts dropped,
    a plain block's lines only where they start with a program."""
    i = 0
    while i < len(body):
        number, line = start + i, body[i]
        if lang == "console":
            if not line.startswith("$ "):
                i += 1
                continue
            line = line[2:]
        while line.rstrip().endswith("\\") and i + 1 < len(body):
            i += 1
            line = line.rstrip()[:-1] + " " + body[i].strip()
        i += 1
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        first = re.sub(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$", "", first)
        if lang == "" and not (first in PROGRAMS or re.match(r"[A-Za-z_][A-Za-z0-9_]*=", line.strip())):
            continue
        yield number, line


INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
COMMAND_SPAN = re.compile(r"(python3? (-m lmkit\.train|train\.py)|lmkit (train|generate|eval|export|import-hf|serve|"
                          r"plugins|report)) +\S")  # (a command's name alone is a name, not a command)


def inline_spans(text: str):
    """(line number, span) of the inline code spans outside fenced blocks."""
    fenced = set()
    for _, start, body in fenced_blocks(text):
        fenced.update(range(start - 1, start + len(body) + 1))
    for number, line in enumerate(text.splitlines(), 1):
        if number not in fenced:
            for span in INLINE.findall(line):
                yield number, span


def doc_commands(path: Path, text: str | None = None) -> list[Command]:
    text = path.read_text(encoding="utf-8") if text is None else text
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for lang, start, body in fenced_blocks(text):
        if lang not in SHELL:
            continue
        for number, line in block_lines(lang, start, body):
            for words in shell_commands(line):
                found.append(Command(f"{name}:{number}", line.strip(), words))
    for number, span in inline_spans(text):
        if not COMMAND_SPAN.match(span):
            continue
        for words in shell_commands(span):
            found.append(Command(f"{name}:{number} (inline)", span, words, inline=True))
    return found


def overrides_in_prose(text: str):
    """(line number, span) of inline spans that are config overrides (`logger=[csv,tensorboard]`): a key of
    lmkit's configs, `=`, a value; the same quoting rule as commands."""
    for number, span in inline_spans(text):
        match = re.match(r"'?[+~]{0,2}([a-z_]+)[\w.]*=", span)
        if match and match[1] in TOP_KEYS:
            yield number, span


# --- checking one command -------------------------------------------------------------------------------------------

def config_trees(texts: list[str]) -> dict[str, dict[str, str]]:
    """Config folders the docs draw (for `--config-dir`): a plain block whose first line is `NAME/`, then
    `  group/option.yaml   # line` and `   # line` rows, each `# ` a line of that file."""
    trees: dict[str, dict[str, str]] = {}
    for text in texts:
        for _, _, body in fenced_blocks(text):
            if not body or not re.fullmatch(r"[\w.-]+/", body[0].strip()):
                continue
            files, current = {}, None
            for row in body[1:]:
                match = re.match(r"\s+(\S+\.yaml)?\s*# ?(.*)$", row)
                if not match:
                    continue
                if match[1]:
                    current = match[1]
                files[current] = files.get(current, "") + match[2] + "\n"
            trees[body[0].strip().rstrip("/")] = files
    return trees


TREES = config_trees([p.read_text(encoding="utf-8") for p in DOCS])
OPTIONAL_HYDRA_PLUGINS = {"hydra/launcher=submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
                          "hparams_search=optuna": "hydra_plugins.hydra_optuna_sweeper"}
_composed: dict[tuple[str, ...], None] = {}


def compose_train(overrides: list[str]) -> None:
    from lmkit.conf import compose

    key = tuple(overrides)
    if key not in _composed:
        compose("train", overrides)
        _composed[key] = None


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """A `-m` sweep's override lists to compose: every value's first choice, then each other choice of a config
    group (`model=lstm,transformer`, `compression=int8,[prune,int8]`) with the rest at their first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            choices.append([text.split("=", 1)[0] + "=" + v for v in override.sweep_string_iterator()])
        else:
            choices.append([text])
    first = [c[0] for c in choices]
    points = [first]
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}
    for i, (override, options) in enumerate(zip(parsed, choices)):
        if override.key_or_group.lstrip("+~") in groups:
            points += [first[:i] + [option] + first[i + 1:] for option in options[1:]]
    return points


def check_train(args: list[str], tmp: Path) -> int:
    """Compose a training command line's overrides; returns how many compositions it took."""
    overrides, multirun, i = [], False, 0
    while i < len(args):
        arg = args[i]
        name, equals, value = arg.partition("=")
        if arg in ("-m", "--multirun"):
            multirun = True
        elif name in ("--config-dir", "-cd"):
            if not equals:
                i += 1
                value = args[i] if i < len(args) else ""
            folder = value.rstrip("/")
            assert folder in TREES, f"--config-dir {value}: the docs draw no such folder (a block starting {folder}/)"
            for path, content in TREES[folder].items():
                (tmp / folder / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp / folder / path).write_text(content)
            overrides.append(f"hydra.searchpath=[file://{tmp / folder}]")
        elif arg.startswith("-"):
            raise AssertionError(f"{arg}: not an option lmkit's docs should show to train.py")
        elif arg == "...":
            pass  # "and the rest of your overrides"
        elif not equals:
            raise AssertionError(f"{arg!r} is not an override (key=value)")
        elif arg in OPTIONAL_HYDRA_PLUGINS and not _has_module(OPTIONAL_HYDRA_PLUGINS[arg]):
            pass  # a Hydra plugin this environment lacks (an extra): nothing to compose it with
        else:
            overrides.append(arg)
        i += 1
    points = sweep_points(overrides) if multirun else [overrides]
    for point in points:
        compose_train(point)
    return len(points)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def command_groups(command: str) -> tuple[str, ...]:
    """The config groups conf/<command>.yaml's defaults list names (lmkit.cli.parse composes those with Hydra)."""
    conf = yaml.safe_load((ROOT / "conf" / f"{command.replace('-', '_')}.yaml").read_text())
    return tuple(next(iter(d)) for d in conf.get("defaults", []) if isinstance(d, dict))


def schema(command: str) -> type:
    from lmkit import cli

    if command == "serve":
        from lmkit.serve.settings import ServeSettings

        return ServeSettings
    return {"export": cli.ExportArgs, "generate": cli.GenerateArgs, "eval": cli.EvalArgs,
            "import-hf": cli.ImportArgs}[command]


def check_lmkit(args: list[str], tmp: Path, inline: bool = False) -> int:
    from lmkit import cli

    if not args or args[0] in ("-h", "--help", "help", "--version", "-V"):
        return 0
    command, rest = args[0], [a for a in args[1:] if a != "..."]
    assert command in cli.COMMANDS, f"lmkit {command}: no such command; commands: {', '.join(cli.COMMANDS)}"
    if command == "train":
        return check_train(rest, tmp)
    if any(a in ("-h", "--help") for a in rest):
        return 0
    if command == "plugins":
        assert not rest, "lmkit plugins takes no arguments"
        return 0
    if command == "report":
        dirs = [a for a in rest if "=" not in a]
        options = {a.split("=", 1)[0] for a in rest if "=" in a}
        assert dirs and options <= {"out"}, "usage: lmkit report DIR [DIR ...] [out=pareto.png]"
        return 0
    if inline:  # `lmkit serve workers=2` in a sentence about some model: its mandatory keys as placeholders
        conf = yaml.safe_load((ROOT / "conf" / f"{command.replace('-', '_')}.yaml").read_text())
        given = {a.split("=", 1)[0] for a in rest}
        rest = [*rest, *(f"{key}=X" for key, value in conf.items() if value == "???" and key not in given)]
    cli.parse(schema(command), command, rest, groups=command_groups(command))
    return 1


def check_script(args: list[str]) -> None:
    """`python bench/run.py NAME ...`, `python SCRIPT.py`, `bash SCRIPT.sh`: the script is in the repository (and
    the benchmark is one bench/run.py has)."""
    script = next((a for a in args if a.endswith((".py", ".sh"))), None)
    if script is None or script.startswith("/"):
        return
    assert (ROOT / script).is_file(), f"{script}: no such file in the repository"
    if script == "bench/run.py":
        spec = importlib.util.spec_from_file_location("bench_run", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        names = [a for a in args[args.index(script) + 1:] if not a.startswith("-")]
        unknown = [n for n in names if n not in module.BENCHES]
        assert not unknown, f"bench/run.py {unknown[0]}: no such benchmark; {', '.join(module.BENCHES)}"


def check_command(command: Command, tmp: Path) -> str:
    """Check one command; returns what kind it was (train, lmkit, other)."""
    bare = [w.text for w in command.words if w.bare_glob]
    assert not bare, f"{bare[0]!r} has [, ], * or ? outside quotes, a glob to zsh: write '{bare[0]}'"
    args = command.args
    while args and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", args[0]):
        args = args[1:]  # environment prefixes
    if args and args[0] in ("time", "exec", "nohup"):
        args = args[1:]
    if args and args[0] == "srun":
        args = args[1:]
        while args and args[0].startswith("-"):
            args = args[1:]
    if not args:
        return "other"
    program = args[0]
    if program == "torchrun":
        script = next((i for i, a in enumerate(args) if a.endswith(".py")), None)
        if script is None or args[script] != "train.py":
            return "other"
        check_train(args[script + 1:], tmp)
        return "train"
    if program in ("python", "python3"):
        if args[1:3] == ["-m", "lmkit.train"]:
            check_train(args[3:], tmp)
            return "train"
        if args[1:3] == ["-m", "lmkit"]:
            check_lmkit(args[3:], tmp, command.inline)
            return "lmkit"
        if args[1:2] == ["train.py"]:
            check_train(args[2:], tmp)
            return "train"
        check_script(args)
        return "other"
    if program == "bash":
        check_script(args)
        return "other"
    if program == "lmkit":
        check_lmkit(args[1:], tmp, command.inline)
        return "train" if args[1:2] == ["train"] else "lmkit"
    return "other"


# --- the tests -----------------------------------------------------------------------------------------------------

COMMANDS = [c for path in DOCS for c in doc_commands(path)]


def _top_keys() -> set[str]:
    keys = {"hydra", "hparams_search"}
    for conf in (ROOT / "conf").glob("*.yaml"):
        keys |= set(yaml.safe_load(conf.read_text()) or {})
    keys |= {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}
    return keys - {"defaults"}


TOP_KEYS = _top_keys()


def test_docs_exist_and_the_readme_is_a_front_door():
    assert len(DOCS) > 1, "docs/*.md are missing"
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move the detail into docs/"
    assert len(COMMANDS) > 50  # the extraction itself works (a broken fence would drop most of them)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_every_command_in_the_docs_is_one_lmkit_takes(command, tmp_path):
    from lmkit.errors import LmkitError

    try:
        check_command(command, tmp_path)
    except (LmkitError, AssertionError, ValueError) as e:
        pytest.fail(f"{command.where}: {command.source}\n  {e}")


def test_how_many_commands_are_checked(tmp_path, capsys):
    kinds = {"train": 0, "lmkit": 0, "other": 0}
    for command in COMMANDS:
        try:
            kinds[check_command(command, tmp_path)] += 1
        except Exception:
            kinds["other"] += 1  # (its own parametrized case reports it)
    with capsys.disabled():
        print(f"\ndocs: {len(COMMANDS)} shell commands in {len(DOCS)} files: {kinds['train']} training command "
              f"lines composed, {kinds['lmkit']} lmkit commands parsed, {kinds['other']} others (quoting, scripts)")
    assert kinds["train"] > 30 and kinds["lmkit"] > 20


def test_overrides_named_in_prose_are_quoted_for_zsh():
    bad = []
    for path in DOCS:
        for number, span in overrides_in_prose(path.read_text(encoding="utf-8")):
            for words in shell_commands(span):
                bad += [f"{path.relative_to(ROOT)}:{number}: `{span}`" for w in words if w.bare_glob]
    assert not bad, "write these overrides quoted, as zsh needs them ('key=[a,b]'):\n" + "\n".join(bad)


def test_python_blocks_are_python():
    for path in DOCS:
        for lang, start, body in fenced_blocks(path.read_text(encoding="utf-8")):
            if lang == "python":
                try:
                    ast.parse("\n".join(body))
                except SyntaxError as e:
                    pytest.fail(f"{path.relative_to(ROOT)}:{start + (e.lineno or 1) - 1}: {e.msg}")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_relative_links_reach_a_file_and_heading():
    bad = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue  # https:, mailto:
                file, _, anchor = target.partition("#")
                resolved = (path.parent / file).resolve() if file else path
                where = f"{path.relative_to(ROOT)}:{number}: ({target})"
                if not resolved.exists():
                    bad.append(f"{where}: no such file")
                elif anchor and resolved.suffix == ".md":
                    headings = [slug(h) for h in re.findall(r"^#+\s+(.*)$", resolved.read_text(encoding="utf-8"),
                                                            re.M)]
                    if anchor not in headings:
                        bad.append(f"{where}: no heading #{anchor}")
    assert not bad, "\n".join(bad)


# --- the checks fail where they should ------------------------------------------------------------------------------

@pytest.mark.parametrize("doc, message", [
    ("```bash\npython train.py model=transformer model.nonexistent=1\n```", "model.nonexistent"),
    ("```bash\nlmkit train optim.lrr=3e-3\n```", "optim.lrr"),
    ("```bash\npython train.py -m model=lstm,transformer trainer.max_stepz=5\n```", "trainer.max_stepz"),
    ("```bash\npython train.py model=nonexistent\n```", "model/nonexistent"),
    ("```bash\nlmkit export model=m out=o nonexistent=1\n```", "nonexistent"),
    ("```bash\nlmkit export model=m out=o compression=int8 compression.int8.bogus=1\n```", "bogus"),
    ("```bash\nlmkit serve model=m max_batch_size=many\n```", "could not be converted"),
    ("```bash\nlmkit generate model=m temprature=0.8\n```", "temprature"),
    ("```bash\nlmkit eval model=m data=text data.pth=x\n```", "data.pth"),
    ("```bash\nlmkit import-hf src=a out=b extra=1\n```", "extra"),
    ("```bash\nlmkit plugins list\n```", "no arguments"),
    ("```bash\nlmkit fly model=m\n```", "no such command"),
    ("```bash\npython train.py compression=[prune,int8]\n```", "outside quotes"),
    ("```bash\npython train.py data=text data.path=notes/*.txt\n```", "outside quotes"),
    ("```\n$ ignored\npython train.py 'logger=[csv,tensorboard]' \\\n    logger.nope=1   # a comment\n```",
     "logger.nope"),  # a plain block: a continued line, a comment, a prompt that is not a console's
    ("```console\n$ CUDA_VISIBLE_DEVICES=0 python train.py trainer=gpu trainer.devicez=1\nsome output\n```",
     "trainer.devicez"),
    ("```bash\ntorchrun --nproc_per_node=2 train.py trainer=ddp model.widthh=3\n```", "model.widthh"),
    ("```bash\nsrun python train.py --config-dir nowhere experiment=mine\n```", "no such folder"),
    ("```bash\npython bench/run.py nonexistent\n```", "no such benchmark"),
    ("```bash\npython train.py -m 'compression=int8,[prune,nonexistent]'\n```", "nonexistent"),
    ("```bash\npython train.py model=lstm,transformer\n```", "Ambiguous value"),  # a sweep without -m
    ("Run `lmkit export model=m out=o formatt=hf` inline.", "formatt"),
])
def test_a_doc_naming_what_lmkit_does_not_take_fails(doc, message, tmp_path):
    from lmkit.errors import LmkitError

    commands = doc_commands(tmp_path / "fake.md", doc)
    errors = []
    for command in commands:
        try:
            check_command(command, tmp_path)
        except (LmkitError, AssertionError, ValueError) as e:
            errors.append(str(e))
    assert any(message in e for e in errors), (commands, errors)


def test_the_config_folder_the_docs_draw_does_what_they_say(tmp_path):
    from lmkit.conf import compose

    assert "my_conf" in TREES
    check_train(["--config-dir", "my_conf", "experiment=mine"], tmp_path)
    cfg = compose("train", [f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "experiment=mine"])
    assert (cfg.model.kind, cfg.model.n_embd, cfg.trainer.max_steps) == ("lstm", 512, 2000)


def test_a_bracket_in_a_prose_override_must_be_quoted():
    assert list(overrides_in_prose("a list: `compression=[prune,int8]`, or `[prune,int8]` by name"))
    bad = [s for _, s in overrides_in_prose("`compression=[prune,int8]` and `'logger=[csv,tensorboard]'`")
           if any(w.bare_glob for w in chain.from_iterable(shell_commands(s)))]
    assert bad == ["compression=[prune,int8]"]


def test_a_link_to_nothing_fails(tmp_path):
    assert LINK.findall("see [the page](docs/missing.md#x) and [b](https://x.org)") == ["docs/missing.md#x",
                                                                                          "https://x.org"]
    assert slug("Preference tuning (DPO)") == "preference-tuning-dpo"
    assert slug("llama.cpp (GGUF)") == "llamacpp-gguf"


def test_the_readmes_figures_are_the_benchmarks_results():
    """"At a glance" quotes bench/results/*.json (what bench/run.py wrote), so a rerun that moves a figure shows."""
    import json

    readme = (ROOT / "README.md").read_text()
    results = {name: json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
               for name in ("quality", "compression", "grids", "deploy")}
    quality = results["quality"]
    assert (f"validation loss of {quality['val_loss']:.3f} in {quality['process_s']} s, where nanoGPT's CPU recipe "
            f"reaches {quality['nanogpt_val_loss']} in {quality['nanogpt_s']:g} s") in " ".join(readme.split())
    int8 = max(results["compression"]["recipes"][f"{kind} int8"]["after_vs_before"]["perplexity"]
               for kind in ("lstm", "transformer"))
    assert f"`int8` keeps perplexity within +{(int8 - 1) * 100:.2f}%" in readme
    grids = results["grids"]["models"]
    llama = grids["llama"]["rows"]
    assert f"+{(llama['int4 gptq']['perplexity'] / llama['fp32']['perplexity'] - 1) * 100:.2f}%" in readme
    sizes = [model["rows"]["int4 gptq"]["bytes_x"] for model in grids.values()]
    assert f"{min(sizes):.2f}x-{max(sizes):.2f}x the bytes" in readme
    speeds = {w["model"]: w["tokens_per_s"] for w in results["deploy"]["widths"]}
    assert all(max(t, key=t.get) == "onnx int8" for model, t in speeds.items()
               if int(model.rsplit("x", 1)[1]) >= 256)  # "the fastest CPU runtime from 256 wide up"
    x512 = speeds["transformer 4x512"]
    assert f"{x512['onnx int8'] / x512['torch fp32']:.1f}x torch fp32 for a 4x512 Transformer" in readme
