"""Benchmark: ``MixtureOfFactorAnalyzers.log_prob`` against the same distribution built from
``torch.distributions`` (``MixtureSameFamily`` of ``LowRankMultivariateNormal``), measured in
the same run on the same data. Both use Woodbury identities; the peer broadcasts every row
against every component (an ``[N, K, D]`` intermediate), ours uses matrix products.

    python benchmarks/bench_log_prob.py            # N=2000, D=784, K=50, L=6 on the CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mfa import MixtureOfFactorAnalyzers


def _time(fn, device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("-d", type=int, default=784)
    parser.add_argument("-k", type=int, default=50)
    parser.add_argument("-l", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    model = MixtureOfFactorAnalyzers(args.k, args.d, args.l, generator=gen).to(device)
    with torch.no_grad():
        model.loc.copy_(torch.rand(args.k, args.d, generator=gen))
        model.loadings.mul_(3.0)
    x = torch.rand(args.n, args.d, generator=gen).to(device)
    peer = model.to_distribution()
    with torch.no_grad():
        ours_s = _time(lambda: model.log_prob(x), device, args.repeats)
        peer_s = _time(lambda: peer.log_prob(x), device, args.repeats)
        diff = (model.log_prob(x) - peer.log_prob(x)).abs().max().item()
    result = {"n": args.n, "d": args.d, "k": args.k, "l": args.l, "device": str(device),
              "mfa_seconds": ours_s, "torch_distributions_seconds": peer_s,
              "speedup": peer_s / ours_s, "max_abs_difference": diff}
    print(f"log_prob of {args.n}x{args.d}, K={args.k}, L={args.l} on {device}: mfa "
          f"{ours_s * 1e3:.1f} ms, torch.distributions {peer_s * 1e3:.1f} ms "
          f"(speed-up {peer_s / ours_s:.1f}x); max |difference| {diff:.2e} nats")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
