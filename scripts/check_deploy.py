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
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def check_invariants(label: str, docs: list[dict], expect_checksum: bool) -> None:
    deployments = [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "fleetgate"
    ]
    if not deployments:
        problem(f"{label}: no fleetgate Deployment")
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
        if c.get("args") == ["gateway"]:
            ports = {(p["containerPort"], p.get("protocol", "TCP")) for p in c["ports"]}
            for want in [(1883, "TCP"), (8080, "TCP"), (5683, "UDP"), (5690, "UDP"), (8008, "TCP")]:
                if want not in ports:
                    problem(f"{label}: {name}: port {want[0]}/{want[1]} not exposed")
    services = [d for d in docs if d["kind"] == "Service"]
    exposed = {
        (p["port"], p.get("protocol", "TCP"))
        for s in services
        if s["spec"].get("selector", {}).get("app.kubernetes.io/component") == "gateway"
        for p in s["spec"]["ports"]
    }
    for want in [(1883, "TCP"), (8080, "TCP"), (5683, "UDP"), (5690, "UDP")]:
        if want not in exposed:
            problem(f"{label}: no Service exposes the gateway's {want[0]}/{want[1]}")


def config_files(docs: list[dict], out: Path, stem: str) -> list[tuple[Path, str]]:
    """Each rendered service-config.yml, with the NATS URL the Deployments give it."""
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
            found.append((path, nats))
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
    ap.add_argument("--kustomize", type=Path, required=True)
    ap.add_argument("--chart", type=Path, required=True)
    ap.add_argument("--alerts", type=Path, required=True)
    ap.add_argument("--alert-tests", type=Path, required=True)
    ap.add_argument("--dashboard", type=Path, required=True)
    ap.add_argument("--fleetgate", help="a fleetgate binary: config and metric-name checks")
    a = ap.parse_args()

    started = time.monotonic()
    _metric_names_self_test()
    trees = {"kustomize tree": a.kustomize, **render_chart(a.chart, a.out)}
    for label, path in trees.items():
        validate_strict(label, path, a.out)
        docs = docs_of(path)
        # kustomize rolls pods through the ConfigMap's hashed name instead of an annotation.
        expect_checksum = label.endswith("default values")
        check_invariants(label, docs, expect_checksum)
        check_prometheus_rule(docs, a.alerts, label)
        if a.fleetgate:
            for cfg, nats in config_files(docs, a.out, path.stem):
                check_config(a.fleetgate, f"{label}: {cfg.name}", cfg, nats)
    promtool(a.alerts, a.alert_tests)
    if a.fleetgate:
        check_metric_names(a.fleetgate, a.alerts, a.alert_tests, a.dashboard)
    else:
        problem("no fleetgate binary (FLEETGATE_BIN): config and metric names not checked")
    print(f"check-deploy: {len(problems)} problems in {time.monotonic() - started:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
