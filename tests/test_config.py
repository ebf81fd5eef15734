from dataclasses import dataclass, field

import pytest

from ctssl_core.config import ConfigError, build, load_profile, merge, parse_overrides, to_dict


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass(frozen=True)
class Outer:
    name: str = "a"
    fractions: tuple[float, ...] = (0.1, 1.0)
    inner: Inner = field(default_factory=Inner)
    flag: bool = False
    maybe: int | None = None


def test_overrides_parse_yaml_scalars_and_nesting():
    assert parse_overrides(["inner.lr=3e-4", "flag=true", "name=x", "fractions=[0.5, 1]"]) == {
        "inner": {"lr": 3e-4}, "flag": True, "name": "x", "fractions": [0.5, 1]}


def test_build_fills_nested_dataclass_and_converts_types():
    cfg = build(Outer, {"inner": {"steps": 5}}, ["inner.lr=0.5", "fractions=[0.25]", "maybe=3"])
    assert cfg.inner == Inner(lr=0.5, steps=5)
    assert cfg.fractions == (0.25,)
    assert cfg.maybe == 3
    assert to_dict(cfg)["inner"]["lr"] == 0.5


def test_unknown_key_names_the_close_match():
    with pytest.raises(ConfigError, match=r"Did you mean 'steps'"):
        build(Outer, {"inner": {"stpes": 3}})


@pytest.mark.parametrize("over", ["inner.steps=1.5", "flag=maybe", "inner.lr=fast", "oops"])
def test_bad_values_raise_config_error(over):
    with pytest.raises(ConfigError):
        build(Outer, {}, [over])


def test_merge_is_deep_and_right_wins():
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_unknown_profile_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile"):
        load_profile("no-such-profile")
    p = tmp_path / "mine.yaml"
    p.write_text("pretrain:\n  steps: 3\n")
    assert load_profile(p) == {"pretrain": {"steps": 3}, "profile": "mine"}
