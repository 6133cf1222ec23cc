#!/usr/bin/env python3
# A victim's round trips under a compressed-echo flood: 4 processes x 8
# /echo clients with permessage-deflate send compressed 64 KiB acgt
# messages as fast as the server takes them, while one client makes 1-byte
# round trips every 10 ms. Starts BIN itself (--workers 1 --io uring).
# QUIET more /echo clients (default 0) each send one 1-byte message a
# second and are otherwise quiet: they starve once per message under the
# flood. Prints the victim's round trips, the flood's bytes, the quiet
# clients' echoes, the server's CPU seconds and its
# corecast_receives_starved_total over the measured window.
# usage: echo-flood-victim.py BIN PORT SECONDS [QUIET]   (docs/BENCHMARKS.md)
import socket, os, sys, time, base64, struct, subprocess, zlib, random, selectors, multiprocessing, statistics
binp, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
nquiet = int(sys.argv[4]) if len(sys.argv) > 4 else 0
def handshake(ext):
    s = socket.create_connection(("127.0.0.1", port))
    k = base64.b64encode(os.urandom(16)).decode()
    e = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if ext else ""
    s.sendall(f"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {k}\r\nSec-WebSocket-Version: 13\r\n{e}\r\n".encode())
    h = b""
    while b"\r\n\r\n" not in h:
        h += s.recv(4096)
    assert b" 101 " in h, h
    return s
def frame(payload, opcode, rsv1):
    b0 = 0x80 | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126: hdr = bytes([b0, 0x80 | n])
    elif n < 65536: hdr = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else: hdr = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    return hdr + b"\0\0\0\0" + payload
def flooder(n, stop_at, out):
    rnd = random.Random(os.getpid())
    socks = [handshake(True) for _ in range(n)]
    msgs = []
    for i in range(4):
        text = "".join(rnd.choice("acgt") for _ in range(65536)).encode()
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        d = c.compress(text) + c.flush(zlib.Z_SYNC_FLUSH)
        msgs.append(frame(d[:-4], 1, True))
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, [b"", 0])
    got = 0
    while time.time() < stop_at:
        for key, ev in sel.select(0.1):
            s, st = key.fileobj, key.data
            if ev & selectors.EVENT_READ:
                try:
                    d = s.recv(1 << 20)
                    got += len(d)
                except BlockingIOError:
                    pass
            if ev & selectors.EVENT_WRITE:
                if not st[0]:
                    st[0] = msgs[st[1] % 4]; st[1] += 1
                try:
                    k = s.send(st[0]); st[0] = st[0][k:]
                except BlockingIOError:
                    pass
    out.put(got)
def quiet(n, stop_at, out):
    socks = [handshake(False) for _ in range(n)]
    rnd = random.Random(os.getpid())
    due = [time.time() + rnd.random() for _ in socks]
    for s in socks:
        s.setblocking(False)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    echoes = 0
    while time.time() < stop_at:
        now = time.time()
        for i, s in enumerate(socks):
            if due[i] <= now:
                s.send(frame(b"q", 1, False))
                due[i] += 1.0
        for key, _ in sel.select(0.02):
            try:
                echoes += len(key.fileobj.recv(4096)) // 3
            except BlockingIOError:
                pass
    out.put(echoes)
def cpu_secs(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def starved_total():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    d = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        d += c
    for line in d.decode(errors="replace").splitlines():
        if line.startswith("corecast_receives_starved_total"):
            return float(line.split()[-1])
    return float("nan")
if __name__ == "__main__":
    srv = subprocess.Popen([binp, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "1", "--io", "uring"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        v = handshake(False)
        stop_at = time.time() + secs + 1.0
        q = multiprocessing.Queue()
        ps = [multiprocessing.Process(target=flooder, args=(8, stop_at, q)) for _ in range(4)]
        qq = multiprocessing.Queue()
        qs = [multiprocessing.Process(target=quiet, args=(nquiet, stop_at, qq))] if nquiet else []
        for p in ps + qs: p.start()
        time.sleep(1.0)
        cpu0, starved0 = cpu_secs(srv.pid), starved_total()
        rtts = []
        t_end = time.time() + secs
        while time.time() < t_end:
            t0 = time.perf_counter()
            v.sendall(frame(b"x", 1, False))
            r = b""
            while len(r) < 3:
                r += v.recv(16)
            rtts.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.01)
        cpu, starved = cpu_secs(srv.pid) - cpu0, starved_total() - starved0
        flood = sum(q.get() for _ in ps)
        echoes = sum(qq.get() for _ in qs)
        for p in ps + qs: p.join()
        rtts.sort()
        q99 = rtts[int(len(rtts) * 0.99) - 1]
        print(f"n={len(rtts)} median={statistics.median(rtts):.1f}ms p99={q99:.1f}ms max={rtts[-1]:.1f}ms over100={sum(1 for x in rtts if x > 100)} flood={flood/1e6:.0f}MB quiet_echoes={echoes} server_cpu={cpu:.2f}s starved={starved:.0f}")
    finally:
        srv.kill()
