from pathlib import Path

import pytest

from shared.config import ConfigError, PipelineConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_pipeline_yaml_matches_the_defaults():
    # pipeline.yaml is the documented reference: it must load and say what the dataclasses default to
    assert load_config(REPO / "pipeline.yaml") == PipelineConfig().validate()


def test_overrides_are_typed():
    cfg = load_config(None, ["preprocess.workers=3", "source.splits=[train]", "model.max_pixels=1000000", "preprocess.fetch.cache_dir=null"])
    assert cfg.preprocess.workers == 3 and cfg.source.splits == ["train"]
    assert cfg.model.max_pixels == 1_000_000 and cfg.preprocess.fetch.cache_dir is None
    assert load_config(None, ["train.eval_samples=all"]).train.eval_samples == "all"
    assert load_config(None, ["train.eval_samples=8"]).train.eval_samples == 8


@pytest.mark.parametrize(
    "override, field",
    [
        ("preprocess.workers=-1", "preprocess.workers"),
        ("preprocess.workers=two", "preprocess.workers"),
        ("preprocess.response_template=no answer here", "preprocess.response_template"),
        ("shards.zstd_level=40", "shards.zstd_level"),
        ("preprocess.fetch.retries=-2", "preprocess.fetch.retries"),
        ("source.input_kee=problem", "input_kee"),
        ("model.min_pixels=100", None),
        ("train.eval_samples=some", "train.eval_samples"),
        ("train.eval_samples=-1", "train.eval_samples"),
        ("train.attention_backend=cudnn", "train.attention_backend"),
        ("train.vision_attention_backend=flash", "train.vision_attention_backend"),
    ],
)
def test_bad_values_name_the_field(override, field):
    overrides = [override] + (["model.max_pixels=10"] if field is None else [])
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert (field or "model.min_pixels") in str(e.value)


def test_a_split_needs_a_file_or_a_hub_repo():
    with pytest.raises(ConfigError, match="source.files.train=PATH"):
        load_config(None, ["source.hf_repo=null"])


def test_missing_config_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "nope.yaml")
