"""Command lines as Hydra, torchtune and `ray` users know them, for every `python -m jobs.<name>`:

    key=value ...            overrides of conf/<name>.yaml, type-checked against tandem/config.py
    --help, -h               what the job does, its command line, and the keys it reads with defaults and docs
    --cfg job                the resolved config, as YAML
    --config-name NAME       compose conf/NAME.yaml instead
    -m, --multirun           a sweep: every combination of comma-separated values (where the job supports one)

Unknown flags and keys are one-line `ConfigError`s naming them. `--help` and `--cfg` raise `Shown`, which carries the
text for the entry point to print. The library never prints or exits: `run` is for `if __name__ == "__main__"`
blocks only, the one place where errors become exit codes.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import sys
import tokenize
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tandem import config as schema
from tandem.errors import ConfigError, TandemError

HELP = ("--help", "-h")
MULTIRUN = ("-m", "--multirun")
OPTIONS = """options:
  -h, --help             this text
  --cfg job              print the resolved config (after overrides) and exit
  --config-name NAME     compose conf/NAME.yaml instead of conf/{name}.yaml"""


class Shown(Exception):
    """Not a failure: the command line asked for text (--help, --cfg) instead of a run."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


@dataclass(frozen=True)
class Job:
    """One entry point's command line: its config, what it reads, its short keys and subcommands."""

    name: str  # conf/<name>.yaml and `python -m jobs.<name>`
    doc: str  # the module docstring: what the job does, then its command line
    reads: tuple[str, ...]  # config keys or groups it reads, listed by --help
    shorthands: dict = field(default_factory=dict)  # `dataset=X` for `dataset.ref=X`
    commands: tuple[str, ...] = ()  # subcommands, e.g. dataset add|list|show
    sweeps: tuple[str, ...] = ()  # keys -m may sweep; empty: no sweeps
    module: str = ""  # what `python -m` runs; default: jobs.<name>

    @property
    def prog(self) -> str:
        return f"python -m {self.module or 'jobs.' + self.name}"

    def config(self, argv: list[str]) -> DictConfig:
        """The config for `argv` (key=value overrides and options); raises Shown or ConfigError."""
        runs = self.sweep(argv)
        if len(runs) > 1:
            raise ConfigError(f"{self.prog} runs one configuration; "
                              f"{'-m sweeps' if self.sweeps else 'it has no sweeps'}")
        return runs[0][1]

    def command(self, argv: list[str]) -> tuple[str, DictConfig]:
        """(subcommand, config) for `python -m jobs.<name> COMMAND key=value ...`."""
        if argv and argv[0] in self.commands:
            return argv[0], self.config(list(argv[1:]))
        if any(a in HELP for a in argv):
            self.config(list(argv))  # raises Shown with the help
        raise ConfigError(f"expected a command first, one of {', '.join(self.commands)}; got "
                          f"{argv[0] if argv else 'none'} ({self.prog} --help)")

    def sweep(self, argv: list[str]) -> list[tuple[list[str], DictConfig]]:
        """Every configuration `argv` asks for: one, or with -m one per combination of comma-separated values,
        each with the overrides that make it differ."""
        name, overrides, show, multirun = self._parse(list(argv))
        combos = self._combinations(overrides) if multirun else [([], overrides)]
        runs = [(swept, self._load(name, full)) for swept, full in combos]
        if show == "help":
            raise Shown(self.help(runs[0][1]))
        if show == "cfg":
            raise Shown("\n".join(OmegaConf.to_yaml(cfg) for _, cfg in runs).rstrip())
        return runs

    def help(self, cfg: DictConfig) -> str:
        lines = [self.doc.strip(), "", f"config keys it reads (conf/{self.name}.yaml over tandem/config.py; "
                 "set any with key=value):"]
        docs = field_docs()
        for key in ("workdir", *self.reads):
            lines += _describe(key, OmegaConf.select(cfg, key), docs)
        if self.shorthands:
            lines += ["", "short keys: " + ", ".join(f"{k}= for {v}=" for k, v in self.shorthands.items())]
        lines += ["", OPTIONS.format(name=self.name)]
        if self.sweeps:
            lines.append("  -m, --multirun         sweep comma-separated values (key=a,b) of: " +
                         ", ".join(self.sweeps))
        return "\n".join(lines)

    def _parse(self, argv: list[str]) -> tuple[str, list[str], str | None, bool]:
        name, overrides, show, multirun = self.name, [], None, False
        while argv:
            arg = argv.pop(0)
            if arg in HELP:
                show = "help"
            elif arg == "--cfg":
                kind = argv.pop(0) if argv else None
                if kind not in ("job", "all"):
                    raise ConfigError(f"--cfg takes `job`; got {kind or 'nothing'}")
                show = show or "cfg"
            elif arg == "--config-name":
                if not argv:
                    raise ConfigError("--config-name takes a name from conf/")
                name = argv.pop(0)
            elif arg in MULTIRUN and self.sweeps:
                multirun = True
            elif arg.startswith("-") and "=" not in arg:
                raise ConfigError(f"unknown option {arg} for {self.prog} (--help lists what it takes)")
            else:
                key, sep, value = arg.partition("=")
                if not sep:
                    raise ConfigError(f"expected key=value, got {arg!r} ({self.prog} --help)")
                overrides.append(f"{self.shorthands[key]}={value}" if key in self.shorthands else arg)
        return name, overrides, show, multirun

    def _combinations(self, overrides: list[str]) -> list[tuple[list[str], list[str]]]:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        try:
            parsed = OverridesParser.create().parse_overrides(overrides)
        except HydraException as e:
            raise _override_error(e) from None
        choices = []
        for o in parsed:
            key = o.get_key_element()
            if not o.is_sweep_override():
                choices.append([None])
            elif key.lstrip("+") not in self.sweeps and not key.lstrip("+").startswith(
                    tuple(s + "." for s in self.sweeps)):
                raise ConfigError(f"-m cannot sweep {key}; {self.prog} sweeps {', '.join(self.sweeps)}")
            else:
                choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        runs = []
        for picked in itertools.product(*choices):
            swept = [p for p in picked if p is not None]
            runs.append((swept, [p or o for p, o in zip(picked, overrides)]))
        return runs

    def _load(self, name: str, overrides: list[str]) -> DictConfig:
        from hydra.errors import HydraException, OverrideParseException
        from omegaconf.errors import OmegaConfBaseException

        try:
            return schema.load_config(name, overrides)
        except HydraException as e:
            cause = e.__cause__
            if isinstance(cause, OmegaConfBaseException) and "not in" in str(cause):
                key = getattr(cause, "full_key", None) or _first_line(e)
                hint = "; a key a route does not set yet takes +: +serve.routes.NAME.KEY=..." \
                    if str(key).startswith("serve.routes.") else ""
                raise ConfigError(f"unknown config key {key} for {self.prog} (--help lists the keys{hint})") from None
            if "Ambiguous value" in str(e):
                raise ConfigError(f"{_first_line(e).split('for argument ')[-1]}: a list is key=[a,b], text with a "
                                  f"comma is quoted, key='a, b'; "
                                  f"{'-m sweeps a,b' if self.sweeps else 'this job has no sweeps'}") from None
            if isinstance(e, OverrideParseException):
                raise _override_error(e) from None
            key = getattr(cause, "full_key", None)
            raise ConfigError(f"{key}: {_first_line(cause)}" if key else _first_line(cause or e)) from None
        except OmegaConfBaseException as e:  # an interpolation that does not resolve
            raise ConfigError(_first_line(e)) from None


def _override_error(e: BaseException) -> ConfigError:
    """Hydra's grammar error names neither the override nor the way out (`registry.reason=make train (stop 33)`)."""
    override = getattr(e, "override", None)
    if not override:
        return ConfigError(_first_line(e))
    reason = next((line for line in str(e).splitlines() if line and not line.startswith("Error parsing")), "")
    return ConfigError(f"{override}: {reason}; quote a value with spaces and brackets or other punctuation: "
                       "key='...' (in the shell: \"key='...'\")")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _describe(key: str, value, docs: dict[str, str], indent: str = "  ") -> list[str]:
    """`key: value  # doc` per leaf; a group's leaves one by one."""
    if isinstance(value, DictConfig) and key in docs.get("__groups__", ()):
        return [line for k in value for line in _describe(f"{key}.{k}", value[k], docs, indent)]
    shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    text = f"{indent}{key}={_override_value(shown)}"
    doc = docs.get(key, "")
    return [f"{text:<50} {doc}" if doc else text]


def _override_value(value) -> str:
    """A value as it would be written in an override: null, true, 0.25, [a, b], {k: v}."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_override_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


@lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """Dotted key -> the comment the schema gives it (trailing, or on the lines just above), from tandem/config.py;
    `__groups__` lists the keys that are dataclasses, whose leaves --help lists one by one."""
    comments = _comments(Path(schema.__file__).read_text())
    docs: dict = {"__groups__": set()}

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            docs[key] = comments.get((cls.__name__, f.name), "")
            if dataclasses.is_dataclass(hints[f.name]):
                docs["__groups__"].add(key)
                walk(hints[f.name], f"{key}.")

    walk(schema.TandemConfig, "")
    return docs


def _comments(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> its trailing comment, else the comment lines just above it; read with the tokenizer, so a
    `#` inside a string is never taken for one."""
    out: dict[tuple[str, str], str] = {}
    pending: list[str] = []
    cls = None
    line_tokens: list[tokenize.TokenInfo] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.NEWLINE, tokenize.NL):
            line_tokens.append(tok)
            continue
        words = [t for t in line_tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
        line_tokens = []
        if not words:
            pending = []
            continue
        if words[0].type == tokenize.COMMENT:
            pending.append(words[0].string.lstrip("# ").strip())
            continue
        if words[0].string == "class" and words[0].start[1] == 0:
            cls = words[1].string
        elif cls and words[0].start[1] == 4 and words[0].type == tokenize.NAME and len(words) > 1 \
                and words[1].string == ":":
            trailing = [t.string.lstrip("# ").strip() for t in words if t.type == tokenize.COMMENT]
            out[(cls, words[0].string)] = " ".join(trailing or pending)
        elif words[0].start[1] == 0:
            cls = None
        pending = []
    return out


def run(main, argv: list[str] | None = None) -> None:
    """Run an entry point's `main(argv)` as a command: --help/--cfg text on stdout with exit 0, a TandemError as
    `error: ...` on stderr with its exit code."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except Shown as shown:
        print(shown.text)
        sys.exit(0)
    except TandemError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
