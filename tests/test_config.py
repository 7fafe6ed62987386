"""The one config loader: profiles, overrides, and errors that name the problem."""
import pytest

from schemas.config import ConfigError, load_config


def test_profiles_load_and_differ():
    default = load_config("default", environ={})
    tiny = load_config("tiny", environ={})
    assert default.profile == "default" and tiny.profile == "tiny"
    assert tiny.ingest.partition_size < default.ingest.partition_size


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  partition_sise: 10\n")
    with pytest.raises(ConfigError, match=r"ingest\.partition_sise"):
        load_config(bad, environ={})


def test_wrong_type_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.partition_size"):
        load_config("tiny", ["ingest.partition_size=many"], environ={})


def test_cli_and_environment_overrides():
    cfg = load_config("tiny", ["ingest.partition_size=3", "audio.allowed_channels=[1, 2]"],
                      environ={"ACEPIPE__RUNNER__MAX_WORKERS": "5"})
    assert cfg.ingest.partition_size == 3
    assert cfg.audio.allowed_channels == [1, 2]
    assert cfg.runner.max_workers == 5


def test_missing_config_lists_the_profiles():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no-such-profile", environ={})


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("audio: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})


def test_without_a_lyrics_database_the_lyrics_stage_is_skipped_and_says_why():
    cfg = load_config("tiny", ["lyrics_db=null"], environ={})
    assert cfg.stages == ["probe", "aesthetics", "transcribe", "rhythm", "caption"]
    assert list(cfg.skipped_stages) == ["lyrics"]
    assert cfg.skipped_stages["lyrics"].startswith("lyrics_db is not set. Set lyrics_db")
    with_db = load_config("tiny", environ={})
    assert "lyrics" in with_db.stages and with_db.skipped_stages == {}


def test_the_default_profile_runs_every_stage():
    from tasks.stage import dag_order

    cfg = load_config("default", ["lyrics_db=lyrics.parquet"], environ={})
    assert dag_order(cfg.stages) == dag_order(["probe", "aesthetics", "transcribe", "lyrics", "rhythm", "caption"])
    assert cfg.latents.compute_dtype == "float32"


def test_config_command_prints_the_effective_config_and_explains_keys(capsys):
    import yaml

    from flows.cli import main

    assert main(["config", "--config", "tiny", "--set", "ingest.partition_size=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["ingest"]["partition_size"] == 3 and shown["profile"] == "tiny"
    assert main(["config", "--config", "tiny", "--explain"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "tracks per partition" in lines["ingest.partition_size"]
    assert "pack.filter.min_pq" in lines and "runner.gpu_concurrency" in lines
