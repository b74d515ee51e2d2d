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
        got = tensorlift.load_file(sys.argv[1], framework="np")
        print("loaded", {k: v.tolist() for k, v in got.items()})
    except Exception as e:
        print("error_len", len(str(e)))
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
        env={**base, "TENSORLIFT_REMOTE_RETRIES": "0", "PYTHONIOENCODING": "utf-8", **env},
        capture_output=True,
        # The server's words may be anything: read as UTF-8 whatever the locale.
        encoding="utf-8",
        errors="replace",
        timeout=180,
    )
    return run.returncode, run.stdout + run.stderr, time.monotonic() - started


def _run(handler, path, s3=False, **env):
    """Loads ``path`` from a raw server answering with ``handler`` (as the S3 endpoint, with
    ``s3``), in a child process that must end by itself; what it printed, the seconds, and
    the requests' targets."""
    port, seen, close = _serve(handler)
    if s3:
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_SKIP_SIGNATURE": "true",
            "AWS_REGION": "us-east-1",
            **env,
        }
        url = f"s3://bucket/{path}"
    else:
        url = f"http://127.0.0.1:{port}/{path}"
    try:
        code, out, secs = _child(url, **env)
    finally:
        close()
    assert code == 0, f"the child died (exit {code}): {out}"
    return out, secs, seen


def _rss_mb(out):
    return int(out.rsplit("rss_mb", 1)[1].split()[0])


def test_an_error_reply_that_claims_a_petabyte_is_read_as_a_message():
    # Every request gets a 404 whose Content-Length says 1 PiB (past any address space), in
    # two writes: a client that sizes its buffer by the header before reading the message
    # aborts the process.
    def handler(conn, method, target):
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 1125899906842624\r\n\r\n" + b"x" * 1000)
        time.sleep(0.3)
        conn.sendall(b"y" * 1000)
        conn.shutdown(socket.SHUT_RDWR)

    out, _, seen = _run(handler, "model/")
    # The server's own words: its status, and the body it sent, from both writes (as much of
    # the second as came before the connection closed).
    assert "error:" in out and seen, out
    assert "404 Not Found: " + "x" * 1000 + "y" in out, out[-3000:]
    assert _rss_mb(out) < 400, out


def test_an_endless_error_reply_is_cut_short():
    # A 404 whose chunked body never ends, 1 MiB a chunk for as long as the client reads.
    def handler(conn, method, target):
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 20) + b"z" * (1 << 20) + b"\r\n"
        while True:
            conn.sendall(chunk)

    out, secs, seen = _run(handler, "model/", TENSORLIFT_REMOTE_TIMEOUT_SECS="5")
    assert "error:" in out and seen, out
    # Its message is kept, 8 KiB at most; the rest is never read.
    assert secs < 60 and int(out.split("error_len", 1)[1].split()[0]) < (8 << 10) + 1000, out
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

    out, _, _ = _run(handler, "model/", s3=True)
    assert "listing goes on past 1000 pages" in out, out
    assert len(pages) == 1000, len(pages)


def _safetensors(values):
    """A one-tensor safetensors file of float32 ``values`` named ``w``."""
    import json
    import struct

    data = struct.pack(f"<{len(values)}f", *values)
    head = json.dumps({"w": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}}).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def test_a_long_not_found_page_is_still_not_found():
    # The folder has no index: the server's 404 page for it is 12,000 bytes of a 3-byte
    # character, longer than the 8 KiB kept, cut inside a character. It must still read as
    # "not found" (its status kept), so that the folder's model.safetensors is loaded.
    shard = _safetensors([1.0, 2.0, 3.0])

    def handler(conn, method, target):
        if target.endswith("/model.safetensors"):
            head = b"HTTP/1.1 206 Partial Content\r\nETag: \"e1\"\r\nLast-Modified: Wed, 21 Oct 2015 07:28:00 GMT\r\n"
            if method == "HEAD":
                conn.sendall(b"HTTP/1.1 200 OK\r\nETag: \"e1\"\r\nContent-Length: %d\r\n\r\n" % len(shard))
                return
            conn.sendall(head + b"Content-Range: bytes 0-%d/%d\r\nContent-Length: %d\r\n\r\n" % (len(shard) - 1, len(shard), len(shard)) + shard)
        else:
            page = "\u20ac".encode() * 4000
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n\r\n" % len(page) + page)

    out, _, _ = _run(handler, "model/")
    assert "loaded {'w': [1.0, 2.0, 3.0]}" in out, out


def test_a_listing_page_past_its_bound_is_refused():
    # A listing page that claims a petabyte (and breaks off), then one of 17 MiB: refused,
    # neither read whole.
    for claim in (1 << 50, None):

        def handler(conn, method, target, claim=claim):
            if "list-type=2" not in target:
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            start = b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><IsTruncated>false</IsTruncated>'
            if claim is not None:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % claim + start)
                conn.shutdown(socket.SHUT_RDWR)
                return
            pad = b"<!--" + b"p" * (17 << 20) + b"-->"
            body = start + pad + b"</ListBucketResult>"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

        out, _, _ = _run(handler, "model/", s3=True)
        assert "error:" in out and _rss_mb(out) < 400, out
        if claim is None:
            assert "longer than the 16777216 bytes read of such a reply" in out, out
        else:
            # The claim is not believed: the body is read as it comes, and ends short.
            assert "Error getting list response body" in out, out
