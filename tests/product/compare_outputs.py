#!/usr/bin/env python3
"""Compares two epmoe-run outputs (safetensors): hidden_states and expert_counts.

  compare_outputs.py A B --identical         every byte of hidden_states equal, counts equal
  compare_outputs.py A B --tol 1e-2 [--routing]   rel L2 of hidden_states <= tol (and the
                                                  expert_counts equal)

Prints one line: the relative L2 error, the largest absolute difference, whether the routing
(expert_counts per layer and expert) agrees. Exit 1 on a failed check. numpy only, so it runs on
machines without the project's virtualenv."""
import argparse
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64,
          "BF16": np.uint16}


def read(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    base = 8 + n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        arr = np.frombuffer(blob[base + a:base + b], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])
        if t["dtype"] == "BF16":  # bf16 bits -> fp32 exactly
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = (t["dtype"], arr)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("b")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--identical", action="store_true")
    g.add_argument("--tol", type=float)
    p.add_argument("--routing", action="store_true",
                   help="also require equal expert_counts (every layer, every expert)")
    p.add_argument("--what", default="")
    args = p.parse_args()
    A, B = read(args.a), read(args.b)
    (da, ha), (db, hb) = A["hidden_states"], B["hidden_states"]
    ok = da == db and ha.shape == hb.shape
    ha64, hb64 = ha.astype(np.float64), hb.astype(np.float64)
    finite = bool(np.isfinite(ha64).all() and np.isfinite(hb64).all())
    ok = ok and finite
    rel = float(np.linalg.norm(ha64 - hb64) / max(np.linalg.norm(hb64), 1e-300)) if ok else float("inf")
    maxabs = float(np.max(np.abs(ha64 - hb64))) if ok and ha.size else 0.0
    identical = ok and ha.tobytes() == hb.tobytes()
    counts_a, counts_b = A.get("expert_counts"), B.get("expert_counts")
    routing = counts_a is not None and counts_b is not None and \
        np.array_equal(counts_a[1], counts_b[1])
    if args.identical:
        passed = identical and routing
    else:
        passed = ok and rel <= args.tol and (routing or not args.routing)
    print(f"{args.what}: {'PASS' if passed else 'FAIL'} rel_l2={rel:.3e} max_abs={maxabs:.3e} "
          f"bit_identical={identical} routing_counts_equal={routing} finite={finite} "
          f"rows={ha.shape[0] if ha.ndim else 0} dtype={da}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
