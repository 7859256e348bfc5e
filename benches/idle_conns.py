#!/usr/bin/env python3
"""Opens COUNT keep-alive connections to a proxy on 127.0.0.1, sends one request on each,
reads its answer, then keeps them all open (idle) for at most HOLD seconds, so that
benches/load.sh can read the proxy's resident memory with that many idle clients.

usage: idle_conns.py PORT COUNT REQUEST_TARGET READY_FILE HOLD_SECONDS
Writes "<ok> <failed>" to READY_FILE once every connection has had its answer.
"""
import resource
import socket
import sys
import time


def read_answer(sock):
    """Reads one HTTP/1.1 response with a Content-Length body; returns its status code."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed inside the body")
        body += chunk
    return int(head.split(b" ", 2)[1])


def main():
    port, count, target, ready_file, hold = sys.argv[1:6]
    port, count, hold = int(port), int(count), float(hold)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, count + 1024)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    request = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    sockets, ok, failed = [], 0, 0
    deadline = time.monotonic() + 120
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(request)
            if read_answer(s) == 200:
                ok += 1
            else:
                failed += 1
            sockets.append(s)
        except OSError:
            failed += 1
    with open(ready_file, "w") as f:
        f.write(f"{ok} {failed}\n")
    time.sleep(hold)
    for s in sockets:
        s.close()


if __name__ == "__main__":
    main()
