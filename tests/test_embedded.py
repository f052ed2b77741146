"""The embedded benchmarks registry: `embedded` and `embedded:<name>` for data and model."""

import pytest

from privtune.embedded import DEFAULT, EMBEDDED, embedded, is_embedded
from privtune.errors import ConfigError


def test_names_resolve_and_unknown_ones_list_the_valid():
    assert embedded("embedded").name == DEFAULT
    assert embedded("embedded:portraits").data.name == "portraits.parquet"
    assert embedded("embedded:emoji").model.name == "tiny-sd"
    assert is_embedded("embedded:emoji") and not is_embedded("./embedded")
    with pytest.raises(ConfigError, match="embedded:portraits"):
        embedded("embedded:nope")


def test_every_embedded_data_set_ships():
    for bench in EMBEDDED.values():
        assert bench.data.is_file(), bench


def test_duplicated_benchmark_pins_the_emoji_set():
    from privtune.config import load_config

    cfg = load_config("duplicated")
    assert cfg.model.base == "embedded:emoji" and cfg.data.source == "embedded:emoji"
