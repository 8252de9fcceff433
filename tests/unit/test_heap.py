"""The gateway's periodic ``malloc_trim``: found on glibc, called on its interval, harmless."""

from __future__ import annotations

import asyncio
import platform

import pytest

from cardseal.gateway.heap import malloc_trim, trim_heap_forever


def test_glibc_malloc_trim_is_found_and_runs() -> None:
    trim = malloc_trim()
    if platform.libc_ver()[0] != "glibc":  # pragma: no cover - CI and this machine: glibc
        assert trim is None
        return
    assert trim is not None
    assert trim(0) in (0, 1)  # 1: memory was given back


def test_trims_on_its_interval_until_cancelled() -> None:
    calls: list[int] = []

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(
            trim_heap_forever(0.01, lambda pad: calls.append(pad) or 0))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(calls) >= 3 and set(calls) == {0}
