from pathlib import Path

import pytest

from ftlib.core.config import ConfigError, load_params
from tests.conftest import REPO


def test_repo_params_load_and_match_course_defaults():
    p = load_params(REPO / "params.yaml")
    assert p.base_model == "embedded:smollm2-135m-instruct"
    assert (p.split.train, p.split.validation, p.split.test) == (0.8, 0.1, 0.1)
    assert p.validate.min_output_chars == 5  # course notes 3.2
    assert p.data.labels == ["POSITIVO", "NEGATIVO", "NEUTRAL"]
    assert p.trust_remote_code is False


def test_params_yaml_and_the_dataclass_defaults_agree():
    """One source of defaults: the shipped params.yaml sets exactly what Params() defaults to,
    so tests built from either train the same thing."""
    from ftlib.core.config import Params, as_dict

    assert as_dict(load_params(REPO / "params.yaml")) == as_dict(Params())


def test_overrides_are_typed():
    p = load_params(None, ["split.train=0.7", "split.test=0.2", "validate.duplicates=warning",
                           "data.labels=A,B", "max_seq_length=1024"])
    assert p.split.train == 0.7 and p.max_seq_length == 1024
    assert p.validate.duplicates == "warning" and p.data.labels == ["A", "B"]


@pytest.mark.parametrize("override", ["split.train=0.9", "nope.x=1", "split.nope=1", "validate.duplicates=maybe", "novalue",
                                      "train.lora_layers=-1"])
def test_bad_overrides_are_refused(override):
    with pytest.raises(ConfigError):
        load_params(None, [override])


def test_unknown_key_in_file_is_refused(tmp_path: Path):
    f = tmp_path / "params.yaml"
    f.write_text("split:\n  trian: 0.8\n")
    with pytest.raises(ConfigError, match="trian"):
        load_params(f)
