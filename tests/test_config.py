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


@pytest.mark.parametrize("override, key", [
    ("split.train=nan", "split.train"), ("split.train=0", "split"), ("train.lora_r=0", "train.lora_r"),
    ("train.learning_rate=nan", "train.learning_rate"), ("train.learning_rate=-1e-4", "train.learning_rate"),
    ("max_seq_length=0", "max_seq_length"), ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size"),
    ("base_model=", "base_model"), ("register.model_name= ", "register.model_name"), ("train.lora_r=abc", "train.lora_r"),
    ("train.max_steps=0", "train.max_steps"), ("train.num_train_epochs=inf", "train.num_train_epochs"),
    ("train.lora_dropout=1", "train.lora_dropout"), ("register.accuracy_threshold=1.5", "register.accuracy_threshold"),
    ("trust_remote_code=1", "trust_remote_code"), ("data.labels=A,A", "data.labels"), ("train.target_modules=", "train.target_modules"),
    ("quantize.max_quant_drop={q8_0: 2}", "quantize.max_quant_drop.q8_0"), ("benchmark.max_examples=-3", "benchmark.max_examples"),
])
def test_every_bad_value_is_refused_at_load_with_its_key(override, key):
    """Issue 16: a value that would fail 40 s later (or silently write an empty split) exits 2 at load, naming the key."""
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}"):
        load_params(None, [override])


def test_optional_values_may_be_null():
    assert load_params(None, ["register.baseline_margin=null"]).register.baseline_margin is None


def test_unknown_key_in_file_is_refused(tmp_path: Path):
    f = tmp_path / "params.yaml"
    f.write_text("split:\n  trian: 0.8\n")
    with pytest.raises(ConfigError, match="trian"):
        load_params(f)


def test_profiles_load_and_keep_their_outputs_under_their_root():
    """A profile is one switch (`ftlib run --profile`, the DAG form): every profile loads on the shipped params, the
    smoke profile cuts each stage and writes only under its own root, and an unknown name is refused."""
    from ftlib.core.config import PROFILES, get_profile

    assert get_profile(None) is PROFILES["full"] and get_profile("full").overrides == ()
    for profile in PROFILES.values():
        load_params(REPO / "params.yaml", list(profile.overrides))
    smoke = get_profile("smoke")
    p = load_params(REPO / "params.yaml", [*smoke.overrides, "train.lora_r=8"])  # the run's own overrides still apply
    assert p.train.lora_r == 8 and p.train.max_steps > 0 and p.quantize.variants == ["q8_0"] and not p.benchmark.include_base
    assert smoke.root and not smoke.register
    for out in (p.train.output_dir, p.train.checkpoint_dir, smoke.path("data/splits"), smoke.path("reports")):
        assert Path(out).parts[:2] == Path(smoke.root).parts[:2], out
    with pytest.raises(ConfigError, match="profile: one of full, smoke"):
        get_profile("quick")
