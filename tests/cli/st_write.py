"""Minimal safetensors writer for test inputs (independent of the C writer)."""
import json
import struct
import sys

import ml_dtypes
import numpy as np

DTYPES = {np.float32: "F32", np.int32: "I32", np.int64: "I64", np.float16: "F16", np.uint8: "U8",
          ml_dtypes.bfloat16: "BF16"}


def write(path, tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.tobytes()
        header[name] = {"dtype": DTYPES[arr.dtype.type], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def read(path):
    """{name: array} of a safetensors file (for checks of outputs)."""
    names = {v: k for k, v in DTYPES.items()}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=names[t["dtype"]]).reshape(t["shape"])
    return out


def main():
    if sys.argv[1] == "finite":  # finite FILE: exit 0 when every hidden_states value is finite
        hs = read(sys.argv[2])["hidden_states"].astype(np.float64)
        print(f"{sys.argv[2]}: {hs.size} values, {np.count_nonzero(~np.isfinite(hs))} not finite, "
              f"max |x| {np.abs(hs).max():.4g}")
        sys.exit(0 if np.isfinite(hs).all() else 1)
    out, hidden, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(7)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids = rng.integers(0, 1024, tokens).astype(np.int32)
    write(f"{out}/wrong_hidden.safetensors", {"hidden_states": x[:, : hidden // 2], "token_ids": ids})
    write(f"{out}/wrong_dtype.safetensors", {"hidden_states": x.astype(np.int32), "token_ids": ids})
    write(f"{out}/no_ids.safetensors", {"hidden_states": x})
    bad = x.copy()
    bad[3, 5] = np.nan
    write(f"{out}/nan.safetensors", {"hidden_states": bad, "token_ids": ids})
    big = ids.copy()
    big[2] = 5000
    write(f"{out}/bad_ids.safetensors", {"hidden_states": x, "token_ids": big})
    write(f"{out}/good.safetensors", {"hidden_states": x, "token_ids": ids})
    # the bad-input catalogue (tests/cli/test_run_cli.sh)
    with open(f"{out}/not_safetensors.bin", "wb") as f:
        f.write(b"hello, this is not a safetensors file\n" * 4)
    with open(f"{out}/good.safetensors", "rb") as f:
        data = f.read()
    with open(f"{out}/truncated.safetensors", "wb") as f:
        f.write(data[: len(data) // 2])
    write(f"{out}/no_hidden.safetensors", {"x": x, "token_ids": ids})
    write(f"{out}/ids_float.safetensors", {"hidden_states": x, "token_ids": ids.astype(np.float32)})
    write(f"{out}/ids_short.safetensors", {"hidden_states": x, "token_ids": ids[:-1]})
    neg = ids.copy()
    neg[4] = -1
    write(f"{out}/ids_negative.safetensors", {"hidden_states": x, "token_ids": neg})
    inf = x.copy()
    inf[7, 9] = np.inf
    write(f"{out}/inf.safetensors", {"hidden_states": inf, "token_ids": ids})
    # rows that a clamp-free checkpoint maps to outputs beyond F16's 65504 (issue 24, defect 10):
    # F16 must fail naming the element, BF16 (range 3e38) must not
    big = rng.standard_normal((8, hidden)) * 30.0
    write(f"{out}/f16_big.safetensors", {"hidden_states": big.astype(np.float16)})
    write(f"{out}/bf16_big.safetensors", {"hidden_states": big.astype(ml_dtypes.bfloat16)})


if __name__ == "__main__":
    main()
