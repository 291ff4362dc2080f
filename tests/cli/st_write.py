"""Minimal safetensors writer for test inputs (independent of the C writer)."""
import json
import struct
import sys

import numpy as np

DTYPES = {np.float32: "F32", np.int32: "I32", np.int64: "I64", np.float16: "F16", np.uint8: "U8"}


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


def main():
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


if __name__ == "__main__":
    main()
