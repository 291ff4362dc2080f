"""Bad checkpoints for the catalogue (tests/cli/test_run_cli.sh): copies a checkpoint directory
and damages one thing in it, by editing safetensors headers and bytes directly (independent of
the C reader and writer).

  ckpt_mutate.py SRC DST meta KEY VALUE|-     every file's metadata KEY set (or '-': removed)
  ckpt_mutate.py SRC DST drop TENSOR          the tensor removed from the header of its file
  ckpt_mutate.py SRC DST dtype TENSOR DTYPE   the header's dtype replaced (same byte size)
  ckpt_mutate.py SRC DST shape TENSOR A,B     the header's shape replaced (same element count)
  ckpt_mutate.py SRC DST nan TENSOR           the first element of an F32 tensor set to NaN
"""
import glob
import json
import os
import shutil
import struct
import sys


def load(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    return header, data


def save(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data)


def main():
    src, dst, op, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    files = sorted(glob.glob(os.path.join(dst, "*.safetensors")))
    done = False
    for path in files:
        header, data = load(path)
        if op == "meta":
            meta = header.setdefault("__metadata__", {})
            if args[1] == "-":
                meta.pop(args[0], None)
            else:
                meta[args[0]] = args[1]
            done = True
        elif args[0] in header:
            t = header[args[0]]
            if op == "drop":
                del header[args[0]]
            elif op == "dtype":
                t["dtype"] = args[1]
            elif op == "shape":
                t["shape"] = [int(v) for v in args[1].split(",")]
            elif op == "nan":
                assert t["dtype"] == "F32", t
                a = t["data_offsets"][0]
                data[a:a + 4] = struct.pack("<f", float("nan"))
            else:
                sys.exit(f"unknown operation {op}")
            done = True
        else:
            continue
        save(path, header, data)
    if not done:
        sys.exit(f"{op} {args}: no file of {dst} holds it")


if __name__ == "__main__":
    main()
