"""One place for each finite set of names: the CLI reads the registries, the implementations
agree with them, and nothing depends on which module was imported first."""

import argparse
import subprocess
import sys

import pytest

from gesim import registries, symbolic


def _choice_actions(parser, where):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _choice_actions(sub, f"{where} {name}")
        elif action.choices is not None:
            yield where, action


def _registry_objects():
    """The registries themselves (identity, not equal copies typed again)."""
    return [symbolic.TABLE_FORMATS, *(v for k, v in vars(registries).items()
                                     if k.isupper() and isinstance(v, (tuple, dict)))]


def test_every_cli_choices_comes_from_a_registry():
    from gesim.cli import build_parser
    from gesim.figures.__main__ import build_parser as figures_parser

    known = _registry_objects()
    seen = 0
    for parser, where in ((build_parser(), "python -m gesim"), (figures_parser(), "python -m gesim.figures")):
        for at, action in _choice_actions(parser, where):
            seen += 1
            assert any(action.choices is r for r in known), f"{at} {action.option_strings}: typed by hand"
    assert seen >= 14


def test_implementations_agree_with_the_registries():
    from gesim import policies
    from gesim.cli import probe_run as runner
    from gesim.methods import mitigation
    from gesim.probe import api
    from gesim.transformer import data, train

    assert tuple(policies.POLICIES) == registries.POLICIES
    assert data.STRUCTURES == tuple(registries.STRUCTURES) and data.SUFFIX is registries.STRUCTURES
    assert tuple(train.ARCHS) == registries.ARCHS
    assert tuple(train.OPTIMIZERS) == registries.TORCH_OPTIMIZERS
    assert tuple(train.AMP) == registries.AMP
    assert tuple(api.BACKENDS) == registries.PROBE_BACKENDS
    assert tuple(runner.DTYPES) == registries.DTYPES
    assert tuple(mitigation.METHODS) == registries.MITIGATIONS


@pytest.mark.parametrize("name", list(registries.RULES))
def test_every_rule_resolves_to_a_class_with_step(name):
    cls = registries.rule(name)
    assert isinstance(cls, type) and callable(getattr(cls, "step", None))
    from gesim.simulate import optim

    assert type(optim.make(name, 0.1)) is cls


def test_registries_load_no_torch_and_rules_need_no_prior_import():
    code = ("import sys, gesim.registries; assert 'torch' not in sys.modules; "
            "from gesim.simulate import SimConfig, simulate; "
            "s = simulate(SimConfig(rule='pngd', instances=4, steps=1)).summary(); "
            "s2 = simulate(SimConfig(rule='calibrated', instances=4, steps=1)).summary(); "
            "print(s['instances'], s2['instances'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["4", "4"]


def test_unknown_rule_lists_every_registered_name():
    from gesim.errors import GesimError
    from gesim.simulate import optim

    with pytest.raises(GesimError, match="did you mean 'pngd'.*adam, calibrated, pngd, sgd"):
        optim.make("pgnd", 0.1)
