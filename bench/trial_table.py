"""The B/A table of a bench/trial.sh run: for every GEMM shape, AUTO's time in version A and each
version's time over A's in the same round (then their geometric mean over the rounds).

    python3 bench/trial_table.py <unpacked epmoe-trial folder> [--markdown]

Reads variants.txt and gemm_<variant>_r<round>.json (or gemm_<variant>.json, the single-round
files of older archives). A ratio below 1 is the version being faster.
"""
import glob
import json
import math
import os
import re
import sys


def records(path):
    with open(path) as f:
        d = json.load(f)
    recs = d["results"] if isinstance(d, dict) and "results" in d else d[list(d)[-1]]
    return {(r["model"], r["gemm"], r["rows_per_expert"]): r for r in recs if r.get("kind") == "gemm"}


def main():
    folder = sys.argv[1]
    markdown = "--markdown" in sys.argv
    names = {"A": "the baseline"}
    with open(os.path.join(folder, "variants.txt")) as f:
        for line in f:
            v, _, patch = line.strip().partition(" = ")
            names[v] = patch
    variants = ["A"] + sorted((v for v in names if v != "A"), key=lambda v: int(v[1:]))
    rounds = sorted({int(m.group(1)) for p in glob.glob(os.path.join(folder, "gemm_A_r*.json"))
                     for m in [re.search(r"_r(\d+)\.json$", p)]})
    if rounds:
        data = {(v, k): records(os.path.join(folder, f"gemm_{v}_r{k}.json")) for v in variants for k in rounds}
    else:
        rounds = [1]
        data = {(v, 1): records(os.path.join(folder, f"gemm_{v}.json")) for v in variants}
    for v in variants:
        print(f"{v} = {names[v]}")
    head = ["model", "gemm", "rows"] + [f"A µs r{k}" for k in rounds]
    for v in variants[1:]:
        head += [f"{v}/A r{k}" for k in rounds] + ([f"{v}/A gmean"] if len(rounds) > 1 else [])
    sep = " | " if markdown else "  "
    print(("| " if markdown else "") + sep.join(head) + (" |" if markdown else ""))
    if markdown:
        print("|" + "---|" * len(head))
    for key in data[("A", rounds[0])]:
        a = [data[("A", k)][key]["ours_ms"] * 1e3 for k in rounds]
        cells = [key[0], key[1], str(key[2])] + [f"{x:.1f}" for x in a]
        for v in variants[1:]:
            r = [data[(v, k)][key]["ours_ms"] * 1e3 / a[i] for i, k in enumerate(rounds)]
            cells += [f"{x:.3f}" for x in r]
            if len(rounds) > 1:
                cells.append(f"{math.exp(sum(map(math.log, r)) / len(r)):.3f}")
        print(("| " if markdown else "") + sep.join(cells) + (" |" if markdown else ""))


if __name__ == "__main__":
    main()
