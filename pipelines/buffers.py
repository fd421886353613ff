"""Batch buffers (pixels and padding mask) reused across batches instead of allocated for each.

A fresh [B, H, W, 3] buffer per batch is paid for in page faults (one per 4 KiB on first touch)
in the loader worker, and again in the trainer when it maps the shared segment: for a batch of
eight 640 px images about 2,400 on each side, plus a shared-memory segment created, sent as a
file descriptor, mapped and torn down. On this project's machines that cost about a third of a
loader worker's throughput.

`BufferPool` is the producer's side (a loader worker, or the loading process itself when there
are no workers). It owns slots of memory, shared between processes when it runs in a worker,
and reuses them; a slot holds one batch's pixels and padding mask. A batch names its slot and
carries the slot's storage only the first time the slot is used, so each slot crosses between
processes once.

`SlotViews` is the consumer's side. It keeps the slots it has been sent and hands out each
batch's bytes as an array of its own over the slot; the batch's tensors are made from it. When
the last of them is freed (the batch dropped, every view of it gone), a finalizer gives the
slot back to its producer: directly in-process, as four bytes on a pipe across processes. A
producer that finds no free slot allocates another, so a consumer that keeps any number of
batches costs memory, as a fresh buffer per batch would, and never sees its pixels overwritten
or blocks a worker.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np
import torch

HEADROOM = 0.25  # a new slot is this much larger than the batch that needed it


class BufferPool:
    """Reusable slots of uint8 memory on the producer side.

    `returns` is the read end of the pipe on which the consumer gives slots back (None
    in-process, where the consumer calls `release`)."""

    def __init__(self, shared: bool, returns: Connection | None = None):
        self.shared = shared
        self.returns = returns
        self.pid = os.getpid()
        self.slots: dict[int, torch.UntypedStorage] = {}
        self.free: list[int] = []
        self._next = 0

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def _collect_returns(self) -> None:
        if self.returns is None:
            return
        try:
            while self.returns.poll():
                self.free.append(int.from_bytes(self.returns.recv_bytes(), "little"))
        except (EOFError, OSError):  # the consumer has gone: nothing more will come back
            self.returns = None

    def take(self, nbytes: int) -> tuple[int, torch.UntypedStorage, bool, list[int]]:
        """A slot of at least `nbytes`: (slot id, storage, new, ids of slots retired).

        A new slot is made when no free slot is large enough; then the smallest free slot, if
        any, is retired so that the pool does not keep slots too small for the batches it sees.
        """
        self._collect_returns()
        fitting = [s for s in self.free if self.slots[s].nbytes() >= nbytes]
        if fitting:
            slot = min(fitting, key=lambda s: self.slots[s].nbytes())
            self.free.remove(slot)
            return slot, self.slots[slot], False, []
        retired = []
        if self.free:
            smallest = min(self.free, key=lambda s: self.slots[s].nbytes())
            self.free.remove(smallest)
            del self.slots[smallest]
            retired.append(smallest)
        size = max(1, nbytes + int(nbytes * HEADROOM))
        storage = (
            torch.UntypedStorage._new_shared(size) if self.shared else torch.UntypedStorage(size)
        )
        slot, self._next = self._next, self._next + 1
        self.slots[slot] = storage
        return slot, storage, True, retired


def uint8_view(storage: torch.UntypedStorage, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous uint8 tensor of `shape` at the start of `storage`."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


class SlotViews:
    """The consumer's side: slots by (producer, slot id), and per producer the function that
    gives a slot back."""

    def __init__(self, give_back: dict[int, Callable[[int], None]]):
        self.give_back = give_back
        self.slots: dict[tuple[int, int], np.ndarray] = {}

    def buffer(
        self,
        producer: int,
        slot: int,
        storage: torch.UntypedStorage | None,
        retired: list[int],
        nbytes: int,
    ) -> np.ndarray:
        """The batch's first `nbytes` of the slot, as a flat uint8 array, valid until it and
        the last array or tensor made from it are freed."""
        for old in retired:
            self.slots.pop((producer, old), None)
        if storage is not None:
            self.slots[(producer, slot)] = uint8_view(storage, (storage.nbytes(),)).numpy()
        # Not a slice of the slot array: numpy points every view's base at the array that owns
        # the memory, so arrays made from a slice would outlive it and the slot would come
        # back too early. An array over a ctypes region of the slot is instead the base of
        # every array made from it, and tensors made from those keep them alive.
        region = (ctypes.c_uint8 * nbytes).from_buffer(self.slots[(producer, slot)])
        view = np.frombuffer(region, dtype=np.uint8)
        weakref.finalize(view, self.give_back[producer], slot).atexit = False
        return view


def pipe_sender(conn: Connection) -> Callable[[int], None]:
    """Gives slots back over `conn`; once the pipe is closed (the loader finished, the worker
    gone) there is no one to give them to and the slot simply goes with the consumer's memory."""

    def send(slot: int) -> None:
        try:
            conn.send_bytes(slot.to_bytes(4, "little"))
        except (OSError, ValueError):
            pass

    return send
