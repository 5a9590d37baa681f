"""Which threads run torch's CPU kernels on several cores.

PyTorch's CPU kernels split their work over an OpenMP team, and each Python thread that first runs
one gets a team of its own (``torch.set_num_threads`` threads, counting itself) that lives as long
as the thread. libgomp keeps its idle team threads spinning, ready for the next kernel, only while
the threads it manages across all teams are no more than the CPUs; past that it puts them to sleep
after a few spins, and every kernel then waits for them to wake. A runtime has threads besides the
engine's (the event loop, the loader, ``asyncio.to_thread`` helpers for the caches): one of them
running a single kernel with the default count left a second team behind, and on a 2-core AMD EPYC
the engine's 4-bit products took 59 µs each instead of 29, its decode step 29 ms instead of 20
(issue 20).

So a thread that runs a model asks for its cores with ``pin_torch_threads``, and every other
thread gets one: teams of one are never started, and the engine's team keeps spinning.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_lock = threading.Lock()

# torch's own choice for this machine (one per core), read before any pin changes the default.
DEFAULT_THREADS = torch.get_num_threads()


def pin_torch_threads(threads: int) -> None:
    """Give the calling thread ``threads`` OpenMP threads for torch's kernels, and leave the count
    any thread that has not run a kernel yet starts with at one."""
    with _lock:
        torch.set_num_threads(threads)
        torch.get_num_threads()  # fixes this thread's count now, before the default changes
        # torch.set_num_threads sets both the calling thread's count and the default: a thread of its
        # own (one that never runs a kernel, so never starts a team) sets the default alone.
        setter = threading.Thread(target=torch.set_num_threads, args=(1,), name="torch-threads-default")
        setter.start()
        setter.join()


async def run_in_own_thread(fn: Callable[..., T], *args: object, threads: int, **kwargs: object) -> T:
    """``fn(*args, **kwargs)`` in a new thread given ``threads`` OpenMP threads, which ends with it
    (and its OpenMP team with it), where ``asyncio.to_thread``'s pool thread would keep a team."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        pin_torch_threads(threads)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting coroutine, raised there
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name=f"torch-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await done
