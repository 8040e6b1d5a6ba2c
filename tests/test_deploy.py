"""The deployment package in deploy/: each file checked by the tool its users
run (systemd-analyze, promtool, the Kubernetes API schemas, a container
builder where there is one), and against the promises docs/operating.md makes.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets as pysecrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import kubernetes_validate
import promql_parser
import pytest
import yaml
from conftest import start_server
from support import NEW, OLD, Api, Inbox, free_port, wait_serving

from phonebind.v1 import resources_pb2 as res
from phonebind_server.app import LIVENESS
from phonebind_server.config import (
    FILE_SETTINGS,
    ROTATION_KEY_SETTINGS,
    SECRET_SETTINGS,
    Settings,
    env_name,
    load,
)

# The settings a deployment always hands over as files: the further keys of a
# rotation are added the same way only while one runs (docs/operating.md).
ALWAYS_FILES = tuple(name for name in FILE_SETTINGS if name not in ROTATION_KEY_SETTINGS)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
OPERATING = ROOT / "docs" / "operating.md"


def setting_variables() -> set[str]:
    """Every PHONEBIND_ variable the server reads."""
    from dataclasses import fields

    from phonebind_server.domain.policy import Policy

    names = {env_name(f.name) for f in fields(Settings) if f.name != "policy"}
    names |= {env_name(f.name, policy=True) for f in fields(Policy)}
    names |= {env_name(name) + "_FILE" for name in FILE_SETTINGS}
    return names | {"PHONEBIND_CONFIG"}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- the Containerfile -------------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Containerfile, continuation lines joined."""
    text = (DEPLOY / "Containerfile").read_text(encoding="utf-8")
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    found = []
    for line in logical:
        word, _, rest = line.strip().partition(" ")
        found.append((word.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in containerfile():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def image_env() -> dict[str, str]:
    env = {}
    for word, rest in stages()[-1]:
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = value
    return env


def test_the_image_is_built_in_two_stages_and_runs_as_a_numeric_non_root_user():
    build, runtime = stages()
    assert build[0][1].endswith(" AS build")
    # The runtime stage takes the built environment and nothing from the context.
    copies = [rest for word, rest in runtime if word in ("COPY", "ADD")]
    assert copies and all(rest.startswith("--from=build ") for rest in copies), copies
    users = [rest for word, rest in runtime if word == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0, users
    # The user is set last but for how it starts, so nothing after runs as root.
    words = [word for word, _ in runtime]
    assert words[words.index("USER") + 1 :] == ["ENTRYPOINT", "CMD"]
    assert dict(runtime)["ENTRYPOINT"] == '["phonebind-server"]'
    assert dict(runtime)["CMD"] == '["serve"]'
    assert "HEALTHCHECK" not in words


def test_every_python_install_in_the_image_is_held_to_constraints_txt():
    build = stages()[0]
    copied = [rest for word, rest in build if word == "COPY"]
    assert copied[0] == "constraints.txt ./"
    installs = [
        command
        for word, rest in build
        if word == "RUN"
        for command in rest.split("&&")
        if re.search(r"pip (install|wheel)\b", command)
    ]
    assert len(installs) == 2, installs
    for command in installs:
        assert "-c constraints.txt" in command, command
    # The runtime environment is made from the wheels built here, never from an index.
    assert "--no-index" in installs[1]


def test_the_image_bakes_in_no_secret():
    build, runtime = stages()
    sources = [rest.split()[0] for word, rest in build if word in ("COPY", "ADD")]
    assert sources == ["constraints.txt", "client/", "server/"]
    # The build context holds only what is copied, whatever a working copy has.
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"
    assert {line[1:].rstrip("/") for line in ignore if line.startswith("!")} == {
        "constraints.txt",
        "client",
        "server",
    }
    declared = [
        key
        for word, rest in build + runtime
        if word in ("ENV", "ARG")
        for key in re.findall(r"(\w+)=", rest) + ([rest.split("=")[0]] if word == "ARG" else [])
    ]
    for name in declared:
        assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", name) or name.endswith(
            "_FILE"
        ), name
    env = image_env()
    assert not {env_name(name) for name in SECRET_SETTINGS} & set(env)
    assert urlsplit(env["PHONEBIND_DATABASE_URL"]).password is None


def test_the_image_settings_are_real_and_its_writable_paths_are_volumes():
    env = image_env()
    phonebind = {key: value for key, value in env.items() if key.startswith("PHONEBIND_")}
    assert set(phonebind) <= setting_variables()
    settings = load({}, env=phonebind, serving=False)
    runtime = dict(stages()[-1])
    volumes = json.loads(runtime["VOLUME"])
    database = settings.database_url.removeprefix("sqlite:///")
    assert os.path.dirname(database) in volumes
    assert runtime["WORKDIR"] in volumes
    assert "/tmp" in volumes  # noqa: S108  # the image's own scratch volume
    exposed = {int(port) for port in runtime["EXPOSE"].split()}
    assert exposed == {
        port_of(settings.listen),
        port_of(settings.health_listen),
        port_of(settings.metrics_listen),
    }


def container_builder() -> tuple[str | None, str]:
    """A builder that works here (podman, buildah, or docker with an engine),
    or None and why there is none."""
    why = []
    for tool, probe in (("podman", ["info"]), ("buildah", ["info"])):
        path = shutil.which(tool)
        if path is None:
            why.append(f"{tool} is not installed")
            continue
        answer = subprocess.run([path, *probe], capture_output=True, text=True, timeout=60)
        if answer.returncode == 0:
            return path, ""
        why.append(f"{tool} does not work here ({(answer.stderr.strip() or '?').splitlines()[-1]})")
    docker = shutil.which("docker")
    if docker is None:
        why.append("docker is not installed")
    else:
        answer = subprocess.run(
            [docker, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if answer.returncode == 0 and answer.stdout.strip():
            return docker, ""
        last = (answer.stderr.strip() or "no answer").splitlines()[-1]
        why.append(f"docker is only a client here, with no reachable engine ({last})")
    return None, "no container builder is available: " + "; ".join(why)


def test_the_image_builds_and_runs_with_a_read_only_root(tmp_path):
    builder, why = container_builder()
    if builder is None:
        pytest.skip(why)
    tool = os.path.basename(builder)
    tag = f"localhost/phonebind-test:{pysecrets.token_hex(4)}"
    build = subprocess.run(
        [builder, "build", "-f", str(DEPLOY / "Containerfile"), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:
        user = subprocess.run(
            [builder, "inspect", "--format", "{{.Config.User}}", tag]
            if tool != "buildah"
            else [builder, "inspect", "--type", "image", "--format", "{{.OCIv1.Config.User}}", tag],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert user.stdout.strip() == "65532:65532", user.stdout + user.stderr
        if tool == "buildah":
            return  # builds only; running is podman's or docker's
        volume = f"phonebind-test-{pysecrets.token_hex(4)}"
        run = [
            builder,
            "run",
            "--rm",
            "--read-only",
            "--tmpfs",
            "/tmp",  # noqa: S108  # a tmpfs inside the container
            "-v",
            f"{volume}:/var/lib/phonebind",
        ]
        version = subprocess.run(
            [*run, tag, "--version"], capture_output=True, text=True, timeout=120
        )
        assert version.returncode == 0, version.stderr
        assert version.stdout.startswith("phonebind-server ")
        # The SQLite database goes to the volume; the rest of the file system is read-only.
        for command in (["migrate"], ["migrate", "status"]):
            done = subprocess.run(
                [*run, tag, *command], capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stdout + done.stderr
        subprocess.run([builder, "volume", "rm", volume], capture_output=True, timeout=60)
    finally:
        subprocess.run([builder, "rmi", "-f", tag], capture_output=True, timeout=120)


# -- systemd -----------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "phonebind.service"
SERVER = BIN / "phonebind-server"


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order (keys may repeat)."""
    section, found = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def unit_values(key: str) -> list[str]:
    return [v for _, k, v in unit_entries(UNIT.read_text(encoding="utf-8")) if k == key]


def env_file(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    )


def verify_unit(text: str, directory: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify on `text` (as phonebind.service); its exit code and
    every line it printed about the unit."""
    copy = directory / "phonebind.service"
    copy.write_text(text, encoding="utf-8")
    answer = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = (answer.stdout + answer.stderr).splitlines()
    return answer.returncode, [line for line in lines if "phonebind" in line]


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: it comes with Debian's systemd package")
    return path


def unit_with_this_server() -> str:
    """The unit, with the server of this virtual environment where it names
    /opt/phonebind's (verify wants every command to exist)."""
    text = UNIT.read_text(encoding="utf-8")
    assert "/opt/phonebind/bin/phonebind-server" in text
    return text.replace("/opt/phonebind/bin/phonebind-server", str(SERVER))


def test_the_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path):
    code, about_unit = verify_unit(unit_with_this_server(), tmp_path)
    assert code == 0 and about_unit == [], about_unit
    # The same check catches a misspelt setting, which verify only warns about.
    broken = unit_with_this_server().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes")
    code, about_unit = verify_unit(broken, tmp_path)
    assert any("Unknown key" in line and "ProtectHomes" in line for line in about_unit), about_unit


def test_the_unit_exposure_is_low(tmp_path):
    copy = tmp_path / "phonebind.service"
    copy.write_text(unit_with_this_server(), encoding="utf-8")
    # The threshold is in tenths: 15 is an exposure of 1.5 out of 10.
    answer = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--threshold=15", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    level = re.search(r"Overall exposure level for phonebind.service: (\d+\.\d)", answer.stdout)
    assert level, answer.stdout + answer.stderr
    print(f"\n[systemd] exposure {level.group(1)} (systemd-analyze security --offline=true)")
    assert answer.returncode == 0, answer.stdout[-2000:]
    assert float(level.group(1)) <= 1.5


def test_the_unit_is_hardened_and_hands_every_secret_over_as_a_file():
    def one(key: str) -> str:
        values = unit_values(key)
        assert len(values) == 1, (key, values)
        return values[0]

    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
        "StateDirectory": "phonebind",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert one(key) == value, key
    assert "@system-service" in unit_values("SystemCallFilter")
    assert one("ExecStartPre").endswith("phonebind-server migrate")
    assert one("ExecStart").endswith("phonebind-server serve")

    example = env_file(DEPLOY / "systemd" / "phonebind.env.example")
    assert set(example) <= setting_variables()
    settings = load({}, env=example, serving=False)
    assert settings.workers > 1, "VMs run several workers on one port"
    # The supervisor waits grace_seconds for calls, a stuck worker ends itself 5 s
    # later; systemd must not kill them before.
    stop = one("TimeoutStopSec")
    assert stop.endswith("s") and float(stop[:-1]) > settings.grace_seconds + 5

    credentials = dict(value.split(":", 1) for value in unit_values("LoadCredential"))
    environment = dict(value.split("=", 1) for value in unit_values("Environment"))
    assert set(environment) <= setting_variables()
    for name in ALWAYS_FILES:
        path = environment[env_name(name) + "_FILE"]
        assert path.startswith("%d/") and path[3:] in credentials, name
        assert env_name(name) not in environment and env_name(name) not in example
    for name in ("tls_cert", "tls_key", "tls_client_ca", "credentials_file"):
        assert environment[env_name(name)][3:] in credentials


def set_memory_deny_write_execute() -> None:
    """What MemoryDenyWriteExecute=yes asks of the kernel: no memory that is
    writable and executable, for this process and what it executes."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def test_the_server_runs_a_whole_rebind_with_memory_deny_write_execute(
    database_url, tmp_path, secrets_seen
):
    supported = subprocess.run(
        [sys.executable, "-c", "import ctypes; exit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0))"],
        timeout=60,
    )
    if supported.returncode != 0:
        pytest.skip("this kernel has no PR_SET_MDWE (it came with Linux 6.3)")
    probe = "import mmap; mmap.mmap(-1, 4096, prot=7)"  # read, write and execute
    refused = subprocess.run(
        [sys.executable, "-c", probe],
        preexec_fn=set_memory_deny_write_execute,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused.stderr

    sms, port = tmp_path / "sms.jsonl", free_port()
    secrets_seen.watch_sms(str(sms))
    log_path = tmp_path / "server.log"
    secrets_seen.watch_log(log_path)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PHONEBIND_")}
    with open(log_path, "w", encoding="utf-8") as log:
        server = subprocess.Popen(
            [
                *(str(SERVER), "serve", "--dev", "--listen", f"127.0.0.1:{port}"),
                *("--database-url", database_url, "--sms-gateway", f"file:{sms}"),
            ],
            env=environment,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=set_memory_deny_write_execute,
        )
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, server, lambda: log_path.read_text(encoding="utf-8")[-2000:])
        with grpc.insecure_channel(address) as channel:
            pb = Api(channel, Inbox(str(sms), secrets_seen), secrets_seen)
            pb.register("mdwe-1", "13800138701")
            rebind = pb.start("mdwe-1", "13900139701")
            pb.identity("mdwe-1", rebind.rebind_id)
            pb.send_and_verify("mdwe-1", rebind.rebind_id, OLD, "13800138701")
            pb.send_and_verify("mdwe-1", rebind.rebind_id, NEW, "13900139701")
            done = pb.complete("mdwe-1", rebind.rebind_id)
        assert done.rebind.state == res.REBIND_STATE_COMPLETED
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode == 0, log_path.read_text(encoding="utf-8")[-2000:]


# -- Kubernetes --------------------------------------------------------------------------

KUBERNETES = DEPLOY / "kubernetes"
# The oldest Kubernetes the manifests suit, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.31", "1.37")


def manifests() -> dict[str, dict]:
    """Every resource in deploy/kubernetes, by KIND/name."""
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            name = document.get("metadata", {}).get("name", path.name)
            found[f"{document['kind']}/{name}"] = document
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_are_valid_against_the_kubernetes_api_schemas(version):
    resources = {k: v for k, v in manifests().items() if not k.startswith("Kustomization/")}
    for name, resource in resources.items():
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} is not valid Kubernetes {version}: {error.message}")
    assert len(resources) == 8
    print(
        f"\n[kubernetes] {len(resources)} resources valid against {version} (strict)"
        f" by kubernetes-validate {kubernetes_validate.version.__version__}"
    )


def test_the_validator_refuses_a_field_kubernetes_does_not_have():
    deployment = manifests()["Deployment/phonebind"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["tls"] = 1
    with pytest.raises(kubernetes_validate.ValidationError, match="'tls' was unexpected"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_the_kustomization_applies_every_manifest():
    kustomization = manifests()["Kustomization/kustomization.yaml"]
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def pod_spec(kind_name: str) -> dict:
    return manifests()[kind_name]["spec"]["template"]["spec"]


def test_pods_run_locked_down():
    for kind_name in ("Deployment/phonebind", "Job/phonebind-migrate"):
        spec = pod_spec(kind_name)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 65532
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["requests"] and container["resources"]["limits"]


def configmap() -> dict[str, str]:
    return manifests()["ConfigMap/phonebind"]["data"]


def test_the_configmap_holds_real_settings_and_no_secret():
    data = configmap()
    assert set(data) <= setting_variables()
    assert not {env_name(name) for name in FILE_SETTINGS} & set(data)
    plain = {k: v for k, v in data.items() if not k.endswith("_FILE")}
    settings = load({}, env=plain, serving=False)
    assert settings.workers == 1, "one worker per pod: scale replicas instead"
    assert settings.health_listen and settings.metrics_listen


def test_the_deployment_serves_one_worker_with_grpc_probes_on_the_health_port():
    spec = pod_spec("Deployment/phonebind")
    (server,) = spec["containers"]
    assert server["args"] == ["serve"]
    assert not any("worker" in arg for arg in server["args"])
    assert server["envFrom"] == [{"configMapRef": {"name": "phonebind"}}]
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    data = configmap()
    assert ports == {
        "grpc": port_of(data["PHONEBIND_LISTEN"]),
        "health": port_of(data["PHONEBIND_HEALTH_LISTEN"]),
        "metrics": port_of(data["PHONEBIND_METRICS_LISTEN"]),
    }
    assert server["livenessProbe"]["grpc"] == {"port": ports["health"], "service": LIVENESS}
    assert server["startupProbe"]["grpc"] == {"port": ports["health"], "service": LIVENESS}
    # Readiness asks about the whole server: the name "".
    assert server["readinessProbe"]["grpc"] == {"port": ports["health"]}
    # Every key is a file from a Secret, where the ConfigMap says.
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    for name in (*ALWAYS_FILES, "tls_cert", "tls_key", "tls_client_ca", "credentials_file"):
        variable = env_name(name) + ("_FILE" if name in FILE_SETTINGS else "")
        directory = os.path.dirname(data[variable])
        assert any(mounts[v] == directory for v in secrets if v in mounts), variable
    # The pod outlives its drain: preStop, then grace_seconds, then the 5 s margin.
    settings = load(
        {}, env={k: v for k, v in data.items() if not k.endswith("_FILE")}, serving=False
    )
    pause = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > pause + settings.grace_seconds + 5
    # New pods wait for the migration.
    (schema,) = spec["initContainers"]
    assert schema["args"] == ["migrate", "status"]


def test_the_migration_job_sees_the_database_url_and_the_keys_only():
    """A migration that reseals stored values (m0014) needs the keys; the SMS
    secret, the TLS key and the callers it never sees."""
    spec = pod_spec("Job/phonebind-migrate")
    (migrate,) = spec["containers"]
    assert migrate["args"] == ["migrate"]
    assert "envFrom" not in migrate
    names = ("database_url", "index_key", "code_key", "seal_keys", "audit_key")
    data = configmap()
    assert migrate["env"] == [
        *(
            {"name": env_name(name) + "_FILE", "value": data[env_name(name) + "_FILE"]}
            for name in names
        ),
        {
            "name": "PHONEBIND_ACTIVE_SEAL_KEY",
            "valueFrom": {
                "configMapKeyRef": {"name": "phonebind", "key": "PHONEBIND_ACTIVE_SEAL_KEY"}
            },
        },
    ]
    (keys,) = [v for v in spec["volumes"] if "secret" in v]
    assert keys["secret"]["items"] == [{"key": name, "path": name} for name in names]


def test_service_budget_and_policy_select_the_server_pods_and_its_ports():
    labels = manifests()["Deployment/phonebind"]["spec"]["template"]["metadata"]["labels"]
    port_names = {
        p["name"]: p["containerPort"]
        for p in pod_spec("Deployment/phonebind")["containers"][0]["ports"]
    }
    for name in ("Service/phonebind", "Service/phonebind-headless"):
        service = manifests()[name]["spec"]
        assert service["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["ports"]} <= set(port_names)
    budget = manifests()["PodDisruptionBudget/phonebind"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    policy = manifests()["NetworkPolicy/phonebind"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(ingress) == {port_names["grpc"], port_names["metrics"]}
    assert ingress[port_names["grpc"]][0]["podSelector"]["matchLabels"] == {
        "phonebind.io/caller": "true"
    }
    assert ingress[port_names["metrics"]][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    egress = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {("TCP", 5432), ("UDP", 53), ("TCP", 53), ("TCP", 443)}


# -- Prometheus and Grafana --------------------------------------------------------------

RULES = DEPLOY / "prometheus" / "phonebind-rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "phonebind.json"


def promtool() -> str:
    path = BIN / "promtool"
    if path.exists():
        return str(path)
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: `make test` installs it (scripts/install-promtool.sh)")
    return found


def test_promtool_checks_the_rules():
    answer = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "SUCCESS: 10 rules found" in answer.stdout


def test_promtool_runs_the_rule_tests():
    tests = RULES.with_name("phonebind-rules.test.yaml")
    answer = subprocess.run(
        [promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=120
    )
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "SUCCESS" in answer.stdout
    tested = {
        case["alertname"]
        for group in yaml.safe_load(tests.read_text(encoding="utf-8"))["tests"]
        for case in group["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == set(alerts()), "every alert has a test that sees it fire"


def alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_every_alert_has_its_runbook_in_the_operating_page():
    headings = set(re.findall(r"^### (\w+)$", OPERATING.read_text(encoding="utf-8"), re.MULTILINE))
    for name, rule in alerts().items():
        assert name in headings, name
        assert rule["annotations"]["runbook"] == f"docs/operating.md#{name.lower()}"
        assert rule["labels"]["severity"] in ("warning", "critical")


def documented_metrics() -> set[str]:
    """The metric names the operating page lists, a histogram as its three series."""
    text = OPERATING.read_text(encoding="utf-8").split("\n## Metrics\n", 1)[1]
    names = set()
    for name, kind in re.findall(
        r"^\| `(\w+)` \| (counter|gauge|histogram) \|", text, re.MULTILINE
    ):
        names |= (
            {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        )
    return names


def metrics_in(expression: str) -> set[str]:
    """The metric names an expression selects; a selector without one fails."""
    for variable, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
        expression = expression.replace(variable, value)
    expression = re.sub(r"\$\{?\w+\}?", "x", expression)  # dashboard variables
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expression}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expression), visit)
    return names


def test_the_metric_list_matches_the_brief():
    documented = documented_metrics()
    assert {
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "phonebind_rpcs_total",
        "phonebind_outbox_oldest_age_seconds",
        "phonebind_store_up",
        "process_resident_memory_bytes",
        "python_gc_objects_collected_total",
    } <= documented
    assert metrics_in('sum(rate(a_total{x="1"}[5m])) / on() b + histogram_quantile(0.9, c)') == {
        "a_total",
        "b",
        "c",
    }


def test_the_rules_use_documented_metrics_only():
    used = set()
    for name, rule in alerts().items():
        found = metrics_in(rule["expr"])
        assert found <= documented_metrics(), (name, found - documented_metrics())
        used |= found
    assert {"phonebind_store_up", "grpc_server_handled_total"} <= used


def dashboard_expressions() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.+), \w+\)", query)
            assert match, query
            found.append((f"variable {variable['name']}", match.group(1)))
    return found


def test_the_dashboard_loads_and_uses_documented_metrics_only():
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["uid"] == "phonebind" and board["title"] == "phonebind"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 12
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
    used = set()
    for title, expression in dashboard_expressions():
        found = metrics_in(expression)
        assert found, (title, expression)
        assert found <= documented_metrics(), (title, found - documented_metrics())
        used |= found
    # Each part of the list has a panel: gRPC, phonebind's own, the process.
    for prefix in ("grpc_server_", "phonebind_", "process_", "python_"):
        assert any(name.startswith(prefix) for name in used), prefix


def served_metrics(text: str) -> set[str]:
    names = set()
    for name, kind in re.findall(r"^# TYPE (\w+) (\w+)$", text, re.MULTILINE):
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "counter" and not name.endswith("_total"):
            names.add(name + "_total")
        else:
            names.add(name)
    return names


def test_a_real_server_serves_the_documented_metrics(database_url, tmp_path, clock, secrets_seen):
    """phonebind's own metrics always; the gRPC, process and Python families
    once the server exposes that family at all, each of its documented names."""
    running = start_server(
        database_url, tmp_path, clock, secrets_seen, metrics_listen="127.0.0.1:0"
    )
    try:
        running.api.register("metrics-1", "13800138801")
        url = f"http://127.0.0.1:{running.app.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:  # nosec B310
            served = served_metrics(answer.read().decode())
    finally:
        running.stop()
    documented = documented_metrics()
    own = {name for name in documented if name.startswith("phonebind_")}
    assert own <= served, own - served
    for prefix in ("grpc_server_", "process_", "python_"):
        family = {name for name in documented if name.startswith(prefix)}
        if any(name.startswith(prefix) for name in served):
            assert family <= served, family - served
