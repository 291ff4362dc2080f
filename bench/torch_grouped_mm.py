"""torch._grouped_mm on bf16 weights at the same expert-slice shapes as bench/gemm_bench.cu.

    python3 bench/torch_grouped_mm.py --json out.json [--reps 20] [--rows 8,16,...]

A: [E*rows, K] bf16, W: [E, N, K] bf16 (passed as W.transpose(1, 2), i.e. [E, K, N] column-major
per expert), offs: int32 cumulative row ends. 3 warm-ups, then the call captured into a CUDA graph,
replayed for --warm-ms (200) so the clock settles, then replayed in batches of 3 between events
(device time per call, as gemm_bench times ours), and launched eagerly with events around each call (torch_eager_ms); medians.
The bf16 weight sets are 0.5-4.2 GB, far above the L2, so repeated calls stream them from HBM.
If torch rejects groups whose row count is not a multiple of 16 (older builds), the groups are
padded to 16 rows and the record says so (FLOPs are still counted for the real rows).
"""
import argparse
import json

import torch

MODELS = [("V4-Flash", 4096, 2048, 32), ("V4-Pro", 7168, 3072, 48)]
WARM_MS = 200.0  # --warm-ms


def median_batch_ms(run, reps, calls_per_run):
    """Median over reps of the event-timed run(), per call."""
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls_per_run)
    times.sort()
    return times[len(times) // 2]


def eager_median_ms(fn, reps):
    """One event pair around each eager call: host-side launch work included."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return median_batch_ms(fn, reps, 1)


def graph_median_ms(fn, reps, batch=3):
    """Device time per call, as bench/gemm_bench.cu measures ours: fn captured once into a CUDA
    graph, replayed `batch` times back to back between two events, median over reps batches."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()

    def replays():
        for _ in range(batch):
            graph.replay()
    # replays until the clock has settled at this call's own level (as gemm_bench --warm-ms)
    warmed = 0.0
    while warmed < WARM_MS:
        warmed += batch * median_batch_ms(replays, 1, batch)
    return median_batch_ms(replays, reps, batch)


def main():
    global WARM_MS
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="torch_grouped_mm.json")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", default="8,16,32,64,96,768,1536,3072")
    ap.add_argument("--warm-ms", type=float, default=WARM_MS,
                    help="graph replays before the timed ones, so the clock settles")
    args = ap.parse_args()
    WARM_MS = args.warm_ms
    rows_list = [int(x) for x in args.rows.split(",")]
    dev = torch.device("cuda")
    records = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    for name, H, I, E in MODELS:
        for gname, N, K in (("W13", 2 * I, H), ("W2", H, I)):
            w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16)
            wt = w.transpose(1, 2)
            for rows in rows_list:
                padded = rows
                rec = {"kind": "torch", "model": name, "gemm": gname, "experts": E,
                       "rows_per_expert": rows, "N": N, "K": K}
                for attempt in (rows, (rows + 15) // 16 * 16):
                    a = torch.randn(E * attempt, K, device=dev, dtype=torch.bfloat16)
                    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * attempt
                    try:
                        call = lambda: torch._grouped_mm(a, wt, offs=offs, out_dtype=torch.bfloat16)
                        eager_ms = eager_median_ms(call, args.reps)
                        ms = graph_median_ms(call, args.reps)
                        padded = attempt
                        break
                    except RuntimeError as err:
                        rec["error_unpadded"] = str(err).splitlines()[0][:200]
                        ms = None
                    finally:
                        del a
                if ms is None:
                    rec["error"] = "torch._grouped_mm failed"
                    records.append(rec)
                    print(f"{name} {gname} {rows}: failed: {rec.get('error_unpadded')}", flush=True)
                    continue
                flops = 2.0 * rows * E * N * K
                wbytes = 2.0 * E * N * K
                rec.update({"rows_run": padded, "torch_ms": ms, "torch_eager_ms": eager_ms,
                            "torch_tflops": flops / (ms * 1e-3) / 1e12,
                            "torch_weight_gbs": wbytes / (ms * 1e-3) / 1e9,
                            "weight_bytes_bf16": wbytes})
                records.append(rec)
                print(f"{name:9s} {gname:4s} {rows:5d} | torch {ms * 1e3:9.1f} us "
                      f"{rec['torch_tflops']:7.1f} TFLOP/s {rec['torch_weight_gbs']:8.1f} GB/s"
                      + (f" (groups padded to {padded})" if padded != rows else ""), flush=True)
            del w, wt
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                   "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
