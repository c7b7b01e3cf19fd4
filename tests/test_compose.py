"""compose.yaml (the whole stack: JupyterLab, a Ray head, an MLflow server on PostgreSQL, Serve),
checked offline.

No Docker daemon runs where raypipe is developed, so the stack is never brought up here. What is
checked is what can be without one: the file parses; every port is published on 127.0.0.1 only;
the image is the repository's Dockerfile at pyproject's version; every command a service runs is
provided by a package the image installs (and `ray start` / `mlflow server` accept its options,
by their own CLI parsers); the notebook, the Ray nodes and the server agree on the tracking URI,
the storage path and Serve's host; secrets appear only as `${VAR:?...}` references.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path

import nbformat
import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"

# The executables a service may run, and the distribution that provides each in the image. `sh`
# and `python` come with the base image (rayproject/ray), `pg_isready` with the postgres image.
PROVIDED_BY = {
    ("ray",): "ray",
    ("mlflow",): "mlflow",
    ("jupyter", "lab"): "jupyterlab",  # `jupyter lab` runs jupyterlab's `jupyter-lab`
    ("raypipe",): "raypipe",
}
BASE_IMAGE = {"sh", "python"}
SHELL_SPLIT = re.compile(r"\s*(?:&&|\|\||;)\s*")
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|KEY", re.I)


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for line in (REPO / "Dockerfile").read_text().splitlines():
        m = re.match(r"\s*ARG\s+(\w+)(?:=(\S*))?", line)
        if m:
            args.setdefault(m.group(1), (m.group(2) or "").strip('"'))
    return args


def _dockerfile_mkdirs() -> set[str]:
    """Directories the Dockerfile makes (as the image's user): mount points of named volumes."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    return {d for m in re.finditer(r"^RUN mkdir -p (.+)$", text, re.M) for d in m.group(1).split()}


def _raypipe_services(compose: dict) -> dict[str, dict]:
    """The services built from this repository's Dockerfile."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _mounts(service: dict) -> dict[str, str]:
    """container path -> source (a named volume or a host path)."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        out[target] = source
    return out


def _published(service: dict) -> list[tuple[str, int, int]]:
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((str(p.get("host_ip", "")), int(p.get("published", 0)), int(p["target"])))
            continue
        parts = str(p).split(":")
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2].split("/")[0])))
        else:  # "8000" or "8000:8000": published on every interface
            out.append(("", int(parts[0]), int(parts[-1].split("/")[0])))
    return out


def _invocations(command) -> list[list[str]]:
    """The programs a command runs: itself, or each command of an `sh -c` script."""
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if argv[:1] == ["CMD"]:
        argv = argv[1:]
    elif argv[:1] == ["CMD-SHELL"]:
        argv = ["sh", "-c", " ".join(argv[1:])]
    if argv[:2] in (["sh", "-c"], ["bash", "-c"]):
        out = []
        for part in SHELL_SPLIT.split(argv[2].strip()):
            words = shlex.split(part)
            while words and (words[0] == "exec" or re.fullmatch(r"\w+=.*", words[0])):
                words = words[1:]
            out.append(words)
        return out
    return [argv]


def _extras_installed(extras: str) -> set[str]:
    """The optional-dependency groups `pip install .[extras]` installs, self-references followed."""
    groups = PYPROJECT["project"]["optional-dependencies"]
    todo, seen = [e.strip() for e in extras.split(",") if e.strip()], set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        assert e in groups, f"EXTRAS names '{e}', which pyproject.toml does not define"
        seen.add(e)
        for req in groups[e]:
            m = re.match(r"raypipe\[([^\]]+)\]", req)
            if m:
                todo += [x.strip() for x in m.group(1).split(",")]
    return seen


def _requirement_names(extras: str) -> set[str]:
    """Distribution names the image installs from pyproject (its dependencies and these extras)."""
    groups = PYPROJECT["project"]["optional-dependencies"]
    reqs = list(PYPROJECT["project"]["dependencies"])
    for e in _extras_installed(extras):
        reqs += groups[e]
    names = {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}
    return names | {"raypipe"}


def _command_problems(service: dict, extras: str) -> list[str]:
    """Why a service's command (or healthcheck) would not run in the image; [] when it would."""
    installed = _requirement_names(extras)
    problems = []
    commands = [service["command"]] + ([service["healthcheck"]["test"]] if "healthcheck" in service else [])
    for command in commands:
        for argv in _invocations(command):
            if not argv:
                problems.append(f"empty command in {command!r}")
                continue
            if argv[0] in BASE_IMAGE:
                continue
            key = next((k for k in PROVIDED_BY if tuple(argv[: len(k)]) == k), None)
            if key is None:
                problems.append(f"{' '.join(argv[:2])}: no package the image installs provides it")
            elif PROVIDED_BY[key] not in installed:
                problems.append(f"{' '.join(key)}: needs '{PROVIDED_BY[key]}', which EXTRAS={extras} does not install")
    env = _env(service)
    if env.get("MLFLOW_BACKEND_STORE_URI", "").startswith("postgresql") and "psycopg2-binary" not in installed:
        problems.append(f"a postgresql backend store needs psycopg2, which EXTRAS={extras} does not install")
    return problems


# --------------------------------------------------------------------- the file and the image


def test_compose_declares_the_whole_stack():
    compose = _compose()
    assert set(compose["services"]) == {"postgres", "mlflow", "ray-head", "jupyter"}
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for target, source in _mounts(service).items():
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume '{source}' is not declared"
            else:
                assert (REPO / source).exists(), f"{name}: bind mount {source} is not in the repository"


def test_every_published_port_binds_127_0_0_1_only():
    compose = _compose()
    published = {}
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", f"{name}: host networking publishes everything"
        for host_ip, port, target in _published(service):
            assert host_ip == "127.0.0.1", f"{name}: port {port} is published on every interface"
            published[port] = (name, target)
    assert published == {
        5000: ("mlflow", 5000),  # MLflow UI and API
        8265: ("ray-head", 8265),  # Ray dashboard
        8000: ("ray-head", 8000),  # Ray Serve (its proxy runs on the head)
        8888: ("jupyter", 8888),  # JupyterLab
    }
    assert "postgres" not in {name for name, _ in published.values()}  # reached only by mlflow


def test_the_image_is_this_dockerfile_at_pyprojects_version():
    compose = _compose()
    args = _dockerfile_args()
    assert args["RAYPIPE_VERSION"] == VERSION
    services = _raypipe_services(compose)
    assert set(services) == {"mlflow", "ray-head", "jupyter"}
    images = {(s["image"], yaml.safe_dump(s["build"])) for s in services.values()}
    assert len(images) == 1, "the raypipe services must run one image, built one way"
    service = next(iter(services.values()))
    build = service["build"]
    assert build["context"] == "." and (REPO / build.get("dockerfile", "Dockerfile")).name == "Dockerfile"
    build_args = {k: str(v) for k, v in build["args"].items()}
    assert set(build_args) <= set(args), f"build args the Dockerfile lacks: {set(build_args) - set(args)}"
    assert build_args.get("RAYPIPE_VERSION", args["RAYPIPE_VERSION"]) == VERSION
    variant = build_args.get("VARIANT", args["VARIANT"])
    repo, _, tag = service["image"].rpartition(":")
    assert repo == "raypipe" and tag.startswith(f"{VERSION}-{variant}"), service["image"]
    _extras_installed(build_args["EXTRAS"])  # every extra named exists in pyproject.toml


def test_every_service_command_is_installed_in_the_image():
    compose = _compose()
    for name, service in _raypipe_services(compose).items():
        extras = str(service["build"]["args"]["EXTRAS"])
        assert _command_problems(service, extras) == [], name
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]


@pytest.mark.parametrize(
    ("service", "extras", "missing"),
    [
        ("jupyter", "demo", "jupyterlab"),
        ("mlflow", "demo,notebook", "psycopg2"),
    ],
)
def test_the_command_check_sees_a_missing_package(service, extras, missing):
    problems = _command_problems(_compose()["services"][service], extras)
    assert any(missing in p for p in problems), problems


def test_the_command_check_sees_an_unknown_program():
    assert _command_problems({"command": ["sh", "-c", "ray start --head && exec jupyter-notebook"]}, "demo,notebook")


def test_ray_and_mlflow_accept_the_options_given_them():
    """Their own click parsers read the argument lists (nothing is started)."""
    from mlflow.cli import server
    from ray.scripts.scripts import start

    compose = _compose()
    parsers = {("ray", "start"): start, ("mlflow", "server"): server}
    parsed = 0
    for name, service in _raypipe_services(compose).items():
        for argv in _invocations(service["command"]):
            command = parsers.get(tuple(argv[:2]))
            if command is not None:
                command.make_context(" ".join(argv[:2]), argv[2:])  # raises on an unknown option
                parsed += 1
    assert parsed == 3  # the MLflow server, the Ray head, the notebook's Ray node


def test_the_installed_distributions_provide_the_programs():
    """Where the distribution is installed here, it really ships the console script."""
    for key, dist in PROVIDED_BY.items():
        script = "-".join(key)
        try:
            scripts = {ep.name for ep in metadata.distribution(dist).entry_points if ep.group == "console_scripts"}
        except metadata.PackageNotFoundError:
            continue  # jupyterlab is not a dev dependency; the pyproject check above covers it
        assert script in scripts, f"{dist} does not install `{script}`"


# --------------------------------------------------------------------- wiring


def test_mlflow_runs_on_postgres_with_proxied_artifacts_in_a_volume():
    mlflow = _compose()["services"]["mlflow"]
    (argv,) = _invocations(mlflow["command"])
    assert argv[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in argv
    (dest,) = [a.split("=", 1)[1] for a in argv if a.startswith("--artifacts-destination=")]
    assert _mounts(mlflow)[dest] == "mlflow-artifacts"
    assert dest in _dockerfile_mkdirs()  # made by `ray`, so the fresh volume is writable by it
    uri = _env(mlflow)["MLFLOW_BACKEND_STORE_URI"]
    assert re.fullmatch(r"postgresql://mlflow:\$\{MLFLOW_DB_PASSWORD:\?[^}]*\}@postgres:5432/mlflow", uri), uri
    assert not any("backend-store-uri" in a for a in argv)  # the password stays off the command line
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_notebook_and_every_ray_node_get_the_servers_uri_and_shared_storage():
    compose = _compose()
    services = compose["services"]
    (argv,) = _invocations(services["mlflow"]["command"])
    opts = dict(a.lstrip("-").split("=", 1) for a in argv[2:] if "=" in a)
    uri = f"http://mlflow:{opts['port']}"
    assert ("127.0.0.1", int(opts["port"]), int(opts["port"])) in _published(services["mlflow"])
    assert f"mlflow:{opts['port']}" in opts["allowed-hosts"].split(",")  # MLflow answers that Host
    for name in ("jupyter", "ray-head"):  # the driver, and the node that runs workers and replicas
        env = _env(services[name])
        assert env["MLFLOW_TRACKING_URI"] == uri, name
        storage = env["RAYPIPE_STORAGE_PATH"]
        assert _mounts(services[name])[storage] == "raypipe-storage", f"{name}: storage is not the shared volume"
        assert storage in _dockerfile_mkdirs(), f"{storage}: a fresh volume there would belong to root"


def test_the_notebook_joins_the_ray_head_as_a_node_without_cpus():
    services = _compose()["services"]
    (head,) = _invocations(services["ray-head"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    assert "--dashboard-host=0.0.0.0" in head  # the container's side; the host side is 127.0.0.1
    head_port = next(a.split("=")[1] for a in head if a.startswith("--port="))
    node, lab = _invocations(services["jupyter"]["command"])
    address = f"ray-head:{head_port}"
    assert node[:2] == ["ray", "start"] and f"--address={address}" in node
    assert "--num-cpus=0" in node  # work goes to the head (and so do Serve's replicas and proxy)
    assert _env(services["jupyter"])["RAY_ADDRESS"] == address
    assert lab[:2] == ["jupyter", "lab"] and "--ip=0.0.0.0" in lab
    assert _mounts(services["jupyter"])["/home/ray/raypipe/notebooks"] == "./notebooks"


def test_serve_listens_on_the_ray_head_and_the_notebook_reaches_it():
    from raypipe.config import ServeConfig
    from raypipe.serve import client_url

    services = _compose()["services"]
    host = _env(services["jupyter"])["RAYPIPE_SERVE_HOST"]
    assert host == services["ray-head"]["hostname"] == "ray-head"
    # deploy() waits for the URL it prints; from the notebook's container that is the head's proxy
    assert client_url(ServeConfig(host=host, port=8000)) == "http://ray-head:8000"
    assert ("127.0.0.1", 8000, 8000) in _published(services["ray-head"])
    cells = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    assert any("RAYPIPE_SERVE_HOST" in c and "serve.host=" in c for c in cells)
    # the optional bearer token reaches the replicas (head) and the client (notebook)
    assert all("RAYPIPE_SERVE_TOKEN" in _env(services[n]) for n in ("ray-head", "jupyter"))
    assert any("serve.auth_token_env=RAYPIPE_SERVE_TOKEN" in c for c in cells)


def test_the_notebook_takes_its_tracking_uri_from_the_environment(monkeypatch):
    """The notebook resolves tracking through the config (which reads MLFLOW_TRACKING_URI) and
    hard-codes no store of its own."""
    from raypipe.config import load_config

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert not [c for c in code if re.search(r"sqlite:|file:/|mlruns|https?://", c)]
    assert any("mlflow.set_tracking_uri(cfg.resolved_tracking_uri)" in c for c in code)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    config = next(ast.literal_eval(n.value) for n in ast.parse(params.source).body
                  if isinstance(n, (ast.Assign, ast.AnnAssign)) and getattr(n.targets[0] if isinstance(n, ast.Assign) else n.target, "id", "") == "CONFIG")
    env = _env(_compose()["services"]["jupyter"])
    monkeypatch.chdir(NOTEBOOK.parent)  # the kernel's working directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("RAYPIPE_STORAGE_PATH", env["RAYPIPE_STORAGE_PATH"])
    cfg = load_config(config, [])
    assert cfg.tracking.tracking_uri is None  # a config value would win over the environment
    assert cfg.resolved_tracking_uri == "http://mlflow:5000"
    assert cfg.resolved_storage_path == env["RAYPIPE_STORAGE_PATH"]


# --------------------------------------------------------------------- secrets and health


def _strings(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")
    elif node is not None:
        yield path, str(node)


def test_secrets_are_only_references_to_the_environment():
    compose = _compose()
    ref = r"\$\{(\w+)(:\?[^}]*|:-)\}"  # required (:?message), or optional and empty by default (:-)
    required = set()
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if SECRET_NAME.search(key):
                m = re.fullmatch(ref, value)
                assert m, f"{name}: {key} must be ${{VAR:?...}} (or ${{VAR:-}}), not a literal"
                if m.group(2).startswith(":?"):
                    required.add(m.group(1))
    assert required == {"MLFLOW_DB_PASSWORD", "JUPYTER_TOKEN"}
    for where, text in _strings(compose):
        # credentials inside a URL: the password part must be a required reference
        for m in re.finditer(r"://[^/:@\s]+:([^@\s]+)@", text):
            assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", m.group(1)), f"{where}: a literal password in a URL"
        if re.search(r"\.command(\[\d+\])?$", where):
            assert "${" not in text, f"{where}: secrets and variables stay off command lines"
    for ignore in (".gitignore", ".dockerignore"):  # a .env file next to compose.yaml holds them
        assert ".env" in (REPO / ignore).read_text().split(), ignore


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies():
    services = _compose()["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec["condition"] == "service_healthy", f"{name} -> {dep}"
    assert set(services["jupyter"]["depends_on"]) == {"mlflow", "ray-head"}
    # the healthchecks ask the servers themselves, on the ports the commands open
    assert "127.0.0.1:5000/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "127.0.0.1:8265/api/gcs_healthz" in " ".join(services["ray-head"]["healthcheck"]["test"])
    assert "127.0.0.1:8888/api" in " ".join(services["jupyter"]["healthcheck"]["test"])
