#!/usr/bin/env python3
"""The checks of scripts/check-deploy (which installs the tools and renders the kustomize tree).

Renders the Helm chart with Helm's Go engine (helm-python-sdk), validates every manifest with
kubernetes-validate --strict, checks the invariants fleetgate's pods need, runs promtool on the
alert rules, and checks every metric name in the alerts, their tests and the dashboard against
the /metrics of a running fleetgate. Exits non-zero with every problem listed.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

# Kubernetes versions the manifests must be valid for: the oldest the chart supports
# (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.25.0", None]

problems: list[str] = []


def problem(msg: str) -> None:
    problems.append(msg)
    print(f"FAIL {msg}", flush=True)


def docs_of(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# --- rendering -----------------------------------------------------------------------------


def render_chart(chart: Path, out: Path) -> dict[str, Path]:
    """Renders the chart with its defaults and each ci/*-values.yaml; lints each strictly."""
    import helm_python

    # Helm's Go logger writes to fd 2 (an INFO line per symlinked file): silence it while
    # rendering; failures come back as exceptions and lint messages.
    saved_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        return _render_chart(helm_python, chart, out)
    finally:
        os.dup2(saved_stderr, 2)
        os.close(devnull)
        os.close(saved_stderr)


def _render_chart(helm_python, chart: Path, out: Path) -> dict[str, Path]:
    loaded = helm_python.Chart.load(str(chart))
    sets = {"default": None}
    for f in sorted((chart / "ci").glob("*-values.yaml")):
        sets[f.name.removesuffix("-values.yaml")] = f
    rendered = {}
    for name, values_file in sets.items():
        values = yaml.safe_load(values_file.read_text()) if values_file else None
        report = helm_python.lint(str(chart), values, strict=True, kube_version="v1.25.0")
        for m in report.get("messages", []):
            if m.get("severity", 0) >= 2:
                problem(f"helm lint ({name} values): {m.get('path')}: {m.get('error')}")
        for e in report.get("errors", []):
            problem(f"helm lint ({name} values): {e}")
        try:
            manifests = loaded.render(values, name="fg", namespace="iot", is_install=True)
        except Exception as e:  # noqa: BLE001 - any render failure is reported as one
            problem(f"helm render ({name} values): {e}")
            continue
        path = out / f"helm-{name}.yaml"
        objects = [m for k, m in sorted(manifests.items()) if m.strip() and k.endswith(".yaml")]
        path.write_text("\n---\n".join(objects))
        rendered[f"helm chart, {name} values"] = path
        print(f"rendered the chart with {name} values: {len(docs_of(path))} objects")
    # values.schema.json is in force: a misspelt value is refused, not silently ignored.
    try:
        loaded.render({"services": {"gateway": {"replica": 3}}}, name="fg", namespace="iot")
        problem("the chart rendered with a misspelt value (services.gateway.replica)")
    except Exception as e:  # noqa: BLE001 - the refusal is what we want
        if "replica" not in str(e):
            problem(f"the chart refused a misspelt value without naming it: {e}")
    # The embedded store is opened by one process only: more than one replica of a service that
    # keeps data is refused (by values.schema.json, or by the template when it comes from
    # `defaults`), as is a database URL in the ConfigMap; with PostgreSQL they scale.
    refused = {
        "services.epts.replicas": {"services": {"epts": {"replicas": 2}}},
        "services.ecr.autoscaling": {"services": {"ecr": {"autoscaling": {"enabled": True}}}},
        "services.ecr.replicas is 3": {
            "defaults": {"replicas": 3},
            "services": {"ecr": {"replicas": None}},
        },
        "config.storage.postgres.url": {
            "config": {"storage": {"postgres": {"url": "postgres://u:pw@db/fg"}}}
        },
    }
    for what, values in refused.items():
        try:
            loaded.render(values, name="fg", namespace="iot")
            problem(f"the chart rendered {values}: {what} must be refused")
        except Exception as e:  # noqa: BLE001 - the refusal is what we want
            if what.split(" ")[0].split(".")[-1] not in str(e):
                problem(f"the chart refused {values} without naming {what}: {e}")
    scaled = {"postgres": {"existingSecret": "pg"}, "services": {"epts": {"replicas": 3}}}
    try:
        manifests = loaded.render(scaled, name="fg", namespace="iot")
        docs = [
            d
            for k, m in manifests.items()
            if k.endswith(".yaml")
            for d in yaml.safe_load_all(m)
            if d
        ]
        epts = [
            (d["kind"], d["spec"].get("replicas"))
            for d in workloads(docs)
            if d["metadata"]["name"] == "fg-fleetgate-epts"
        ]
        if epts != [("Deployment", 3)]:
            problem(f"with postgres, services.epts.replicas 3 rendered {epts}")
    except Exception as e:  # noqa: BLE001
        problem(f"the chart refused {scaled}: {e}")
    return rendered


# --- Kubernetes schemas ----------------------------------------------------------------------

# The Prometheus Operator kinds have no schema in kubernetes-validate; these are the parts of
# their CRDs (monitoring.coreos.com/v1) the chart uses, closed like --strict.
_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS},
    "additionalProperties": False,
}
_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _LABELS},
    "additionalProperties": False,
}
_RELABEL = {
    "type": "object",
    "properties": {
        "sourceLabels": {"type": "array", "items": _STR},
        "targetLabel": _STR,
        "regex": _STR,
        "replacement": _STR,
        "action": _STR,
        "separator": _STR,
    },
    "additionalProperties": False,
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": _STR,
            "kind": _STR,
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": _SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": _STR,
                                "path": _STR,
                                "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                                "scrapeTimeout": _STR,
                                "relabelings": {"type": "array", "items": _RELABEL},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": _STR,
            "kind": _STR,
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": _STR,
                                "interval": _STR,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "properties": {
                                            "alert": _STR,
                                            "record": _STR,
                                            "expr": _STR,
                                            "for": _STR,
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                            },
                            "additionalProperties": False,
                        },
                    }
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def validate_strict(label: str, path: Path, out: Path) -> None:
    """kubernetes-validate --strict on every object; CRD kinds against CRD_SCHEMAS."""
    import jsonschema

    before = len(problems)
    docs = docs_of(path)
    plain = [d for d in docs if (d.get("apiVersion"), d.get("kind")) not in CRD_SCHEMAS]
    for d in docs:
        schema = CRD_SCHEMAS.get((d.get("apiVersion"), d.get("kind")))
        if schema is None:
            continue
        for e in jsonschema.Draft202012Validator(schema).iter_errors(d):
            where = "/".join(str(p) for p in e.absolute_path)
            problem(f"{label}: {d['kind']}/{d['metadata'].get('name')}: {where}: {e.message}")
    k8s_file = out / f"{path.stem}-k8s.yaml"
    k8s_file.write_text(yaml.safe_dump_all(plain))
    for version in KUBE_VERSIONS:
        cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
        if version:
            cmd += ["-k", version]
        run = subprocess.run([*cmd, str(k8s_file)], capture_output=True, text=True)
        # --quiet prints warnings and failures only: a kind without a schema is a warning
        # there, and a failure here.
        lines = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.strip()]
        if run.returncode != 0 or lines:
            for ln in lines or [f"exit {run.returncode}"]:
                problem(f"{label} (Kubernetes {version or 'latest'}): {ln}")
    if len(problems) == before:
        print(f"{label}: {len(docs)} objects valid (strict)")


# --- what fleetgate's pods need ----------------------------------------------------------------


# Device ports of the gateway: (port, protocol).
DEVICE_PORTS = [(1883, "TCP"), (8080, "TCP"), (5683, "UDP"), (5690, "UDP")]
# Services that keep data in storage.path (the embedded store) unless PostgreSQL is set, and
# serve a REST API on their admin port.
DATA_SERVICES = {"epts", "ecr"}


def workloads(docs: list[dict]) -> list[dict]:
    """fleetgate's Deployments and StatefulSets."""
    return [
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        and d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "fleetgate"
    ]


def command_of(workload: dict) -> str:
    return (workload["spec"]["template"]["spec"]["containers"][0].get("args") or ["up"])[0]


def env_of(workload: dict) -> dict[str, dict]:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container.get("env", [])}


def under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def check_invariants(label: str, docs: list[dict], expect_checksum: bool, config: dict) -> None:
    deployments = workloads(docs)
    if not deployments:
        problem(f"{label}: no fleetgate Deployment")
    hpa_targets = {
        (h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"])
        for h in docs
        if h["kind"] == "HorizontalPodAutoscaler"
    }
    for d in deployments:
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        if pod.get("enableServiceLinks") is not False:
            problem(f"{label}: {name}: enableServiceLinks is not false")
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            problem(f"{label}: {name}: not runAsNonRoot")
        c = pod["containers"][0]
        probes = {
            k: c.get(k, {}).get("httpGet", {}).get("path")
            for k in ("livenessProbe", "readinessProbe", "startupProbe")
        }
        if probes != {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": "/livez"}:
            problem(f"{label}: {name}: probes {probes}")
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        if "/srv/fleetgate" not in mounts or "subPath" in mounts["/srv/fleetgate"]:
            problem(f"{label}: {name}: configuration not mounted as the directory /srv/fleetgate")
        if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
            problem(f"{label}: {name}: root filesystem writable")
        annotations = d["spec"]["template"]["metadata"].get("annotations") or {}
        if expect_checksum and "checksum/config" not in annotations:
            problem(f"{label}: {name}: no checksum/config annotation")
        command = command_of(d)
        if command == "gateway":
            ports = {(p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]}
            for want in [*DEVICE_PORTS, (8008, "TCP")]:
                if want not in ports:
                    problem(f"{label}: {name}: port {want[0]}/{want[1]} not exposed")
            spool = (config.get("gateway") or {}).get("spool") or {}
            path = spool.get("path", "fleetgate-data/spool")
            if spool.get("enabled", True) and not any(under(path, m) for m in mounts):
                problem(f"{label}: {name}: gateway.spool.path {path} is on no volume")
        env = env_of(d)
        postgres = env.get("FLEETGATE_STORAGE_POSTGRES_URL")
        if postgres is not None and "secretKeyRef" not in postgres.get("valueFrom", {}):
            problem(f"{label}: {name}: FLEETGATE_STORAGE_POSTGRES_URL not from a Secret")
        if command in DATA_SERVICES:
            check_data_service(label, d, config, postgres is not None, mounts, hpa_targets)
    check_services(label, docs, deployments)
    check_wiring(label, deployments, config)


def check_data_service(label, d, config, postgres, mounts, hpa_targets) -> None:
    """EPTS and ECR: the embedded store is locked by the one process that opens it, so without
    PostgreSQL exactly one pod, which is stopped before its replacement starts (a StatefulSet),
    on a volume claim that holds storage.path; no autoscaler."""
    name = d["metadata"]["name"]
    if postgres or ((config.get("storage") or {}).get("postgres") or {}).get("url"):
        return
    if d["kind"] != "StatefulSet":
        problem(f"{label}: {name}: the embedded store in a {d['kind']}, not a StatefulSet")
        return
    if d["spec"].get("replicas") != 1:
        problem(f"{label}: {name}: {d['spec'].get('replicas')} replicas on the embedded store")
    if ("StatefulSet", name) in hpa_targets:
        problem(f"{label}: {name}: autoscaled on the embedded store")
    claims = {t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])}
    path = (config.get("storage") or {}).get("path", "fleetgate-data/storage")
    held = [m for p, m in mounts.items() if under(path, p)]
    if not held or held[0]["name"] not in claims:
        problem(f"{label}: {name}: storage.path {path} is not on a volume claim of the StatefulSet")


def check_services(label: str, docs: list[dict], deployments: list[dict]) -> None:
    """Devices reach the gateway's ports; the REST APIs (EPTS, ECR) have a Service of their own
    on the admin port, and no device-facing Service carries the admin port."""
    services = [d for d in docs if d["kind"] == "Service"]

    def component(s):
        return s["spec"].get("selector", {}).get("app.kubernetes.io/component")

    exposed = {
        (p["port"], p.get("protocol", "TCP"))
        for s in services
        if component(s) == "gateway"
        for p in s["spec"]["ports"]
    }
    for want in DEVICE_PORTS:
        if want not in exposed:
            problem(f"{label}: no Service exposes the gateway's {want[0]}/{want[1]}")
    for s in services:
        ports = s["spec"]["ports"]
        devices = any(p.get("targetPort") in ("mqtt", "http", "coap", "fgu") for p in ports)
        if devices and any(p.get("targetPort") == "admin" for p in ports):
            problem(f"{label}: Service {s['metadata']['name']} mixes device and admin ports")
    for d in deployments:
        if command_of(d) not in DATA_SERVICES:
            continue
        comp = d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        api = [
            s
            for s in services
            if component(s) == comp and s["spec"].get("clusterIP") != "None"
            and all(p.get("targetPort") == "admin" for p in s["spec"]["ports"])
        ]
        if not api:
            problem(f"{label}: {d['metadata']['name']}: no Service for its REST API (admin port)")


def check_wiring(label: str, deployments: list[dict], config: dict) -> None:
    """The configuration names the services that run: EPTS a reliable receiver of DCX where it
    is deployed (and only there), CMX among the gateway's extensions."""
    commands = {command_of(d) for d in deployments}
    epts = (config.get("epts") or {}).get("instance", "epts")
    cmx = (config.get("cmx") or {}).get("instance", "cmx")
    receivers = (config.get("dcx") or {}).get("reliable_receivers") or []
    extensions = (config.get("gateway") or {}).get("extensions") or ["dcx"]
    if "epts" in commands and "dcx" in commands and epts not in receivers:
        problem(f"{label}: EPTS is deployed but not in dcx.reliable_receivers ({receivers})")
    if epts in receivers and "epts" not in commands:
        problem(f"{label}: dcx.reliable_receivers lists {epts}, which is not deployed")
    if "cmx" in commands and cmx not in extensions:
        problem(f"{label}: CMX is deployed but not in gateway.extensions ({extensions})")
    if "epts" in commands and not config.get("applications"):
        problem(f"{label}: EPTS is deployed but no application has time-series settings")


def config_files(docs: list[dict], out: Path, stem: str) -> list[tuple[Path, str, str]]:
    """Each rendered service-config.yml, with the NATS URL the Deployments give it and the kind
    of object that holds it."""
    nats = next(
        (
            e["value"]
            for d in docs
            if d["kind"] == "Deployment"
            for e in d["spec"]["template"]["spec"]["containers"][0].get("env", [])
            if e["name"] == "FLEETGATE_NATS_URL"
        ),
        "",
    )
    found = []
    for d in docs:
        data = d.get("data") if d["kind"] == "ConfigMap" else d.get("stringData")
        if d["kind"] in ("ConfigMap", "Secret") and data and "service-config.yml" in data:
            path = out / f"{stem}-{d['metadata']['name']}.yml"
            path.write_text(data["service-config.yml"])
            found.append((path, nats, d["kind"]))
    return found


def check_config(fleetgate: str, label: str, path: Path, nats: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env["FLEETGATE_NATS_URL"] = nats
    run = subprocess.run(
        [fleetgate, "--config", str(path), "config"], capture_output=True, text=True, env=env
    )
    if run.returncode != 0:
        problem(f"{label}: fleetgate refuses its service-config.yml: {run.stderr.strip()}")
    else:
        print(f"{label}: fleetgate accepts its service-config.yml")


# --- the rendered workloads, started ------------------------------------------------------------

CHECK_TOKEN = "check-deploy-token"
CHECK_ENDPOINT = "check-deploy-endpoint"


def http(method: str, url: str, body: bytes | None = None, timeout: float = 15):
    """(status, body, content type); HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


class Postgres:
    """A PostgreSQL server of its own in a temporary directory, on a free port (Debian's
    binaries; as the postgres user when run as root, which initdb requires)."""

    def __init__(self, base: Path):
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bindir:
            raise RuntimeError("PostgreSQL is not installed (Debian's postgresql)")
        self.bin = bindir[-1]
        self.dir = base / "pgdata"
        self.port = free_port(socket.SOCK_STREAM)
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        base.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            os.chmod(base.parent, 0o711)  # a temporary directory: root's alone until now
            shutil.chown(base, "postgres")
        subprocess.run(
            [*self.as_user, str(self.bin / "initdb"), "-D", str(self.dir), "-U", "postgres",
             "--auth=trust", "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True,
        )  # fmt: skip
        self.proc = subprocess.Popen(
            [*self.as_user, str(self.bin / "postgres"), "-D", str(self.dir), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={base}",
             "-c", "fsync=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.proc.stderr.read()[-1000:]}")
            time.sleep(0.1)
        raise RuntimeError("postgres did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def check_live(fleetgate: str, label: str, docs: list[dict], cfg: Path, config: dict) -> None:
    """Runs every fleetgate workload of a rendering as its pods would (`fleetgate <args>` with the
    rendered service-config.yml and the workload's environment; a data service on PostgreSQL as
    two replicas) on a nats-server of its own (and PostgreSQL where a Secret names one), with
    loopback ports, storage and spool in a temporary directory and one endpoint added to
    auth.endpoints. Then a device's sample goes through the HTTP transport, DCX and EPTS (a
    reliable receiver: the 2xx means stored) and is read back over EPTS's REST API; a
    configuration set over ECR's REST API reaches the device through CMX; the plot page loads."""
    apps = config.get("applications") or {}
    app, app_config = next(iter(apps.items()), (None, {}))
    version = (app_config.get("versions") or [None])[0]
    if version is None:
        problem(f"{label}: no application with an app version to try the services with")
        return
    started_at = time.monotonic()
    procs: list[tuple[str, subprocess.Popen, str]] = []
    pg = None
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        nats_port = free_port(socket.SOCK_STREAM)
        nats = subprocess.Popen(
            ["nats-server", "-a", "127.0.0.1", "-p", str(nats_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            admin: dict[str, list[str]] = {}
            http_port = None
            for d in workloads(docs):
                name = d["metadata"]["name"]
                command = command_of(d)
                env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
                secret_env = []
                for e in env_of(d).values():
                    if "value" in e:
                        env[e["name"]] = e["value"]
                    else:
                        secret_env.append(e["name"])
                copies = 1
                if "FLEETGATE_STORAGE_POSTGRES_URL" in secret_env:
                    if pg is None:
                        try:
                            pg = Postgres(base / "postgres")
                        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                            err = getattr(e, "stderr", b"") or b""
                            problem(f"{label}: cannot start PostgreSQL: {e} {err[-500:]!r}")
                            return
                    env["FLEETGATE_STORAGE_POSTGRES_URL"] = pg.url
                    secret_env.remove("FLEETGATE_STORAGE_POSTGRES_URL")
                    copies = min(2, d["spec"].get("replicas") or 2)
                if "FLEETGATE_ADMIN_API_TOKENS" in secret_env:
                    secret_env.remove("FLEETGATE_ADMIN_API_TOKENS")  # left without: open API
                if secret_env:
                    problem(f"{label}: {name}: environment from unknown Secrets: {secret_env}")
                for i in range(copies):
                    cwd = base / f"{name}-{i}"
                    cwd.mkdir()
                    port = free_port(socket.SOCK_STREAM)
                    env.update(
                        FLEETGATE_NATS_URL=f"nats://127.0.0.1:{nats_port}",
                        FLEETGATE_ADMIN_LISTEN=f"127.0.0.1:{port}",
                        FLEETGATE_STORAGE_PATH=str(cwd / "storage"),
                        FLEETGATE_GATEWAY_SPOOL_PATH=str(cwd / "spool"),
                        FLEETGATE_AUTH_ENDPOINTS=(
                            f"[{{app_version: {version}, token: {CHECK_TOKEN}, "
                            f"endpoint_id: {CHECK_ENDPOINT}}}]"
                        ),
                        FLEETGATE_LOG_FORMAT="text",
                    )
                    if command == "gateway":
                        http_port = free_port(socket.SOCK_STREAM)
                        env["FLEETGATE_TRANSPORTS_HTTP_LISTEN"] = f"127.0.0.1:{http_port}"
                        for t in ("MQTT", "COAP", "UDP"):
                            env[f"FLEETGATE_TRANSPORTS_{t}_LISTEN"] = "127.0.0.1:0"
                    args = d["spec"]["template"]["spec"]["containers"][0].get("args") or []
                    log = open(cwd / "log", "w+")
                    proc = subprocess.Popen(
                        [os.path.abspath(fleetgate), "--config", str(cfg), *args],
                        cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                    )  # fmt: skip
                    procs.append((f"{name}[{i}]", proc, str(cwd / "log")))
                    admin.setdefault(command, []).append(f"http://127.0.0.1:{port}")
            if not wait_ready(label, procs, admin):
                return
            run_flow(label, admin, http_port, app, app_config, version)
        finally:
            for _, proc, _ in procs:
                if proc.poll() is None:
                    proc.terminate()
            for who, proc, log in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    problem(f"{label}: {who} did not stop within 15 s of SIGTERM")
            nats.terminate()
            nats.wait()
            if pg is not None:
                pg.stop()
    n = len(procs)
    print(f"{label}: {n} fleetgate processes as the workloads run them: device sample stored and "
          f"read back, configuration pushed through CMX ({time.monotonic() - started_at:.1f} s)")


def wait_ready(label: str, procs, admin: dict[str, list[str]]) -> bool:
    urls = [u for us in admin.values() for u in us]
    deadline = time.monotonic() + 60
    pending = set(urls)
    while pending and time.monotonic() < deadline:
        for who, proc, log in procs:
            if proc.poll() is not None:
                tail = Path(log).read_text()[-1500:]
                problem(f"{label}: {who} exited ({proc.returncode}): {tail}")
                return False
        for u in list(pending):
            try:
                if http("GET", f"{u}/readyz", timeout=2)[0] == 200:
                    pending.discard(u)
            except OSError:
                pass
        time.sleep(0.2)
    if pending:
        problem(f"{label}: not ready within 60 s: {sorted(pending)}")
        return False
    return True


def run_flow(label, admin, http_port, app, app_config, version) -> None:
    def need(ok: bool, what: str) -> bool:
        if not ok:
            problem(f"{label}: {what}")
        return ok

    has = set(admin)
    if not need({"gateway", "dcx", "auth", "epts"} <= has, f"a service is missing: {sorted(has)}"):
        return
    gw = f"http://127.0.0.1:{http_port}/kp1/{version}"
    temperature = 21.5
    sample = json.dumps({"temperature": temperature}).encode()
    status, body, _ = http("POST", f"{gw}/dcx/{CHECK_TOKEN}/json", sample)
    if not need(200 <= status < 300, f"a device's sample got {status} {body[:200]!r}"):
        return
    # Stored before the device's 2xx (EPTS is a reliable receiver), and every replica answers
    # with it (replicas on PostgreSQL share it, whichever stored it).
    for epts in admin["epts"] if (app_config.get("time_series") or {}).get("auto_extract") else []:
        q = urllib.parse.urlencode(
            {"timeSeriesName": "auto~temperature", "endpointId": CHECK_ENDPOINT}
        )
        status, body, _ = http("GET", f"{epts}/epts/api/v1/applications/{app}/time-series/last?{q}")
        point = json.loads(body or b"{}").get(CHECK_ENDPOINT, {}).get("auto~temperature", [{}])[0]
        need(status == 200 and point.get("values") == {"value": temperature},
             f"EPTS REST ({epts}): the stored point not read back: {status} {body[:300]!r}")  # fmt: skip
    status, body, ctype = http("GET", f"{admin['epts'][0]}/epts/plot")
    need(status == 200 and ctype.startswith("text/html"), f"the plot page: {status} {ctype}")
    if not need({"ecr", "cmx"} <= has, f"ECR or CMX does not run: {sorted(has)}"):
        return
    ecr = admin["ecr"][0]
    status, body, _ = http("PUT", f"{ecr}/ecr/api/v1/app-versions/{version}", b'{"interval_s": 30}')
    config_id = json.loads(body or b"{}").get("configId") if status == 200 else None
    if not need(config_id, f"ECR REST: setting a configuration got {status} {body[:300]!r}"):
        return
    status, body, _ = http("POST", f"{gw}/cmx/{CHECK_TOKEN}/config/json", b'{"observe": false}')
    got = json.loads(body or b"{}") if status == 200 else {}
    need(got.get("configId") == config_id and got.get("config") == {"interval_s": 30},
         f"CMX: the device got {status} {body[:300]!r}, not configuration {config_id}")  # fmt: skip


# --- alerts and dashboard ----------------------------------------------------------------------

# PromQL words that are not metric names.
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
}  # fmt: skip
# Series Prometheus makes itself for every target.
_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression (PromQL, or a Grafana label_values query) reads."""
    e = re.sub(r'"(\\.|[^"\\])*"|\'(\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e
    )  # label lists
    # Grafana: label_values(metric, label) reads metric; label_values(label) reads none.
    e = re.sub(r"label_values\s*\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)", r" \1 ", e)
    e = re.sub(r"label_values\s*\(\s*\w+\s*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w$.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


def _metric_names_self_test() -> None:
    cases = {
        'sum by (le, transport) (rate(a_bucket{job=~"$job",x="y"}[$__rate_interval]))': {"a_bucket"},
        "rate(a_total[5m]) / on (instance) group_left (pod) b > 0.01": {"a_total", "b"},
        'histogram_quantile(0.99, sum without (pod) (rate(c[5m] offset 1h))) > 1e3': {"c"},
        "label_values(d, job)": {"d"},
        "label_values(job)": set(),
        'up{job="x"} == 0 and on() vector(1)': {"up"},
        'e{a="b"}': {"e"},
    }
    for expr, want in cases.items():
        got = metric_names(expr)
        assert got == want, f"metric_names({expr!r}) = {got}, not {want}"


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    found = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                found.append((f"panel {p.get('title')!r}", t["expr"]))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if q:
            found.append((f"variable {v['name']}", q))
    return found


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_metric_names(fleetgate: str) -> set[str]:
    """Starts `fleetgate up` on free loopback ports and reads the names /metrics serves."""
    admin = free_port(socket.SOCK_STREAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env.update(
        FLEETGATE_ADMIN_LISTEN=f"127.0.0.1:{admin}",
        FLEETGATE_TRANSPORTS_MQTT_LISTEN=f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
        FLEETGATE_TRANSPORTS_HTTP_LISTEN=f"127.0.0.1:{free_port(socket.SOCK_STREAM)}",
        FLEETGATE_TRANSPORTS_COAP_LISTEN=f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
    )
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen(
            [os.path.abspath(fleetgate), "up"],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            text = None
            reloaded = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    url = f"http://127.0.0.1:{admin}"
                    with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                        ready = r.status == 200
                    with urllib.request.urlopen(f"{url}/livez", timeout=2) as live:
                        assert live.status == 200
                except OSError:
                    ready = False
                if not ready:
                    time.sleep(0.2)
                    continue
                # Some families show only once they have a value: a reload makes
                # fleetgate_config_reloads_total{result} appear.
                if reloaded is None:
                    proc.send_signal(signal.SIGHUP)
                    reloaded = time.monotonic()
                with urllib.request.urlopen(f"{url}/metrics", timeout=2) as m:
                    text = m.read().decode()
                if "fleetgate_config_reloads" in text or time.monotonic() - reloaded > 10:
                    break
                time.sleep(0.2)
            if text is None:
                proc.kill()
                raise SystemExit(f"fleetgate up did not become ready: {proc.communicate()[1][-2000:]}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
    names = set()
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "summary": ["", "_sum", "_count"],
        "info": ["_info"],
    }
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        for s in suffixes.get(m.group(2), [""]):
            names.add(m.group(1) + s)
    # Sample lines too, in case a type is one the table above does not know.
    names |= {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*)(?:\{| )", text, re.M)}
    return names


def check_metric_names(fleetgate: str, alerts: Path, tests: Path, dashboard: Path) -> None:
    served = served_metric_names(fleetgate)
    print(f"a running fleetgate serves {len(served)} metric names")
    used: list[tuple[str, str]] = []
    for g in yaml.safe_load(alerts.read_text())["groups"]:
        for r in g["rules"]:
            used.append((f"{alerts.name}: {r.get('alert') or r.get('record')}", r["expr"]))
    for i, t in enumerate(yaml.safe_load(tests.read_text())["tests"]):
        for s in t.get("input_series", []):
            used.append((f"{tests.name}: test {i + 1} input", s["series"]))
        for p in t.get("promql_expr_test", []):
            used.append((f"{tests.name}: test {i + 1} expression", p["expr"]))
    used += [(f"{dashboard.name}: {w}", e) for w, e in dashboard_exprs(json.loads(dashboard.read_text()))]
    count = 0
    for where, expr in used:
        for name in sorted(metric_names(expr)):
            count += 1
            if name not in served and name not in _SYNTHETIC:
                problem(f"{where}: metric {name} is not served by /metrics")
    if count < len(used):
        problem(f"only {count} metric names found in {len(used)} expressions: the parser is off")
    print(f"{len(used)} expressions, {count} metric references checked against /metrics")


def check_prometheus_rule(docs: list[dict], alerts: Path, label: str) -> None:
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    for r in rules:
        if r["spec"] != yaml.safe_load(alerts.read_text()):
            problem(f"{label}: PrometheusRule {r['metadata']['name']} differs from {alerts}")


def promtool(alerts: Path, tests: Path) -> None:
    for cmd in (["check", "rules", alerts.name], ["test", "rules", tests.name]):
        run = subprocess.run(["promtool", *cmd], capture_output=True, text=True, cwd=alerts.parent)
        if run.returncode != 0:
            problem(f"promtool {' '.join(cmd)}:\n{run.stdout}{run.stderr}")
        else:
            print(f"promtool {' '.join(cmd)}: ok")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--kustomize", type=Path, action="append", required=True, help="a rendered kustomize tree"
    )
    ap.add_argument("--chart", type=Path, required=True)
    ap.add_argument("--alerts", type=Path, required=True)
    ap.add_argument("--alert-tests", type=Path, required=True)
    ap.add_argument("--dashboard", type=Path, required=True)
    ap.add_argument("--fleetgate", help="a fleetgate binary: config and metric-name checks")
    a = ap.parse_args()

    started = time.monotonic()
    _metric_names_self_test()
    trees = {f"kustomize tree {k.stem}": k for k in a.kustomize}
    trees.update(render_chart(a.chart, a.out))
    for label, path in trees.items():
        validate_strict(label, path, a.out)
        docs = docs_of(path)
        configs = config_files(docs, a.out, path.stem)
        if len(configs) != 1:
            problem(f"{label}: {len(configs)} service-config.yml, not one")
            continue
        cfg, nats, holder = configs[0]
        config = yaml.safe_load(cfg.read_text()) or {}
        postgres = ((config.get("storage") or {}).get("postgres") or {}).get("url")
        if holder == "ConfigMap" and postgres:
            problem(f"{label}: storage.postgres.url (a password) in a ConfigMap, not a Secret")
        # kustomize rolls pods through the ConfigMap's hashed name instead of an annotation.
        expect_checksum = label.endswith("default values")
        check_invariants(label, docs, expect_checksum, config)
        check_prometheus_rule(docs, a.alerts, label)
        if a.fleetgate:
            check_config(a.fleetgate, f"{label}: {cfg.name}", cfg, nats)
            # Every workload started as its pods would run: the kustomize trees (embedded store;
            # PostgreSQL) and the chart's defaults (the same as the kustomize tree, by values).
            if label.startswith("kustomize") or label.endswith("default values"):
                check_live(a.fleetgate, label, docs, cfg, config)
    promtool(a.alerts, a.alert_tests)
    if a.fleetgate:
        check_metric_names(a.fleetgate, a.alerts, a.alert_tests, a.dashboard)
    else:
        problem("no fleetgate binary (FLEETGATE_BIN): config and metric names not checked")
    print(f"check-deploy: {len(problems)} problems in {time.monotonic() - started:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
