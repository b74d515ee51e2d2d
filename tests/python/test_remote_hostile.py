"""A hostile or broken server can neither crash the process nor make its memory grow: each
scenario runs a load in a child process of its own against a raw HTTP server started here
(plain ``http://``, or an endpoint that speaks just enough S3), and checks that the child
ended with a Python error, not a signal, within bounded memory and time."""

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

CHILD = textwrap.dedent(
    """
    import sys, tensorlift
    try:
        tensorlift.load_file(sys.argv[1])
        print("loaded")
    except Exception as e:
        print("error:", type(e).__name__, str(e)[:2000].replace("\\n", " "))
    # The peak of this process's own memory (ru_maxrss would count its parent's, kept
    # across fork and exec).
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print("rss_mb", peak // 1024)
    """
)


def _serve(handler):
    """A raw HTTP/1.1 server on 127.0.0.1: ``handler(conn, method, target)`` answers each
    request (and may close the connection). Returns its port, a list of the requests'
    targets, and a function that stops it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    seen, stop = [], threading.Event()

    def one(conn):
        f = conn.makefile("rb")
        try:
            while not stop.is_set():
                line = f.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                seen.append(target)
                handler(conn, method, target)
        except OSError:
            pass
        finally:
            conn.close()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()

    def close():
        stop.set()
        srv.close()

    return srv.getsockname()[1], seen, close


def _child(url, **env):
    """Loads ``url`` in a child process, with no other store settings than ``env``'s; its
    exit code, what it printed, and the seconds."""
    started = time.monotonic()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TENSORLIFT_REMOTE_"))}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, url],
        env={**base, "TENSORLIFT_REMOTE_RETRIES": "0", **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    return run.returncode, run.stdout + run.stderr, time.monotonic() - started


def _rss_mb(out):
    return int(out.rsplit("rss_mb", 1)[1].split()[0])


def test_an_error_reply_that_claims_a_terabyte_is_read_as_a_message():
    # Every request gets a 404 whose Content-Length says 1 TiB, in two writes: a client that
    # sizes its buffer by the header before reading the message aborts the process.
    def handler(conn, method, target):
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 1099511627776\r\n\r\n" + b"x" * 1000)
        time.sleep(0.3)
        conn.sendall(b"y" * 1000)
        conn.shutdown(socket.SHUT_RDWR)

    port, seen, close = _serve(handler)
    try:
        code, out, _ = _child(f"http://127.0.0.1:{port}/model/")
    finally:
        close()
    assert code == 0, f"the child died (exit {code}): {out}"
    assert "error:" in out and seen, out
    assert _rss_mb(out) < 400, out


def test_an_endless_error_reply_is_cut_short():
    # A 404 whose chunked body never ends, 1 MiB a chunk for as long as the client reads.
    def handler(conn, method, target):
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 20) + b"z" * (1 << 20) + b"\r\n"
        while True:
            conn.sendall(chunk)

    port, seen, close = _serve(handler)
    try:
        code, out, secs = _child(f"http://127.0.0.1:{port}/model/", TENSORLIFT_REMOTE_TIMEOUT_SECS="5")
    finally:
        close()
    assert code == 0, f"the child died (exit {code}): {out}"
    assert "error:" in out and seen, out
    # Its message is kept, 8 KiB at most; the rest is never read.
    assert secs < 60 and out.count("z") <= 8 << 10, out
    assert _rss_mb(out) < 400, out


def test_a_listing_that_never_ends_is_refused():
    # An S3 endpoint whose listing pages are all empty and each says another follows.
    pages = []

    def handler(conn, method, target):
        if "list-type=2" in target:
            pages.append(target)
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><IsTruncated>true</IsTruncated>'
                b"<NextContinuationToken>t%d</NextContinuationToken></ListBucketResult>" % len(pages)
            )
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n" % len(body)
        else:
            body, head = b"", b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        conn.sendall(head + body)

    port, _, close = _serve(handler)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ALLOW_HTTP": "true",
        "AWS_SKIP_SIGNATURE": "true",
        "AWS_REGION": "us-east-1",
    }
    try:
        code, out, secs = _child("s3://bucket/model/", **env)
    finally:
        close()
    assert code == 0, f"the child died (exit {code}): {out}"
    assert "listing goes on past 1000 pages" in out, out
    assert len(pages) == 1000, len(pages)
