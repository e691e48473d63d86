"""Benchmark: ``MixtureOfFactorAnalyzers.log_prob`` against the same distribution built from
``torch.distributions`` (``MixtureSameFamily`` of ``LowRankMultivariateNormal``), measured in
the same run on the same data. Both use Woodbury identities; the peer broadcasts every row
against every component (an ``[N, K, D]`` intermediate), ours uses matrix products. Also
timed: the Woodbury form alone (``exact=False``, what the trainers' passes use), without the
residual form that recomputes each row's near-top entries; both against a float64 copy.

    python benchmarks/bench_log_prob.py            # N=2000, D=784, K=50, L=6 on the CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from mfa import MixtureOfFactorAnalyzers, linalg
from mfa.cli_types import non_negative_int, positive_int

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from _provenance import commit  # noqa: E402  (the checkout's commit, for the JSON)


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


def _exactness(model, x, device, repeats: int) -> dict:
    """Seconds and largest error against a float64 copy of ``log p`` with the residual form
    (the default) and without it (``exact=False``), both without the input checks."""
    reference = copy.deepcopy(model).double()

    def unchecked(exact):
        return linalg.logsumexp(model._component_log_prob(x, exact=exact))

    with torch.no_grad():
        exact = reference.log_prob(x.double())
        return {
            "exact_seconds": _time(lambda: unchecked(True), device, repeats),
            "woodbury_only_seconds": _time(lambda: unchecked(False), device, repeats),
            "max_abs_error_vs_float64": (unchecked(True).double() - exact).abs().max().item(),
            "woodbury_only_max_abs_error_vs_float64":
                (unchecked(False).double() - exact).abs().max().item(),
        }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=positive_int, default=2000)
    parser.add_argument("-d", type=positive_int, default=784)
    parser.add_argument("-k", type=positive_int, default=50)
    parser.add_argument("-l", type=non_negative_int, default=6)
    parser.add_argument("--repeats", type=positive_int, default=5)
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
    result = {"commit": commit(), "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "torch_threads": torch.get_num_threads(), "n": args.n, "d": args.d,
              "k": args.k, "l": args.l, "device": str(device),
              "mfa_seconds": ours_s, "torch_distributions_seconds": peer_s,
              "speedup": peer_s / ours_s, "max_abs_difference": diff}
    print(f"log_prob of {args.n}x{args.d}, K={args.k}, L={args.l} on {device}: mfa "
          f"{ours_s * 1e3:.1f} ms, torch.distributions {peer_s * 1e3:.1f} ms "
          f"(speed-up {peer_s / ours_s:.1f}x); max |difference| {diff:.2e} nats")
    # The residual form's cost and accuracy: on these rows (no component explains any
    # sharply), on rows drawn from a sharp model (noise at the quantisation level) and from
    # one whose first 5 components each have one noise variance at 1e-9.
    sharp = copy.deepcopy(model).cpu()  # sampled with a CPU generator, then moved
    with torch.no_grad():
        sharp.set_parameters(factor_loadings=0.1 * sharp.factor_loadings / 3.0,
                             noise_variance=torch.full_like(sharp.noise_variance, 1.3e-6))
        sharp_x = sharp.sample(args.n, generator=torch.Generator().manual_seed(1))[0]
        # Heywood components: one noise variance far below its loadings' (ill-conditioned
        # capacitances, which the exact form computes in float64).
        p = {name: getattr(sharp, name).clone() for name in
             ("weights", "means", "factor_loadings", "noise_variance")}
        p["noise_variance"][:5, 3] = 1e-9
        p["factor_loadings"][:5, 3] *= 30.0
        heywood = MixtureOfFactorAnalyzers.from_parameters(**p)
        heywood_x = heywood.sample(args.n, generator=torch.Generator().manual_seed(2))[0]
    sharp, heywood = sharp.to(device), heywood.to(device)
    for name, m, rows in (("random rows", model, x), ("sharp model", sharp, sharp_x),
                          ("Heywood components", heywood, heywood_x)):
        result[name] = _exactness(m, rows.to(device), device, args.repeats)
        r = result[name]
        print(f"  {name}: without the checks {r['exact_seconds'] * 1e3:.1f} ms; the Woodbury "
              f"form alone (exact=False) {r['woodbury_only_seconds'] * 1e3:.1f} ms (the "
              f"residual form costs {r['exact_seconds'] / r['woodbury_only_seconds'] - 1:+.0%});"
              f" max |error| against float64 {r['max_abs_error_vs_float64']:.2g} nats "
              f"(Woodbury alone {r['woodbury_only_max_abs_error_vs_float64']:.2g})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
