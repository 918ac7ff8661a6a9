#!/usr/bin/env python3
"""Cisco's own CML client (virl2-client) against the simulator: log in to every simulated
server, list all labs, read each lab's title and state, and compare them with what the
simulator's control API says the server holds. Exits non-zero on any difference.

Usage: virl2_check.py STATE_DIR   (the simulator's --state-dir, holding endpoints.json)
"""
import json
import os
import sys
import urllib.request

from virl2_client import ClientLibrary


def main() -> int:
    state_dir = sys.argv[1]
    with open(os.path.join(state_dir, "endpoints.json")) as f:
        summary = json.load(f)
    control = summary["control"]
    ca_file = summary.get("ca_file")
    password = os.environ.get("CML_SIM_PASSWORD", "local-dev-password")
    with urllib.request.urlopen(f"{control}/workers") as r:
        workers = {w["id"]: w for w in json.load(r)}
    failures = 0
    for worker_id, url in summary["workers"].items():
        version = workers[worker_id]["version"]
        # virl2-client 2.10 supports controllers from 2.7 on; older ones are checked without
        # its version gate, exactly as an operator would have to.
        modern = not version.startswith("2.4")
        client = ClientLibrary(
            url,
            "admin",
            password,
            allow_http=url.startswith("http://"),
            ssl_verify=ca_file if ca_file else True,
            check_version=modern,
            raise_for_auth_failure=True,
        )
        labs = {lab.id: (lab.title, lab.state()) for lab in client.all_labs(show_all=True)}
        with urllib.request.urlopen(f"{control}/workers/{worker_id}/labs") as r:
            expected = {lab["id"]: (lab["title"], lab["state"]) for lab in json.load(r)}
        if labs != expected:
            failures += 1
            print(f"FAIL {worker_id} ({version}): virl2-client saw {labs}, the simulator holds {expected}")
        else:
            print(f"ok   {worker_id} ({version}, {url}): {len(labs)} labs, titles and states match")
    print(f"{len(summary['workers']) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
