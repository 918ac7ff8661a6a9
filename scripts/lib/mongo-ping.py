#!/usr/bin/env python3
"""Sends MongoDB's `ping` over the wire protocol (OP_MSG) and exits 0 when the server answers ok.

Standard library only, so scripts can wait for a server before any client is built.
Usage: mongo-ping.py HOST PORT [TIMEOUT_SECONDS]
"""
import socket
import struct
import sys
import time


def bson_doc(elements: bytes) -> bytes:
    return struct.pack("<i", 4 + len(elements) + 1) + elements + b"\x00"


def ping_once(host: str, port: int) -> bool:
    db = b"admin\x00"
    body = (
        b"\x10ping\x00" + struct.pack("<i", 1)
        + b"\x02$db\x00" + struct.pack("<i", len(db)) + db
    )
    section = b"\x00" + bson_doc(body)
    payload = struct.pack("<I", 0) + section
    header = struct.pack("<iiii", 16 + len(payload), 1, 0, 2013)
    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(header + payload)
        head = s.recv(16, socket.MSG_WAITALL)
        if len(head) < 16:
            return False
        length = struct.unpack("<i", head[:4])[0]
        rest = b""
        while len(rest) < length - 16:
            chunk = s.recv(length - 16 - len(rest))
            if not chunk:
                return False
            rest += chunk
    # The reply document holds `ok: 1.0` (a double) when the server is up.
    return b"\x01ok\x00" + struct.pack("<d", 1.0) in rest


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    deadline = time.monotonic() + (float(sys.argv[3]) if len(sys.argv) > 3 else 30.0)
    while True:
        try:
            if ping_once(host, port):
                return 0
        except OSError:
            pass
        if time.monotonic() > deadline:
            print(f"MongoDB at {host}:{port} did not answer ping", file=sys.stderr)
            return 1
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
