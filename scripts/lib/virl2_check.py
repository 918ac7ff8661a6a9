#!/usr/bin/env python3
"""Cisco's own CML client (virl2-client) against the simulator: log in to every simulated
server, list all labs, read each lab's title and state, and compare them with what the
simulator's control API says the server holds. Then groups: share a lab with two groups
through the control API and read every lab's groups back through virl2-client (2.9+: the
server's groups and their associations, and each lab's associations; 2.4: the lab objects),
and change a lab's associations through virl2-client and read them back through the control
API. Then users: as admin, make users and a group and share labs through virl2-client, log in
as each user through virl2-client and compare the labs it lists with the simulator's rule. On 2.9+ workers served one port each, Cisco's event listener joins a lab and follows a
change of its state and title made through the control API from /ws/ui alone (its nodes'
states, the lab's state and title; no REST call meanwhile). Exits non-zero on any difference.

Usage: virl2_check.py STATE_DIR   (the simulator's --state-dir, holding endpoints.json)
"""
import json
import os
import sys
import time
import urllib.parse
import urllib.request
import warnings

from virl2_client import ClientLibrary
from virl2_client.event_handling import EventHandler, EventHandlerBase
from virl2_client.event_listening import EventListener
from virl2_client.exceptions import LabNotFound


def control_json(url: str, method: str = "GET", body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request) as r:
        return json.load(r)


def check_groups(client, control: str, worker_id: str, modern: bool) -> list[str]:
    """Differences between the groups virl2-client reads and what the simulator was told."""
    problems = []
    labs_url = f"{control}/workers/{worker_id}/labs"
    first, second = [lab["id"] for lab in control_json(labs_url)][:2]
    control_json(f"{labs_url}/{first}/groups", "PUT",
                 [{"name": "netops", "permissions": ["lab_view", "lab_exec"]},
                  {"name": "students", "permissions": ["lab_admin", "lab_edit", "lab_exec", "lab_view"]}])
    control_json(f"{labs_url}/{second}/groups", "PUT", [])
    told = {lab["id"]: lab["groups"] for lab in control_json(labs_url)}
    expected_names = {lab_id: sorted({g["name"] for g in gs}) for lab_id, gs in told.items()}
    if not expected_names[first] == ["netops", "students"]:
        problems.append(f"the control API did not share {first}: {told[first]}")

    if modern:
        groups = client.group_management.groups()
        names = {}
        for group in groups:
            for association in group["associations"]:
                names.setdefault(association["id"], set()).add(group["name"])
        seen = {lab_id: sorted(names.get(lab_id, ())) for lab_id in told}
        if seen != expected_names:
            problems.append(f"group_management.groups() gives {seen}, the simulator was told {expected_names}")
        for lab_id, gs in told.items():
            lab = client.join_existing_lab(lab_id, sync_lab=False)
            associations = lab.associations
            got = sorted((g["id"], sorted(g["permissions"])) for g in associations["groups"])
            want = sorted((g["id"], sorted(g["permissions"])) for g in gs)
            if got != want:
                problems.append(f"lab {lab_id}: associations {got}, the simulator was told {want}")
        # A change made through virl2-client is what the simulator holds.
        netops = next(g["id"] for g in groups if g["name"] == "netops")
        lab = client.join_existing_lab(second, sync_lab=False)
        lab.update_associations({"groups": [{"id": netops, "permissions": ["lab_view"]}], "users": []})
        now = {lab["id"]: lab["groups"] for lab in control_json(labs_url)}[second]
        if [(g["name"], g["permissions"]) for g in now] != [("netops", ["lab_view"])]:
            problems.append(f"update_associations on {second} left the simulator with {now}")
    else:
        for lab_id in told:
            lab = client.join_existing_lab(lab_id, sync_lab=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Lab.groups is deprecated from 2.9 on
                got = sorted({g["name"] for g in lab.groups})
            if got != expected_names[lab_id]:
                problems.append(f"lab {lab_id}: groups {got}, the simulator was told {expected_names[lab_id]}")
    return problems


def check_users(client, url: str, control: str, worker_id: str, modern: bool, ca_file) -> list[str]:
    """Sharing made through virl2-client as admin (users, a group, associations), then each
    user logged in through virl2-client: the labs it lists must be those the simulator's rule
    gives it (what lab-api is judged against)."""
    problems = []
    labs_url = f"{control}/workers/{worker_id}/labs"
    labs = [lab["id"] for lab in control_json(labs_url)]
    team = client.group_management.create_group(
        "vc-team", description="made by virl2-check",
        **({"associations": [{"id": labs[0], "permissions": ["lab_view"]}]} if modern
           else {"labs": [{"id": labs[0], "permission": "read_only"}]}))
    member = client.user_management.create_user("vc-member", "vc-password", groups=[team["id"]])
    loner = client.user_management.create_user("vc-loner", "vc-password")
    chief = client.user_management.create_user("vc-chief", "vc-password", admin=True)
    if modern:
        lab = client.join_existing_lab(labs[1], sync_lab=False)
        lab.update_associations({"groups": [], "users": [{"id": loner["id"], "permissions": ["lab_exec"]}]})
    users = {u["username"]: u for u in client.user_management.users()}
    for name in ("vc-member", "vc-loner", "vc-chief"):
        if name not in users:
            problems.append(f"user_management.users() does not list {name}")
    if member["id"] not in [m for g in client.group_management.groups() if g["id"] == team["id"] for m in g["members"]]:
        problems.append(f"the group {team['id']} does not list its member")
    for name in ("vc-member", "vc-loner", "vc-chief", "alice", "bob"):
        password = "vc-password" if name.startswith("vc-") else f"{name}-password"
        as_user = ClientLibrary(url, name, password, allow_http=url.startswith("http://"),
                                ssl_verify=ca_file if ca_file else True, check_version=modern,
                                raise_for_auth_failure=True)
        seen = sorted(as_user.get_lab_list(show_all=True))
        told = sorted(control_json(f"{control}/workers/{worker_id}/users/{name}/labs"))
        if seen != told:
            problems.append(f"{name} lists {seen} through virl2-client, the simulator's rule gives {told}")
        for lab_id in seen[:2]:
            as_user.join_existing_lab(lab_id)  # readable in full, topology included
    if sorted(control_json(f"{control}/workers/{worker_id}/users/vc-chief/labs")) != sorted(labs):
        problems.append("an admin of the server does not see every lab")
    member_labs = control_json(f"{control}/workers/{worker_id}/users/vc-member/labs")
    if labs[0] not in member_labs:
        problems.append(f"vc-member does not see {labs[0]}, shared with its group")
    return problems


class LabEventsHandler(EventHandler):
    """Cisco's event handler, except that lab-level events skip the element lookup: 2.10.1
    looks up every event but `created` as a node, interface or link of the lab and raises
    KeyError for a `lab_event` (whose element is the lab), which ends its listener."""

    def handle_event(self, event):
        if event.type != "lab_event":
            return super().handle_event(event)
        try:
            event.lab = self._client_library.get_local_lab(event.lab_id)
        except LabNotFound:
            return None
        return EventHandlerBase.handle_event(self, event)


def check_events(url: str, control: str, worker_id: str, password: str, ca_file) -> list[str]:
    """Differences between what Cisco's event listener makes of a joined lab and what the
    simulator was told: its nodes' states, its state and its title, from /ws/ui alone."""
    client = ClientLibrary(url, "admin", password, allow_http=url.startswith("http://"),
                           ssl_verify=ca_file if ca_file else True, raise_for_auth_failure=True)
    client.auto_sync = False  # as events=True sets it: what follows comes from events only
    listener = EventListener(client)
    listener._event_handler = LabEventsHandler(client)
    client.event_listener = listener
    client.start_event_listening()
    try:
        # The listener is "connected" once it has sent its token; the server follows changes
        # for it only once it has read that token: wait for that before making one.
        deadline = time.monotonic() + 10
        while not any(w["id"] == worker_id and w["listening_streams"] > 0
                      for w in control_json(f"{control}/workers")):
            if time.monotonic() > deadline:
                return [f"the listener's stream was not following {worker_id} within 10 s"]
            time.sleep(0.05)
        labs_url = f"{control}/workers/{worker_id}/labs"
        sim_lab = max(control_json(labs_url), key=lambda lab: lab["node_count"])
        lab = client.join_existing_lab(sim_lab["id"])
        if lab.state() != sim_lab["state"]:
            return [f"lab {sim_lab['id']}: state {lab.state()}, the simulator holds {sim_lab['state']}"]
        calls = control_json(f"{control}/workers/{worker_id}/calls")
        target = "STOPPED" if sim_lab["state"] == "STARTED" else "STARTED"
        node_target = "BOOTED" if target == "STARTED" else "STOPPED"
        control_json(f"{labs_url}/{sim_lab['id']}", "PATCH", {"state": target, "title": "followed by events"})
        deadline = time.monotonic() + 10
        seen = None
        while time.monotonic() < deadline:
            seen = (lab.state(), lab.title, sorted({n.state for n in lab.nodes()}))
            if seen == (target, "followed by events", [node_target] if sim_lab["node_count"] else []):
                break
            time.sleep(0.05)
        else:
            return [f"lab {sim_lab['id']}: the listener left it at {seen}, expected {target}, "
                    f"'followed by events' and nodes {node_target}"]
        after = control_json(f"{control}/workers/{worker_id}/calls")
        rest = {k: after[k] - calls.get(k, 0) for k in after if k != "ws_ui" and after[k] != calls.get(k, 0)}
        if rest:
            return [f"lab {sim_lab['id']}: followed with REST calls {rest}, not from events alone"]
        return []
    finally:
        client.stop_event_listening()


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
            continue
        problems = check_groups(client, control, worker_id, modern)
        problems += check_users(client, url, control, worker_id, modern, ca_file)
        one_port = urllib.parse.urlparse(url).path in ("", "/")
        followed = modern and one_port
        if followed:
            problems += check_events(url, control, worker_id, password, ca_file)
        if problems:
            failures += 1
            for p in problems:
                print(f"FAIL {worker_id} ({version}): {p}")
        else:
            where = "groups and associations" if modern else "groups in the lab objects"
            where += ", and each user's own labs"
            events = "; the event listener followed a lab" if followed else ""
            print(f"ok   {worker_id} ({version}, {url}): {len(labs)} labs, titles, states and {where} match{events}")
    print(f"{len(summary['workers']) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
