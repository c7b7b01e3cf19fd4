"""cluster.yaml against Ray's own autoscaler schema, and the Dockerfile it runs, checked offline.

No cloud account and no Docker engine here: `ray up`'s own `prepare_config` + `validate_config`
check the cluster config, and the Dockerfile is parsed. Versions must agree everywhere:
pyproject.toml (raypipe, ray pin) = raypipe.__version__ = Dockerfile ARGs = image tags and the
version check in cluster.yaml; torch in the image = .ci/constraints-cpu.txt.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from pathlib import Path

import pytest
import ray
import yaml

import raypipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # fills what `ray up` fills before validating
    validate_config(prepared)
    return prepared


def _run_env(cluster: dict) -> dict[str, str]:
    env = {}
    for option in cluster["docker"].get("run_options", []):
        parts = shlex.split(option)
        if parts[0] in ("--env", "-e"):
            key, _, value = parts[1].partition("=")
            env[key] = value
    return env


def test_versions_agree_between_pyproject_and_the_package():
    assert raypipe.__version__ == VERSION
    ray_pins = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"ray(\[|=)", d)]
    assert ray_pins == [f"ray[train,tune,serve]=={ray.__version__}"]


# --------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_own_schema():
    prepared = _validate(_cluster())
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(head_node_type="missing"),
        lambda c: c["available_node_types"]["gpu_worker"].update(gpus=1),  # not a schema key
        lambda c: c.update(setup_command=[]),  # misspelled top-level key
    ],
    ids=["unknown head type", "unknown node key", "unknown top-level key"],
)
def test_the_schema_check_rejects_a_broken_cluster_yaml(breakage):
    config = _cluster()
    breakage(config)
    with pytest.raises(Exception):  # noqa: B017 - ValueError or jsonschema's ValidationError
        _validate(config)


def test_head_has_no_gpu_and_gpu_workers_autoscale():
    config = _cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert any("--num-gpus=0" in cmd for cmd in config["head_start_ray_commands"])
    gpu_groups = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_groups, "no worker type with a GPU"
    for t in gpu_groups.values():
        assert 0 <= t["min_workers"] < t["max_workers"] <= config["max_workers"]


def test_cluster_runs_the_images_of_this_raypipe_version_and_checks_it():
    config = _cluster()
    docker = config["docker"]
    assert docker["head_image"].endswith(f":{VERSION}-cpu")  # no GPU on the head
    assert docker["worker_image"].endswith(f":{VERSION}-gpu")
    setup = " ".join(config["setup_commands"])
    assert f"raypipe.__version__ == '{VERSION}'" in setup  # a stale image fails `ray up` loudly


def test_cluster_passes_tracking_storage_and_auth_to_every_node():
    config = _cluster()
    env = _run_env(config)
    assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://", "databricks"))
    storage = env["RAYPIPE_STORAGE_PATH"]
    assert storage.startswith(("s3://", "gs://", "/")), "checkpoints need storage every node reaches"
    # The example scripts are what reads RAYPIPE_STORAGE_PATH.
    assert "RAYPIPE_STORAGE_PATH" in (REPO / "examples" / "_common.py").read_text()
    # Token auth stays on: every node has the mode and the token file `ray get-auth-token` wrote.
    assert env["RAY_AUTH_MODE"] == "token"
    assert "~/.ray/auth_token" in config["file_mounts"]


# --------------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for op, rest in instructions:
        if op == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            defaults.setdefault(key, value.strip('"'))
    return defaults


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def test_dockerfile_builds_from_the_official_ray_image_of_the_pinned_version():
    instructions = _instructions()
    args = _arg_defaults(instructions)
    (base,) = [rest for op, rest in instructions if op == "FROM"]
    assert args["RAY_VERSION"] == ray.__version__
    assert _expand(base, args) == f"rayproject/ray:{ray.__version__}-{args['PYTHON_TAG']}-cpu"
    assert _expand(base, {**args, "VARIANT": "gpu"}) == f"rayproject/ray:{ray.__version__}-{args['PYTHON_TAG']}-gpu"
    py = re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"])
    assert py and int(py.group(1)) >= 10  # requires-python >= 3.10


def test_dockerfile_installs_this_raypipe_with_a_pinned_torch():
    instructions = _instructions()
    args = _arg_defaults(instructions)
    runs = [rest for op, rest in instructions if op == "RUN"]
    assert args["RAYPIPE_VERSION"] == VERSION
    torch_pin = (REPO / ".ci" / "constraints-cpu.txt").read_text().split("torch==")[1].split()[0]
    assert args["TORCH_VERSION"] == torch_pin
    assert any('"torch==${TORCH_VERSION}"' in r and "TORCH_CPU_INDEX" in r for r in runs)
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    (install,) = [r for r in runs if re.search(r'pip install "\.\[', r)]
    assert "raypipe.__version__ == '${RAYPIPE_VERSION}'" in install  # the build fails on a mismatch
    assert "ray.__version__ == '${RAY_VERSION}'" in install
    # Whatever the Dockerfile copies must exist in the build context.
    for op, rest in instructions:
        if op == "COPY":
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"


def test_dockerfile_runs_as_a_non_root_user():
    users = [rest for op, rest in _instructions() if op == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "raypipe-work", "*.db", "mlruns"} <= ignored
