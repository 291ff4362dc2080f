"""epmoe-serve called from Python with stock grpcio and stubs generated from proto/ by
grpc_tools.protoc: proof that any gRPC client can use the service.

Checks Health/Check, Info, Forward (fp32 and fp16, bit-identical to `epmoe-run` on the same
rows), INVALID_ARGUMENT naming the field, a client-side cancel, and a clean SIGTERM stop.
Run by ctest (service.python) with the environment it sets.
"""
import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np


def env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"test_python_client: environment variable {name} is not set (run through ctest)")
    return value


def generate_stubs(out):
    """epmoe.proto as is; health.proto copied flat so its module does not shadow grpcio's
    `grpc` package (the proto package, hence the service name, is unchanged)."""
    from grpc_tools import protoc

    src = os.path.join(env("EPMOE_SOURCE_DIR"), "proto")
    flat = os.path.join(out, "protosrc")
    os.makedirs(flat, exist_ok=True)
    shutil.copy(os.path.join(src, "epmoe.proto"), flat)
    shutil.copy(os.path.join(src, "grpc", "health", "v1", "health.proto"), flat)
    for proto in ("epmoe.proto", "health.proto"):
        rc = protoc.main(["grpc_tools.protoc", f"-I{flat}", f"--python_out={out}",
                          f"--grpc_python_out={out}", os.path.join(flat, proto)])
        assert rc == 0, f"grpc_tools.protoc failed on {proto}"
    sys.path.insert(0, out)


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}[array.dtype]
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors_f32(path, name):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    t = header[name]
    assert t["dtype"] == "F32", t
    b, e = t["data_offsets"]
    return np.frombuffer(data[b:e], dtype=np.float32).reshape(t["shape"])


def kill_if_ours(pid):
    """SIGCONT + SIGKILL to pid if it is still one of our programs (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"epmoe" not in f.read():
                return
        for sig in (signal.SIGCONT, signal.SIGKILL):
            os.kill(pid, sig)
    except (FileNotFoundError, ProcessLookupError):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="folder for the stubs and scratch files")
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    generate_stubs(args.out)
    import grpc
    import epmoe_pb2
    import epmoe_pb2_grpc
    import health_pb2
    import health_pb2_grpc

    data = env("EPMOE_SERVICE_DATA")
    ckpt = os.path.join(data, "tiny")
    mpiexec, serve, run = env("EPMOE_MPIEXEC"), env("EPMOE_SERVE"), env("EPMOE_RUN")

    # Rows exact in fp16 and fp32, and the batch job's answer for them.
    rng = np.random.default_rng(31)
    T = 12
    ready = os.path.join(args.out, f"ready-{os.getpid()}")
    log = open(os.path.join(args.out, "serve.log"), "w")
    if os.path.exists(ready):
        os.unlink(ready)
    server = subprocess.Popen([mpiexec, "-np", str(args.ranks), serve, "--checkpoint", ckpt,
                               "--listen", "127.0.0.1:0", "--ready-file", ready],
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
        channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                        options=[("grpc.enable_http_proxy", 0)])
        health = health_pb2_grpc.HealthStub(channel)
        moe = epmoe_pb2_grpc.MoeStub(channel)

        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert status.status == health_pb2.HealthCheckResponse.SERVING, status
        info = moe.Info(epmoe_pb2.InfoRequest(), timeout=30)
        assert info.n_ranks == args.ranks and info.preset == "tiny", info
        want = os.environ.get("EPMOE_BACKEND") or "cpu"
        assert (info.backend, info.layer_begin, info.layer_end) == (want, 0, info.n_layers), info
        assert info.transport == ("mpi" if want == "cpu" else "mpi-staged" if args.ranks > 1
                                  else "nccl"), info
        H, vocab = info.hidden_size, info.vocab_size
        print(f"Info: preset {info.preset}, {info.n_ranks} ranks, hidden {H}, "
              f"{info.n_layers} layers, {info.n_routed_experts} experts, backend {info.backend} "
              f"({info.device_name}, {info.transport})")

        x = (rng.integers(-128, 129, size=(T, H)) / 64.0).astype(np.float32)
        ids = rng.integers(0, vocab, size=T).astype(np.int32)
        inp, ref_path = os.path.join(args.out, "in.safetensors"), os.path.join(args.out, "ref.safetensors")
        write_safetensors(inp, {"hidden_states": x, "token_ids": ids})
        subprocess.run([mpiexec, "-np", "1", run, "--checkpoint", ckpt, "--input", inp,
                        "--output", ref_path, "--quiet"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
        ref = read_safetensors_f32(ref_path, "hidden_states")

        for wire, np_dtype in ((epmoe_pb2.DTYPE_FP32, np.float32), (epmoe_pb2.DTYPE_FP16, np.float16)):
            req = epmoe_pb2.ForwardRequest(
                request_id=f"py-{wire}",
                hidden_states=epmoe_pb2.Tensor(shape=[T, H], dtype=wire,
                                               data=x.astype(np_dtype).tobytes()),
                token_ids=ids.tolist())
            resp = moe.Forward(req, timeout=120)
            assert resp.request_id == f"py-{wire}", resp.request_id
            assert list(resp.hidden_states.shape) == [T, H]
            assert resp.hidden_states.dtype == wire
            got = np.frombuffer(resp.hidden_states.data, dtype=np_dtype).reshape(T, H)
            want = ref.astype(np_dtype)
            assert got.tobytes() == want.tobytes(), \
                f"dtype {np_dtype.__name__}: {np.sum(got != want)} elements differ from epmoe-run"
            print(f"Forward {np_dtype.__name__}: {T} rows bit-identical to epmoe-run "
                  f"(batch of {resp.timing.batch_tokens} tokens, queue {resp.timing.queue_seconds*1e3:.2f} ms)")

        bad = epmoe_pb2.ForwardRequest(
            hidden_states=epmoe_pb2.Tensor(shape=[2, H + 32], dtype=epmoe_pb2.DTYPE_FP32,
                                           data=bytes(8 * (H + 32))),
            token_ids=[1, 2])
        try:
            moe.Forward(bad, timeout=30)
            raise AssertionError("a wrong hidden size was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            assert "hidden_states.shape[1]" in e.details(), e.details()
            print(f"bad input: {e.code().name}: {e.details()}")

        # Cancel a call from the client; the server discards it and keeps serving.
        big = epmoe_pb2.ForwardRequest(
            hidden_states=epmoe_pb2.Tensor(shape=[256, H], dtype=epmoe_pb2.DTYPE_FP32,
                                           data=np.zeros((256, H), np.float32).tobytes()),
            token_ids=[0] * 256)
        future = moe.Forward.future(big, timeout=120)
        future.cancel()
        assert future.cancelled() or future.code() == grpc.StatusCode.CANCELLED
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        try:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
            raise AssertionError("an unknown service was reported")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
        channel.close()

        os.kill(rank0, signal.SIGTERM)
        rc = server.wait(timeout=120)
        assert rc == 0, f"mpiexec exited {rc}"
        print("SIGTERM: drained, every rank exited 0")
    finally:
        # Every path, failures included: the ranks run in process groups of their own, so
        # each is killed by pid (SIGCONT first in case one was stopped), then mpiexec.
        for pid in rank_pids:
            kill_if_ours(pid)
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
    print("test_python_client: OK")


if __name__ == "__main__":
    main()
