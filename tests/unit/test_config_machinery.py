"""The shared checks (moesaic._checks) and config machinery (moesaic._config), on small sections of their own."""

import json
from dataclasses import dataclass
from functools import partial
from typing import Optional, Tuple

import pytest

from moesaic._checks import (check_bool, check_choice, check_int, check_keys, check_list, check_mapping,
                             check_number, check_str, join_key)
from moesaic._config import (KeyDoc, Section, apply_overrides, parse_override, parse_value, read_config_file,
                             section, setting, type_text)


# --- checks ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc, message", [
    (lambda: check_int(2.0, "a.n"), TypeError, "a.n must be an int, got float: 2.0"),
    (lambda: check_int(True, "a.n"), TypeError, "a.n must be an int, got bool: True"),
    (lambda: check_int(None, "a.n", none_word="null"), None, None),
    (lambda: check_int("3", "a.n", none_word="null"), TypeError, "a.n must be an int or null, got str: '3'"),
    (lambda: check_int(0, "a.n", 1), ValueError, "a.n must be an int >= 1, got 0"),
    (lambda: check_int(9, "a.k", 1, 4, hi_text="a.e=4"), ValueError, "a.k must be an int in [1, a.e=4], got 9"),
    (lambda: check_int(9, "a.n", hi=4), ValueError, "a.n must be an int <= 4, got 9"),
    (lambda: check_number("1", "a.x"), TypeError, "a.x must be a number, got str: '1'"),
    (lambda: check_number(False, "a.x"), TypeError, "a.x must be a number, got bool: False"),
    (lambda: check_number(0, "a.x", 0.0, lo_open=True), ValueError, "a.x must be a finite number in (0, inf), got 0.0"),
    (lambda: check_number(1.0, "a.x", 0.0, 1.0, hi_open=True), ValueError,
     "a.x must be a finite number in [0, 1), got 1.0"),
    (lambda: check_number(float("nan"), "a.x"), ValueError, "a.x must be a finite number in (-inf, inf), got nan"),
    (lambda: check_bool(1, "a.flag"), TypeError, "a.flag must be a bool (true/false), got int: 1"),
    (lambda: check_bool("true", "a.flag"), TypeError, "a.flag must be a bool (true/false), got str: 'true'"),
    (lambda: check_str("", "a.s"), ValueError, "a.s must be a non-empty str, got ''"),
    (lambda: check_str(3, "a.s", allow_none=True), TypeError, "a.s must be a non-empty str or null, got int: 3"),
    (lambda: check_choice("x", "a.c", ("p", "q")), ValueError, "a.c must be one of ['p', 'q'], got 'x'"),
    (lambda: check_choice(1, "a.c", ("p", "q")), TypeError, "a.c must be a str, one of ['p', 'q'], got int: 1"),
    (lambda: check_choice(True, "a.c", (0, 1)), TypeError, "a.c must be a int, one of [0, 1], got bool: True"),
    (lambda: check_choice("P", "a.c", ("p",), fold_case=True), None, None),
    (lambda: check_mapping([1], "a.m"), TypeError, "a.m must be a mapping (dict / JSON object / TOML table), "
                                                  "got list: [1]"),
    (lambda: check_mapping({1: 2}, "a.m"), TypeError, "a.m keys must be str, got int: 1"),
    (lambda: check_mapping(3, ""), TypeError, "config must be a mapping (dict / JSON object / TOML table), got int: 3"),
    (lambda: check_keys({"z": 1}, "a", ["y", "x"]), ValueError, "unknown key 'a.z'; allowed keys under a: x, y"),
    (lambda: check_keys({"z": 1}, "", ["y"]), ValueError, "unknown key 'z'; allowed keys at the top level: y"),
    (lambda: check_list(0.5, "a.l", what="numbers"), TypeError, "a.l must be a list of numbers, got float: 0.5"),
    (lambda: check_list([1], "a.l", length=2, what="numbers"), ValueError,
     "a.l must be a list of numbers (exactly 2 entries), got 1: [1]"),
    (lambda: check_list([], "a.l", min_length=1, what="names"), ValueError,
     "a.l must be a list of names (at least 1 entries), got 0: []"),
    (lambda: check_list([1, "2"], "a.l", check_int), TypeError, "a.l[1] must be an int, got str: '2'"),
])
def test_every_message_names_the_key_the_value_and_what_is_allowed(call, exc, message):
    if exc is None:
        call()
        return
    with pytest.raises(exc) as info:
        call()
    assert str(info.value) == message


def test_checks_normalise():
    assert check_number(2, "x") == 2.0 and isinstance(check_number(2, "x"), float)
    assert check_list([1, 2], "l", check_number) == (1.0, 2.0)
    assert check_choice("adamw", "t", ("AdamW", "SGD"), fold_case=True) == "AdamW"
    assert join_key("", "a") == "a" and join_key("a", "b") == "a.b" and join_key("a.b", 0) == "a.b[0]"


# --- sections ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inner(Section):
    """A nested section."""

    PATH = "inner"

    rate: float = setting(0.5, doc="A rate.", check=partial(check_number, lo=0.0, hi=1.0))
    names: Tuple[str, ...] = setting(("a",), doc="Some names.", check=partial(check_list, item=check_str))


@dataclass(frozen=True)
class Outer(Section):
    """A small tree: values, a nested section, an optional section, a joint rule."""

    size: int = setting(4, doc="A size.", check=partial(check_int, lo=1))
    limit: Optional[int] = setting(None, doc="A limit.", check=partial(check_int, lo=1, none_word="null"))
    inner: Inner = section(Inner, doc="The inner section.")
    extra: Optional[Inner] = section(Inner, optional=True, doc="An optional one.")

    @classmethod
    def check_values(cls, values, path):
        if values["limit"] is not None and values["limit"] < values["size"]:
            raise ValueError(f"{join_key(path, 'limit')} ({values['limit']}) must be >= "
                             f"{join_key(path, 'size')} ({values['size']})")


def test_from_dict_to_dict_round_trip():
    cfg = Outer.from_dict({"size": 2, "inner": {"rate": 1, "names": ["x", "y"]}, "extra": {}})
    assert cfg.inner == Inner(1.0, ("x", "y")) and cfg.extra == Inner() and cfg.limit is None
    assert isinstance(cfg.inner.rate, float)  # normalised when built
    data = cfg.to_dict()
    assert data == {"size": 2, "limit": None, "inner": {"rate": 1.0, "names": ["x", "y"]},
                    "extra": {"rate": 0.5, "names": ["a"]}}
    assert json.loads(json.dumps(data)) == data and Outer.from_dict(data) == cfg
    assert Outer.from_dict({}) == Outer() and Outer().extra is None


def test_errors_carry_the_path_given_or_the_class_path():
    with pytest.raises(ValueError, match=r"^unknown key 'run.inner.rat'; allowed keys under run.inner: names, rate$"):
        Outer.from_dict({"inner": {"rat": 1}}, "run")
    with pytest.raises(ValueError, match=r"^inner.rate must be a finite number in \[0, 1\], got 2.0$"):
        Inner(rate=2)  # built directly: the class's own path
    with pytest.raises(ValueError, match=r"^run.extra.rate must be"):
        Outer.from_dict({"extra": {"rate": 2}}, "run")
    with pytest.raises(TypeError, match=r"^run.inner.names\[0\] must be a non-empty str, got int: 1$"):
        Outer.from_dict({"inner": {"names": [1]}}, "run")
    with pytest.raises(ValueError, match=r"^limit \(2\) must be >= size \(4\)$"):
        Outer.from_dict({"limit": 2})
    with pytest.raises(TypeError, match=r"^inner must be a Inner, got dict"):
        Outer(inner={"rate": 1})
    with pytest.raises(TypeError, match=r"^run.inner must be a mapping"):
        Outer.from_dict({"inner": 3}, "run")


def test_with_overrides_and_apply_overrides():
    cfg = Outer()
    new = cfg.with_overrides({"inner.rate": 0.25, "extra.names": ["q"], "limit": 9})
    assert new.inner.rate == 0.25 and new.extra == Inner(0.5, ("q",)) and new.limit == 9 and cfg.limit is None
    data = {"a": {"b": 1}}
    out = apply_overrides(data, {"a.c.d": 2})
    assert out == {"a": {"b": 1, "c": {"d": 2}}} and data == {"a": {"b": 1}}  # a copy
    with pytest.raises(ValueError, match=r"override 'a.b.c': a.b is a value \(1\), not a section with keys"):
        apply_overrides(data, {"a.b.c": 1})
    with pytest.raises(ValueError, match=r"override key '.a' must be a dotted key path"):
        apply_overrides(data, {".a": 1})


def test_describe_lists_every_key_with_type_default_and_meaning():
    rows = Outer.describe()
    assert rows[0] == KeyDoc("size", "int", "4", "A size.")
    assert rows[1] == KeyDoc("limit", "int or null", "null", "A limit.")
    assert KeyDoc("inner.names", "list of str", '["a"]', "Some names.") in rows
    assert KeyDoc("extra", "table or absent", "absent", "An optional one.") in rows
    assert [r.path for r in rows] == ["size", "limit", "inner.rate", "inner.names", "extra", "extra.rate", "extra.names"]
    assert type_text("Optional[Union[str, int]]") == "str or int or null"
    assert type_text("Dict[str, float]") == "table of float" and type_text("Tuple[float, float]") == "[float, float]"


# --- files and the command line ------------------------------------------------------------------------------

def test_read_config_file(tmp_path):
    (tmp_path / "a.toml").write_text('[inner]\nrate = 0.1\n')
    (tmp_path / "a.json").write_text('{"inner": {"rate": 0.1}}')
    assert read_config_file(tmp_path / "a.toml") == read_config_file(str(tmp_path / "a.json")) == \
        {"inner": {"rate": 0.1}}
    for name, text, exc, pattern in [
        ("b.toml", "a = = 1", ValueError, r"b.toml: invalid TOML: "),
        ("b.json", "{", ValueError, r"b.json: invalid JSON: "),
        ("c.json", "[1]", TypeError, r"c.json: config must be a mapping \(JSON object / TOML table\) at the top level, "
                                     r"got list"),
        ("d.yaml", "a: 1", ValueError, r"config file '.*d.yaml' must end in .json or .toml, got suffix '.yaml'"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(exc, match=pattern):
            read_config_file(tmp_path / name)
    (tmp_path / "e.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"e.toml: not UTF-8 text"):
        read_config_file(tmp_path / "e.toml")
    with pytest.raises(FileNotFoundError, match=r"config file '.*missing.toml' does not exist"):
        read_config_file(tmp_path / "missing.toml")


def test_parse_override():
    assert parse_override("train.steps=10") == ("train.steps", 10)
    assert parse_override("engine.optimizer.params.betas = [0.8, 0.9]") == ("engine.optimizer.params.betas",
                                                                            [0.8, 0.9])
    assert parse_override("engine.bf16.enabled=true") == ("engine.bf16.enabled", True)
    assert parse_override("data.path=some/dir") == ("data.path", "some/dir")  # not TOML: kept as text
    assert parse_override('a.b="x=y"') == ("a.b", "x=y")
    assert parse_value("{ g = 0.5 }") == {"g": 0.5}
    with pytest.raises(ValueError, match="must look like section.key=value"):
        parse_override("train.steps")
    with pytest.raises(ValueError, match="must look like section.key=value"):
        parse_override("=3")
