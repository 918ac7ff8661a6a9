"""Checks the prometheus-operator objects of a rendered kustomization, which
kubernetes-validate cannot (it has no schemas for custom resources):

- each ServiceMonitor and PrometheusRule has exactly the fields we use, of the right types;
- each ServiceMonitor selects at least one Service of the render, every selected Service has
  the endpoint's named port and the jobLabel label;
- every job the alert rules select is the job name some ServiceMonitor gives its targets;
- the dashboard ConfigMap holds a Grafana dashboard.

Usage: monitoring-check.py RENDERED.yaml
"""

import json
import re
import sys

import jsonschema
import yaml

DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": LABELS},
    "additionalProperties": False,
}


def strict(required, **properties):
    return {"type": "object", "required": required, "properties": properties,
            "additionalProperties": False}


SERVICE_MONITOR = strict(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": "monitoring.coreos.com/v1"},
    kind={"const": "ServiceMonitor"},
    metadata=METADATA,
    spec=strict(
        ["selector", "endpoints"],
        jobLabel={"type": "string"},
        selector=strict(["matchLabels"], matchLabels=LABELS),
        namespaceSelector=strict([], matchNames={"type": "array", "items": {"type": "string"}}),
        endpoints={"type": "array", "minItems": 1, "items": strict(
            ["port"],
            port={"type": "string"},
            path={"type": "string", "pattern": "^/"},
            scheme={"enum": ["http", "https"]},
            interval=DURATION,
            scrapeTimeout=DURATION,
        )},
    ),
)

RULE = {
    "type": "object",
    "required": ["expr"],
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "record": {"type": "string"},
        "expr": {"type": "string", "minLength": 1},
        "for": DURATION,
        "labels": LABELS,
        "annotations": LABELS,
    },
    "additionalProperties": False,
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}

PROMETHEUS_RULE = strict(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": "monitoring.coreos.com/v1"},
    kind={"const": "PrometheusRule"},
    metadata=METADATA,
    spec=strict(["groups"], groups={"type": "array", "minItems": 1, "items": strict(
        ["name", "rules"],
        name={"type": "string"},
        interval=DURATION,
        rules={"type": "array", "minItems": 1, "items": RULE},
    )}),
)


def fail(message):
    sys.exit(f"monitoring-check: {message}")


def main(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    services = [d for d in docs if d["kind"] == "Service"]
    if not monitors and not rules:
        return
    for doc, schema in [(m, SERVICE_MONITOR) for m in monitors] + [(r, PROMETHEUS_RULE) for r in rules]:
        try:
            jsonschema.validate(doc, schema)
        except jsonschema.ValidationError as e:
            fail(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.absolute_path))}: {e.message}")

    jobs = set()
    for m in monitors:
        name = f"ServiceMonitor/{m['metadata']['name']}"
        spec = m["spec"]
        wanted = spec["selector"]["matchLabels"]
        selected = [s for s in services
                    if s["metadata"].get("namespace") == m["metadata"].get("namespace")
                    and wanted.items() <= s["metadata"].get("labels", {}).items()]
        if not selected:
            fail(f"{name} selects no Service (labels {wanted})")
        for s in selected:
            ports = {p.get("name") for p in s["spec"]["ports"]}
            for e in spec["endpoints"]:
                if e["port"] not in ports:
                    fail(f"{name}: Service/{s['metadata']['name']} has no port named {e['port']!r} ({sorted(ports)})")
            job = s["metadata"]["name"]
            if "jobLabel" in spec:
                job = s["metadata"].get("labels", {}).get(spec["jobLabel"])
                if job is None:
                    fail(f"{name}: Service/{s['metadata']['name']} has no label {spec['jobLabel']!r} to name the job")
            jobs.add(job)

    for r in rules:
        for group in r["spec"]["groups"]:
            for rule in group["rules"]:
                for m in re.finditer(r'job\s*(=~|=)\s*"([^"]*)"', rule["expr"]):
                    named = m.group(2).split("|") if m.group(1) == "=~" else [m.group(2)]
                    for job in named:
                        if monitors and job not in jobs:
                            fail(f"rule {rule.get('alert', rule.get('record'))} selects job {job!r}; "
                                 f"the ServiceMonitors name {sorted(jobs)}")

    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for key, text in d["data"].items():
                dash = json.loads(text)
                if not dash.get("uid") or not dash.get("panels"):
                    fail(f"ConfigMap/{d['metadata']['name']} {key}: not a dashboard (no uid or panels)")

    print(f"ok   {len(monitors)} ServiceMonitors select their Services' ports (jobs {sorted(jobs)}); "
          f"{sum(len(g['rules']) for r in rules for g in r['spec']['groups'])} rules select those jobs")


if __name__ == "__main__":
    main(sys.argv[1])
