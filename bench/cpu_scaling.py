#!/usr/bin/env python3
"""CPU scaling of a full MoE layer stack versus MPI rank count, on this host.

  .venv/bin/python bench/cpu_scaling.py [--build build] [--preset tiny] [--ranks 1,2,4,8]
                                        [--strong-tokens 4096] [--weak-tokens 512] [--out out/bench]

Strong scaling: a fixed batch over 1..N ranks. Weak scaling: a fixed number of tokens per rank.
Each point runs `mpirun -np P epmoe-run` on a generated checkpoint and reads the forward time
the batch job reports (checkpoint loading excluded); the best of --repeat runs is kept.
Writes a table to stdout, JSON and a PNG plot to --out. Absolute numbers hold only for the
machine they were taken on: the ranks share its cores (oversubscribed beyond nproc).
"""
import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def mpi_env():
    env = dict(os.environ)
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_rmaps_base_oversubscribe": "1",
                "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
                "OMPI_MCA_btl": "self,vader", "OMPI_MCA_pml": "ob1",
                "OMPI_MCA_mpi_yield_when_idle": "1"})
    return env


def run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def forward_seconds(build, ckpt, inp, out, ranks, repeat):
    best = None
    for _ in range(repeat):
        text = run(["mpirun", "-np", str(ranks), f"{build}/bin/epmoe-run", "--checkpoint", ckpt,
                    "--input", inp, "--output", out, "--quiet"], env=mpi_env())
        m = re.search(r"forward ([0-9.]+) s", text)
        if not m:
            sys.exit(f"no forward time in output:\n{text}")
        t = float(m.group(1))
        best = t if best is None else min(best, t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ranks", default="1,2,4,8")
    ap.add_argument("--strong-tokens", type=int, default=4096)
    ap.add_argument("--weak-tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ranks = [int(r) for r in a.ranks.split(",")]
    ckpt = os.path.join(a.out, f"ckpt-{a.preset}-{a.layers}")
    if not os.path.isdir(ckpt):
        run([f"{a.build}/bin/epmoe-gen", "--preset", a.preset, "--n_layers", str(a.layers), "--out", ckpt])

    def make_input(tokens):
        path = os.path.join(a.out, f"in-{a.preset}-{tokens}.safetensors")
        if not os.path.exists(path):
            run([f"{a.build}/bin/epmoe-gen", "--preset", a.preset, "--input-out", path,
                 "--tokens", str(tokens), "--dtype", "bf16"])
        return path

    rows = []
    for kind in ("strong", "weak"):
        for p in ranks:
            tokens = a.strong_tokens if kind == "strong" else a.weak_tokens * p
            t = forward_seconds(a.build, ckpt, make_input(tokens), os.path.join(a.out, "o.safetensors"), p, a.repeat)
            rows.append({"scaling": kind, "ranks": p, "tokens": tokens, "layers": a.layers,
                         "seconds": t, "tokens_per_s": tokens / t})
    base = {k: next(r for r in rows if r["scaling"] == k and r["ranks"] == ranks[0]) for k in ("strong", "weak")}
    print(f"CPU scaling, preset {a.preset}, {a.layers} layers, host with {os.cpu_count()} cores")
    print(f"{'scaling':8} {'ranks':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>10} {'vs 1 rank':>9}")
    for r in rows:
        rel = r["tokens_per_s"] / base[r["scaling"]]["tokens_per_s"]
        r["speedup"] = rel
        print(f"{r['scaling']:8} {r['ranks']:5d} {r['tokens']:7d} {r['seconds']:8.3f} {r['tokens_per_s']:10.0f} {rel:9.2f}")
    meta = {"preset": a.preset, "layers": a.layers, "host_cores": os.cpu_count(), "rows": rows}
    with open(os.path.join(a.out, "cpu_scaling.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind in ("strong", "weak"):
            rs = [r for r in rows if r["scaling"] == kind]
            ax.plot([r["ranks"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o",
                    label=f"{kind} ({'fixed %d tokens' % a.strong_tokens if kind == 'strong' else '%d tokens/rank' % a.weak_tokens})")
        ax.axvline(os.cpu_count(), color="gray", ls=":", label=f"{os.cpu_count()} cores")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MPI ranks")
        ax.set_ylabel("tokens/s (forward, all layers)")
        ax.set_title(f"epmoe CPU scaling, {a.preset}, {a.layers} layers")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "cpu_scaling.png"), dpi=100)
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {a.out}/cpu_scaling.json and cpu_scaling.png")


if __name__ == "__main__":
    main()
