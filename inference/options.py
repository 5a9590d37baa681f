"""Options declared once: a dataclass field made with ``option()`` carries its default, help text,
parser and checks, and that one declaration drives the command line, the ``INFERENCE_*`` variable
and the validation.

A flag given on the command line wins over its variable; a repeatable flag's variable holds a
comma-separated list. ``--help`` names the variable and the default beside each flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

ENV_PREFIX = "INFERENCE_"
_OPTION = "option"


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Check:
    """A condition one option's value must meet (never asked of an unset, ``None`` value); the
    message may name the option as ``{name}`` (its field) or ``{flag}``."""

    holds: Callable[[Any], bool]
    message: str

    def __call__(self, option: Option, value: Any) -> None:
        if not self.holds(value):
            raise ConfigError(self.message.format(name=option.name, flag=option.flag))


POSITIVE = Check(lambda v: v > 0, "{name} must be positive")
NOT_NEGATIVE = Check(lambda v: v >= 0, "{name} must not be negative")
AT_LEAST_ONE = Check(lambda v: v >= 1, "{name} must be at least 1")
SHARE = Check(lambda v: 0 < v <= 1, "{name} must be above 0 and at most 1")


def matches(pattern: re.Pattern[str], what: str) -> Check:
    return Check(lambda v: bool(pattern.match(v)), "{flag} must be " + what)


def starts_with(*prefixes: str, empty_means_unset: bool = False) -> Check:
    """A URL's scheme; with ``empty_means_unset`` an empty value passes (it turns the feature off)."""
    named = ", ".join(prefixes[:-1]) + " or " + prefixes[-1]
    return Check(lambda v: (empty_means_unset and v == "") or v.startswith(prefixes), "{flag} must start with " + named)


def on_off(value: str) -> bool:
    """A switch's value: on/off (also true/false, yes/no, 1/0)."""
    lowered = value.strip().lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise ValueError(value)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option's declaration; ``name`` is its dataclass field, filled in by ``declared()``."""

    help: str
    default: Any
    parse: Callable[[str], Any]
    checks: tuple[Check, ...] = ()
    choices: tuple[str, ...] | None = None
    repeatable: bool = False
    show_default: bool = True
    flag_name: str | None = None
    name: str = ""

    @property
    def flag(self) -> str:
        return self.flag_name or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    def help_line(self) -> str:
        default = self.default
        if self.repeatable:
            default = ", ".join(str(d) for d in default or ()) or None
        if isinstance(default, bool):
            default = "on" if default else "off"
        shown = f" (default: {default})" if self.show_default and default not in (None, "") else ""
        return f"{self.help}{shown} [env: {self.env}]"

    def read(self, given: Any, environ: Mapping[str, str]) -> Any:
        """The option's parsed value from the command line (``given``) or else its variable;
        ``dataclasses.MISSING`` when neither sets it."""
        raw = given
        if raw is None and environ.get(self.env, "") != "":
            env_value = environ[self.env]
            raw = [v.strip() for v in env_value.split(",") if v.strip()] if self.repeatable else env_value
        if raw is None:
            return dataclasses.MISSING
        if self.repeatable:
            return tuple(self._parse(item) for item in raw)
        if self.choices is not None and raw not in self.choices:
            raise ConfigError(f"{self.env}={raw!r} must be one of {', '.join(self.choices)}")
        return self._parse(raw)

    def _parse(self, raw: str) -> Any:
        try:
            return self.parse(raw)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{self.flag} / {self.env}: {raw!r} is not a valid {self.parse.__name__}") from exc

    def check(self, value: Any) -> None:
        if value is not None:
            for check in self.checks:
                check(self, value)


def option(default: Any = None, help: str = "", *, parse: Callable[[str], Any] | None = None,
           check: Check | Sequence[Check] = (), choices: Sequence[str] | None = None, repeatable: bool = False,
           flag: str | None = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that is also an option. ``parse`` defaults to the default's type (a bool is
    ``on_off``, ``None`` is ``str``); a repeatable option's value is a tuple of parsed items; a
    default made by ``default_factory`` is not shown in ``--help`` (the help text says what it is)."""
    if parse is None:
        parse = on_off if isinstance(default, bool) else str if default is None or repeatable else type(default)
    declared = Option(help=help, default=default, parse=parse, checks=(check,) if isinstance(check, Check) else
                      tuple(check), choices=tuple(choices) if choices else None, repeatable=repeatable,
                      show_default=default_factory is None, flag_name=flag)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={_OPTION: declared})
    return dataclasses.field(default=default, metadata={_OPTION: declared})


def declared(cls: type) -> tuple[Option, ...]:
    """The options a dataclass declares, in order, each knowing its field's name."""
    return tuple(dataclasses.replace(f.metadata[_OPTION], name=f.name)
                 for f in dataclasses.fields(cls) if _OPTION in f.metadata)


def parser_for(cls: type, *, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for opt in declared(cls):
        parser.add_argument(opt.flag, dest=opt.dest, action="append" if opt.repeatable else "store",
                            choices=opt.choices, default=None, help=opt.help_line())
    return parser


def read_options(cls: type, parser: argparse.ArgumentParser, argv: Sequence[str],
                 environ: Mapping[str, str]) -> dict[str, Any]:
    """The values the command line and the environment set, by field name (unset ones left out)."""
    args = parser.parse_args(argv)
    values = {opt.name: opt.read(getattr(args, opt.dest), environ) for opt in declared(cls)}
    return {name: value for name, value in values.items() if value is not dataclasses.MISSING}


def check_options(config: Any) -> None:
    """Each option's own checks, in the order they are declared."""
    for opt in declared(type(config)):
        opt.check(getattr(config, opt.name))
