"""Write deploy/k8s/prometheusrule.yaml and prometheusrule-monitors.yaml: rules.yml and
monitors.rules.yml wrapped in prometheus-operator CRDs.

    python deploy/prometheus/render_prometheusrule.py

rules.yml and monitors.rules.yml are the one source of the rules (promtool checks and tests
them; compose mounts them); tests/unit/test_deploy_files.py and tests/unit/test_monitors.py
fail when a PrometheusRule no longer matches its file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yml"
TARGET = HERE.parent / "k8s" / "prometheusrule.yaml"
MONITOR_RULES = HERE / "monitors.rules.yml"
MONITOR_TARGET = HERE.parent / "k8s" / "prometheusrule-monitors.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/rules.yml by deploy/prometheus/render_prometheusrule.py.
# Do not edit: change rules.yml and run the script again.
# prometheus-operator loads PrometheusRules whose labels match its ruleSelector
# (kube-prometheus-stack: release=<release name>).
"""


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as literal blocks, like rules.yml."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def prometheus_rule(rules: dict[str, Any], name: str = "sluice") -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "sluice", "release": "prometheus"},
        },
        "spec": {"groups": rules["groups"]},
    }


def render(source: Path = RULES, name: str = "sluice") -> str:
    rules = yaml.safe_load(source.read_text())
    body = yaml.dump(
        prometheus_rule(rules, name), Dumper=_BlockDumper, sort_keys=False, width=100, indent=2
    )
    header = HEADER.replace("deploy/prometheus/rules.yml", f"deploy/prometheus/{source.name}")
    return header.replace("change rules.yml", f"change {source.name}") + body


def render_monitors() -> str:
    return render(MONITOR_RULES, "sluice-monitors")


def main() -> None:
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
    MONITOR_TARGET.write_text(render_monitors())
    print(f"wrote {MONITOR_TARGET}")


if __name__ == "__main__":
    main()
