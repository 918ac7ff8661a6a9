#!/usr/bin/env python3
"""Slow and idle clients against an HTTP port: what a client that connects but misbehaves can
make a server hold.

    slow-clients.py HOST PORT [--idle N] [--trickle N] [--seconds S]

Opens N connections that send nothing and N that trickle an endless request header (4 KiB every
100 ms, ~380 KiB over the run), keeps them as long as the server lets them, and prints one JSON
line: how many the server closed, and when.
"""
import argparse, asyncio, json, time


async def idle(host, port, seconds, closed):
    try:
        r, w = await asyncio.open_connection(host, port)
    except OSError:
        closed.append(0.0)
        return
    start = time.monotonic()
    try:
        data = await asyncio.wait_for(r.read(1), timeout=seconds)
        if not data:
            closed.append(time.monotonic() - start)
    except (asyncio.TimeoutError, OSError):
        pass
    finally:
        w.close()


async def trickle(host, port, seconds, closed):
    try:
        r, w = await asyncio.open_connection(host, port)
    except OSError:
        closed.append(0.0)
        return
    start = time.monotonic()
    w.write(b"GET /api/labs HTTP/1.1\r\nhost: x\r\n")
    chunk = b"x-pad: " + b"a" * 4089 + b"\r\n"
    try:
        while time.monotonic() - start < seconds:
            w.write(chunk)
            await w.drain()
            await asyncio.sleep(0.1)
    except OSError:
        closed.append(time.monotonic() - start)
    finally:
        w.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--idle", type=int, default=2000)
    p.add_argument("--trickle", type=int, default=300)
    p.add_argument("--seconds", type=float, default=20)
    a = p.parse_args()
    closed_idle, closed_trickle = [], []
    await asyncio.gather(
        *[idle(a.host, a.port, a.seconds, closed_idle) for _ in range(a.idle)],
        *[trickle(a.host, a.port, a.seconds, closed_trickle) for _ in range(a.trickle)],
    )
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else None
    print(json.dumps({
        "idle": a.idle, "idle_closed_by_server": len(closed_idle),
        "idle_closed_after_s_median": median(closed_idle),
        "trickle": a.trickle, "trickle_closed_by_server": len(closed_trickle),
        "trickle_closed_after_s_median": median(closed_trickle),
    }))


asyncio.run(main())
