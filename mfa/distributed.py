"""Data-parallel training on :mod:`torch.distributed`: sharding without padding, one
all-reduce per EM iteration or Adam step, and the rank-0 conventions.

EM's sufficient statistics are sums over rows, so when each of ``W`` processes streams its
own shard and the ``W`` partial sums are added (one all-reduce of one flat float64 buffer per
iteration), every process takes exactly the single-process M-step, up to the order of the
float64 additions. Adam is made equal to single-process Adam on the same *global* minibatches:
every rank draws the same shuffled order from the same seeded generator, takes its contiguous
part of each global batch, back-propagates the *sum* of its rows' ``−log p`` and one
all-reduce adds the gradients (with the loss and the row count) before dividing by the global
batch size. (``DistributedDataParallel`` averages per-rank means, which differs whenever the
parts are unequal, e.g. the last batch.)

No row counts twice and none is dropped: ``DistributedSampler`` pads its shards by repeating
rows, which would bias the sums, so :class:`ShardSampler` and :class:`ShardBatchSampler`
split without padding (a shard may be one row shorter, or empty).

Every helper is a no-op (or the identity) when no process group is initialised or the world
has one process, so single-process behaviour is unchanged. Collectives that fail — another
rank crashed, or the process group's ``timeout`` passed — raise :class:`DistributedError`
naming the operation and this rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import fields
from datetime import timedelta

import torch
from torch import Tensor
from torch import distributed as dist
from torch.utils.data import Sampler

from mfa.statistics import SufficientStatistics, accumulate_statistics

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedError",
    "ShardBatchSampler",
    "ShardSampler",
    "all_reduce_statistics",
    "backward_mean",
    "broadcast_from_main",
    "broadcast_model",
    "check_same_dataset",
    "concat_rows",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_active",
    "is_initialized",
    "is_main_process",
    "launched_by_torchrun",
    "main_process_only",
    "range_across_processes",
    "shard_batch",
    "shard_range",
    "shutdown",
    "sum_across_processes",
]

logger = logging.getLogger(__name__)

#: Collective timeout when ``MFA_DIST_TIMEOUT`` (seconds) is not set: a rank that waits
#: longer for the others (one crashed or hangs) fails with :class:`DistributedError`.
DEFAULT_TIMEOUT = timedelta(minutes=10)

#: The largest ``MFA_DIST_TIMEOUT`` a ``timedelta`` holds (seconds).
MAX_TIMEOUT_S = timedelta.max.total_seconds()


class DistributedError(RuntimeError):
    """A collective operation failed: another process crashed or the timeout passed."""


# ---------------------------------------------------------------------- who am I


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_active() -> bool:
    """Whether training is data-parallel: a process group of more than one process."""
    return get_world_size() > 1


def is_main_process() -> bool:
    """Whether this process writes files and logs (rank 0, or no process group)."""
    return get_rank() == 0


def main_process_only(fn: Callable | None) -> Callable | None:
    """``fn`` on the main process, ``None`` elsewhere (for a trainer's ``checkpoint_fn``)."""
    return fn if is_main_process() else None


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process launch (``torchrun`` sets ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _timeout() -> timedelta:
    text = os.environ.get("MFA_DIST_TIMEOUT")
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"MFA_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"MFA_DIST_TIMEOUT must be positive, got {text!r}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:  # inf, 1e20: beyond what a timedelta (and the process group) holds
        raise ValueError(f"MFA_DIST_TIMEOUT must be a finite number of seconds below "
                         f"{MAX_TIMEOUT_S:.0f} (about 10,000 years), got {text!r}") from None


def init_from_env(timeout: timedelta | None = None, device: str | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment.

    NCCL when CUDA is available and ``device`` (the run's setting; ``None``/``"auto"``: any)
    is not a CPU one (each process then uses ``cuda:LOCAL_RANK``), gloo otherwise: a CPU run
    on a machine with fewer GPUs than processes failed in ``set_device``.
    ``timeout`` (default ``MFA_DIST_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT`) bounds
    every collective, so no rank waits forever for one that crashed.

    Returns:
        Whether this call created the process group (``False`` without a multi-process
        environment, or when one exists already).
    """
    if not launched_by_torchrun() or is_initialized():
        return False
    timeout = timeout or _timeout()
    on_cpu = device not in (None, "auto") and not str(device).startswith("cuda")
    if torch.cuda.is_available() and not on_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timeout)
    logger.info("process group: %s, rank %d of %d, timeout %s", backend, get_rank(),
                get_world_size(), timeout)
    return True


def shutdown() -> None:
    """Destroy the default process group (if any); errors of a broken group are logged."""
    if not is_initialized():
        return
    try:
        dist.destroy_process_group()
    except (RuntimeError, ValueError) as error:
        logger.warning("destroying the process group failed: %s", error)


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed collective into a :class:`DistributedError` that says what happened."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as error:
        if isinstance(error, DistributedError):
            raise
        raise DistributedError(
            f"rank {get_rank()} of {get_world_size()}: {what} failed; another process has "
            f"probably crashed (see its error) or stopped answering within the process "
            f"group's timeout: {type(error).__name__}: {str(error).strip()[:400]}"
        ) from error


def _comm_device(like: Tensor | None = None) -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if like is None else like.device


# ---------------------------------------------------------------------- sharding


def shard_range(n: int, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The contiguous rows ``[start, end)`` of ``n`` that ``rank`` owns: the ranks' ranges
    tile ``[0, n)`` exactly (sizes differ by at most one; a range may be empty)."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    return n * rank // world, n * (rank + 1) // world


def shard_batch(indices: Tensor) -> Tensor:
    """This rank's contiguous part of a global batch of row indices ``[B]``."""
    start, end = shard_range(indices.shape[0])
    return indices[start:end]


class ShardSampler(Sampler[int]):
    """The indices ``[start, end)`` of :func:`shard_range`, in order: no padding, no row
    twice (unlike ``DistributedSampler``, which repeats rows to even the shards out).
    ``n``: the number of rows, or the dataset itself (``len(n)`` rows), as
    ``DistributedSampler(dataset)`` takes it."""

    def __init__(self, n, rank: int | None = None, world: int | None = None) -> None:
        if not isinstance(n, int) or isinstance(n, bool):
            if not hasattr(n, "__len__"):
                raise TypeError(f"ShardSampler takes a number of rows or a sized dataset, got "
                                f"{type(n).__name__}")
            n = len(n)
        self.start, self.end = shard_range(n, rank, world)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


class ShardBatchSampler(Sampler[list[int]]):
    """This rank's contiguous part of each batch of ``batch_sampler`` (the global batches).

    Every rank iterates the same global batches (the inner sampler's generator must advance
    identically on every rank, as a seeded one does), so the ranks' parts of batch ``i`` make
    up exactly the single-process batch ``i``; parts may be empty. ``set_epoch`` is passed on
    to an inner sampler that has one.
    """

    def __init__(self, batch_sampler, rank: int | None = None, world: int | None = None):
        self.batch_sampler = batch_sampler
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world is None else world

    def set_epoch(self, epoch: int) -> None:
        inner = getattr(self.batch_sampler, "sampler", self.batch_sampler)
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            start, end = shard_range(len(batch), self.rank, self.world)
            yield list(batch[start:end])

    def __len__(self) -> int:
        return len(self.batch_sampler)


# ---------------------------------------------------------------------- collectives


def all_reduce_statistics(stats: SufficientStatistics | None, model,
                          reference: Tensor) -> SufficientStatistics:
    """The sum over every process of each one's :class:`SufficientStatistics`, by ONE
    all-reduce of one flat float64 buffer (``reference``, equal on every rank, is kept).

    Args:
        stats: this rank's sums, or ``None`` for a rank that had no rows.
        model: for a rank without rows, its statistics over no rows (every field's shape).
        reference: ``c`` ``[D]`` of the pass.
    """
    if not is_active():
        return stats
    if stats is None:  # the sums over no rows, with every field's shape
        with torch.no_grad():
            empty = model.means.detach().new_zeros(0, model.n_features)  # [0, D]
            stats = accumulate_statistics(model, empty, model.component_terms(),
                                          stats_dtype=torch.float64)
    names = [f.name for f in fields(stats)
             if f.name != "reference" and isinstance(getattr(stats, f.name), Tensor)]
    parts = {name: getattr(stats, name).to(torch.float64) for name in names}
    device = next(iter(parts.values())).device
    flat = torch.cat([parts[name].reshape(-1) for name in names]).to(_comm_device(parts["mass"]))
    with _collective("the all-reduce of the EM statistics"):
        dist.all_reduce(flat)
    flat = flat.to(device)
    out, offset = {f.name: getattr(stats, f.name) for f in fields(stats)}, 0
    for name in names:
        size = parts[name].numel()
        out[name] = flat[offset:offset + size].view(parts[name].shape)
        offset += size
    if out["n_rows"].item() == 0:
        raise ValueError(f"the data is empty on all {get_world_size()} processes")
    out["reference"] = reference.to(torch.float64)
    return type(stats)(**out)


def sum_across_processes(*values: float | Tensor) -> list[float]:
    """Each value summed over every process (float64; one all-reduce); unchanged without a
    process group."""
    if not is_active():
        return [float(v) for v in values]
    flat = torch.tensor([float(v) for v in values], dtype=torch.float64,
                        device=_comm_device())
    with _collective("the all-reduce of a sum"):
        dist.all_reduce(flat)
    return flat.cpu().tolist()


def range_across_processes(value: float) -> tuple[float, float]:
    """``(smallest, largest)`` of ``value`` over every process (one all-reduce);
    ``(value, value)`` without a process group."""
    if not is_active():
        return float(value), float(value)
    flat = torch.tensor([float(value), -float(value)], dtype=torch.float64,
                        device=_comm_device())
    with _collective("the all-reduce of a maximum"):
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    high, low = flat.cpu().tolist()
    return -low, high


def check_same_rows(rows, name: str) -> None:
    """Refuse a tensor of rows (or ``QuantizedRows``) that is not the same on every process:
    the trainers split one tensor into the processes' shards, so a tensor of each process's
    own rows had half of every process's rows dropped, silently. The comparison is of a
    fingerprint (the row count and three rows' sums), one all-reduce; nothing without a
    process group."""
    if not is_active() or rows is None:
        return
    n = int(rows.shape[0])
    picks = sorted({0, n // 2, n - 1}) if n else []
    _check_fingerprint(n, [rows[i : i + 1] for i in picks], name,
                       "pass every process the same tensor (each trains on its own shard of "
                       "it), or per-process loaders (mfa.distributed.ShardSampler) of one "
                       "Dataset")


def check_same_dataset(dataset, name: str) -> None:
    """Refuse a DataLoader's map-style ``dataset`` that is not the same on every process, as
    :func:`check_same_rows` does a tensor: a loader over the whole Dataset is re-made over
    each process's shard, so loaders over each process's own rows (not through a
    ``ShardSampler``) dropped half of every process's rows, silently (270 of 540 read)."""
    if not is_active():
        return
    n = len(dataset)
    picks = sorted({0, n // 2, n - 1}) if n else []
    rows = [_row_tensor(dataset[i]) for i in picks]
    # Items that are no tensors (dicts, images for a collate_fn) or that differ between two
    # reads (noise or a random augmentation per access): the count alone is compared, on
    # every process if on one (else one process's sums met another's zeros).
    if any(row is None or not _same(row, _row_tensor(dataset[i]))
           for row, i in zip(rows, picks, strict=True)):
        rows = None
    _check_fingerprint(n, rows, name,
                       "pass every process a DataLoader over the same Dataset (each reads its "
                       "shard of it), or loaders over each process's rows whose sampler is "
                       "mfa.distributed.ShardSampler")


def _row_tensor(item) -> Tensor | None:
    """A Dataset item's row as a tensor (the first of a tuple), or ``None``."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    try:
        return torch.as_tensor(item)
    except (TypeError, RuntimeError, ValueError):
        return None


def _same(a: Tensor, b: Tensor | None) -> bool:
    """Equal, NaN where the other is NaN (a row with missing entries read twice is the same
    row: taken for noise per read, it let per-process datasets that differ through)."""
    if b is None or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_complex():  # (each part on its own: nan+1j is not nan+5j)
        a, b = torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj())
    if a.is_floating_point():
        nan = a.isnan()
        return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]))
    return bool(torch.equal(a, b))


def _check_fingerprint(n: int, rows: list[Tensor] | None, name: str, advice: str) -> None:
    """One all-reduce comparing ``n`` and the sums of up to three ``rows`` across the
    processes (a fixed length: processes with 1, 2 or 3 rows take part alike); ``None``
    rows: not comparable on this process, so ``n`` alone is compared on every process."""
    sums = [float(row.double().nan_to_num(0.0).sum()) for row in rows or []]
    sums += [0.0] * (3 - len(sums))
    skip = float(rows is None)
    values = torch.tensor([skip, n, *sums, -n, *(-v for v in sums)], dtype=torch.float64,
                          device=_comm_device())
    with _collective(f"the check that every process has the same {name}"):
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    width = 1 if values[0] > 0 else 4  # the count alone where any process could not compare
    high, low = values[1:1 + width], -values[5:5 + width]
    if not bool(torch.equal(high, low)):
        raise ValueError(f"{name} differs between the processes ({int(low[0])} to "
                         f"{int(high[0])} rows, or other values): {advice}")


def backward_mean(values: Tensor, parameters) -> tuple[Tensor, int]:
    """Back-propagate ``values.mean()`` over the *global* minibatch.

    Alone: ``values.mean().backward()``. Data-parallel: this rank back-propagates its
    ``values.sum()``, one all-reduce adds the gradients, the sum and the row count, and every
    gradient is divided by the global row count: the single-process gradient of the mean.

    Args:
        values: ``[B_r]`` per-row losses of this rank's part of the batch (may be empty).
        parameters: the parameters to receive gradients (their ``.grad`` must be cleared).

    Returns:
        ``(mean over the global batch, detached, global row count)``.
    """
    if not is_active():
        loss = values.mean()
        loss.backward()
        return loss.detach(), values.shape[0]
    params = [p for p in parameters if p.requires_grad]
    total = values.sum()
    total.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = _comm_device(total)
    flat = torch.cat([g.reshape(-1).to(device) for g in grads]
                     + [total.detach().reshape(1).to(device, grads[0].dtype),
                        torch.tensor([float(values.shape[0])], dtype=grads[0].dtype,
                                     device=device)])
    with _collective("the all-reduce of the Adam gradients"):
        dist.all_reduce(flat)
    rows = int(round(flat[-1].item()))
    flat = flat / max(rows, 1)
    offset = 0
    for p in params:
        size = p.numel()
        p.grad = flat[offset:offset + size].view_as(p).to(p.device).clone()
        offset += size
    return flat[-2].to(total.device), rows


def broadcast_model(model: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every process's ``model`` (in place)."""
    if not is_active():
        return
    with torch.no_grad(), _collective("the broadcast of the model"):
        for value in model.state_dict().values():
            buffer = value.to(_comm_device(value))
            dist.broadcast(buffer, src=0)
            value.copy_(buffer)


def broadcast_from_main(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0, its result sent to every process (picklable). An
    exception on rank 0 is raised on every rank (as ``DistributedError`` elsewhere), so none
    waits for a result that will not come."""
    if not is_active():
        return fn(*args, **kwargs)
    box: list = [None]
    error = None
    if is_main_process():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Exception as exc:  # sent on, then raised here below
            error = exc
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
    with _collective(f"the broadcast of {getattr(fn, '__name__', 'a result')}"):
        dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise DistributedError(f"rank 0 failed: {value}")
    return value


def concat_rows(local: Tensor, max_rows: int) -> Tensor:
    """The first ``max_rows`` of every rank's ``local`` rows ``[n_r, D]`` concatenated in rank
    order, on every rank (one broadcast per rank that still contributes)."""
    if not is_active():
        return local[:max_rows]
    counts = torch.zeros(get_world_size(), dtype=torch.float64, device=_comm_device(local))
    counts[get_rank()] = local.shape[0]
    with _collective("the exchange of initialisation rows"):
        dist.all_reduce(counts)
        parts, have = [], 0
        for rank, count in enumerate(int(c) for c in counts.tolist()):
            if have >= max_rows:
                break
            take = min(count, max_rows - have)
            if take == 0:
                continue
            buffer = (local[:take] if rank == get_rank() else local.new_empty(
                (take, local.shape[1]))).to(_comm_device(local)).contiguous()
            dist.broadcast(buffer, src=rank)
            parts.append(buffer.to(local.device))
            have += take
    return torch.cat(parts) if parts else local[:0]
