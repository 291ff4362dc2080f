"""Hostile HTTP/2 clients, raw (issue 24, defects 2 and 8).

1. A request that declares a huge message must not make the server hold it.

gRPC core 1.51 checks max_message_bytes only once a message is whole: measured with this
test, a 3 GiB length prefix made the server take in 512 MiB (and grow by as much) and it was
still reading. What bounds gRPC's buffers is its resource quota, which epmoe-serve sets
(rpc_memory_bytes): beyond it gRPC cuts the stream.

A raw HTTP/2 client (no library: the point is to send what no well-behaved client sends)
opens a Forward call, sends a length prefix of 3 GiB and then streams data as fast as the
server's flow-control windows allow, while the server's RSS is watched. The server must end the
stream (RST_STREAM, or trailers with END_STREAM) before it has taken more than its quota, and
its RSS must not grow by anything like the declared size. A well-formed call afterwards is
still served.

2. A call whose request message is missing (headers with END_STREAM) or cut short (a prefix
declaring 100 bytes, 50 bytes, END_STREAM) is answered INVALID_ARGUMENT (grpc-status 3), not
CANCELLED: the client sent a bad request, it did not cancel.

Starts `mpiexec -np 1 epmoe-serve` with --max-message-bytes 1 MiB and --rpc-memory-bytes 16 MiB
and stops (or kills) it and its rank on every path. Run by ctest (service.raw).
"""
import argparse
import os
import signal
import socket
import struct
import subprocess
import sys
import time

DECLARED = 3 << 30          # the length prefix: 3 GiB
MAX_MESSAGE = 1 << 20       # the server's max_message_bytes
QUOTA = 16 << 20            # the server's rpc_memory_bytes
SEND_CAP = 512 << 20        # we stop sending here whatever happens (a server that buffers)
RSS_GROWTH_LIMIT = QUOTA + (32 << 20)  # the server may not grow by more than this


def env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"test_raw_http2: environment variable {name} is not set (run through ctest)")
    return value


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def kill_if_ours(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"epmoe" not in f.read():
                return
        for sig in (signal.SIGCONT, signal.SIGKILL):
            os.kill(pid, sig)
    except (FileNotFoundError, ProcessLookupError):
        pass


# ---- HTTP/2 framing (RFC 9113) and literal HPACK headers (RFC 7541 6.2.2, no Huffman) --------
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream) + payload


def hpack_int(value, prefix_bits, first_byte_flags=0):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_byte_flags | value])
    out = [first_byte_flags | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def literal(name, value):
    """Literal header field without indexing, new name (0x00), plain strings."""
    n, v = name.encode(), value.encode()
    return b"\x00" + hpack_int(len(n), 7) + n + hpack_int(len(v), 7) + v


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setblocking(False)
        self.buf = b""
        self.conn_window = 65535
        self.stream_window = 65535
        self.peer_initial_window = 65535
        self.max_frame = 16384
        self.closed_by = None   # how the server ended our stream
        self.goaway = False
        self.pending = b""

    def send(self, data):
        self.pending += data
        self.flush()

    def flush(self):
        while self.pending:
            try:
                n = self.sock.send(self.pending)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError):
                self.goaway = True
                self.pending = b""
                return
            self.pending = self.pending[n:]

    def poll(self, timeout):
        """Reads and handles what the server sent, for up to timeout seconds."""
        import select
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            r, w, _ = select.select([self.sock], [self.sock] if self.pending else [], [],
                                    max(0.0, left))
            if w:
                self.flush()
            if r:
                try:
                    chunk = self.sock.recv(1 << 16)
                except (ConnectionResetError, BlockingIOError):
                    chunk = b""
                if not chunk:
                    self.goaway = True
                    return
                self.buf += chunk
                self.parse()
            if left <= 0 or not (r or w):
                return

    def parse(self):
        while len(self.buf) >= 9:
            length = struct.unpack(">I", b"\0" + self.buf[:3])[0]
            if len(self.buf) < 9 + length:
                return
            kind, flags = self.buf[3], self.buf[4]
            stream = struct.unpack(">I", self.buf[5:9])[0] & 0x7fffffff
            payload = self.buf[9:9 + length]
            self.buf = self.buf[9 + length:]
            if kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload), 6):
                    ident, value = struct.unpack(">HI", payload[i:i + 6])
                    if ident == 4:   # SETTINGS_INITIAL_WINDOW_SIZE
                        self.stream_window += value - self.peer_initial_window
                        self.peer_initial_window = value
                    if ident == 5:   # SETTINGS_MAX_FRAME_SIZE
                        self.max_frame = value
                self.send(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.send(frame(PING, ACK, 0, payload))
            elif kind == WINDOW_UPDATE:
                inc = struct.unpack(">I", payload)[0] & 0x7fffffff
                if stream == 0:
                    self.conn_window += inc
                elif stream == 1:
                    self.stream_window += inc
            elif kind == RST_STREAM and stream == 1:
                self.closed_by = f"RST_STREAM (error code {struct.unpack('>I', payload)[0]})"
            elif kind == HEADERS and stream == 1 and flags & END_STREAM:
                self.closed_by = "trailers (END_STREAM)"
            elif kind == GOAWAY:
                self.goaway = True


def huge_prefix_call(port, rank0):
    c = Conn(port)
    c.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0))
    headers = b"".join(literal(n, v) for n, v in (
        (":method", "POST"), (":scheme", "http"), (":path", "/epmoe.v1.Moe/Forward"),
        (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
        ("te", "trailers")))
    c.send(frame(HEADERS, END_HEADERS, 1, headers))
    # gRPC message: compressed flag 0, then the big-endian length: 3 GiB
    first = struct.pack(">BI", 0, DECLARED)
    rss0 = rss_bytes(rank0)
    rss_max = rss0
    sent = 0
    chunk = b"\x0a" * 16384     # field 1 bytes... anything; the server must never parse it
    pending_prefix = first
    deadline = time.monotonic() + 60
    while c.closed_by is None and not c.goaway and sent < SEND_CAP and time.monotonic() < deadline:
        c.poll(0.0 if c.pending == b"" and min(c.conn_window, c.stream_window) > 0 else 0.05)
        room = min(c.conn_window, c.stream_window, c.max_frame)
        if room > 0 and not c.pending:
            payload = (pending_prefix + chunk)[:room]
            pending_prefix = b""
            c.send(frame(DATA, 0, 1, payload))
            c.conn_window -= len(payload)
            c.stream_window -= len(payload)
            sent += len(payload)
        rss_max = max(rss_max, rss_bytes(rank0))
    c.poll(1.0)   # the answer may follow the last frame we sent
    rss_max = max(rss_max, rss_bytes(rank0))
    c.sock.close()
    return sent, c.closed_by or ("connection closed" if c.goaway else None), rss0, rss_max


def call_status(port, mode):
    """(grpc-status, grpc-message) of a Forward whose message is missing or truncated. The
    server's trailers are plain HPACK literals (gRPC core does not Huffman-code them), so a
    byte search finds them; None if absent."""
    import re
    import select
    c = Conn(port)
    c.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0))
    headers = b"".join(literal(n, v) for n, v in (
        (":method", "POST"), (":scheme", "http"), (":path", "/epmoe.v1.Moe/Forward"),
        (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
        ("te", "trailers")))
    if mode == "missing":
        c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, headers))
    else:
        c.send(frame(HEADERS, END_HEADERS, 1, headers))
        c.send(frame(DATA, END_STREAM, 1, struct.pack(">BI", 0, 100) + b"\x0a" * 50))
    raw = b""
    end = time.monotonic() + 30
    while time.monotonic() < end and b"grpc-message" not in raw:
        r, _, _ = select.select([c.sock], [], [], 0.2)
        if r:
            try:
                chunk = c.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                break
            raw += chunk
    c.sock.close()
    status = re.search(rb"grpc-status\x01([0-9])", raw)
    message = re.search(rb"grpc-message([\x00-\x7f])", raw)
    text = None
    if message:
        n = message.group(1)[0]
        text = raw[message.end():message.end() + n].decode(errors="replace")
    return (int(status.group(1)) if status else None), text


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="folder for scratch files")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    mpiexec, serve = env("EPMOE_MPIEXEC"), env("EPMOE_SERVE")
    client = env("EPMOE_CLIENT")
    ckpt = os.path.join(env("EPMOE_SERVICE_DATA"), "tiny")
    ready = os.path.join(args.out, f"ready-{os.getpid()}")
    if os.path.exists(ready):
        os.unlink(ready)
    log = open(os.path.join(args.out, "serve.log"), "w")
    server = subprocess.Popen([mpiexec, "-np", "1", serve, "--checkpoint", ckpt,
                               "--listen", "127.0.0.1:0", "--ready-file", ready,
                               "--max-message-bytes", str(MAX_MESSAGE), "--rpc-memory-bytes", str(QUOTA),
                               "--log-level", "2"],
                              stdout=log, stderr=subprocess.STDOUT)
    rank_pids = []
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(ready):
            assert server.poll() is None, "epmoe-serve exited before serving"
            assert time.monotonic() < deadline, "epmoe-serve not serving in time"
            time.sleep(0.05)
        lines = open(ready).read().splitlines()
        port, _, rank0 = (int(v) for v in lines[0].split())
        rank_pids = [int(v) for v in lines[1].split()]

        sent, closed_by, rss0, rss_max = huge_prefix_call(port, rank0)
        growth = rss_max - rss0
        print(f"declared {DECLARED} bytes; the server took {sent} bytes before ending the stream "
              f"by {closed_by}; its RSS {rss0 >> 20} MiB -> at most {rss_max >> 20} MiB "
              f"(+{growth >> 10} KiB)")
        assert closed_by is not None, f"the server never refused the call ({sent} bytes sent)"
        assert sent <= 2 * QUOTA, \
            f"the server took {sent} bytes of a message declared {DECLARED} (quota {QUOTA})"
        assert growth < RSS_GROWTH_LIMIT, f"the server's RSS grew by {growth} bytes"

        for mode in ("missing", "truncated"):
            code, text = call_status(port, mode)
            print(f"request message {mode}: grpc-status {code}: {text}")
            assert code == 3, f"message {mode}: grpc-status {code} ({text}), expected 3 " \
                "(INVALID_ARGUMENT)"
            assert text and "request" in text, text

        # still serving
        r = subprocess.run([client, "--server", f"127.0.0.1:{port}", "--random-tokens", "4"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"a good call after the huge prefix failed: {r.stderr}"
        os.kill(rank0, signal.SIGTERM)
        rc = server.wait(timeout=120)
        assert rc == 0, f"mpiexec exited {rc}"
    finally:
        for pid in rank_pids:
            kill_if_ours(pid)
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
    print("test_raw_http2: OK")


if __name__ == "__main__":
    main()
