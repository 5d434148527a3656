"""Loading a run's settings: YAML (safe loader) + ``a.b=value`` overrides -> ``Config``.

``load_config(path, overrides)`` is the only way a run gets its settings. The loader turns
every mistake into a ``ConfigError`` that names the key and the file (or the override);
``dcgan.train`` prints it and exits with code 2 before any work.

Why not OmegaConf / pydantic: the coercion we need (YAML scalars and ``a.b=value``
strings into the annotated types, unknown keys rejected) is ~80 lines here, and owning it
keeps the error text in one format: ``<file>: <key>: <problem>``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dcgan.base.checks import ConfigError, FieldError
from dcgan.config.sections import Config, ConfigSource, check_run_name, type_name


class Scalar(typing.NamedTuple):
    """A plain YAML scalar that YAML reads as something other than a string (``1.10``,
    ``0755``, ``12:30``, ``yes``): its value and the text it was written as. A setting
    typed ``str`` takes the text, so ``train.name=1.10`` names the run ``1.10``."""

    value: Any
    text: str


class _TextKeepingLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that plain scalars read as numbers, booleans or dates come
    back as ``Scalar`` (value and source text)."""

    def construct_object(self, node, deep=False):
        value = super().construct_object(node, deep)
        plain = isinstance(node, yaml.ScalarNode) and node.style is None
        if plain and value is not None and not isinstance(value, str):
            return Scalar(value, node.value)
        return value


def read_yaml(text: str) -> Any:
    """Parse YAML (safe: no arbitrary objects) keeping the text of non-string scalars (``Scalar``)."""
    return yaml.load(text, Loader=_TextKeepingLoader)


def yaml_problem(error: yaml.YAMLError, text: str, locate: bool = True) -> str:
    """What YAML refused in ``text``, as one line (``locate``: with its line and column).
    PyYAML's own message spans lines (the offending line copied, a caret under the column)."""
    if isinstance(error, yaml.reader.ReaderError):
        code = ord(error.character) if isinstance(error.character, str) else error.character
        # Python keeps a command line's undecodable bytes as lone surrogates U+DC80..U+DCFF
        undecodable = 0xDC80 <= code <= 0xDCFF
        what = f"byte 0x{code - 0xDC00:02x} is not UTF-8" if undecodable else f"character U+{code:04X} is not allowed"
        return f"line {text[: error.position].count(chr(10)) + 1}: {what}" if locate else what
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if locate and mark is not None else ""
    return where + problem + (f" ({context})" if context else "")


# --------------------------------------------------------------------------- loading


OVERRIDE = "override"  # how errors in an a.b=value override begin: they name it, not the config file


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``a.b=value`` overrides, validate; raise ConfigError."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        text = read_utf8(Path(path), "config")
        try:
            raw = read_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML: {yaml_problem(e, text)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: top level must be a mapping of sections")
    overridden = {}  # dotted key -> the override that set it: errors on that key name the override, not the file
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{OVERRIDE} {item!r} is not of the form a.b=value")
        try:
            parsed = read_yaml(value) if value.strip() else ""
        except yaml.YAMLError as e:
            problem = yaml_problem(e, value, locate=False)
            raise ConfigError(f"{OVERRIDE} {item!r}: not a valid YAML value ({problem})") from None
        _set_dotted(raw, key.strip(), parsed, f"{OVERRIDE} {item!r}")
        overridden[key.strip()] = item
    try:
        cfg = _build(Config, raw, "")
    except ConfigError as e:
        blamed = next((item for key, item in overridden.items() if str(e).startswith(f"{key}:")), None)
        raise ConfigError(f"{OVERRIDE} {blamed!r}: {e}" if blamed else f"{where}: {e}") from None
    if not cfg.train.name:
        cfg.train.name = Path(path).stem if path is not None else "run"
        try:
            check_run_name(cfg.train.name, "train.name")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e} (the config file's name; set train.name)") from None
    cfg.source = ConfigSource(None if path is None else str(path), tuple(overrides))
    return cfg


def read_utf8(path: Path, what: str) -> str:
    """A settings file's text; ConfigError naming the file when it cannot be read or is not
    UTF-8 (with the first bad byte and its line)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8"
        ) from None


def build_section(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """A config dataclass from a mapping with the same coercion and checks as the run
    config (the launchers' options use it); errors read ``<where>: <prefix><key>: ...``."""
    try:
        return _build(cls, raw, prefix)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML: what the run folder's config.yaml holds, and what
    ``load_config`` reads back to the same config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(config_yaml(cfg))


def _set_dotted(raw: dict, key: str, value: Any, where: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, coercing each field to its annotation."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<top>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{prefix}{key}: unknown key (known here: {known})")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{prefix}{e.key}: {e.problem}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    raw, text = value, None
    if isinstance(value, Scalar):
        value, text = value
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key + ".")
    if origin is Literal:
        choices = typing.get_args(hint)
        if text in choices:  # as written: YAML 1.1 reads `cache: on` as true
            return text
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(raw, hint, key)
    if origin is list:
        (arg,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if text is not None:  # as written: "1.10", not 1.1
            return text
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {hint!r} for {key}")  # a bug here, not user input


def _coerce_union(raw: Any, hint: Any, key: str) -> Any:
    """The first member of a union that takes the value (``float | Literal["auto"]``: a
    number, else auto), given as written (``Scalar``), so each member reads it its way."""
    for member in typing.get_args(hint):
        if member is type(None):
            if raw is None:
                return None
            continue
        try:
            return _coerce(raw, member, key)
        except ConfigError:
            pass
    value = raw.value if isinstance(raw, Scalar) else raw
    raise ConfigError(f"{key}: expected {type_name(hint)}, got {value!r}")
