"""Merges bench/gemm_bench.cu's and bench/torch_grouped_mm.py's JSON into one table and one JSON.

    python3 bench/report.py ours.json torch.json merged.json

Columns: weight-stream rate of ours (NVFP4 weight+scale bytes / time) as a fraction of the
measured device-to-device copy rate, TFLOP/s of ours, torch._grouped_mm (bf16 weights) and cuBLAS
(bf16, one GEMM of the same FLOPs), and the speed-up of ours over torch (time ratio). Times are
device time per call (each call graph-captured and replayed, both sides); the eager times (host
launch work included, both sides) are printed beside AUTO's row and kept in the JSON.
Targets (issue 5): decode (<= 96 rows) >= 0.75 of copy and >= 3.5x torch; prefill (>= 768)
>= 0.9x torch TFLOP/s.
"""
import json
import sys


def main():
    ours = json.load(open(sys.argv[1]))
    torch_recs = json.load(open(sys.argv[2]))
    copy = next(r for r in ours["records"] if r["kind"] == "copy")["gbs"]
    tmap = {(r["model"], r["gemm"], r["rows_per_expert"]): r for r in torch_recs["records"]}
    rows_out = []
    print(f"device: {ours['device']}   d2d copy: {copy:.0f} GB/s (read+write)")
    for r in ours["records"]:
        if r["kind"] == "probe":  # loads only, the decode kernels' pattern vs linear
            print(f"weight-stream probe {r['model']:9s} {r['gemm']:4s}: decode pattern "
                  f"{r['slab_gbs']:7.0f} GB/s ({r['slab_gbs'] / copy * 100:4.1f}% of copy), linear "
                  f"{r['linear_gbs']:7.0f} GB/s ({r['linear_gbs'] / copy * 100:4.1f}%)")
    hdr = (f"{'model':9s} {'gemm':4s} {'rows':>5s} | {'ours us':>8s} {'wGB/s':>6s} {'%copy':>5s} "
           f"{'TFLOP/s':>7s} | {'torch us':>8s} {'TFLOP/s':>7s} | {'cuBLAS':>7s} | "
           f"{'x torch':>7s} {'target':>14s}")
    print(hdr)
    print("-" * len(hdr))
    for r in ours["records"]:
        if r["kind"] != "gemm":
            continue
        t = tmap.get((r["model"], r["gemm"], r["rows_per_expert"]), {})
        tms = t.get("torch_ms")
        speedup = tms / r["ours_ms"] if tms else None
        frac = r["ours_weight_gbs"] / copy
        decode = r["rows_per_expert"] <= 96
        if speedup is None:
            verdict = "no torch"
        elif decode:
            ok = frac >= 0.75 and speedup >= 3.5
            verdict = ("MET" if ok else "missed") + " (decode)"
        else:
            ok = r["ours_tflops"] >= 0.9 * t["torch_tflops"]
            verdict = ("MET" if ok else "missed") + " (prefill)"
        m = dict(r)
        teager = t.get("torch_eager_ms")
        m.update({"copy_gbs": copy, "frac_of_copy": frac, "torch_ms": tms, "torch_eager_ms": teager,
                  "speedup_vs_torch_eager": (teager / r["ours_eager_ms"]
                                             if teager and r.get("ours_eager_ms") else None),
                  "torch_tflops": t.get("torch_tflops"), "speedup_vs_torch": speedup,
                  "verdict": verdict})
        rows_out.append(m)
        tt = f"{tms * 1e3:8.1f} {t['torch_tflops']:7.1f}" if tms else f"{'-':>8s} {'-':>7s}"
        sp = f"{speedup:7.2f}" if speedup else f"{'-':>7s}"
        print(f"{r['model']:9s} {r['gemm']:4s} {r['rows_per_expert']:5d} | {r['ours_ms'] * 1e3:8.1f} "
              f"{r['ours_weight_gbs']:6.0f} {frac * 100:5.1f} {r['ours_tflops']:7.1f} | {tt} | "
              f"{r['cublas_bf16_tflops']:7.1f} | {sp} {verdict:>14s}  [{r.get('variant', '')}]")
        if teager and r.get("ours_eager_ms"):
            print(f"{'':20s} {'launched eagerly (host work timed):':28s} ours {r['ours_eager_ms'] * 1e3:8.1f} us, "
                  f"torch {teager * 1e3:8.1f} us, {teager / r['ours_eager_ms']:5.2f}x")
        for name, kms in r.get("kernel_ms", {}).items():
            print(f"{'':20s} {name:28s} {kms * 1e3:9.1f} us  {kms / r['ours_ms']:5.2f}x the chosen one's time")
    json.dump({"device": ours["device"], "copy_gbs": copy, "torch": torch_recs.get("torch"),
               "rows": rows_out}, open(sys.argv[3], "w"), indent=1)


if __name__ == "__main__":
    main()
