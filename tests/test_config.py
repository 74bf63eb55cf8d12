"""YAML -> dataclass validation: errors name the bad key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from attn_mod.config import ConfigError, from_dict, load_config


@dataclass
class Inner:
    alpha: list[float] = field(default_factory=lambda: [0.0])
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    steps: int = 3
    lr: float = 1e-3
    flag: bool = False
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)

    def validate(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def test_valid_and_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\nsteps: 5\nlr: 1\ninner:\n  alpha: [0.1, 2]\n  mode: b\nitems:\n  - {mode: a}\n")
    cfg = load_config(Outer, p)
    assert cfg.steps == 5 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.inner.alpha == [0.1, 2.0] and cfg.inner.mode == "b" and cfg.items[0].mode == "a"
    assert from_dict(Outer, {}).inner.alpha == [0.0]


@pytest.mark.parametrize("data, match", [
    ({"stepz": 3}, r"config.stepz: unknown key; known keys: name, steps"),
    ({"steps": "3"}, r"config.steps: expected an integer"),
    ({"steps": True}, r"config.steps: expected an integer"),
    ({"flag": "yes"}, r"config.flag: expected true/false"),
    ({"inner": {"alpah": [1]}}, r"config.inner.alpah: unknown key"),
    ({"inner": {"alpha": [0.1, "x"]}}, r"config.inner.alpha\[1\]: expected a number"),
    ({"inner": {"mode": "c"}}, r"config.inner.mode: 'c' is not one of \['a', 'b'\]"),
    ({"items": [{"mode": "z"}]}, r"config.items\[0\].mode"),
    ({"limit": "all"}, r"config.limit"),
    ({"steps": 0}, r"config: steps must be >= 1"),
    ({"inner": 3}, r"config.inner: expected a mapping"),
])
def test_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Outer, data)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
