"""Recipes: YAML files with `_base_` inheritance and dotted command-line overrides, built into typed dataclasses.

The machinery every stage's configuration uses (`mae_et.train.config`, `mae_et.evaluate.config`); it knows no
schema of its own. Values are parsed as YAML (`train.epochs=5`, `optim.clip_grad=null`), and every mistake fails in
one line (an unknown key names the closest one). The rules on one value sit beside its field in the schema
(`Check`, `Text`, `FromBool`, `Literal`): docs/design.md, "A rule is checked once, at the schema".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml

from mae_et.errors import UserError
from mae_et.files import write_text_atomic


class ConfigError(UserError, ValueError):
    """A configuration problem, with a message that names the key and the fix."""


# The source checkout this package runs from: its configs/ folder holds the recipes. An installed copy
# (not editable) has no configs/ beside it.
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # mae_et/recipes.py -> the checkout


# A recipe is a few KB of YAML; anything far bigger is another file given by mistake, and parsing it takes
# minutes (a 100 MB one: over five), so it is refused unread.
MAX_RECIPE_BYTES = 1_000_000


def find_recipe(path: str | Path) -> Path:
    """A recipe path as given, else relative to the checkout (so `python /path/to/pretrain.py` finds
    `configs/...` from any directory)."""
    path = Path(path)
    if path.exists():
        return _recipe_file(path, f"config file '{path}'")
    in_checkout = SOURCE_ROOT / path
    if not path.is_absolute() and in_checkout.exists():
        return _recipe_file(in_checkout, f"config file '{in_checkout}'")
    if (SOURCE_ROOT / "configs").is_dir():
        raise ConfigError(
            f"config file '{path}' does not exist (here or in {SOURCE_ROOT / 'configs'}); "
            f"pass --config configs/pretrain/<recipe>.yaml"
        )
    raise ConfigError(
        f"config file '{path}' does not exist, and this mae_et (installed at {SOURCE_ROOT / 'mae_et'}) "
        "has no recipes beside it: they live in the configs/ folder of the source checkout; pass "
        "--config /path/to/checkout/configs/<stage>/<recipe>.yaml, or install it with pip install -e <checkout>"
    )


def _recipe_file(path: Path, what: str) -> Path:
    """`path` if it is a readable file of recipe size; else one line that starts with `what` and says why not."""
    if path.is_dir():
        raise ConfigError(f"{what} is a folder, not a recipe file; pass one of its .yaml files")
    if not path.is_file():
        raise ConfigError(f"{what} " + ("is not a regular file" if path.exists() else "does not exist"))
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ConfigError(
            f"{what} is {size / 1e6:.1f} MB; a recipe is at most {MAX_RECIPE_BYTES / 1e6:g} MB of YAML (a few KB): "
            "is it the right file?"
        )
    return path


def load_yaml_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe, following `_base_` links (child keys override the base, recursively)."""
    path = find_recipe(path) if not _chain else path
    real = path.resolve()
    if real in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, real))
        raise ConfigError(
            f"config file '{path}' inherits itself through _base_ ({cycle}); remove one of those _base_ lines"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text; pass a .yaml recipe") from None
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file '{path}': _base_ must be one file name, got {base!r}")
    base_path = _recipe_file(  # relative to this recipe; a wrong one names this file, whose _base_ line to fix
        path.parent / base, f"config file '{path}': its _base_ '{base}' ('{path.parent / base}')"
    )
    return merge_dicts(load_yaml_recipe(base_path, (*_chain, real)), data)


def merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['train.epochs=5', 'data.root=/x'] -> {'train': {'epochs': 5}, 'data': {'root': '/x'}}."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.epochs=5)")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""  # `key=` is the empty string; `key=null` is None
        except yaml.YAMLError as e:
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(
                f"override '{item}': the value is not valid YAML ({what}); quote it, e.g. {dotted}='\"{raw}\"'"
            ) from None
        keys = dotted.strip().split(".")
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key below a value")
        node[keys[-1]] = value
    return nested


# ----------------------------------------------------------------------------- rules on one value


@dataclasses.dataclass(frozen=True)
class Check:
    """A bound on one field's value, declared in the schema: `epochs: Annotated[float, Check(gt=0)]`; inf and nan
    pass no bound. Fails in one line naming the key, the rule and the value."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def rule(self) -> str:
        gt, ge, lt, le = (None if x is None else _number(x) for x in (self.gt, self.ge, self.lt, self.le))
        low = f"({gt}" if gt is not None else f"[{ge}" if ge is not None else None
        high = f"{lt})" if lt is not None else f"{le}]" if le is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>' if self.gt is not None else '>='} {low[1:]}"
        return f"{'<' if self.lt is not None else '<='} {high[:-1]}"

    def __call__(self, value: Any, dotted: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{dotted} must be a finite number {self.rule()}, got {value}")
        ok = (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )
        if not ok:
            raise ConfigError(f"{dotted} must be {self.rule()}, got {value}")


def _number(x: float) -> str:
    """A bound as written: whole numbers in full (a seed's 4294967296, not 4.29497e+09)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Text:
    """Rules on a string field, declared in the schema: `project: Annotated[str, Text(max_len=128, forbidden="/:",
    what="a W&B project name")]`. Fails in one line naming the key, the value and the rule."""

    what: str  # what the value must be, e.g. "a W&B project name"
    max_len: int | None = None
    forbidden: str = ""  # characters it may not contain

    def __call__(self, value: str, dotted: str) -> None:
        bad = sorted(set(value) & set(self.forbidden))
        if bad or (self.max_len is not None and len(value) > self.max_len):
            rules = [f"no {' '.join(self.forbidden)}"] if self.forbidden else []
            rules += [f"at most {self.max_len} characters"] if self.max_len is not None else []
            found = f"it has {' '.join(bad)}" if bad else f"it has {len(value)} characters"
            raise ConfigError(f"{dotted} '{value}' is not {self.what} ({found}); use one with {' and '.join(rules)}")


@dataclasses.dataclass(frozen=True)
class FromBool:
    """How a key that takes words reads YAML 1.1's booleans (`off` -> false, `yes` -> true), declared in the
    schema: `wandb: Annotated[WandbMode, FromBool(true="auto", false="off")]`; applied before the type check."""

    true: str
    false: str


Positive = Check(gt=0)  # counts, sizes, rates, epochs
NonNegative = Check(ge=0)  # shares, decays, cadences where 0 means off
UnitInterval = Check(ge=0, le=1)  # probabilities
Seed = Check(ge=0, lt=2**32)  # what numpy's and every worker's seeding accept


T = typing.TypeVar("T")


def build_config(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from a nested dict, checking every key and value type."""
    return _build(cls, data, prefix="")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], dotted + "."))
    return keys


def _unknown_key_error(dotted: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{dotted}'{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str, root: tuple[type, str] | None = None) -> Any:
    """`cls` from `data`; `root` (the outermost dataclass, its prefix) gives an unknown key's suggestions."""
    root = root or (cls, prefix)
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)  # with the Annotated rules
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    for key, value in data.items():
        if key not in names:
            # name the whole dotted path ('trian.epochs', not 'trian') so the suggestion is precise
            while isinstance(value, dict) and len(value) == 1:
                ((sub, value),) = value.items()
                key = f"{key}.{sub}"
            raise _unknown_key_error(f"{prefix}{key}", _all_keys(*root))
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in data:
            raise ConfigError(f"{prefix}{name} is missing: {prefix.rstrip('.')} needs {', '.join(required)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.", root)
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, dotted: str) -> Any:
    """Check `value` against a type hint; convert the harmless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:  # a type with its rules: read booleans as declared, coerce to the type, check each bound
        for rule in args[1:]:
            if isinstance(rule, FromBool) and isinstance(value, bool):
                value = rule.true if value else rule.false
        value = _coerce(value, args[0], dotted)
        for rule in args[1:]:
            if isinstance(rule, (Check, Text)):
                rule(value, dotted)
        return value
    if dataclasses.is_dataclass(hint):  # an entry of a list of typed entries
        return _build(hint, value, f"{dotted}.")
    if origin is typing.Literal:
        if value in args and not isinstance(value, bool):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off as booleans
            raise ConfigError(
                f"{dotted} '{str(value).lower()}' is unknown (YAML reads yes/no/on/off as true/false); "
                f"choose one of {', '.join(map(str, args))}"
            )
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{dotted} '{value}' is unknown; choose one of {', '.join(map(str, args))}{hint}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, dotted)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(f"'{dotted}' got {value!r}: {'; '.join(map(str, errors))}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{dotted}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{dotted}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{dotted}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{dotted}' must be a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"'{dotted}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{dotted}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{dotted}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{dotted}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{dotted}' must be a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"'{dotted}': unsupported type {hint}")  # a schema bug, not a user error


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, JSON and trackers."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
