import pytest

from retinanet.config import Config, ConfigError, config_from_dict, config_to_dict, load_config


def test_round_trip():
    cfg = Config()
    cfg.model.backbone = "resnet18"
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'model.backbone'"):
        load_config(overrides=["model.backbon=resnet18"])
    with pytest.raises(ConfigError, match="unknown config key 'model.fpn_chanels'.*fpn_channels"):
        config_from_dict({"model": {"fpn_chanels": 3}})


def test_bare_leaf_names_and_value_parsing():
    cfg = load_config(overrides=["backbone=resnet34", "gamma=1", "anchor_ratios=[1.0]", "allow_low_quality=false"])
    assert cfg.model.backbone == "resnet34" and cfg.loss.gamma == 1.0
    assert cfg.model.anchor_ratios == [1.0] and cfg.model.allow_low_quality is False


def test_booleans_are_strict():
    with pytest.raises(ConfigError, match="true or false"):
        load_config(overrides=["model.allow_low_quality=yes please"])
    with pytest.raises(ConfigError, match="integer"):
        load_config(overrides=["model.num_classes=3.5"])


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  num_classes: 7\n  backbone: resnet18\n")
    cfg = load_config(str(p), ["model.num_classes=9"])
    assert cfg.model.num_classes == 9 and cfg.model.backbone == "resnet18"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
