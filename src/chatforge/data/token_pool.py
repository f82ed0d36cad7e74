"""Tokenising in forked worker processes: the second core for ``iter_examples(num_proc=2)``.

Tokenisation is pure Python for plain ASCII text (:mod:`chatforge.data.pretoken_cache`),
so one process uses one core. With ``num_proc`` > 1 the main process keeps reading,
cleaning and packing, and chunks of conversations go to ``num_proc`` forked workers that
encode and truncate them; results come back *in submission order*, so ids, labels and
packed rows are exactly those of the in-process path (tests/test_tokenize.py compares
them). At most ``2 * num_proc`` chunks are in flight, so memory does not grow with the
input. Results travel as plain pickled lists: per record (AMD EPYC, load 5-6, 5,120 bench records)
``array('i')`` bytes cost 8.5 us to make in the worker and 11 us to turn back into lists in
the main process, pickled lists 7 us to make; the main process is the one to spare.

The Rust tokenizer's own thread pool (``TOKENIZERS_PARALLELISM``) is not the lever here:
on the data bench's corpus ``backend.encode_batch`` cost 94-105 CPU us per record
(``encode_batch_fast`` the same) against 16-18 through the pre-token cache (AMD EPYC,
``lscpu``: "AMD EPYC", load 5-6, min of 5 runs over 5,000 records), so threads would
spread 5x more work over the two cores. The workers set ``TOKENIZERS_PARALLELISM=false``
(inherited through the fork: no fork-after-threads warning, no oversubscription).

Measured (same CPU, 1M bench records, ``bench/data.py --stages pack``, OMP_NUM_THREADS=1) on a
*busy* machine (load 4-8): in-process 7.2k records/s, 81.9 CPU us per record, 522 MiB; two
workers 6.0k records/s, 100.9 CPU us, 625 + 280 MiB. The pool costs ~19 CPU us per record
(pickling both ways, per-worker caches) and only pays where two cores are free: the main
process then needs ~50 us per record (read, clean, pack, receive), the ceiling ~20k/s. Off by
default (``num_proc=1``) until measured on an idle 2-core machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from chatforge.errors import ConfigError

_WORK: Callable[[Any], Any] | None = None  # set right before the workers fork; they inherit it


def _start_worker() -> None:
    # Ctrl-C is the parent's to handle: it stops feeding and shuts the pool down
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(chunk: Any) -> Any:
    assert _WORK is not None, "token_pool worker started without work (not forked?)"
    return _WORK(chunk)


def ordered_map(work: Callable[[Any], Any], chunks: Iterable[Any], num_proc: int,
                in_flight: int | None = None) -> Iterator[Any]:
    """``work(chunk)`` for every chunk in ``num_proc`` forked processes, yielded in order.

    ``work`` and everything it reaches (an encoder with its caches) are inherited by the
    fork, never pickled; only chunks and results are. A worker that dies (killed, out of
    memory) raises ``BrokenProcessPool`` here instead of hanging.
    """
    global _WORK
    if num_proc < 2:
        raise ValueError("ordered_map needs num_proc >= 2 (use the in-process path)")
    if "fork" not in mp.get_all_start_methods():
        raise ConfigError(f"num_proc={num_proc}: worker processes need fork(), which this platform lacks; "
                          "use num_proc=1")
    in_flight = in_flight or 2 * num_proc
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers at fork time
    _WORK = work
    try:
        with ProcessPoolExecutor(num_proc, mp_context=mp.get_context("fork"), initializer=_start_worker) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.submit(_run, chunk))
                if len(pending) >= in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        _WORK = None
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
