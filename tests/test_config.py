"""The Hydra experiment layer composes, and every group option loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
GROUPS = ["dataset", "model", "federation", "unlearning", "request"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_default_config_composes_with_every_group():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config")
    for group in GROUPS:
        assert group in cfg, f"group {group!r} missing from the composed config"
    assert cfg.dataset.name == "cifar100"
    assert cfg.dataset.fallback == "mnist"
    assert cfg.federation.num_clients >= 2


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_option_composes(group):
    options = _options(group)
    assert options, f"conf/{group} has no options"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for option in options:
            cfg = compose(config_name="config", overrides=[f"{group}={option}"])
            assert cfg[group] is not None


def test_unknown_key_is_refused():
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name="config", overrides=["federation.num_clientz=3"])
