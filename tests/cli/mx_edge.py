"""Edits one MXFP4 expert projection of a model directory in place (independent of the C code):
row 0's first 32-block becomes all zero at scale 2^-127 (what an OCP quantizer writes for
amax 0), and row 1's second 32-block moves 20 binades below the tensor's largest scale with
every code +-4, which an exact NVFP4 conversion reaches only by moving codes.

usage: mx_edge.py MODEL_DIR PATTERN     (e.g. 'layers.1.ffn.experts.*.w1': every match edited)
"""
import fnmatch
import json
import struct
import sys


def locate(model_dir, name):
    index = json.load(open(f"{model_dir}/model.safetensors.index.json"))
    path = f"{model_dir}/{index['weight_map'][name]}"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    entry = header[name]
    begin, end = entry["data_offsets"]
    return path, 8 + n + begin, end - begin, entry["shape"]


def edit(model_dir, prefix):
    spath, soff, slen, sshape = locate(model_dir, prefix + ".scale")
    wpath, woff, wlen, wshape = locate(model_dir, prefix + ".weight")
    blocks = sshape[1]  # 32-blocks per row
    row_bytes = wshape[1]  # K/2
    assert blocks >= 2 and row_bytes == 16 * blocks
    with open(spath, "r+b") as f:
        f.seek(soff)
        scales = bytearray(f.read(slen))
        top = max(scales)
        scales[0] = 0
        scales[blocks + 1] = top - 20
        f.seek(soff)
        f.write(scales)
    with open(wpath, "r+b") as f:
        f.seek(woff)
        codes = bytearray(f.read(wlen))
        codes[0:16] = bytes(16)
        codes[row_bytes + 16 : row_bytes + 32] = bytes([0x66, 0xE6] * 8)  # +4 +4, +4 -4
        f.seek(woff)
        f.write(codes)


def main():
    model_dir, pattern = sys.argv[1], sys.argv[2]
    index = json.load(open(f"{model_dir}/model.safetensors.index.json"))
    prefixes = [n[: -len(".scale")] for n in index["weight_map"]
                if n.endswith(".scale") and fnmatch.fnmatch(n[: -len(".scale")], pattern)]
    assert prefixes, f"no MXFP4 tensor matches {pattern}"
    for prefix in prefixes:
        edit(model_dir, prefix)
    print(f"mx_edge: edited {len(prefixes)} projections")


if __name__ == "__main__":
    main()
