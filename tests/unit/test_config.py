from pathlib import Path

import pytest

from recsys.config import ConfigError, available_profiles, flatten_config, load_config

REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def test_repo_conf_loads_and_every_key_is_commented():
    config = load_config(REPO_CONF)
    assert config.sessions.min_length >= 2
    for file in REPO_CONF.rglob("*.yaml"):  # the section files and conf/profiles/
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


def _conf_with_profile(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.yaml").write_text("epochs: 10\nn_sample: 2048\n")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "films.yaml").write_text(text)
    return tmp_path


def test_profile_overlays_section_files_and_overrides_still_win(tmp_path, monkeypatch):
    monkeypatch.delenv("RECSYS_PROFILE", raising=False)
    conf = _conf_with_profile(tmp_path, "train:\n  epochs: 3\nsessions:\n  mode: user\n")
    assert load_config(conf).train.epochs == 10  # no profile: the section files as they are
    config = load_config(conf, ["train.epochs=7"], profile="films")
    assert (config.train.epochs, config.train.n_sample, config.sessions.mode) == (7, 2048, "user")
    monkeypatch.setenv("RECSYS_PROFILE", "films")  # how the CLI's --profile reaches flows and workers
    assert load_config(conf).train.epochs == 3


def test_unknown_profile_and_bad_profile_content_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("RECSYS_PROFILE", raising=False)
    conf = _conf_with_profile(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"profile 'nope'.*known profiles: films"):
        load_config(conf, profile="nope")
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        load_config(conf, profile="films")
    (conf / "profiles" / "films.yaml").write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_config(conf, profile="films")


def test_every_shipped_profile_is_valid(monkeypatch):
    monkeypatch.delenv("RECSYS_PROFILE", raising=False)
    names = available_profiles(REPO_CONF)
    assert "movielens" in names
    base = load_config(REPO_CONF)
    for name in names:
        assert load_config(REPO_CONF, profile=name) != base, f"profile {name} changes nothing"
