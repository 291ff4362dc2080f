"""Summarizes an Nsight Compute source-page CSV (bench/ncu-source.sh): the share of each stall
reason over all sampled warp cycles, then the instructions with the most samples, each with its
top three stall reasons and the SASS around it.

    python3 bench/ncu_source_top.py report.csv [how-many] [--ws-regions]

--ws-regions also splits the samples of a warp-specialized GEMM kernel (gemm_sm90_ws.cu) by
where the warps were: the consumers' full-stage waits (their try_wait and its branch), the rest
of their main loop (up to the drain, wgmma wait_group 0), their epilogue (from the drain to the
producer's code, which starts at its first try_wait's block) and the producer.
"""
import csv
import sys


def number(text):
    try:
        return float(text)
    except ValueError:
        return 0.0


def main():
    rows = [r for r in csv.reader(open(sys.argv[1], errors="replace")) if len(r) > 5]
    args = [a for a in sys.argv[2:] if not a.startswith("--")]
    how_many = int(args[0]) if args else 6
    head, data = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(head)}
    stalls = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]
    samples = col["Warp Stall Sampling (All Samples)"]
    total = sum(number(r[samples]) for r in data) or 1.0
    share = sorted(((sum(number(r[col[k]]) for r in data) / total, k) for k in stalls), reverse=True)
    print(f"{total:.0f} samples; by stall reason: " +
          ", ".join(f"{k} {100 * v:.1f}%" for v, k in share[:8]))
    if "--ws-regions" in sys.argv:
        ws_regions(data, col, samples, total)
    top = sorted(range(len(data)), key=lambda i: -number(data[i][samples]))[:how_many]
    for i in top:
        r = data[i]
        reasons = sorted(((number(r[col[k]]), k) for k in stalls), reverse=True)[:3]
        print(f"{100 * number(r[samples]) / total:5.1f}%  executed {r[col['Instructions Executed']]}  "
              f"{r[col['Source']].strip()[:70]}  [" +
              ", ".join(f"{k} {100 * v / total:.1f}%" for v, k in reasons) + "]")
        for j in range(max(0, i - 6), min(len(data), i + 3)):
            print(f"        {data[j][col['Address']][-5:]}  {data[j][col['Source']].strip()[:90]}")


def ws_regions(data, col, samples, total):
    src = [r[col["Source"]] for r in data]
    waits = [i for i, s in enumerate(src) if "TRYWAIT" in s]
    drain = next(i for i, s in enumerate(src) if "DEPBAR.LE gsb0, 0x0" in s)
    producer_wait = next(i for i in waits if i > drain)
    # the producer's block starts after the epilogue's last store
    producer = 1 + max(i for i in range(drain, producer_wait) if "STG" in src[i] or "EXIT" in src[i]
                       or "RET" in src[i])
    first = waits[0]
    split = {"set-up": 0.0, "consumer full-stage waits": 0.0, "consumer main loop": 0.0,
             "consumer epilogue": 0.0, "producer": 0.0}
    for i, r in enumerate(data):
        n = number(r[samples])
        if i < first:
            split["set-up"] += n
        elif i < drain:
            wait = "TRYWAIT" in src[i] or (i > 0 and "TRYWAIT" in src[i - 1] and "BRA" in src[i])
            split["consumer full-stage waits" if wait else "consumer main loop"] += n
        elif i < producer:
            split["consumer epilogue"] += n
        else:
            split["producer"] += n
    print("by region: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in split.items()))
    # the retry loop's try_wait is the next one in the code
    print("first try_wait at a step start: executed", data[first][col["Instructions Executed"]],
          "times, retried", data[waits[1]][col["Instructions Executed"]])


if __name__ == "__main__":
    main()
