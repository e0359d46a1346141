import dataclasses

import pytest

from mmlm.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    read_yaml,
    to_dict,
)


@dataclasses.dataclass
class Inner:
    width: int = 4
    names: list[str] = dataclasses.field(default_factory=list)
    ratio: float | None = None


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    lr: float = 1e-3
    pair: tuple[int, int] = (1, 2)


def test_from_dict_builds_nested_and_coerces():
    cfg = from_dict(Outer, {"inner": {"width": 8, "names": ["a"], "ratio": 1}, "lr": 1, "pair": [3, 4]})
    assert cfg.inner.width == 8 and cfg.inner.ratio == 1.0 and isinstance(cfg.lr, float)
    assert cfg.pair == (3, 4)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_names_section_and_closest_key():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"widht": 3}})
    msg = str(err.value)
    assert "'widht'" in msg and "'inner'" in msg and "did you mean 'width'" in msg


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError, match=r"inner\.width: expected int, got 'wide'"):
        from_dict(Outer, {"inner": {"width": "wide"}})
    with pytest.raises(ConfigError, match="expected bool"):
        from_dict(TrainConfig, {"gradient_checkpointing": "yes"})
    with pytest.raises(ConfigError, match="expected 2 items"):
        from_dict(Outer, {"pair": [1, 2, 3]})


def test_value_checks_in_sections():
    with pytest.raises(ConfigError, match="on_bad_image"):
        from_dict(DataConfig, {"on_bad_image": "ignore"})
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        from_dict(TrainConfig, {"grad_accum_steps": 0})


def test_overrides_parse_yaml_scalars():
    data = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=3e-4", "data.batch_size=32", "train.module_lr={vision: 0}"])
    assert data == {"train": {"lr": 3e-4, "module_lr": {"vision": 0}}, "data": {"batch_size": 32}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.lr"])


def test_read_yaml_errors_name_file_and_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        read_yaml(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        read_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        read_yaml(listy)


def test_load_config_unknown_task_and_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'captionning'.*did you mean 'captioning'"):
        load_config({"task": "captionning"})
    path = tmp_path / "r.yaml"
    path.write_text("task: captioning\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "r.yaml" in str(err.value) and "did you mean 'lr'" in str(err.value)


def test_yaml_exponent_floats(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: captioning\ntrain:\n  lr: 3e-4\n")
    assert load_config(path).train.lr == pytest.approx(3e-4)
