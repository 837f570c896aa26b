from pathlib import Path

import pytest

from recsys.config import ConfigError, flatten_config, load_config

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def test_repo_conf_loads_and_every_key_is_commented():
    config = load_config(REPO_CONF)
    assert config.sessions.min_length >= 2
    for file in REPO_CONF.glob("*.yaml"):
        for line in file.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and ":" in line:
                key_only = line.rstrip().endswith(":")  # a nested mapping's header line
                assert key_only or "#" in line, f"{file.name}: uncommented key line {line!r}"


def test_override_nested_key_and_value_parsing():
    config = load_config(REPO_CONF, ["ingest.columns.user_id=uid", "sessions.gap_minutes=45",
                                     "evaluate.cutoffs=[1, 3]"])
    assert config.ingest.columns.user_id == "uid"
    assert config.sessions.gap_minutes == 45.0
    assert config.evaluate.cutoffs == [1, 3]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.epoch=3", "train.epoch"),
        ("train.epochs=abc", "train.epochs"),
        ("nosuch.key=1", "nosuch"),
        ("sessions.min_length=1", "sessions.min_length"),
    ],
)
def test_bad_override_names_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(REPO_CONF, [override])


def test_unknown_key_in_file_is_named(tmp_path):
    (tmp_path / "train.yaml").write_text("epochs: 2\nbatchsize: 8\n")
    with pytest.raises(ConfigError, match=r"train\.batchsize: unknown key"):
        load_config(tmp_path)


def test_data_root_env_and_flatten(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_DATA_ROOT", str(tmp_path))
    config = load_config(REPO_CONF)
    assert config.paths.events_dir == tmp_path / "events"
    flat = flatten_config(config)
    assert flat["train.batch_size"] == str(config.train.batch_size)
    assert flat["ingest.columns.user_id"] == "user_id"
