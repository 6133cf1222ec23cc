#!/usr/bin/env python3
# An honest subscriber's latency while rated '>' subscribers' conflation
# tables are flooded: N subscribers of '>' with max_rate=1 that never read
# (a 4 KiB receive buffer), and a publisher POSTing pipelines of 100
# requests, each to a new 110-byte topic name, as fast as the server
# answers; meanwhile a victim subscribes to 'victim.t' and a second client
# publishes a unique payload to it over HTTP every 20 ms (a new connection
# each time). Starts BIN itself (--workers 2 --io IO, defaults otherwise).
# Prints the victim's publish-to-receive latencies, the share of all
# publications whose hand-off to their worker took at most 50/100/250/500
# ms (corecast_publish_to_delivery_seconds), and the throttle count.
# usage: rated-table-victim.py BIN PORT IO [SECONDS] [N]   (docs/SECURITY.md)
import os, socket, subprocess, sys, threading, time, base64, urllib.request

binp, port, io = sys.argv[1], int(sys.argv[2]), sys.argv[3]
secs = float(sys.argv[4]) if len(sys.argv) > 4 else 10.0
nsubs = int(sys.argv[5]) if len(sys.argv) > 5 else 350
server = subprocess.Popen([binp, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "2", "--io", io],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def connect(path, rcvbuf=None):
    for _ in range(100):
        try:
            s = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            time.sleep(0.05)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    k = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: {k}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    h = b""
    while b"\r\n\r\n" not in h:
        h += s.recv(1)
    assert b" 101 " in h, h
    return s


def metrics():
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


try:
    victim = connect("/ws?topics=victim.t")
    subs = [connect("/ws?topics=%3E&max_rate=1", rcvbuf=4096) for _ in range(nsubs)]
    t0 = time.time()
    sent, lat = {}, []

    def receive():
        buf = b""
        victim.settimeout(0.5)
        while time.time() - t0 < secs + 3:
            try:
                d = victim.recv(65536)
            except socket.timeout:
                continue
            if not d:
                return
            buf += d
            while len(buf) >= 2 and len(buf) >= 2 + (buf[1] & 0x7F):
                n = buf[1] & 0x7F
                payload, buf = buf[2:2 + n], buf[2 + n:]
                at = sent.pop(payload.decode(), None)
                if at is not None:
                    lat.append(time.time() - at)

    def flood():
        i = 0
        while time.time() - t0 < secs:
            try:
                p = socket.create_connection(("127.0.0.1", port))
                p.settimeout(2)
                while time.time() - t0 < secs:
                    reqs = b"".join(f"POST /publish/n.{i + k}.{'y' * 100} HTTP/1.1\r\nHost: a\r\n"
                                    f"Content-Length: 10\r\n\r\nxxxxxxxxxx".encode() for k in range(100))
                    i += 100
                    p.sendall(reqs)
                    d = b""
                    while d.count(b"HTTP/1.1") < 100:
                        c = p.recv(1 << 20)
                        if not c:
                            break
                        d += c
            except OSError:
                pass

    threading.Thread(target=receive, daemon=True).start()
    threading.Thread(target=flood, daemon=True).start()
    n = 0
    while time.time() - t0 < secs:
        n += 1
        key = f"v{n}"
        sent[key] = time.time()
        with socket.create_connection(("127.0.0.1", port)) as h:
            h.sendall(f"POST /publish/victim.t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      f"Content-Length: {len(key)}\r\n\r\n{key}".encode())
            while h.recv(4096):
                pass
        time.sleep(0.02)
    time.sleep(2.5)
    m = metrics()
    buckets = [(l.split('le="')[1].split('"')[0], float(l.split()[-1]))
               for l in m.splitlines() if l.startswith("corecast_publish_to_delivery_seconds_bucket")]
    total = buckets[-1][1] or 1
    shares = " ".join(f"<={le}s:{c / total:.3f}" for le, c in buckets if le in ("0.05", "0.1", "0.25", "0.5"))
    throttled = [l.split()[-1] for l in m.splitlines() if l.startswith("corecast_publishers_throttled_total")]
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(len(lat) * f))] * 1e3 if lat else float("nan")
    print(f"victim: n={len(lat)} of {n} p50={q(0.5):.1f}ms p99={q(0.99):.1f}ms max={q(1.0):.1f}ms "
          f"lost={len(sent)}; hand-offs {shares}; throttled {throttled}")
finally:
    server.terminate()
    server.wait(10)
