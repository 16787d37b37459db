"""The config machinery: typed, frozen dataclass sections that read, check, dump and describe themselves.

A config section is a frozen dataclass deriving from :class:`Section` whose fields are declared with
:func:`setting` (a value: its default, its meaning, its check) or :func:`section` (a nested section).
The machinery gives every section the same behaviour:

* ``from_dict(data, path)`` builds it from a mapping (a dict, a JSON object, a TOML table): unknown
  keys are errors naming the full key path, nested sections recurse, missing keys take their defaults;
* every field is checked (by the ``check`` given to :func:`setting`) when the object is built, from a
  mapping or directly, and then the section's own :meth:`Section.check_values` runs for rules that
  join several fields; messages name the key path (``engine.optimizer.params.lr``), the value and
  what is allowed (see :mod:`moesaic._checks`);
* ``to_dict()`` dumps plain JSON-ready data that ``from_dict`` reads back to an equal object;
* ``with_overrides({"engine.optimizer.params.lr": 1e-3})`` returns a copy with dotted keys replaced;
* ``describe()`` lists every key (path, type, default, meaning) for the generated reference.

:func:`read_config_file` is the package's one reader of JSON and TOML files, and :func:`parse_override`
its one parser of ``key=value`` command-line overrides.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

from ._checks import check_keys, check_mapping, join_key

_DOC, _CHECK, _SECTION, _OPTIONAL, _TYPE, _VARIANTS = "doc", "check", "section", "optional", "type", "variants"
_DEFAULTS = "defaults"
S = TypeVar("S", bound="Section")


def setting(default: Any = MISSING, *, doc: str, check: Optional[Callable[[Any, str], Any]] = None,
            type_text: Optional[str] = None, default_factory: Any = MISSING,
            variants: Optional[Mapping[str, Type["Section"]]] = None) -> Field:
    """Declare a config value.

    Args:
        default: its default (or give ``default_factory`` for a mutable one).
        doc: its meaning, one or two sentences, for the generated reference.
        check: ``check(value, key_path) -> normalised value``, raising TypeError/ValueError.
        type_text: how the reference spells its type, when the annotation alone would mislead.
        variants: for a mapping whose keys depend on a sibling ``type`` field: ``{type: Section}``
            (documentation only; the owning section checks it in :meth:`Section.check_values`).
    """
    meta = {_DOC: doc, _CHECK: check, _TYPE: type_text, _VARIANTS: variants}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: Type["Section"], *, doc: str, optional: bool = False,
            defaults: Optional[Mapping[str, Any]] = None) -> Field:
    """Declare a nested section of type ``cls``; ``optional`` sections default to None (absent).

    ``defaults``: this parent's defaults for some of the section's keys (a key the data leaves out
    takes it, and the reference shows it), where they differ from the section class's own.
    """
    defaults = dict(defaults or {})
    meta = {_DOC: doc, _SECTION: cls, _OPTIONAL: optional, _DEFAULTS: defaults}
    if optional:
        return field(default=None, metadata=meta)
    return field(default_factory=lambda: cls.from_dict(defaults), metadata=meta)


@dataclass(frozen=True)
class KeyDoc:
    """One row of the config reference."""

    path: str
    type: str
    default: str
    doc: str
    variant: str = ""  # e.g. 'type = "SGD"' for keys that exist for one optimizer type only


def _plain(value: Any) -> Any:
    """JSON-ready data: sections to dicts, tuples to lists."""
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


class Section:
    """Base of every config section (see the module docstring); subclasses are frozen dataclasses.

    ``PATH`` is the section's key path when it is built on its own (``FP16Config(...)`` reports
    ``fp16.hysteresis``); inside a bigger tree ``from_dict`` passes the real path
    (``engine.fp16.hysteresis``).
    """

    PATH: ClassVar[str] = ""
    #: ``{key: where it is read now}``: keys that moved out of this section; given here, they raise
    #: ``"<path.key> <text>"`` instead of "unknown key" (an old name names its new place).
    MOVED: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        values = _checked(type(self), {f.name: getattr(self, f.name) for f in fields(self)}, self.PATH)
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: store the normalised value (1 -> 1.0, list -> tuple)

    @classmethod
    def check_values(cls, values: Dict[str, Any], path: str) -> None:
        """Check rules that join several fields; ``values`` are already checked one by one.

        Override in a section; may replace entries of ``values`` (normalisation). Raise
        TypeError/ValueError naming the key paths (``join_key(path, name)``).
        """

    @classmethod
    def from_dict(cls: Type[S], data: Any, path: Optional[str] = None) -> S:
        """Build the section from a mapping.

        Args:
            data: ``{key: value}``; nested sections as nested mappings; missing keys take defaults.
            path: the section's key path for messages (default: the class's ``PATH``).

        Returns:
            The checked section.

        Raises:
            ValueError: an unknown key (named by its full path) or a bad value.
            TypeError: a value of the wrong type.
        """
        path = cls.PATH if path is None else path
        moved = [name for name in data if isinstance(name, str) and name in cls.MOVED] \
            if isinstance(data, Mapping) else []
        if moved:
            raise ValueError(f"{join_key(path, moved[0])} {cls.MOVED[moved[0]]}")
        check_keys(data, path, [f.name for f in fields(cls)])
        values = {}
        for f in fields(cls):
            sub, key = f.metadata.get(_SECTION), join_key(path, f.name)
            if f.name in data:
                value = data[f.name]
                if sub is not None and not isinstance(value, sub) and not (value is None and f.metadata[_OPTIONAL]):
                    value = sub.from_dict(_with_defaults(f, value), key)
            elif sub is not None and not f.metadata[_OPTIONAL]:
                value = sub.from_dict(_with_defaults(f, {}), key)
            else:
                value = _default(f)
                if value is MISSING:
                    raise ValueError(f"{key} is required (allowed keys under {path or 'the top level'}: "
                                     f"{', '.join(x.name for x in fields(cls))})")
            values[f.name] = value
        return cls(**_checked(cls, values, path))

    def to_dict(self) -> Dict[str, Any]:
        """Return the section as plain data (tuples as lists) that ``from_dict`` reads back to an equal object."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def with_overrides(self: S, overrides: Mapping[str, Any]) -> S:
        """A copy with dotted keys replaced, checked like a file.

        Args:
            overrides: ``{"engine.optimizer.params.lr": 1e-3, ...}`` (paths relative to this section).

        Returns:
            The new section; this one is unchanged.
        """
        return type(self).from_dict(apply_overrides(self.to_dict(), overrides), self.PATH)

    @classmethod
    def describe(cls, path: Optional[str] = None) -> List[KeyDoc]:
        """Every key of the section and its subsections, in declaration order."""
        path = cls.PATH if path is None else path
        rows: List[KeyDoc] = []
        for f in fields(cls):
            key = join_key(path, f.name)
            sub = f.metadata.get(_SECTION)
            if sub is not None:
                if f.metadata[_OPTIONAL]:
                    rows.append(KeyDoc(key, "table or absent", "absent", f.metadata[_DOC]))
                defaults = f.metadata.get(_DEFAULTS) or {}
                rows.extend(KeyDoc(r.path, r.type, default_text(defaults[r.path[len(key) + 1:]]), r.doc, r.variant)
                            if r.path[len(key) + 1:] in defaults else r for r in sub.describe(key))
                continue
            rows.append(KeyDoc(key, f.metadata.get(_TYPE) or type_text(f.type), default_text(_default(f)),
                               f.metadata[_DOC]))
            for name, variant in (f.metadata.get(_VARIANTS) or {}).items():
                rows.extend(KeyDoc(r.path, r.type, r.default, r.doc, f'type = "{name}"') for r in variant.describe(key))
        return rows


def _with_defaults(f: Field, data: Any) -> Any:
    """``data`` with the parent's defaults (``section(defaults=...)``) under it; a non-mapping passes to the check."""
    defaults = f.metadata.get(_DEFAULTS)
    return {**defaults, **data} if defaults and isinstance(data, Mapping) else data


def _checked(cls: Type[Section], values: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Check each field of ``values`` (by its ``check`` or its section type), then the section's joint rules."""
    out = {}
    for f in fields(cls):
        value, key = values[f.name], join_key(path, f.name)
        sub = f.metadata.get(_SECTION)
        if sub is not None:
            if not isinstance(value, sub) and not (value is None and f.metadata[_OPTIONAL]):
                raise TypeError(f"{key} must be a {sub.__name__}, got {type(value).__name__}: {value!r}")
        elif f.metadata.get(_CHECK) is not None:
            value = f.metadata[_CHECK](value, key)
        out[f.name] = value
    cls.check_values(out, path)
    return out


def default_text(value: Any) -> str:
    """A default as the reference shows it: JSON spelling (``null``, ``true``, ``[0.9, 0.999]``)."""
    if value is MISSING:
        return "required"
    return json.dumps(_plain(value))


_TYPE_WORDS = {"int": "int", "float": "float", "bool": "bool", "str": "str", "Any": "any"}


def _split_args(text: str) -> List[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def type_text(annotation: Any) -> str:
    """A field annotation in config words: ``Optional[int]`` -> ``int or null``, ``Tuple[str, ...]`` -> ``list of str``."""
    if isinstance(annotation, type):
        text = annotation.__name__
    else:  # a string (postponed annotations) or a typing object such as typing.Optional[int]
        text = str(annotation).replace("typing.", "")
    m = re.fullmatch(r"(\w+)\[(.*)\]", text.strip())
    if not m:
        return _TYPE_WORDS.get(text.strip(), text.strip())
    outer, args = m.group(1), _split_args(m.group(2))
    if outer == "Optional":
        return f"{type_text(args[0])} or null"
    if outer == "Union":
        return " or ".join(type_text(a) for a in args)
    if outer in ("Tuple", "tuple", "List", "list"):
        if len(args) == 2 and args[1] == "...":
            return f"list of {type_text(args[0])}"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if outer in ("Dict", "dict", "Mapping"):
        return f"table of {type_text(args[1])}"
    return text


# --- files and overrides ----------------------------------------------------------------------------------------

def _toml():
    try:
        import tomllib  # Python 3.11+
        return tomllib
    except ImportError:  # Python 3.10: the same parser ships as 'tomli'
        try:
            import tomli
            return tomli
        except ImportError:
            raise ImportError("reading TOML on Python 3.10 needs the 'tomli' package (pip install tomli); "
                              "or write the config as JSON") from None


def read_config_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a ``.json`` or ``.toml`` config file into a dict; every error names the file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: another suffix, text that is not UTF-8, or invalid JSON/TOML.
        TypeError: the top level is not a mapping (a JSON list, say).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ValueError(f"config file {str(path)!r} must end in .json or .toml, got suffix {suffix!r}")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    toml = _toml() if suffix == ".toml" else None
    try:
        data = json.loads(text) if toml is None else toml.loads(text)
    except ValueError as err:  # json.JSONDecodeError and TOMLDecodeError both derive from ValueError
        raise ValueError(f"{path}: invalid {suffix[1:].upper()}: {err}") from None
    if not isinstance(data, dict):
        raise TypeError(f"{path}: config must be a mapping (JSON object / TOML table) at the top level, "
                        f"got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """A command-line value in TOML syntax (``10``, ``true``, ``[0.9, 0.95]``, ``"x"``); anything else stays a str."""
    try:
        return _toml().loads(f"v = {text.strip()}")["v"]
    except ValueError:
        return text.strip()


def parse_override(text: str) -> Tuple[str, Any]:
    """Split ``"engine.optimizer.params.lr=1e-3"`` into the dotted key and its TOML-typed value."""
    if not isinstance(text, str):
        raise TypeError(f"override must be a str 'key.path=value', got {type(text).__name__}: {text!r}")
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} must look like section.key=value (e.g. train.steps=10)")
    return key.strip(), parse_value(raw)


def apply_overrides(data: Mapping[str, Any], overrides: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A deep copy of ``data`` with each dotted key of ``overrides`` set (missing tables are created).

    Keys are checked by the section that reads the result, so an unknown key is reported with its
    full path there; here only the shape of the dotted key is checked.
    """
    out = copy.deepcopy(dict(check_mapping(data, "config")))
    for dotted, value in (overrides or {}).items():
        parts = dotted.split(".") if isinstance(dotted, str) else []
        if not parts or not all(parts):
            raise ValueError(f"override key {dotted!r} must be a dotted key path like 'train.steps'")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[:depth + 1])
                raise ValueError(f"override {dotted!r}: {prefix} is a value ({child!r}), not a section with keys")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return out


def load_source(source: Any, what: str) -> Dict[str, Any]:
    """The mapping behind a config ``source``: a mapping (copied) or a path to a JSON/TOML file.

    Args:
        source: a mapping, a str or PathLike naming a ``.json``/``.toml`` file, or None (empty).
        what: the expected source in words, for the TypeError.
    """
    if source is None:
        return {}
    if isinstance(source, (str, os.PathLike)):
        return read_config_file(source)
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(check_mapping(source, "config")))
    raise TypeError(f"config must be {what}, got {type(source).__name__}")
