#!/usr/bin/env python3
"""Event-stream clients that stop reading: what they can make lab-api hold.

    stalled-streams.py HOST PORT --streams N --workers ID,ID,... [--recv-buffer BYTES]

Opens N streams (one per worker named, filtered to it; the rest unfiltered) on sockets with a
small receive buffer (a client on a real network that stops reading closes its window at once),
reads the response headers of each, then never reads again. Prints "connected" once all are
open, holds them until killed (SIGTERM), then prints one JSON line: how many the server closed.
"""
import argparse, json, signal, socket, sys, threading

p = argparse.ArgumentParser()
p.add_argument("host")
p.add_argument("port", type=int)
p.add_argument("--streams", type=int, required=True)
p.add_argument("--workers", default="")
p.add_argument("--recv-buffer", type=int, default=4096)
a = p.parse_args()
workers = [w for w in a.workers.split(",") if w]
socks = []
for i in range(a.streams):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, a.recv_buffer)
    s.connect((a.host, a.port))
    path = "/api/events/stream" + (f"?worker_ids={workers[i]}" if i < len(workers) else "")
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {a.host}:{a.port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            sys.exit(f"stream {i}: closed before its headers")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        sys.exit(f"stream {i}: {head.splitlines()[0]!r}")
    socks.append(s)
print("connected", flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
done.wait()
closed = 0
for s in socks:
    s.setblocking(False)
    try:
        while True:
            data = s.recv(1 << 20)
            if not data:
                closed += 1
                break
    except BlockingIOError:
        pass  # still open: nothing more to read now
    except OSError:
        closed += 1  # reset
print(json.dumps({"streams": len(socks), "closed_by_server": closed}), flush=True)
