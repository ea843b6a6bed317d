"""`distill --workers N` / `--gpus 0;1`: a pool of spawned worker processes, each loading the base
itself (on the CPU, one GPU, or spread over a group of GPUs) and making the shards dealt to it,
reporting progress and errors to the parent over a queue."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CTCDrafterError
from .distill_folder import dtype_name, make_shard
from .distill_options import DistillOptions
from .labelling import require_tokenizer

@dataclass
class BaseSpec:
    """How to load the base: what a worker process needs to load it itself."""

    name_or_path: str
    device: str = "auto"
    dtype: str = "auto"


def parse_gpu_groups(text: str) -> list[list[int]]:
    """'0;1;2;3' -> [[0], [1], [2], [3]] (a worker each); '0,1;2,3' -> [[0, 1], [2, 3]]."""
    groups = []
    for part in text.split(";"):
        ids = [x.strip() for x in part.split(",")]
        if not part.strip() or not all(x.isdigit() for x in ids):
            raise CTCDrafterError(f"--gpus {text!r}: give GPU numbers, ',' within a worker's group and ';' "
                                  f"between workers, e.g. '0;1;2;3' or '0,1;2,3'")
        groups.append([int(x) for x in ids])
    return groups


def check_gpu_groups(groups: list[list[int]], text: str) -> None:
    """Every GPU named must exist here (numbers as CUDA_VISIBLE_DEVICES, if set, shows them)."""
    if not torch.cuda.is_available():
        raise CTCDrafterError(f"--gpus {text!r} given, but CUDA is not available here "
                              f"(use --workers N for several CPU processes)")
    n = torch.cuda.device_count()
    bad = sorted({g for grp in groups for g in grp if g >= n})
    if bad:
        raise CTCDrafterError(f"--gpus {text!r} names GPU {bad[0]}, but only {n} GPU(s) are visible (0..{n - 1})")


def visible_devices(group: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for a worker: the group's GPUs, as the parent's own visibility numbers them."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [x.strip() for x in parent.split(",")] if parent else None
    return ",".join(names[g] if names else str(g) for g in group)


def describe_base(spec: BaseSpec, device: torch.device) -> tuple[dict, str, int]:
    """(signature, dtype name, max length) of a base from its config alone: the folder can be checked
    before loading the weights (which worker processes load themselves)."""
    from transformers import AutoConfig

    from ..models.base import locate_model, resolve_dtype

    path, gguf, name = locate_model(spec.name_or_path)
    try:
        cfg = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad model path for the user
        raise CTCDrafterError(f"cannot load base model {spec.name_or_path}: {str(e).strip().splitlines()[0]}") from e
    # as BaseModel.signature() / .max_length read them from the loaded model's config
    sig = {"base_model": name, "hidden_size": int(cfg.hidden_size), "vocab_size": int(cfg.vocab_size)}
    max_len = int(getattr(cfg, "max_position_embeddings", 1 << 30))
    return sig, dtype_name(resolve_dtype(spec.dtype, device)), max_len


def load_worker_base(spec: BaseSpec, gpus: int):
    """The base in a worker: on --device (CPU workers), on its one visible GPU, or spread over its
    visible GPUs like device_map="auto" (balanced) when it has several."""
    from ..models.base import load_base_model, resolve_dtype

    if gpus == 0:
        return load_base_model(spec.name_or_path, device=spec.device, dtype=spec.dtype)
    dtype = resolve_dtype(spec.dtype, torch.device("cuda"))
    if gpus == 1:
        return load_base_model(spec.name_or_path, device="cuda", dtype=dtype)
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    base = load_base_model(spec.name_or_path, device="cpu", dtype=dtype)
    no_split = list(getattr(base.model, "_no_split_modules", None) or [])
    memory = get_balanced_memory(base.model, dtype=dtype, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(base.model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    dispatch_model(base.model, device_map=device_map)
    return base


def _worker_main(rank: int, spec: BaseSpec, cuda_visible: str | None, threads: int | None, expect: tuple,
                 opts: DistillOptions, out_dir: Path, work: list, queue, make=make_shard) -> None:
    """A worker process: load the base, make its shards with `make` (a module-level function, as
    make_shard: distill's; corpus build's labels fixed ids), tell the parent ("progress" | "error" | "done")."""
    if cuda_visible is not None:  # before anything touches CUDA (the parent set it for the spawn too)
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
    if threads:
        torch.set_num_threads(threads)
    code = 0
    try:
        base = load_worker_base(spec, 0 if cuda_visible is None else len(cuda_visible.split(",")))
        got = (base.signature(), dtype_name(base.dtype))
        if got != expect:
            raise CTCDrafterError(f"worker {rank} loaded {got}, the folder was prepared for {expect}")
        require_tokenizer(base)
        for i, first, records in work:
            tokens = make(base, out_dir, i, first, records, opts, rank)
            queue.put(("progress", rank, len(records), tokens))
        queue.put(("done", rank))
    except KeyboardInterrupt:
        code = 130
    except CTCDrafterError as e:
        queue.put(("error", rank, str(e)))
        code = 2
    except BaseException as e:  # noqa: BLE001 - a bug: the parent reports it, the traceback goes to stderr
        import traceback

        traceback.print_exc()
        queue.put(("error", rank, f"{type(e).__name__}: {e}"))
        code = 1
    queue.close()
    queue.join_thread()  # the message reaches the parent before this process ends
    sys.exit(code)


@contextmanager
def _env(**values):
    """Set environment variables for processes started inside (spawned children copy the environment)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def follow_workers(procs: list, queue, report) -> None:
    """Relay progress until every worker is done; the first error (or silent death) stops the run."""
    import queue as queue_mod

    finished = set()
    while len(finished) < len(procs):
        try:
            msg = queue.get(timeout=0.5)
        except queue_mod.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in finished and p.exitcode is not None]
            if dead:  # its last message would have been queued before it exited
                try:
                    msg = queue.get(timeout=2)
                except queue_mod.Empty:
                    r, code = dead[0]
                    raise CTCDrafterError(f"worker {r} stopped (exit code {code}) without finishing its shards; "
                                          f"run the same command again to resume") from None
            else:
                continue
        kind, rank, *rest = msg
        if kind == "progress":
            report(*rest)
        elif kind == "done":
            finished.add(rank)
        else:
            raise CTCDrafterError(f"worker {rank}: {rest[0]}")



def deal(plan, todo: list[int], n: int) -> list[list]:
    """The shards still to make, dealt round-robin to n workers: [(i, first, records), ...] each."""
    return [[(i, *plan.shard(i)) for i in todo[r::n]] for r in range(n)]


def threads_per_worker(n: int) -> int | None:
    """CPU workers share the cores instead of oversubscribing them (unless OMP_NUM_THREADS says)."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // max(1, n))


def run_workers(spec: BaseSpec, slots: list, threads: int | None, expect: tuple, opts: DistillOptions,
                out_dir: Path, works: list[list], report, make=make_shard) -> None:
    """One spawned process per slot (its CUDA_VISIBLE_DEVICES, or None for --device), each making
    the shards of its work list with `make`; returns when all are done, raises on the first failure."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: CUDA_VISIBLE_DEVICES applies, no forked CUDA state
    queue = ctx.Queue()
    procs = []
    try:
        for rank, (visible, work) in enumerate(zip(slots, works)):
            with _env(CUDA_VISIBLE_DEVICES=visible):
                p = ctx.Process(target=_worker_main, name=f"distill-worker-{rank}",
                                args=(rank, spec, visible, threads, expect, opts, out_dir, work, queue, make))
                p.start()
            procs.append(p)
        follow_workers(procs, queue, report)
    finally:
        for p in procs:  # after an error or Ctrl-C: finished shards stay, the rest is redone next time
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
