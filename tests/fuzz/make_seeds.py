"""Writes the committed fuzz seeds for the wire and safetensors targets (run once; the
checkpoint seeds are one-layer micro checkpoints from epmoe-gen, see corpus/checkpoint/README).

    .venv/bin/python tests/fuzz/make_seeds.py

wire: serialized epmoe.v1.ForwardRequest messages for fuzz_wire's model (hidden 32, 4 layers,
layer 0 hash-routed, vocab 1024): each dtype, with and without token ids, a layer range, a
long id, and a few that are refused (NaN, a wrong size), so the fuzzer starts on both sides.
safetensors: small files: F32/BF16/F16/I32 tensors, metadata, an empty header, a scalar.
"""
import json
import os
import struct
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def wire_seeds(out):
    from grpc_tools import protoc
    gen = tempfile.mkdtemp()
    rc = protoc.main(["protoc", f"-I{ROOT}/proto", f"--python_out={gen}",
                      f"{ROOT}/proto/epmoe.proto"])
    assert rc == 0
    sys.path.insert(0, gen)
    import epmoe_pb2 as pb

    rng = np.random.default_rng(5)
    H = 32

    def req(name, T=2, dtype=pb.DTYPE_FP32, ids=True, lb=0, le=0, rid="seed", x=None):
        np_dtype = {pb.DTYPE_FP32: np.float32, pb.DTYPE_FP16: np.float16}.get(dtype)
        if x is None:
            x = rng.standard_normal((T, H)).astype(np.float32)
        if dtype == pb.DTYPE_BF16:
            data = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        else:
            data = x.astype(np_dtype).tobytes()
        m = pb.ForwardRequest(request_id=rid, layer_begin=lb, layer_end=le,
                              hidden_states=pb.Tensor(shape=[T, H], dtype=dtype, data=data))
        if ids:
            m.token_ids.extend(int(v) for v in rng.integers(0, 1024, T))
        with open(os.path.join(out, name), "wb") as f:
            f.write(m.SerializeToString())

    req("fp32-2rows")
    req("bf16-3rows", T=3, dtype=pb.DTYPE_BF16)
    req("fp16-1row", T=1, dtype=pb.DTYPE_FP16)
    req("layers-1-3-no-ids", T=4, ids=False, lb=1, le=3)
    req("long-id", rid="r" * 128)
    req("utf8-id", rid="r\u00e9q-\u20ac")
    nan = np.zeros((2, H), np.float32)
    nan[1, 3] = np.nan
    req("nan", x=nan)
    req("no-ids-hash-layer", ids=False)
    with open(os.path.join(out, "empty"), "wb") as f:
        f.write(b"")


def safetensors_file(path, tensors, metadata=None, raw_header=None):
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def safetensors_seeds(out):
    x = np.arange(8, dtype=np.float32)
    safetensors_file(os.path.join(out, "f32"), {"hidden_states": ("F32", [2, 4], x.tobytes())})
    safetensors_file(os.path.join(out, "mixed"), {
        "a": ("BF16", [4], (x[:4].view(np.uint32) >> 16).astype(np.uint16).tobytes()),
        "b": ("F16", [2, 2], x[:4].astype(np.float16).tobytes()),
        "ids": ("I32", [3], np.array([1, 2, 3], np.int32).tobytes()),
        "s": ("F32", [], np.float32(2.5).tobytes()),
        "u": ("U8", [2, 2], bytes([1, 2, 3, 4])),
    }, metadata={"epmoe.hidden_size": "32", "epmoe.format_version": "1"})
    safetensors_file(os.path.join(out, "empty-header"), {}, raw_header=b"{}")
    safetensors_file(os.path.join(out, "metadata-only"), {}, metadata={"k": "v"})


def main():
    for target, make in (("wire", wire_seeds), ("safetensors", safetensors_seeds)):
        out = os.path.join(HERE, "corpus", target)
        os.makedirs(out, exist_ok=True)
        make(out)
        print(f"{target}: {len(os.listdir(out))} seeds in {out}")


if __name__ == "__main__":
    main()
