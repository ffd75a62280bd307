"""The micro-batcher's grouping: what leaves together, and when. Its items' outcomes through the
real stores are tested in test_one_bad_request.py and test_parity.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from quotagate.stores.batch import Batcher, Failed

from .conftest import run


def test_a_step_that_can_be_sent_from_anywhere_sends_the_first_of_a_turn_at_once() -> None:
    """With `start`: the first item of a turn is written before its caller yields, alone; those
    after it in the same turn leave together at the turn's end; results reach each waiter."""
    sent: list[list[str]] = []

    def start(items: list[str], then: object) -> asyncio.Future[Sequence[str | Failed]]:
        sent.append(list(items))
        future: asyncio.Future[Sequence[str | Failed]] = asyncio.get_running_loop().create_future()
        future.set_result([item.upper() for item in items])
        then(future)  # type: ignore[operator]
        return future

    async def never(items: list[str]) -> Sequence[str | Failed]:
        raise AssertionError("start always can")

    async def main() -> tuple[list[str], list[list[str]], list[list[str]]]:
        batcher: Batcher[str, str] = Batcher(never, start=start)
        first = asyncio.ensure_future(batcher.submit("a"))
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in "bc"]
        await asyncio.sleep(0)  # the three tasks run their first step in this turn
        at_once = [list(s) for s in sent]
        results = await asyncio.gather(first, *rest)
        lone = await batcher.submit("d")  # a later turn: alone again, at once
        return [*results, lone], at_once, sent

    results, at_once, sent_all = run(main())
    assert results == ["A", "B", "C", "D"]
    assert at_once == [["a"]]  # sent within its own task's step, before the turn ended
    assert sent_all == [["a"], ["b", "c"], ["d"]]


def test_a_step_run_in_a_task_sends_a_turn_s_items_together() -> None:
    """Without `start` (SQLite's transaction in its thread): one batch per turn, the first included."""
    ran: list[list[str]] = []

    async def run_batch(items: list[str]) -> Sequence[str | Failed]:
        ran.append(list(items))
        return [item.upper() for item in items]

    async def main() -> list[str]:
        batcher: Batcher[str, str] = Batcher(run_batch)
        return list(await asyncio.gather(*(batcher.submit(x) for x in "abc")))

    assert run(main()) == ["A", "B", "C"]
    assert ran == [["a", "b", "c"]]


def test_while_a_batch_is_in_flight_items_gather_until_the_turn_s_end() -> None:
    """The first item leaves at once only when nothing is in flight; else it waits for its turn's
    end with the others (fewer, fuller script calls under load)."""
    sent: list[list[str]] = []
    answers: list[tuple[list[str], object, asyncio.Future[Sequence[str | Failed]]]] = []

    def start(items: list[str], then: object) -> asyncio.Future[Sequence[str | Failed]]:
        sent.append(list(items))
        future: asyncio.Future[Sequence[str | Failed]] = asyncio.get_running_loop().create_future()
        answers.append((items, then, future))  # answered when the test says
        return future

    def answer_all() -> None:
        while answers:
            items, then, future = answers.pop(0)
            future.set_result([item.upper() for item in items])
            then(future)  # type: ignore[operator]

    async def never(items: list[str]) -> Sequence[str | Failed]:
        raise AssertionError("start always can")

    async def main() -> list[object]:
        batcher: Batcher[str, str] = Batcher(never, start=start)
        seen: list[object] = []
        a = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0)
        seen.append([list(s) for s in sent])  # a: at once
        b = asyncio.ensure_future(batcher.submit("b"))
        c = asyncio.ensure_future(batcher.submit("c"))
        await asyncio.sleep(0)
        seen.append([list(s) for s in sent])  # b, c: a is in flight, they wait for the turn's end
        await asyncio.sleep(0)
        seen.append([list(s) for s in sent])
        answer_all()
        seen.append(await asyncio.gather(a, b, c))
        d = asyncio.ensure_future(batcher.submit("d"))
        await asyncio.sleep(0)
        seen.append([list(s) for s in sent])  # nothing in flight again: at once
        answer_all()
        seen.append(await d)
        return seen

    assert run(main()) == [
        [["a"]],
        [["a"]],
        [["a"], ["b", "c"]],
        ["A", "B", "C"],
        [["a"], ["b", "c"], ["d"]],
        "D",
    ]
