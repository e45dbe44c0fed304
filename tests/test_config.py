from pathlib import Path

import pytest

from ppl_cli.config import Config, build_config, field_names, load_yaml
from ppl_cli.errors import PplError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_directory_is_not_empty():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = build_config(str(path))
    assert isinstance(config, Config)
    assert load_yaml(path), "a shipped config should set something"


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: gpt2\nwindow: 512\nstride: 128\n")
    assert Config().model == "smollm2-135m"
    from_file = build_config(str(path))
    assert (from_file.model, from_file.window, from_file.stride) == ("gpt2", 512, 128)
    overridden = build_config(str(path), window=256)
    assert (overridden.model, overridden.window, overridden.stride) == ("gpt2", 256, 128)


def test_dashed_keys_are_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max-batch-tokens: 4096\nadd-bos: false\n")
    config = build_config(str(path))
    assert config.max_batch_tokens == 4096 and config.add_bos is False


@pytest.mark.parametrize(
    "text,message",
    [
        ("windw: 3\n", "unknown key 'windw'"),
        ("window: big\n", "window must be int or null"),
        ("window: true\n", "window must be int or null"),
        ("trust_remote_code: 1\n", "trust_remote_code must be bool"),
        ("model: [a, b]\n", "model must be str"),
        ("- a\n- b\n", "must be a mapping"),
        ("window: [\n", "cannot read config file"),
        ("dtype: float8\n", "dtype must be one of"),
        ("stride: 0\n", "stride must be at least 1"),
        ("limit: 0\n", "limit must be at least 1"),
        ("window: 1\n", "window must be at least 2"),
    ],
)
def test_bad_config_files_are_refused_with_a_clear_message(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PplError, match=message.replace("[", r"\[")):
        build_config(str(path))


def test_missing_config_file():
    with pytest.raises(PplError, match="config file not found"):
        build_config("nope.yaml")


def test_config_is_frozen_and_round_trips():
    config = Config(window=64)
    with pytest.raises(AttributeError):
        config.window = 3
    assert Config(**config.to_dict()) == config
    assert set(config.to_dict()) == set(field_names())
