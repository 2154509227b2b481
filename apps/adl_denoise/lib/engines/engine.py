"""The training engine both trainers (:mod:`lib.engines.adl_training`, :mod:`lib.engines.gcn_training`) run on:
process group and device, seeds and RNG state, checkpoints, the data stream, validation and the step bookkeeping
around a trainer's own optimisation step (:class:`TrainingLoop`).

Data: the batches are addressed by global sample id. Under ``torchrun`` rank r of W takes the ids
``(step * W + r) * B ... + B - 1`` of step ``step`` (B the per-process batch size), so a run resumes exactly from
its step count alone (:func:`dataset_batches`).

Distributed runs (``WORLD_SIZE > 1``): the process group is initialised here (NCCL on CUDA, Gloo on CPU) with
:data:`COLLECTIVE_TIMEOUT` (or :data:`COLLECTIVE_TIMEOUT_ENV` seconds), so that a rank left waiting in a collective
raises instead of waiting forever. Every rank enters the same collectives in the same order: the DDP wrappers' own
(construction, forward buffer broadcast, backward all-reduce, all on tensors DDP allocates itself), validation's
(:func:`validate`: rank 0's batch-norm statistics to every rank, then the sums of the shares) and the final barrier
of :meth:`TrainingLoop.finish`. Validation is shared out over the ranks, slice batches of a 2D network and whole
images of a 3D one, so that no rank waits for a whole validation in its next collective (one longer than the
timeout killed the job). Rank 0 alone logs and writes checkpoints; that work holds no collective, the other ranks
wait for it in their next one. Work that every replica needs (e.g. ADL's batch-norm recalibration) is done by every
rank on the same data rather than on rank 0 and then broadcast: a tensor that Python also holds, handed to a Gloo
collective, is released by one of Gloo's worker threads, which needs the GIL for it; when that happens as the
process group is torn down (the main thread joins those threads while holding the GIL) the rank deadlocks after
its last step, with its peers already gone. The works of DDP's own all-reduces carry a Python object too (the
thread-local state of the backward that made them), and Gloo's thread may release one after the last step (the
final barrier's work keeps the works in flight when it was made), so the group is taken down through its Python
handle (:func:`distributed_run`), which releases the GIL while it waits for Gloo's threads (validation's tensors
are released the same way). A DDP
wrapper's C++ reducer holds the group as well: a wrapper still alive when :func:`distributed_run` destroyed the
group took it down with the GIL held as the trainer's frame was cleared (a rank of a torchrun job on a loaded
machine hung after its last step). The trainers drop their wrappers (:func:`data_parallel`) before leaving
:func:`distributed_run`, which refuses to go on with one alive.
:func:`distributed_run` takes the process group down only after a run that ended normally on this rank: after an
error a peer may still be inside a collective, and tearing down under it can block (the launcher stops the other
ranks when one fails).
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import math
import os
import random
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..data import ValidationPair
from ..runtime.atomic import atomic_torch_save
from ..weights.format import plain_json, scaling_rule_for

__all__ = [
    "COLLECTIVE_TIMEOUT",
    "COLLECTIVE_TIMEOUT_ENV",
    "DistributedContext",
    "EngineConfig",
    "TrainingLoop",
    "as_validation_pairs",
    "collective_timeout",
    "data_parallel",
    "dataset_batches",
    "distributed_run",
    "load_checkpoint",
    "optimiser_step",
    "resume_progress",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "setup_distributed",
    "step_seconds_total",
    "validate",
    "validation_shares",
]

log = logging.getLogger(__name__)

#: How long a rank waits in a collective (for a slower rank, or for rank 0's checkpoints) before
#: the collective raises.
COLLECTIVE_TIMEOUT = _dt.timedelta(minutes=30)
#: Environment variable: that wait in seconds instead (a rank's checkpoint on slow storage, or a 3D network's largest
#: validation volume, may take longer).
COLLECTIVE_TIMEOUT_ENV = "ADL_COLLECTIVE_TIMEOUT_S"


class EngineConfig(Protocol):
    """What the engine reads from a trainer's configuration (:class:`lib.engines.ADLTrainingConfig`,
    :class:`lib.engines.GCNTrainingConfig`)."""

    device: str
    modality: str
    seed: int
    batch_size: int
    num_workers: int
    amp: bool
    checkpoint_dir: str | None
    checkpoint_every: int
    keep_all_checkpoints: bool
    validation_every: int
    val_roi_size: int | tuple[int, ...] | None

    @property
    def total_steps(self) -> int: ...

    def to_dict(self) -> dict: ...


# ----------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine, and
    whether the process group was initialised by :func:`setup_distributed` (then it is also taken down here)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_distributed(config: EngineConfig, timeout: _dt.timedelta = COLLECTIVE_TIMEOUT
                      ) -> tuple[DistributedContext, torch.device]:
    """The process group (under ``torchrun``: ``WORLD_SIZE > 1``) and this process's device.

    ``config.device``: "auto" (CUDA when available), "cpu", "cuda" or "cuda:1"; under torchrun a CUDA run takes
    the GPU of its ``LOCAL_RANK`` (NCCL), a CPU run uses Gloo. A process group initialised by the caller is used
    as it is.

    Raises:
        ValueError: CUDA was asked for but is not available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} was asked for but no CUDA GPU is available")
    if world <= 1:
        return DistributedContext(), torch.device(want)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    initialised_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
        initialised_here = True
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, initialised_here), device


def collective_timeout() -> _dt.timedelta:
    """How long a rank of a training run waits in a collective: :data:`COLLECTIVE_TIMEOUT_ENV` seconds when set,
    else :data:`COLLECTIVE_TIMEOUT`.

    Raises:
        ValueError: the variable is not a positive number of seconds.
    """
    value = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not value:
        return COLLECTIVE_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return _dt.timedelta(seconds=seconds)


#: The ``DistributedDataParallel`` wrappers :func:`data_parallel` made that are still alive.
_live_wrappers: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@contextmanager
def distributed_run(config: EngineConfig) -> Iterator[tuple[DistributedContext, torch.device]]:
    """:func:`setup_distributed` for the body of a training run, with the collective timeout of
    :func:`collective_timeout`; on leaving it normally, the process group initialised here is destroyed (after an
    error it is left to the process's exit: see the module docstring).

    Raises:
        ValueError: a bad :data:`COLLECTIVE_TIMEOUT_ENV`.
        RuntimeError: on leaving normally, a ``DistributedDataParallel`` wrapper of :func:`data_parallel` is still
            alive: the body must drop its wrappers first (a programming error; see the module docstring).
    """
    context, device = setup_distributed(config, collective_timeout())
    yield context, device
    if context.initialised_here:
        import torch.distributed as dist

        if _live_wrappers:
            gc.collect()  # a wrapper held only by a reference cycle
        if _live_wrappers:
            raise RuntimeError(f"{len(_live_wrappers)} DistributedDataParallel wrapper(s) still alive as the process "
                               "group is destroyed: drop them first, else the last one to go takes the group down "
                               "with the GIL held and can deadlock with Gloo's threads (lib.engines.engine)")
        dist.destroy_process_group()


def data_parallel(module: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` in a distributed run, else ``module`` itself. The caller
    drops the wrapper before leaving :func:`distributed_run` (see the module docstring)."""
    if not context.distributed:
        return module
    ddp_args = {"device_ids": [device.index]} if device.type == "cuda" else {}
    wrapper = nn.parallel.DistributedDataParallel(module, **ddp_args)
    _live_wrappers.add(wrapper)
    return wrapper


# ----------------------------------------------------------------------------------------------- RNG state
def seed_everything(seed: int) -> None:
    """Seed torch, numpy's global generator and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    """The RNG states of torch (and CUDA), numpy's global generator and Python's ``random``, in types that
    ``torch.load(weights_only=True)`` reads back."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (the CUDA states only on as many GPUs as were saved)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, state: dict, fmt: str, version: int) -> Path:
    """Write a training checkpoint atomically: ``state`` (a trainer's keys) tagged with ``format`` = ``fmt`` and
    ``version``."""
    return atomic_torch_save({"format": fmt, "version": int(version), **state}, Path(path))


def resume_progress(checkpoint: dict) -> tuple[int, list[dict], list[dict], float | None]:
    """Where a checkpoint's run stands, for :class:`TrainingLoop`: ``(step, history, validation, best)``; also
    restores the random number generators' state it saved."""
    set_rng_state(checkpoint["rng"])
    return (int(checkpoint["step"]), list(checkpoint.get("history") or []), list(checkpoint.get("validation") or []),
            checkpoint.get("best_psnr"))


def load_checkpoint(path: str | os.PathLike, fmt: str, version: int, what: str | None = None) -> dict:
    """Read a training checkpoint of format ``fmt`` up to ``version`` (a file, or a checkpoint folder holding
    ``last.pt``) onto the CPU; ``path`` is added to it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: another format (the message names the file as ``what``, e.g. "an ADL training checkpoint") or
            a newer version.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} not found")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - cut, empty or not a torch file: one clear message
        raise ValueError(f"{p} cannot be read as a checkpoint ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:160]}): cut short or not a checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise ValueError(f"{p} is not {what or f'a {fmt!r} file'}" + (f" (its format is {found!r})" if found else ""))
    if int(payload.get("version", 0)) > version:
        raise ValueError(f"{p} has checkpoint version {payload.get('version')}; this code reads up to {version}")
    payload["path"] = str(p)
    return payload


# ----------------------------------------------------------------------------------------------- data
def dataset_batches(dataset: Dataset, config: EngineConfig, start: int, total: int, context: DistributedContext,
                    pin_memory: bool) -> Iterator[tuple[int, dict]]:
    """Yield ``(step, batch)`` for steps ``start .. total - 1``, this rank's share of each step's samples.

    Map-style datasets are addressed by global sample id (an ``index_deterministic`` dataset such as
    :class:`lib.data.ADLPatchDataset` directly, others through a seeded permutation per pass), so the stream
    resumes exactly at any step; an ``IterableDataset`` restarts from its beginning. Every rank yields the same
    number of steps.
    """
    B, W, R = int(config.batch_size), context.world, context.rank
    generator = torch.Generator().manual_seed(int(config.seed))  # keeps DataLoader seeding off the global RNG
    if isinstance(dataset, IterableDataset):
        log.warning("an IterableDataset cannot be resumed exactly: it restarts from its beginning")
        loader = DataLoader(dataset, batch_size=B, num_workers=config.num_workers, pin_memory=pin_memory,
                            generator=generator)
        step = start
        while step < total:
            produced = False
            for batch in loader:
                produced = True
                yield step, batch
                step += 1
                if step >= total:
                    return
            if not produced:
                raise ValueError("the training dataset is empty")
        return

    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError("the training dataset is empty")
    direct = bool(getattr(dataset, "index_deterministic", False))

    def sample_index(g: int) -> int:
        if direct:
            return g
        rng = np.random.default_rng([int(config.seed), g // n])  # a fresh permutation per pass
        return int(rng.permutation(n)[g % n])

    steps_per_epoch = max(1, math.ceil(n / (B * W)))
    step = start
    while step < total:
        epoch = step // steps_per_epoch
        stop = min(total, (epoch + 1) * steps_per_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        batches = [[sample_index((s * W + R) * B + j) for j in range(B)] for s in range(step, stop)]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=config.num_workers, pin_memory=pin_memory,
                            generator=generator, persistent_workers=False)
        for batch in loader:
            yield step, batch
            step += 1


# ----------------------------------------------------------------------------------------------- optimisation
def optimiser_step(loss: torch.Tensor, optimiser: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   parameters: Sequence[nn.Parameter] | Iterator[nn.Parameter],
                   grad_clip_norm: float | None = None) -> None:
    """One optimiser step on ``loss``: gradients (scaled by ``scaler``, a no-op when it is disabled), optional
    clipping of their global norm to ``grad_clip_norm`` (None or 0: no clipping), the step and the scaler update."""
    optimiser.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip_norm:
        scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip_norm)
    scaler.step(optimiser)
    scaler.update()


def step_seconds_total(history: Sequence[dict]) -> float:
    """Time spent in training steps over the whole run, resumed parts included (the history is checkpointed);
    ``seconds`` of a result is only its own call's wall time."""
    return float(sum(float(h.get("seconds", 0.0)) for h in history))


# ----------------------------------------------------------------------------------------------- validation
def as_validation_pairs(val_pairs: Sequence | None, modality: str) -> list[ValidationPair]:
    """:class:`lib.data.ValidationPair` objects as given, ``(noisy, clean)`` tuples (modality units) named
    ``val0``, ``val1``, ..."""
    pairs = []
    for k, item in enumerate(val_pairs or []):
        if isinstance(item, ValidationPair):
            pairs.append(item)
        else:
            noisy, clean = item[0], item[1]
            pairs.append(ValidationPair(f"val{k}", np.asarray(noisy, np.float32), np.asarray(clean, np.float32),
                                        modality))
    return pairs


def validation_shares(pairs: Sequence[ValidationPair], spatial_dims: int, batch: int, rank: int, world: int
                      ) -> list[np.ndarray | bool]:
    """What rank ``rank`` of ``world`` validates of each pair: the slice indices (Z) of a volume for a 2D network,
    ``True`` (the whole image: a single slice, or any image of a 3D network) or ``False`` (nothing). The units (the
    batches of ``batch`` slices :func:`lib.predict.denoise_array` takes together, and whole images) go to the ranks
    in turn, over all pairs, so every unit is validated by exactly one rank."""
    shares: list[np.ndarray | bool] = []
    unit = 0
    for pair in pairs:
        if spatial_dims == 2 and np.ndim(pair.noisy) == 3:
            z = int(pair.noisy.shape[0])
            mine = [np.arange(s, min(s + batch, z)) for k, s in enumerate(range(0, z, batch))
                    if (unit + k) % world == rank]
            unit += math.ceil(z / batch)
            shares.append(np.concatenate(mine) if mine else False)
        else:
            shares.append(unit % world == rank)
            unit += 1
    return shares


def validate(network: nn.Module, pairs: Sequence[ValidationPair], config: EngineConfig, device: torch.device,
             step: int, context: DistributedContext | None = None) -> dict:
    """PSNR (dB) of ``network`` on full images through :func:`lib.predict.denoise_array`, in each modality's window
    (:func:`lib.evaluation.window_for`: CT [-160, 240] HU, MR 0 .. the clean image's maximum), pooled over all
    voxels of an image.

    In a distributed ``context`` every rank calls this (a collective): rank 0's buffers (batch-norm statistics,
    which DDP leaves as each rank's last forward set them) are copied to every rank's ``network`` first (the
    parameters are the same on every rank), each rank denoises its share (:func:`validation_shares`) and the
    squared-error sums are added up, so every rank gets what one process gets.

    Returns:
        ``{"step", "psnr", "psnr_noisy", "images": {name: {"psnr", "psnr_noisy", "window"}}}``, the means over
        the images; the network is left in the train / eval mode it was in.
    """
    from ..evaluation import psnr_from_squared_error, squared_error_sum, window_for
    from ..predict import denoise_array, slice_batch_size

    rank, world = (context.rank, context.world) if context is not None and context.distributed else (0, 1)
    if world > 1:
        _broadcast_buffers(network)
    spatial_dims = int(getattr(network, "spatial_dims", 2))
    shares = validation_shares(pairs, spatial_dims, slice_batch_size(device), rank, world)
    was_training = network.training
    sums = np.zeros((len(pairs), 2), np.float64)  # per pair: squared error of the denoised and of the noisy image
    windows = []
    try:
        for k, (pair, share) in enumerate(zip(pairs, shares)):
            window = window_for(pair.modality, pair.clean)
            windows.append(window)
            if share is False:
                continue
            slices = None if share is True else share
            noisy, clean = (pair.noisy, pair.clean) if slices is None else (pair.noisy[slices], pair.clean[slices])
            denoised = denoise_array(network, pair.noisy, pair.modality, device=device, roi_size=config.val_roi_size,
                                     amp=config.amp, slices=slices)
            sums[k] = squared_error_sum(denoised, clean, window), squared_error_sum(noisy, clean, window)
    finally:
        network.train(was_training)
    if world > 1:
        import torch.distributed as dist

        totals = torch.tensor(sums, dtype=torch.float64, device=device)  # torch-owned: no numpy array for Gloo to free
        dist.all_reduce(totals)
        sums = totals.cpu().numpy()
        del totals
    images = {}
    for pair, window, (denoised_sum, noisy_sum) in zip(pairs, windows, sums):
        count = int(np.size(pair.clean))
        images[pair.name] = {"psnr": psnr_from_squared_error(float(denoised_sum), count, window),
                             "psnr_noisy": psnr_from_squared_error(float(noisy_sum), count, window),
                             "window": list(window)}
    mean = lambda key: float(np.mean([v[key] for v in images.values()]))  # noqa: E731
    return {"step": step, "psnr": mean("psnr"), "psnr_noisy": mean("psnr_noisy"), "images": images}


def _broadcast_buffers(network: nn.Module) -> None:
    """Rank 0's buffers of ``network`` copied into every rank's (one broadcast per dtype)."""
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in network.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    with torch.no_grad():
        for buffers in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=0)
            offset = 0
            for b in buffers:
                b.copy_(flat[offset:offset + b.numel()].reshape(b.shape))
                offset += b.numel()
            del flat


# ----------------------------------------------------------------------------------------------- training loop
class TrainingLoop:
    """The bookkeeping both trainers share around their own optimisation step: step count, per-step history and
    log (``train_log.jsonl``), progress bar, validation and checkpoint cadence, the final validation and
    checkpoint, and the final barrier of a distributed run. The trainer keeps what differs: its networks, the step
    itself and what its checkpoints hold (``checkpoint_state``, called with this loop).

    Use as a context manager around the batch loop (it closes the bar, and the log on an error), then call
    :meth:`finish` on every rank.

    Args:
        config: the trainer's configuration.
        context, device: from :func:`setup_distributed`.
        network: the bare (not DDP-wrapped) network that is validated.
        pairs: validation images (:func:`as_validation_pairs`); empty: no validation.
        step, history, validation, best: where the run stands (0, [], [], None; or a checkpoint's).
        checkpoint_state: what the trainer's checkpoints hold beyond :meth:`progress_state`.
        checkpoint_format, checkpoint_version: the tags :func:`save_checkpoint` writes.
        progress: a tqdm bar on rank 0.
        description: the bar's label.
    """

    def __init__(self, config: EngineConfig, context: DistributedContext, device: torch.device, network: nn.Module,
                 pairs: list[ValidationPair], step: int, history: list[dict], validation: list[dict],
                 best: float | None, checkpoint_state: Callable[["TrainingLoop"], dict], checkpoint_format: str,
                 checkpoint_version: int, progress: bool, description: str) -> None:
        self.config, self.context, self.device, self.network, self.pairs = config, context, device, network, pairs
        self.step, self.history, self.validation, self.best = step, history, validation, best
        self.total = config.total_steps
        self.checkpoint_state = checkpoint_state
        self.checkpoint_format, self.checkpoint_version = checkpoint_format, checkpoint_version
        self.ckpt_dir = Path(config.checkpoint_dir).expanduser() if config.checkpoint_dir else None
        self.last_checkpoint: Path | None = None
        self.log_file = None
        if self.ckpt_dir is not None and context.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.log_file = open(self.ckpt_dir / "train_log.jsonl", "a", encoding="utf-8")
        self.bar = None
        if progress and context.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=min(step, self.total), desc=description, unit="step",
                            dynamic_ncols=True)

    def __enter__(self) -> "TrainingLoop":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.bar is not None:
            self.bar.close()
        if error is not None and self.log_file is not None:
            self.log_file.close()

    @property
    def complete(self) -> bool:
        """All of the configuration's steps are done."""
        return self.step >= self.total

    def set_description(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def progress_state(self) -> dict:
        """The checkpoint entries every trainer writes: configuration, step, RNG state, history, validation, best
        PSNR, world size and intensity rule (:func:`resume_progress` reads them back)."""
        return {"config": self.config.to_dict(), "step": self.step, "rng": rng_state(),
                "history": plain_json(self.history), "validation": plain_json(self.validation),
                "best_psnr": self.best, "world_size": self.context.world,
                "scaling_rule": scaling_rule_for(self.config.modality)}

    def write_checkpoint(self) -> Path:
        """Rank 0: ``last.pt`` (and ``step_0000123.pt`` with ``keep_all_checkpoints``)."""
        assert self.ckpt_dir is not None
        state = {**self.progress_state(), **self.checkpoint_state(self)}
        if self.config.keep_all_checkpoints:
            save_checkpoint(self.ckpt_dir / f"step_{self.step:07d}.pt", state, self.checkpoint_format,
                            self.checkpoint_version)
        return save_checkpoint(self.ckpt_dir / "last.pt", state, self.checkpoint_format, self.checkpoint_version)

    def run_validation(self) -> None:
        """Every rank: validate now (each rank its share: :func:`validate`) and record it (rank 0 logs it)."""
        if not self.pairs:
            return
        record = validate(self.network, self.pairs, self.config, self.device, self.step, self.context)
        self.validation.append(record)
        self.best = record["psnr"] if self.best is None else max(self.best, record["psnr"])
        if self.log_file is not None:
            self.log_file.write(json.dumps({"validation": plain_json(record)}) + "\n")
            self.log_file.flush()
        if self.context.main:
            log.info("step %d: validation PSNR %.2f dB (noisy %.2f dB)", self.step, record["psnr"],
                     record["psnr_noisy"])

    def end_step(self, record: dict, postfix: dict[str, str]) -> None:
        """Count the step just taken, record it, and validate (every rank) / checkpoint (rank 0) when due."""
        self.step += 1
        self.history.append(record)
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        config, step = self.config, self.step
        if config.validation_every and step % config.validation_every == 0 and step < self.total:
            self.run_validation()
        if self.ckpt_dir is not None and config.checkpoint_every and step % config.checkpoint_every == 0 \
                and step < self.total and self.context.main:
            self.last_checkpoint = self.write_checkpoint()

    def finish(self, revalidate: bool = False) -> None:
        """After the batch loop, on every rank: the final validation (every rank) and checkpoint (rank 0) when the
        run is complete, then the final barrier, so that no rank leaves (and takes the process group down) while rank 0
        still works. ``revalidate``: validate again even if the last step was just validated (the network changed
        since, e.g. its batch-norm statistics were recalibrated; the new record replaces that step's)."""
        if self.complete:
            if revalidate and self.validation and self.validation[-1]["step"] == self.step:
                self.validation.pop()
                self.best = max((r["psnr"] for r in self.validation), default=None)
            if not self.validation or self.validation[-1]["step"] != self.step:
                self.run_validation()
            if self.ckpt_dir is not None and self.context.main:
                self.last_checkpoint = self.write_checkpoint()
        if self.log_file is not None:
            self.log_file.close()
        if self.context.distributed:
            import torch.distributed as dist

            dist.barrier()
