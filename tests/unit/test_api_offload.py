"""api/ports.py `Offload`: a port that says it blocks is called off the event loop."""

from __future__ import annotations

import asyncio
import threading

from diffusiond.api.ports import Offload


class BlockingPort:
    blocks_event_loop = True

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def call(self, value: int) -> int:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(timeout=10)
        return value * 2


class QuickPort:
    def __init__(self) -> None:
        self.threads: list[str] = []

    def call(self, value: int) -> int:
        self.threads.append(threading.current_thread().name)
        return value + 1


def test_a_blocking_port_leaves_the_event_loop_free() -> None:
    port = BlockingPort()

    async def scenario() -> list[str]:
        order: list[str] = []
        offload = Offload(port, QuickPort())
        slow = asyncio.ensure_future(offload(port.call, 21))
        await asyncio.to_thread(port.entered.wait, 10)  # the call is under way, and blocks
        order.append("loop free")  # reached only while the slow call is pending
        assert not slow.done()
        port.release.set()
        order.append(f"slow {await slow}")
        return order

    assert asyncio.run(scenario()) == ["loop free", "slow 42"]
    assert port.threads != [threading.main_thread().name]


def test_quick_ports_are_called_inline() -> None:
    port = QuickPort()

    async def scenario() -> int:
        return await Offload(port)(port.call, 1)

    assert asyncio.run(scenario()) == 2
    assert port.threads == [threading.main_thread().name]
