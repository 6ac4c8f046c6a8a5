"""Command configs: one typed dataclass per subcommand, shared by the CLI flags and hydra.

Every CLI flag is a field of the subcommand's dataclass: ``--enc-dec 3:1`` on the command line is the
key ``enc_dec`` in ``conf/<command>.yaml`` and in a hydra multirun override (``enc_dec=3:1``).
Precedence, lowest first: dataclass defaults < ``--config FILE`` < ``key=value`` overrides < flags.

A subcommand module declares its dataclass and calls :func:`add_dataclass_flags` on its parser;
:func:`resolve` turns the parsed namespace into a validated dataclass instance.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

from pruning.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A flag or config key has a bad value; the message names it and the accepted values."""


DTYPE_CHOICES = ("bf16", "fp16", "fp32")
"""Storage and compute dtypes a flag may name (routers are always fp32)."""


def required(*, help: str, default: Any = "", **metadata: Any) -> Any:
    """A setting without which the command cannot run; checked once for every command (:func:`check_required`)."""
    return dataclasses.field(default=default, metadata={"help": help, "required": True, **metadata})


def check_required(settings: Any) -> None:
    """Every field declared :func:`required` must be given; one error lists all that are missing."""
    missing = [flag_name(f.name) for f in dataclasses.fields(settings) if f.metadata.get("required") and getattr(settings, f.name) in ("", None, [], ())]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)}")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, positional: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field (help = the field's ``metadata['help']``).

    Fields named in ``positional`` become positional arguments. Flags default to ``None`` so that
    :func:`resolve` can tell "not given" from "given"; the dataclass holds the real defaults.
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help", "")
        default = _default_of(field)
        if default is not dataclasses.MISSING and default not in (None, "", [], ()):
            help_text = f"{help_text} (default: {default})"
        kind = _base_type(hints[field.name])
        if field.name in positional:
            parser.add_argument(field.name, nargs="?", default=None, help=help_text)
        elif kind is bool:
            parser.add_argument(flag_name(field.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = field.metadata.get("choices")
            parser.add_argument(flag_name(field.name), dest=field.name, default=None, choices=choices, help=help_text)
    parser.add_argument("--config", dest="_config", default=None, help="YAML file of keys for this command (conf/*.yaml)")
    parser.add_argument("overrides", nargs="*", default=[], help="hydra-style key=value overrides")


def resolve(cls: type[T], args: argparse.Namespace) -> T:
    """Merge defaults, ``--config``, ``key=value`` overrides and flags into a ``cls`` instance."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if getattr(args, "_config", None):
        values.update(_known(load_yaml(Path(args._config)), names, where=str(args._config)))
    overrides = [o for o in getattr(args, "overrides", []) or []]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"unexpected argument {item!r}: overrides must look like key=value (keys: {sorted(names)})")
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        values.update(_known({key: _override_value(key, value)}, names, where="override"))
    for name in names:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    return coerce(cls, values)


def load_yaml(path: Path) -> dict[str, Any]:
    """The keys of a ``--config`` YAML file (a mapping; interpolations resolved), or a :class:`ConfigError`."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not path.is_file():
        raise ConfigError(f"--config: file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config {path} is not valid YAML{where}: {problem}") from None
    except (OmegaConfBaseException, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path} must hold a mapping of keys (key: value lines), found a YAML {type(loaded).__name__}")
    return loaded


def coerce(cls: type[T], values: dict[str, Any]) -> T:
    """Build ``cls`` from loosely typed values (strings from flags, YAML scalars)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name not in values:
            continue
        kwargs[field.name] = _convert(values[field.name], hints[field.name], field.name)
    try:
        instance = cls(**kwargs)
    except TypeError as exc:
        missing = [flag_name(f.name) for f in dataclasses.fields(cls) if f.name not in kwargs and _default_of(f) is dataclasses.MISSING]  # type: ignore[arg-type]
        raise ConfigError(f"missing required setting(s): {', '.join(missing)}") from exc
    check_required(instance)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    return instance


def _override_value(key: str, value: str) -> Any:
    """A ``key=value`` override's value, typed as YAML would type it (``ratio=0.5`` is a float)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not value:
        return value
    try:
        return OmegaConf.create({"v": value})["v"]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override {key}={value}: cannot parse the value ({str(exc).splitlines()[0]})") from None


def _known(data: dict[str, Any], names: set[str], *, where: str) -> dict[str, Any]:
    unknown = sorted(str(key) for key in set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; this command accepts {sorted(names)}")
    return dict(data)


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _base_type(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) in ("types.UnionType", "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return origin or hint


def _convert(value: Any, hint: Any, name: str) -> Any:
    if value is None:
        return None
    kind = _base_type(hint)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        if kind in (list, tuple):
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("[") and text.endswith("]"):  # hydra list syntax: key=[a,b]
                    text = text[1:-1]
                items = [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
            else:
                items = list(value)
            return kind(items)
        return str(value) if not isinstance(value, str) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{flag_name(name)} (key {name!r}) must be a {getattr(kind, '__name__', kind)}, got {value!r}") from None
