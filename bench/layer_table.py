"""The table of bench/layer-vs-torch.sh from its outputs: python3 bench/layer_table.py OUT_DIR."""
import json
import os
import re
import sys

PRESET_EXPERTS = {"dsv4-flash": (4096, 2048, 256), "dsv4-pro": (7168, 3072, 384),
                  "gpt-oss-20b": (2880, 2880, 32), "gpt-oss-120b": (2880, 2880, 128)}


def main():
    out = sys.argv[1]
    copy = json.load(open(os.path.join(out, "copy.json")))
    copy_gbs = copy["copy_gbs"]
    print(f"GPU: {copy['device']}; copy bandwidth {copy_gbs:.0f} GB/s (bytes read + written); "
          f"torch {copy['torch']}\n")
    print("| preset | tokens | PyTorch eager ms | PyTorch graph ms | epmoe graph ms | "
          "epmoe throughput ms | best ratio | experts touched | weight floor ms | graph / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset, (H, I, E) in PRESET_EXPERTS.items():
        try:
            torch_recs = {r["tokens"]: r for r in
                          json.load(open(os.path.join(out, f"torch_{preset}.json")))["records"]}
            layer = {r["tokens"]: r for r in
                     json.load(open(os.path.join(out, f"layer_{preset}.json")))["rows"]}
        except (OSError, ValueError, KeyError) as err:
            if not os.path.exists(os.path.join(out, f"layer_{preset}.json")):
                continue  # not run this time
            print(f"| {preset} | missing: {err} |")
            continue
        thr = {}
        path = os.path.join(out, f"throughput_{preset}.txt")
        if os.path.exists(path):
            for line in open(path):
                m = re.search(r"tokens_per_rank=(\d+) layer_ms=([0-9.]+)", line)
                if m:
                    thr[int(m.group(1))] = float(m.group(2))
        expert_ms = 3 * I * H * 0.5625 / (copy_gbs * 1e9) * 1e3  # one expert's NVFP4 bytes
        for T in sorted(torch_recs):
            t = torch_recs[T]
            # layer_bench's token count is rows x experts / top-k (may round) unless run with
            # --tokens; the floor counts the experts the routing touched where it says so
            lb = min(layer.values(), key=lambda r: abs(r["tokens"] - T))
            floor_ms = lb.get("experts_touched", E) * expert_ms
            ours = [v for v in (lb["layer_us"] / 1e3, thr.get(T)) if v]
            best_ours = min(ours) if ours else float("nan")
            ratio = t["best_ms"] / best_ours
            print(f"| {preset} | {T} | {t['eager_ms']:.2f} | {t.get('graph_ms', float('nan')):.2f} | "
                  f"{lb['layer_us'] / 1e3:.2f} | {thr.get(T, float('nan')):.2f} | {ratio:.2f}x | "
                  f"{lb.get('experts_touched', E)} | {floor_ms:.3f} | "
                  f"{lb['layer_us'] / 1e3 / floor_ms:.2f} |")


if __name__ == "__main__":
    main()
