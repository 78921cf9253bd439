"""Write deploy/k8s/prometheusrule.yaml: rules.yml wrapped in a prometheus-operator CRD.

    python deploy/prometheus/render_prometheusrule.py

rules.yml is the one source of the rules (promtool checks and tests it; compose mounts it);
tests/unit/test_deploy_files.py fails when the PrometheusRule no longer matches it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yml"
TARGET = HERE.parent / "k8s" / "prometheusrule.yaml"

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


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "sluice",
            "labels": {"app.kubernetes.io/name": "sluice", "release": "prometheus"},
        },
        "spec": {"groups": rules["groups"]},
    }


def render() -> str:
    rules = yaml.safe_load(RULES.read_text())
    body = yaml.dump(
        prometheus_rule(rules), Dumper=_BlockDumper, sort_keys=False, width=100, indent=2
    )
    return HEADER + body


def main() -> None:
    TARGET.write_text(render())
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
