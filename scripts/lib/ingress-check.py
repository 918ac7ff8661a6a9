"""Checks the Ingresses of a rendered kustomization (scripts/k8s-check runs it on each).

Each backend names a Service of the render and one of its ports. An Ingress that routes to
lab-api must route the UI's paths there (ingress-nginx regexes, matched as nginx does: from the
start of the path) and nothing else of the UI's, and, since it carries the event stream, must
switch proxy buffering off and allow reads longer than the heartbeat interval.

  ingress-check.py RENDERED.yaml
"""

import re
import sys

import yaml

# Requests the UI sends to lab-api, and ones that must stay with the UI.
TO_LAB_API = [
    "/api/workers/w-1/labs",
    "/api/workers/w-1/labs/l-1",
    "/api/workers/w-1/labs/refresh",
    "/api/sync-requests/0b7c2a4e-5f1d-4c3b-9a8e-2d6f1e0c9b7a",
    "/api/labs/region/us-east-1/workers/w-1/labs",
    "/api/events/stream",
]
NOT_TO_LAB_API = ["/", "/api/workers", "/api/workers/w-1", "/index.html", "/api/auth/login"]
MIN_READ_TIMEOUT = 3600

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
errors = []

for ing in (d for d in docs if d["kind"] == "Ingress"):
    name = ing["metadata"]["name"]
    notes = ing["metadata"].get("annotations", {})
    regex = notes.get("nginx.ingress.kubernetes.io/use-regex") == "true"
    routes = []
    for rule in ing["spec"].get("rules", []):
        for p in rule.get("http", {}).get("paths", []):
            svc = p["backend"]["service"]
            target = services.get(svc["name"])
            if target is None:
                errors.append(f"{name}: backend Service {svc['name']} is not in the render")
                continue
            ports = target["spec"]["ports"]
            wanted = svc["port"]
            if not any(wanted.get("name") == q.get("name") or wanted.get("number") == q["port"]
                       for q in ports):
                errors.append(f"{name}: Service {svc['name']} has no port {wanted}")
            routes.append((p["path"], p["pathType"], svc["name"]))

    def served_by(path):
        for pattern, kind, svc in routes:
            if regex and kind == "ImplementationSpecific":
                if re.match(pattern, path, re.IGNORECASE):
                    return svc
            elif kind == "Exact" and path == pattern:
                return svc
            elif kind == "Prefix" and (path == pattern or path.startswith(pattern.rstrip("/") + "/")):
                return svc
        return None

    if not any(svc == "lab-api" for _, _, svc in routes):
        continue
    for path in TO_LAB_API:
        if served_by(path) != "lab-api":
            errors.append(f"{name}: {path} does not reach lab-api")
    for path in NOT_TO_LAB_API:
        if served_by(path) == "lab-api":
            errors.append(f"{name}: {path} is the UI's but reaches lab-api")
    if notes.get("nginx.ingress.kubernetes.io/proxy-buffering") != "off":
        errors.append(f"{name}: proxy buffering must be off for the event stream")
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        value = notes.get(f"nginx.ingress.kubernetes.io/{key}", "60")
        if not value.isdigit() or int(value) < MIN_READ_TIMEOUT:
            errors.append(f"{name}: {key} {value} s would cut event streams (at least {MIN_READ_TIMEOUT})")

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
