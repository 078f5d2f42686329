"""TCP throughput between two emulated nodes (run by path inside a namespace; imports nothing of commsgd).

python linktest.py server HOST PORT       accept one connection, read to EOF, print {"bytes", "seconds"}
python linktest.py client HOST PORT BYTES connect (retrying for 20 s), send BYTES, close
python linktest.py echo HOST PORT         accept one connection, send back what arrives until EOF
python linktest.py ping HOST PORT COUNT   connect, COUNT round trips of 64 bytes, print {"rtt_s": median}
"""

from __future__ import annotations

import json
import socket
import sys
import time

CHUNK = 1 << 20


def serve(host: str, port: int) -> dict[str, float]:
    """Receive one stream; time from its first byte to EOF."""
    with socket.create_server((host, port)) as server:
        server.settimeout(60)
        conn, _ = server.accept()
        with conn:
            total, first = 0, 0.0
            while data := conn.recv(CHUNK):
                if not total:
                    first = time.perf_counter()
                total += len(data)
            return {"bytes": total, "seconds": time.perf_counter() - first if total else 0.0}


def _connect(host: str, port: int) -> socket.socket:
    """Connect, retrying for 20 s while the server starts."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return socket.create_connection((host, port), timeout=60)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def send(host: str, port: int, count: int) -> dict[str, float]:
    conn = _connect(host, port)
    payload = bytes(CHUNK)
    start = time.perf_counter()
    with conn:
        left = count
        while left > 0:
            conn.sendall(payload[: min(left, CHUNK)])
            left -= min(left, CHUNK)
    return {"bytes": count, "seconds": time.perf_counter() - start}


def echo(host: str, port: int) -> None:
    """Send back every message of one connection (the far end of `ping`)."""
    with socket.create_server((host, port)) as server:
        server.settimeout(60)
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(CHUNK):
                conn.sendall(data)


def ping(host: str, port: int, count: int, size: int = 64) -> dict[str, float]:
    """The median time of `count` round trips of a `size`-byte message (a small collective's latency)."""
    conn = _connect(host, port)
    times = []
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message = bytes(size)
        for _ in range(count):
            start = time.perf_counter()
            conn.sendall(message)
            got = 0
            while got < size:
                part = conn.recv(size - got)
                if not part:
                    raise ConnectionError("echo server closed the connection")
                got += len(part)
            times.append(time.perf_counter() - start)
    times.sort()
    return {"rtt_s": times[len(times) // 2], "count": count}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "server":
        print(json.dumps(serve(argv[1], int(argv[2]))), flush=True)
        return 0
    if len(argv) >= 4 and argv[0] == "client":
        print(json.dumps(send(argv[1], int(argv[2]), int(argv[3]))), flush=True)
        return 0
    if len(argv) >= 3 and argv[0] == "echo":
        echo(argv[1], int(argv[2]))
        return 0
    if len(argv) >= 4 and argv[0] == "ping":
        print(json.dumps(ping(argv[1], int(argv[2]), int(argv[3]))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
