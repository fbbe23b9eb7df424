"""Config validation: every error names the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from harmony.config import ConfigError, load_config, parse_override, validate_config


def test_examples_validate():
    for name in ("quickstart", "fmnist-shard2-50"):
        cfg = load_config(f"examples/{name}.yaml")
        assert cfg.data.dataset == "fashion_mnist"
    paper = load_config("examples/fmnist-shard2-50.yaml")
    assert (paper.fleet.num_clients, paper.data.num_shards, paper.data.shards_per_client) == (50, 100, 2)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"train": {"participation": 1.5}}, r"train.participation = 1.5: .*less than or equal to 1"),
        ({"train": {"algorithm": "fedsgd"}}, r"train.algorithm = 'fedsgd': unknown algorithm .* known: splitfed"),
        ({"model": {"family": "alexnet"}}, r"model.family = 'alexnet': Input should be 'cnn8'"),
        ({"data": {"rhos": [0.2, 1.4]}}, r"data.rhos = \[0.2, 1.4\]: every OOD ratio must lie in \[0, 1\]"),
        ({"fleet": {"num_clients": 0}}, r"fleet.num_clients = 0: .*greater than or equal to 1"),
        ({"train": {"lr": -1}}, r"train.lr = -1: .*greater than 0"),
        ({"trian": {"lr": 0.1}}, r"trian = .*unknown key"),
        ({"fleet": {"split_depths": [2], "profiles": ["pi4"]}}, r"fleet = .*only one of split_depths"),
    ],
)
def test_errors_name_key_value_and_fix(raw, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_config(raw)


def test_overrides_parse_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {rounds: 3}\n")
    cfg = load_config(path, ["train.rounds=5", "fleet.split_depths=[2,4]", "train.algorithm=splitgp(lambda=1)"])
    assert cfg.train.rounds == 5 and cfg.fleet.split_depths == [2, 4]
    assert parse_override("seed=3") == ("seed", 3)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["train.rounds"])
    with pytest.raises(ConfigError, match="train.rounds = 0"):
        load_config(path, ["train.rounds=0"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
