"""The anchor epmoe is measured against: a DeepSeek-V4 or gpt-oss MoE layer written the way a
PyTorch user would write it, in bf16 on one GPU, every routed expert local.

    python3 bench/torch_layer.py --preset dsv4-flash --tokens 128,512,4096,16384 --json out.json
    python3 bench/torch_layer.py --preset dsv4-flash --tokens 4096,16384 --chain 4 --json e2e.json
    python3 bench/torch_layer.py --preset gpt-oss-120b --tokens 128,512,4096,16384 --json oss.json

DeepSeek-V4: fp32 gate logits, sqrt(softplus) scores + bias, top-k, weights renormalized and
scaled; a sort-based permutation of the (token, expert) pairs; torch._grouped_mm for W13 and
W2 (bf16, fp32 accumulation inside); the DeepSeek-V4 clamped SwiGLU; index_add_ of the weighted
outputs; the shared expert (two bf16 matmuls).
gpt-oss (transformers' GptOssTopKRouter and GptOssExperts, the experts through the same
grouped GEMMs): fp32 logits of a router with a bias, top-4 of the logits, softmax over those 4;
W13 with its bias, gate and up interleaved (even / odd columns), gate clamped above at 7, up
to [-7, 7], (up + 1) * gate * sigmoid(1.702 gate); W2 with its bias; no shared expert.
Weights are random bf16 (the timing does not depend on their values; all of them are far above
the L2).

Per token count it reports the median of --reps forwards timed with CUDA events, eagerly and
replayed from a CUDA graph where the layer can be captured (the better of the two is the
anchor). --chain N instead times what a batch job does: a host tensor (the input file's rows)
copied to the GPU, N layers, the result copied back (perf_counter around a synchronized call;
the N layers reuse one layer's weights, which changes nothing: they are far above the L2).
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

PRESETS = {  # hidden, moe_inter, routed experts, top-k, routed scaling factor, swiglu limit
    "dsv4-flash": (4096, 2048, 256, 6, 1.5, 10.0),
    "dsv4-pro": (7168, 3072, 384, 6, 2.5, 10.0),
}
GPTOSS_PRESETS = {  # hidden, intermediate, routed experts, top-k, swiglu limit, alpha
    "gpt-oss-20b": (2880, 2880, 32, 4, 7.0, 1.702),
    "gpt-oss-120b": (2880, 2880, 128, 4, 7.0, 1.702),
}


def permutation(ids, E):
    """Pairs sorted by expert: the token of each, the expert of each, the grouped GEMM offsets."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, device=ids.device, dtype=torch.int32).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, order // ids.shape[1], flat[order], torch.cumsum(counts, 0, dtype=torch.int32)


def routed_weights(E, H, I, dev, g):
    """The router (fp32 weight and bias) and the experts' W13 and W2 in bf16, as the [E, K, N]
    views of [E, N, K] tensors that torch._grouped_mm takes."""
    bf = torch.bfloat16
    gate_w = torch.randn(E, H, device=dev, generator=g) * H ** -0.5
    gate_b = torch.randn(E, device=dev, generator=g) * 0.1
    w13t = torch.randn(E, 2 * I, H, device=dev, generator=g, dtype=bf) * H ** -0.5
    w2t = torch.randn(E, H, I, device=dev, generator=g, dtype=bf) * I ** -0.5
    return gate_w, gate_b, w13t.transpose(1, 2), w2t.transpose(1, 2)


class TorchMoE:
    def __init__(self, preset, dev, seed=1234):
        H, I, E, k, scale, limit = PRESETS[preset]
        g = torch.Generator(device=dev).manual_seed(seed)
        bf = torch.bfloat16
        self.H, self.I, self.E, self.k, self.scale, self.limit = H, I, E, k, scale, limit
        self.gate_w, self.gate_b, self.w13t, self.w2t = routed_weights(E, H, I, dev, g)
        self.sw13 = torch.randn(2 * I, H, device=dev, generator=g, dtype=bf) * H ** -0.5
        self.sw2 = torch.randn(H, I, device=dev, generator=g, dtype=bf) * I ** -0.5

    def swiglu(self, h):
        I, L = h.shape[1] // 2, self.limit
        gate = h[:, :I].float().clamp(max=L)
        up = h[:, I:].float().clamp(-L, L)
        return (F.silu(gate) * up).to(torch.bfloat16)

    def __call__(self, x):
        """x [T, H] fp32 on the GPU -> [T, H] fp32."""
        T, k, E = x.shape[0], self.k, self.E
        logits = x @ self.gate_w.t()
        scores = torch.sqrt(F.softplus(logits))
        ids = torch.topk(scores + self.gate_b, k, dim=-1).indices
        w = scores.gather(1, ids)
        w = w / w.sum(-1, keepdim=True) * self.scale
        order, token_of, _, offs = permutation(ids, E)
        xb = x.to(torch.bfloat16)
        h = torch._grouped_mm(xb[token_of], self.w13t, offs=offs)
        y = torch._grouped_mm(self.swiglu(h), self.w2t, offs=offs)
        y = y.float() * w.reshape(-1)[order].unsqueeze(1)
        out = torch.zeros(T, self.H, device=x.device, dtype=torch.float32)
        out.index_add_(0, token_of, y)
        shared = self.swiglu(xb @ self.sw13.t()) @ self.sw2.t()
        return out + shared.float()


class TorchGptOss:
    def __init__(self, preset, dev, seed=1234):
        H, I, E, k, limit, alpha = GPTOSS_PRESETS[preset]
        g = torch.Generator(device=dev).manual_seed(seed)
        bf = torch.bfloat16
        self.H, self.I, self.E, self.k, self.limit, self.alpha = H, I, E, k, limit, alpha
        # W13's 2I rows interleave gate and up
        self.gate_w, self.gate_b, self.w13t, self.w2t = routed_weights(E, H, I, dev, g)
        self.b13 = torch.randn(E, 2 * I, device=dev, generator=g, dtype=bf) * 0.5
        self.b2 = torch.randn(E, H, device=dev, generator=g, dtype=bf) * 0.05

    def swiglu(self, h):
        L = self.limit
        gate = h[:, ::2].float().clamp(max=L)
        up = h[:, 1::2].float().clamp(-L, L)
        return ((up + 1) * gate * torch.sigmoid(self.alpha * gate)).to(torch.bfloat16)

    def __call__(self, x):
        """x [T, H] fp32 on the GPU -> [T, H] fp32."""
        T = x.shape[0]
        logits = torch.addmm(self.gate_b, x, self.gate_w.t())
        top, ids = torch.topk(logits, self.k, dim=-1)
        w = torch.softmax(top, dim=-1)
        order, token_of, expert_of, offs = permutation(ids, self.E)
        xb = x.to(torch.bfloat16)
        h = torch._grouped_mm(xb[token_of], self.w13t, offs=offs) + self.b13[expert_of]
        y = torch._grouped_mm(self.swiglu(h), self.w2t, offs=offs) + self.b2[expert_of]
        y = y.float() * w.reshape(-1)[order].unsqueeze(1)
        out = torch.zeros(T, self.H, device=x.device, dtype=torch.float32)
        out.index_add_(0, token_of, y)
        return out


def events_median_ms(fn, reps):
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def time_layer(layer, T, reps, dev):
    xs = [torch.randn(T, layer.H, device=dev) for _ in range(2)]  # alternate: not L2-resident
    it = iter(range(1 << 30))
    eager = lambda: layer(xs[next(it) % 2])
    for _ in range(3):
        eager()
    torch.cuda.synchronize()
    rec = {"tokens": T, "eager_ms": events_median_ms(eager, reps)}
    try:
        static_x = xs[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(static_x)

        def replay():
            static_x.copy_(xs[next(it) % 2])
            graph.replay()
        for _ in range(3):
            replay()
        rec["graph_ms"] = events_median_ms(replay, reps)
        del graph
    except Exception as err:  # a capture this torch build refuses: eager is the anchor
        rec["graph_error"] = str(err).splitlines()[0][:200]
    rec["best_ms"] = min(v for key, v in rec.items() if key in ("eager_ms", "graph_ms"))
    return rec


def time_chain(layer, T, n_layers, reps, dev):
    x_host = torch.randn(T, layer.H).to(torch.bfloat16)  # a batch job's input rows, bf16

    def job():
        x = x_host.to(dev).float()
        for _ in range(n_layers):
            x = layer(x)
        return x.to(torch.bfloat16).cpu()
    for _ in range(2):
        job()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        job()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    ms = times[len(times) // 2]
    return {"tokens": T, "layers": n_layers, "forward_ms": ms, "tokens_per_s": T / (ms * 1e-3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="dsv4-flash", choices=sorted(PRESETS) + sorted(GPTOSS_PRESETS))
    ap.add_argument("--tokens", default="128,512,4096,16384")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--chain", type=int, default=0, help="time N chained layers, host to host")
    ap.add_argument("--json", default="torch_layer.json")
    ap.add_argument("--copy-only", action="store_true",
                    help="measure the device-to-device copy bandwidth (read + write) only")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.copy_only:
        src = torch.randn(1 << 29, device=dev)  # 2 GiB of fp32
        dst = torch.empty_like(src)
        ms = events_median_ms(lambda: dst.copy_(src), 20)
        gbs = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
        print(f"copy: {gbs:.0f} GB/s (read + write), {torch.cuda.get_device_name(0)}")
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                       "copy_gbs": gbs}, f)
        return
    layer = (TorchGptOss if args.preset in GPTOSS_PRESETS else TorchMoE)(args.preset, dev)
    records = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, {args.preset}", flush=True)
    for T in (int(t) for t in args.tokens.split(",")):
        if args.chain:
            rec = time_chain(layer, T, args.chain, max(3, args.reps // 4), dev)
            print(f"{args.preset} chain of {args.chain} layers, {T} tokens: "
                  f"{rec['forward_ms']:.2f} ms, {rec['tokens_per_s']:.0f} tokens/s", flush=True)
        else:
            rec = time_layer(layer, T, args.reps, dev)
            print(f"{args.preset} {T:6d} tokens: eager {rec['eager_ms']:.3f} ms, graph "
                  f"{rec.get('graph_ms', float('nan')):.3f} ms"
                  + (f" (capture failed: {rec['graph_error']})" if "graph_error" in rec else ""),
                  flush=True)
        rec["preset"] = args.preset
        records.append(rec)
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                   "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
