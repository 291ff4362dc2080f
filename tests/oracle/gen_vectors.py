#!/usr/bin/env python3
"""Oracle vectors for the C suites, computed independently of the C code.

The number formats come from ml_dtypes (float4_e2m1fn, float8_e4m3fn, float8_e8m0fnu,
bfloat16) and numpy (float16); NVFP4 quantization implements docs/design.md §3.4 in numpy, in
float32 arithmetic. Every output is a small text file in --out DIR, one function per file:
numbers are hex bit patterns so that nothing is lost in printing, '#' lines are comments.

Run: python gen_vectors.py --out DIR   (the oracle.vectors ctest fixture does this)
"""
import argparse
import os
import sys

import ml_dtypes
import numpy as np

E2M1 = ml_dtypes.float4_e2m1fn
E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu
E2M1_MAX = np.float32(6.0)
E4M3_MAX = np.float32(448.0)
F32 = np.float32


# ---- helpers -----------------------------------------------------------------------------

def f32_hex(values):
    """fp32 values as 8-digit hex bit patterns."""
    return ["%08x" % b for b in np.asarray(values, dtype=F32).view(np.uint32)]


def write_lines(out_dir, name, header, lines):
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        for h in header:
            f.write("# %s\n" % h)
        for line in lines:
            f.write(line + "\n")


def neighbours(points):
    """Each point with its fp32 neighbours on both sides, both signs."""
    pts = np.asarray(points, dtype=F32)
    up = np.nextafter(pts, F32(np.inf))
    down = np.nextafter(pts, F32(-np.inf))
    all_pts = np.concatenate([pts, up, down])
    return np.concatenate([all_pts, -all_pts]).astype(F32)


def to_e2m1_satfinite(x):
    """Codes of x (fp32, no NaN) under RNE with saturation at +-6; ml_dtypes does the rounding."""
    x = np.asarray(x, dtype=F32)
    return np.clip(x, -E2M1_MAX, E2M1_MAX).astype(E2M1).view(np.uint8) & 0xF


def to_e4m3_satfinite(x):
    """ml_dtypes turns |x| > 464 into NaN (the fn format has no Inf); satfinite clips first,
    which is the same as rounding and then saturating because 448 is the largest finite."""
    x = np.asarray(x, dtype=F32)
    return np.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3).view(np.uint8)


def random_f32(rng, n, lo_exp, hi_exp):
    """Random nonzero fp32 with log-uniform magnitudes 2^lo_exp..2^hi_exp and random sign."""
    mag = np.exp2(rng.uniform(lo_exp, hi_exp, n))
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return (sign * mag).astype(F32)


# ---- code tables -------------------------------------------------------------------------

def write_e2m1_codes(out_dir):
    codes = np.arange(16, dtype=np.uint8)
    values = codes.view(E2M1).astype(F32)
    lines = ["%x %s" % (c, v) for c, v in zip(codes, f32_hex(values))]
    write_lines(out_dir, "e2m1_codes.txt", ["every E2M1 code: code value_f32_bits"], lines)


def write_e4m3_codes(out_dir):
    codes = np.arange(256, dtype=np.uint16).astype(np.uint8)
    values = codes.view(E4M3).astype(F32)
    lines = ["%02x %s" % (c, "nan" if np.isnan(v) else h)
             for c, v, h in zip(codes, values, f32_hex(values))]
    write_lines(out_dir, "e4m3_codes.txt", ["every E4M3 (fn) code: code value_f32_bits|nan"], lines)


def write_ue8m0_codes(out_dir):
    codes = np.arange(256, dtype=np.uint16).astype(np.uint8)
    values = codes.view(E8M0).astype(F32)
    lines = ["%02x %s" % (c, "nan" if np.isnan(v) else h)
             for c, v, h in zip(codes, values, f32_hex(values))]
    write_lines(out_dir, "ue8m0_codes.txt", ["every UE8M0 code: code value_f32_bits|nan"], lines)


# ---- rounding vectors --------------------------------------------------------------------

def write_e2m1_rounding(out_dir):
    rng = np.random.default_rng(2024)
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    beyond = [6.5, 7.0, 8.0, 100.0, 3.0e38, np.inf]
    tiny = [1e-30, 1e-45, 2.0 ** -126, 0.1]
    x = np.concatenate([
        neighbours(grid + ties + beyond[:-1] + tiny),
        np.array([np.inf, -np.inf, -0.0], dtype=F32),
        random_f32(rng, 2000, -4, 3.5),
        (rng.uniform(-8, 8, 1000)).astype(F32),
    ]).astype(F32)
    codes = to_e2m1_satfinite(x)
    lines = ["%s %x" % (h, c) for h, c in zip(f32_hex(x), codes)]
    write_lines(out_dir, "e2m1_rounding.txt",
                ["fp32 -> E2M1 RNE satfinite (ml_dtypes): input_f32_bits code"], lines)


def write_e4m3_rounding(out_dir):
    rng = np.random.default_rng(2025)
    values = np.arange(256, dtype=np.uint16).astype(np.uint8).view(E4M3).astype(F32)
    finite = values[np.isfinite(values) & (values >= 0)]
    finite = np.sort(finite)
    midpoints = (finite[:-1] + finite[1:]) / F32(2.0)  # exact in fp32: ties between codes
    special = [448.0, 464.0, 480.0, 500.0, 1e6, 3.0e38,
               2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -11, 2.0 ** -6, 2.0 ** -6 - 2.0 ** -10,
               7 * 2.0 ** -9, 7.5 * 2.0 ** -9, 1e-30, 1e-45]
    x = np.concatenate([
        neighbours(np.concatenate([finite, midpoints, np.array(special, dtype=F32)])),
        np.array([np.inf, -np.inf, -0.0], dtype=F32),
        random_f32(rng, 3000, -12, 9.5),
    ]).astype(F32)
    codes = to_e4m3_satfinite(x)
    lines = ["%s %02x" % (h, c) for h, c in zip(f32_hex(x), codes)]
    write_lines(out_dir, "e4m3_rounding.txt",
                ["fp32 -> E4M3 RNE satfinite (ml_dtypes): input_f32_bits code"], lines)


def sixteen_bit_inputs(seed, grid_values):
    """Ties and neighbours around a 16-bit format's grid, overflow, subnormals, randoms."""
    rng = np.random.default_rng(seed)
    grid = np.asarray(grid_values, dtype=F32)
    grid = grid[np.isfinite(grid)]
    grid = np.unique(np.abs(grid))
    mids = (grid[:-1].astype(np.float64) + grid[1:].astype(np.float64)) / 2
    mids = mids[mids == mids.astype(F32)].astype(F32)  # keep the ties fp32 can hold
    rand_bits = rng.integers(0, 2 ** 32, 4000, dtype=np.uint64).astype(np.uint32).view(F32)
    rand_bits = rand_bits[np.isfinite(rand_bits)]
    return np.concatenate([neighbours(np.concatenate([grid, mids])),
                           np.array([np.inf, -np.inf, -0.0, 3.0e38, 1e-45], dtype=F32),
                           rand_bits]).astype(F32)


def write_bf16_rounding(out_dir):
    # a sample of the bf16 grid: every code of a few binades (normal, subnormal, top)
    sample = np.concatenate([np.arange(0x0000, 0x0100), np.arange(0x3f00, 0x4100),
                             np.arange(0x7e00, 0x7f80)]).astype(np.uint16)
    x = sixteen_bit_inputs(7, sample.view(ml_dtypes.bfloat16).astype(F32))
    bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    lines = ["%s %04x" % (h, b) for h, b in zip(f32_hex(x), bits)]
    write_lines(out_dir, "bf16_rounding.txt",
                ["fp32 -> bf16 RNE (ml_dtypes): input_f32_bits bf16_bits"], lines)


def write_fp16_rounding(out_dir):
    sample = np.concatenate([np.arange(0x0000, 0x0800), np.arange(0x3800, 0x4000),
                             np.arange(0x7800, 0x7c00)]).astype(np.uint16)
    grid = sample.view(np.float16).astype(F32)
    x = sixteen_bit_inputs(8, np.concatenate([grid, np.array([65520.0, 65536.0], dtype=F32)]))
    with np.errstate(over="ignore"):  # overflow to Inf is one of the cases
        bits = x.astype(np.float16).view(np.uint16)
    lines = ["%s %04x" % (h, b) for h, b in zip(f32_hex(x), bits)]
    write_lines(out_dir, "fp16_rounding.txt",
                ["fp32 -> fp16 RNE (numpy): input_f32_bits fp16_bits"], lines)


# ---- NVFP4 rows --------------------------------------------------------------------------

def nvfp4_global_sf(amax):
    amax = F32(amax)
    if amax == 0:
        return F32(1.0)
    return F32(2688.0) / amax


def nvfp4_quantize(x, global_sf):
    """docs/design.md §3.4 in float32: per 16-block sf = e4m3((gs * amax16) / 6), then
    code = e2m1((x * gs) / float(sf)), code 0 where sf == 0. Returns codes (one per element),
    block scale bytes and the count of |x * gs / sf| > 6."""
    x = np.asarray(x, dtype=F32).reshape(-1, 16)
    gs = F32(global_sf)
    amax16 = np.max(np.abs(x), axis=1)
    sf_codes = to_e4m3_satfinite((gs * amax16) / F32(6.0))
    sf = sf_codes.view(E4M3).astype(F32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = (x * gs) / sf
    live = np.broadcast_to(sf != 0, scaled.shape)
    scaled = np.where(live, scaled, F32(0.0)).astype(F32)
    codes = np.where(live, to_e2m1_satfinite(scaled), 0).astype(np.uint8)
    saturated = int(np.count_nonzero(live & (np.abs(scaled) > E2M1_MAX)))
    return codes.reshape(-1), sf_codes, saturated


def near_tie_row(rng, n_blocks, calib_amax=F32(1000.3)):
    """Blocks whose (gs * amax16) / 6 falls within a few ulps of an E4M3 rounding tie and whose
    elements' (x * gs) / sf fall within a few ulps of E2M1 ties, so that evaluating the
    formula in any other order (or with a reciprocal) changes some code."""
    gs = nvfp4_global_sf(calib_amax)
    e4m3_grid = np.sort(np.unique(np.abs(
        np.arange(0, 0x7f, dtype=np.uint8).view(E4M3).astype(F32))))
    e4m3_ties = ((e4m3_grid[:-1] + e4m3_grid[1:]) / F32(2.0))[8:]  # normal-range ties
    e2m1_ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.5, 3.0], dtype=F32)
    blocks = []
    for _ in range(n_blocks):
        tie = e4m3_ties[rng.integers(0, e4m3_ties.size)]
        amax16 = F32(tie * F32(6.0) / gs)
        for _ in range(rng.integers(-3, 4)):
            amax16 = np.nextafter(amax16, F32(np.inf))
        sf = to_e4m3_satfinite((gs * amax16) / F32(6.0)).view(E4M3).astype(F32)
        block = [amax16]
        for _ in range(15):
            t = e2m1_ties[rng.integers(0, e2m1_ties.size)]
            v = F32(t * sf / gs)
            steps = rng.integers(-3, 4)
            for _ in range(abs(steps)):
                v = np.nextafter(v, F32(np.inf) if steps > 0 else F32(0))
            block.append(v if v < amax16 else amax16)
        block = np.array(block, dtype=F32) * np.where(rng.random(16) < 0.5, -1, 1).astype(F32)
        blocks.append(rng.permutation(block))
    return np.concatenate(blocks).astype(F32)


def write_nvfp4_rows(out_dir):
    rng = np.random.default_rng(99)
    rows = []  # (name, x, amax used for the global scale)

    x = rng.normal(0, 1, 64).astype(F32)
    rows.append(("normal", x, np.max(np.abs(x))))

    # per-block magnitudes 1e-3..1e3, one block all zeros, one block so small its scale
    # rounds to zero, one block of near-equal magnitudes (its amax element may exceed 6 after
    # the block scale rounds down)
    blocks = [random_f32(rng, 16, -10, -9), np.zeros(16, F32), random_f32(rng, 16, 8, 10),
              random_f32(rng, 16, -1, 1), random_f32(rng, 16, -22, -20),
              random_f32(rng, 16, -3, 3), random_f32(rng, 16, 0, 0.01)]
    x = np.concatenate(blocks).astype(F32)
    rows.append(("mixed_blocks", x, np.max(np.abs(x))))

    # global_sf = 1 (amax 2688) and block amax 6 make the block scale exactly 1, so the E2M1
    # tie points reach the rounding unchanged; the second block holds their fp32 neighbours
    ties = np.array([6, 5, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25], dtype=F32)
    signs = np.where(np.arange(8) % 3 == 0, -1, 1).astype(F32)
    x = np.concatenate([ties * signs, -ties * signs,
                        np.nextafter(ties, F32(np.inf)) * signs,
                        np.nextafter(ties, F32(0)) * -signs]).astype(F32)
    rows.append(("ties", x, F32(2688.0)))

    rows.append(("all_zeros", np.zeros(32, F32), F32(0.0)))

    # a calibration amax 50x too small: block scales saturate at 448 and codes at 6
    x = rng.normal(0, 4, 64).astype(F32)
    rows.append(("scale_too_small", x, np.max(np.abs(x)) / F32(50.0)))

    # e4m3 subnormal block scales: blocks far below the row's amax
    x = np.concatenate([random_f32(rng, 16, 9, 10), random_f32(rng, 16, -6, -5),
                        random_f32(rng, 16, -8, -7), random_f32(rng, 16, -3, -2)]).astype(F32)
    rows.append(("subnormal_scales", x, np.max(np.abs(x))))

    x = random_f32(rng, 256, -6, 6)
    rows.append(("wide_random", x, np.max(np.abs(x))))

    rows.append(("near_ties", near_tie_row(rng, 128), F32(1000.3)))

    header = ["NVFP4 rows quantized by numpy (docs/design.md §3.4, float32, ml_dtypes casts)",
              "row NAME K AMAX_F32 GLOBAL_SF_F32 SATURATED",
              "x     K fp32 bit patterns",
              "codes K E2M1 codes (one hex digit each, unpacked)",
              "sf    K/16 UE4M3 bytes",
              "deq   K fp32 bit patterns of e2m1 * float(sf) (dequantize with scale 1)",
              "end"]
    lines = []
    for name, x, amax in rows:
        gs = nvfp4_global_sf(amax)
        codes, sf_codes, saturated = nvfp4_quantize(x, gs)
        deq = (codes.view(E2M1).astype(F32).reshape(-1, 16)
               * sf_codes.view(E4M3).astype(F32)[:, None]).reshape(-1)
        lines.append("row %s %d %s %s %d" % (name, x.size, f32_hex([amax])[0],
                                             f32_hex([gs])[0], saturated))
        lines.append("x " + " ".join(f32_hex(x)))
        lines.append("codes " + " ".join("%x" % c for c in codes))
        lines.append("sf " + " ".join("%02x" % c for c in sf_codes))
        lines.append("deq " + " ".join(f32_hex(deq)))
        lines.append("end")
    write_lines(out_dir, "nvfp4_rows.txt", header, lines)


# ---- main --------------------------------------------------------------------------------

WRITERS = [
    write_e2m1_codes,
    write_e4m3_codes,
    write_ue8m0_codes,
    write_e2m1_rounding,
    write_e4m3_rounding,
    write_bf16_rounding,
    write_fp16_rounding,
    write_nvfp4_rows,
]


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the vector files")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for write in WRITERS:
        write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
