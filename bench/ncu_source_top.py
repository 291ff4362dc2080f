"""Summarizes an Nsight Compute source-page CSV (bench/ncu_source.sh): the share of each stall
reason over all sampled warp cycles, then the instructions with the most samples, each with its
top three stall reasons and the SASS around it.

    python3 bench/ncu_source_top.py report.csv [how-many]
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
    how_many = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    head, data = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(head)}
    stalls = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]
    samples = col["Warp Stall Sampling (All Samples)"]
    total = sum(number(r[samples]) for r in data) or 1.0
    share = sorted(((sum(number(r[col[k]]) for r in data) / total, k) for k in stalls), reverse=True)
    print(f"{total:.0f} samples; by stall reason: " +
          ", ".join(f"{k} {100 * v:.1f}%" for v, k in share[:8]))
    top = sorted(range(len(data)), key=lambda i: -number(data[i][samples]))[:how_many]
    for i in top:
        r = data[i]
        reasons = sorted(((number(r[col[k]]), k) for k in stalls), reverse=True)[:3]
        print(f"{100 * number(r[samples]) / total:5.1f}%  executed {r[col['Instructions Executed']]}  "
              f"{r[col['Source']].strip()[:70]}  [" +
              ", ".join(f"{k} {100 * v / total:.1f}%" for v, k in reasons) + "]")
        for j in range(max(0, i - 6), min(len(data), i + 3)):
            print(f"        {data[j][col['Address']][-5:]}  {data[j][col['Source']].strip()[:90]}")


if __name__ == "__main__":
    main()
