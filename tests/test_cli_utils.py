"""Flags generated from dataclasses: names, help text, types, bool inversion, presets."""

import argparse
from dataclasses import dataclass, field

import pytest

from megatron_endprompt.cli_utils import (
    Flag,
    add_dataclass_args,
    dataclass_from_args,
    field_docs,
    given_flags,
)
from megatron_endprompt.config import RopeScalingConfig


@dataclass
class Toy:
    """A toy config."""

    num_layers: int = 2
    """Number of transformer layers."""
    lr: float | None = None
    """Peak learning rate."""
    add_bias_linear: bool = True
    """Bias in linear layers."""
    swiglu: bool = False
    """SwiGLU MLP."""
    cues: list[str] = field(default_factory=list)
    """Terminal cues."""

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"--num-layers={self.num_layers}: must be >= 1")


def _parser():
    p = argparse.ArgumentParser()
    add_dataclass_args(
        p, Toy, "toy", flags={"add_bias_linear": Flag("--disable-bias-linear", True)}
    )
    return p


def test_field_docs_are_help_text():
    assert field_docs(Toy)["num_layers"] == "Number of transformer layers."
    assert "Number of transformer layers." in _parser().format_help()


def test_parse_types_and_bool_inversion():
    args = _parser().parse_args(
        [
            "--num-layers",
            "4",
            "--lr",
            "3e-4",
            "--disable-bias-linear",
            "--swiglu",
            "--cues",
            "a",
            "b",
        ]
    )
    toy = dataclass_from_args(Toy, args)
    assert toy == Toy(num_layers=4, lr=3e-4, add_bias_linear=False, swiglu=True, cues=["a", "b"])


def test_missing_flags_keep_defaults_or_base():
    args = _parser().parse_args(["--lr", "1e-3"])
    assert dataclass_from_args(Toy, args) == Toy(lr=1e-3)
    assert dataclass_from_args(Toy, args, base=Toy(num_layers=7)) == Toy(num_layers=7, lr=1e-3)
    assert given_flags(args, Toy) == {"lr"}


def test_validation_runs_through_the_dataclass():
    args = _parser().parse_args(["--num-layers", "0"])
    with pytest.raises(ValueError, match="--num-layers=0"):
        dataclass_from_args(Toy, args)


def test_rope_scaling_flags_with_prefix():
    p = argparse.ArgumentParser()
    add_dataclass_args(
        p, RopeScalingConfig, "rope", flags={"rope_type": Flag("--rope-scaling-type")}
    )
    args = p.parse_args(["--rope-scaling-type", "linear", "--factor", "2.5"])
    cfg = dataclass_from_args(RopeScalingConfig, args)
    assert cfg.rope_type == "linear" and cfg.factor == 2.5
