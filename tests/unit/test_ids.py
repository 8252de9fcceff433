"""Payment ids: the time in milliseconds, then 96 random bits from a pool of os.urandom output
that no two ids (nor two processes) share."""

from __future__ import annotations

import os
import re
import time

from cardseal.storage.sql import _RandomPool, new_payment_id


def test_payment_ids_are_distinct_and_in_time_order() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_payment_id() for _ in range(5000)]  # more than one 4 KiB draw
    after = time.time_ns() // 1_000_000
    assert all(re.fullmatch(r"pay_[0-9a-f]{36}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert len(ids[0]) == 40  # the column's size
    stamps = [int(i[4:16], 16) for i in ids]
    assert before <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= after


def test_the_pool_hands_out_each_byte_once() -> None:
    pool = _RandomPool()
    taken = [pool.take(12) for _ in range(1000)]
    assert len(set(taken)) == 1000 and all(len(t) == 12 for t in taken)
    assert len(pool.take(5000)) == 5000  # larger than a chunk


def test_a_forked_child_draws_afresh() -> None:
    pool = _RandomPool()
    pool.take(12)  # the parent now holds buffered bytes
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, pool.take(12))
        os._exit(0)
    os.close(write)
    from_child = os.read(read, 12)
    os.close(read)
    os.waitpid(child, 0)
    assert from_child != pool.take(12)  # the parent's next bytes are not the child's
