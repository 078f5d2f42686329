"""TCP throughput between two emulated nodes (run by path inside a namespace; imports nothing of commsgd).

python linktest.py server HOST PORT       accept one connection, read to EOF, print {"bytes", "seconds"}
python linktest.py client HOST PORT BYTES connect (retrying for 20 s), send BYTES, close
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


def send(host: str, port: int, count: int) -> dict[str, float]:
    deadline = time.monotonic() + 20
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=60)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    payload = bytes(CHUNK)
    start = time.perf_counter()
    with conn:
        left = count
        while left > 0:
            conn.sendall(payload[: min(left, CHUNK)])
            left -= min(left, CHUNK)
    return {"bytes": count, "seconds": time.perf_counter() - start}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "server":
        print(json.dumps(serve(argv[1], int(argv[2]))), flush=True)
        return 0
    if len(argv) >= 4 and argv[0] == "client":
        print(json.dumps(send(argv[1], int(argv[2]), int(argv[3]))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
