"""Where the time of one CelebA-shaped step goes: the top kernels (torch.profiler) of one
EM E-step batch in a chosen ``stats_dtype`` and of one Adam step, on synthetic data of
:mod:`bench_gpu`'s shape. A tool for finding what costs more than the matrix products; the
figures themselves belong to ``bench_gpu.py``.

    python benchmarks/profile_gpu.py --device cuda --modes centred float64
    python benchmarks/profile_gpu.py --quick --device cpu     # tiny sizes: a smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import DequantisedStream, make_pixels, start_model  # noqa: E402

from mfa._data_stream import DataSource  # noqa: E402
from mfa.em import EMTrainer  # noqa: E402
from mfa.linalg import logsumexp  # noqa: E402


def table(prof, device: torch.device, rows: int) -> str:
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", nargs="+", default=["centred", "float64"])
    p.add_argument("--rows", type=int, default=12, help="kernels listed per table")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu)")
    n, d, k, lat, batch, adam_batch = ((1024, 192, 8, 3, 512, 256) if args.quick
                                       else (8192, 12288, 300, 10, 4096, 1024))
    pixels = make_pixels(n, d, device, seed=0)
    model = start_model(pixels, k, lat, seed=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    x = next(iter(DequantisedStream(pixels, batch, seed=0)))
    for mode in args.modes:
        EMTrainer.e_step(model, DataSource(x, model, batch), mode)  # warm-up
        with profile(activities=activities) as prof:
            EMTrainer.e_step(model, DataSource(x, model, batch), mode)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        print(f"\n== E-step, one batch of {batch} rows, stats_dtype={mode}")
        print(table(prof, device, args.rows))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xa = x[:adam_batch]

    def adam_step():
        optimizer.zero_grad(set_to_none=True)
        loss = -logsumexp(model._component_log_prob(xa)).mean()
        loss.backward()
        optimizer.step()

    adam_step()  # warm-up
    with profile(activities=activities) as prof:
        adam_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    print(f"\n== Adam, one step of {adam_batch} rows")
    print(table(prof, device, args.rows))


if __name__ == "__main__":
    main(sys.argv[1:])
