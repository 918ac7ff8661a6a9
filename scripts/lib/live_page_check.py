"""Drives lab-api's live page in headless Chromium over the DevTools protocol.

Loads the page against a running stack (a sync-daemon holding the lease), changes labs in the
CML simulator (a state, a title full of markup), presses the page's refresh button, and checks
that the page's DOM shows the outcome and the new state without a reload and the markup as
text; that a second press is throttled with a countdown; then that a failing worker, refreshed
from the page, shows as failing. Optionally saves a screenshot. Exits non-zero with what the
page showed when a check fails.

  live_page_check.py --api URL --control URL [--screenshot PNG]
"""

import argparse
import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket  # websocket-client

HOSTILE = '<img src=x onerror="window.__pwned=1">Lab & <b>co</b>'


def http_json(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """One page target of a headless Chromium, driven over its DevTools websocket."""

    def __init__(self, url, workdir):
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if not browser:
            sys.exit("chromium is not installed")
        port = free_port()
        self.proc = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--disable-extensions", "--hide-scrollbars",
             f"--remote-debugging-port={port}", f"--user-data-dir={workdir}",
             "--window-size=1440,900", url],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "chromium.log"), "w"))
        deadline = time.time() + 30
        target = None
        while time.time() < deadline and target is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                target = pages[0] if pages else None
            except OSError:
                time.sleep(0.2)
        if target is None:
            self.close()
            sys.exit("chromium's DevTools endpoint did not come up")
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=30,
                                              suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method, **params):
        mid = next(self.ids)
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, what, expression, timeout=30):
        deadline = time.time() + timeout
        value = None
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        while time.time() < deadline:
            value = self.eval(guarded)
            if value:
                return value
            time.sleep(0.1)
        self.fail(f"timed out waiting for {what} (last value {value!r})")

    def fail(self, message):
        print(f"FAILED: {message}", file=sys.stderr)
        print("the page showed:\n" + (self.eval("document.body.innerText") or ""), file=sys.stderr)
        self.close()
        sys.exit(1)

    def screenshot(self, path):
        png = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(png))

    def close(self):
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def cell(lab_id, cls):
    return (f"(document.querySelector('#labs tr[data-lab-id={json.dumps(lab_id)}] td.{cls}')"
            f" || {{}}).textContent")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--screenshot")
    args = ap.parse_args()

    def refresh(expect):
        """Presses the refresh button of the chosen worker; waits for the status to say `expect`."""
        page.wait("the refresh button", "!document.getElementById('refresh').disabled")
        page.eval("document.getElementById('refresh').click()")
        page.wait(f"the refresh status to say {expect!r}",
                  f"document.getElementById('refresh-status').textContent.startsWith({json.dumps(expect)})")

    workers = http_json("GET", f"{args.control}/workers")
    # The refresh button's checks on a server without an event stream (CML 2.4: only a sync
    # reads its changes), the live ones on a server with one.
    worker = next(w for w in workers if not w["event_stream"])
    streamer = next(w for w in workers if w["event_stream"])
    other = next(w for w in workers if w["id"] not in (worker["id"], streamer["id"]))
    labs = http_json("GET", f"{args.control}/workers/{worker['id']}/labs")
    moved, renamed = labs[0], labs[1]
    new_state = "STOPPED" if moved["state"] == "STARTED" else "STARTED"

    workdir = tempfile.mkdtemp(prefix="live-page-")
    page = Page(f"{args.api}/?worker={worker['id']}", workdir)
    try:
        page.call("Runtime.enable")
        page.wait("the stream to connect", "document.body.dataset.stream === 'live'")
        page.wait(f"{len(labs)} labs of {worker['id']}",
                  f"document.querySelectorAll('#labs tbody tr').length === {len(labs)}")
        page.wait("the fleet", f"document.querySelectorAll('#fleet tbody tr').length === {len(workers)}")
        page.eval("window.__kept = 'the same document'")
        if page.eval(cell(moved["id"], "state")) != moved["state"]:
            page.fail("the lab's first state is not shown")

        http_json("PATCH", f"{args.control}/workers/{worker['id']}/labs/{moved['id']}",
                  {"state": new_state})
        http_json("PATCH", f"{args.control}/workers/{worker['id']}/labs/{renamed['id']}",
                  {"title": HOSTILE})
        refresh(f"refreshed: {len(labs)} labs, 0 new, 2 changed")
        page.wait(f"{moved['id']} to show {new_state}",
                  f"{cell(moved['id'], 'state')} === {json.dumps(new_state)}")
        page.wait("the markup title to show as text",
                  f"{cell(renamed['id'], 'title')} === {json.dumps(HOSTILE)}")
        checks = {
            "no reload": "window.__kept === 'the same document'",
            "no element from a title": "document.querySelectorAll('#labs img, #labs b').length === 0",
            "no script from a title": "window.__pwned === undefined",
            "still live": "document.body.dataset.stream === 'live'",
            "events logged": "document.querySelectorAll('#events li').length >= 2",
        }
        for name, expression in checks.items():
            if page.eval(expression) is not True:
                page.fail(name)
        # At once again: refused, and the page counts down.
        page.eval("document.getElementById('refresh').click()")
        page.wait("the throttle's countdown",
                  "document.getElementById('refresh-status').textContent"
                  ".startsWith('Refresh rate limited. Please wait')")
        if page.eval("document.getElementById('refresh').disabled") is not True:
            page.fail("the button stays enabled while throttled")

        http_json("PUT", f"{args.control}/workers/{other['id']}/faults", {"malformed_json": True})
        page.eval(f"document.querySelector('#fleet tr[data-worker-id={json.dumps(other['id'])}]').click()")
        refresh("refresh failed: cml_malformed")
        page.wait(f"{other['id']} to show as failing",
                  f"(document.querySelector('#fleet tr[data-worker-id={json.dumps(other['id'])}] "
                  "td.health') || {}).textContent === 'failing'")
        # A server with an event stream: its badge says live, and a change made on it shows
        # with no button pressed.
        badge = (f"(document.querySelector('#fleet tr[data-worker-id={json.dumps(streamer['id'])}] "
                 "td.watch') || {}).textContent")
        page.wait(f"{streamer['id']}'s badge to say live", f"{badge} === 'live'", timeout=45)
        streamed = http_json("GET", f"{args.control}/workers/{streamer['id']}/labs")[0]
        page.eval(f"document.querySelector('#fleet tr[data-worker-id={json.dumps(streamer['id'])}]').click()")
        page.wait(f"the labs of {streamer['id']}",
                  f"{cell(streamed['id'], 'title')} === {json.dumps(streamed['title'])}")
        live_title = "Renamed on the CML server"
        http_json("PATCH", f"{args.control}/workers/{streamer['id']}/labs/{streamed['id']}",
                  {"title": live_title})
        page.wait("the change to show with no refresh pressed",
                  f"{cell(streamed['id'], 'title')} === {json.dumps(live_title)}")
        if page.eval("window.__kept") != "the same document":
            page.fail("the page reloaded")
        if args.screenshot:
            time.sleep(3)  # the highlight of changed rows fades
            page.screenshot(args.screenshot)
            print(f"screenshot: {args.screenshot}")
        print("live page: the refresh button's outcome, the new state, the markup title as text, "
              "the throttle's countdown, the failing worker, a live badge and a change pushed by "
              "CML's event stream showed without a reload")
    finally:
        page.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
