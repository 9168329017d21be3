"""serve.coalesce.Coalescer: calls that wait for the model are merged into its next call."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve.coalesce import Coalescer


class GatedModel:
    """A model whose first call blocks until released, so that the test controls what waits."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, items: list[str]) -> list[str]:
        self.calls.append(list(items))
        self.started.set()
        self.release.wait(10)
        return [f"v({x})" for x in items]


async def _until(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10)


def test_calls_that_wait_are_merged_into_one_model_call_and_each_gets_its_own_results():
    model = GatedModel()
    seen: list[int] = []
    queue = Coalescer(model, max_items=32, on_call=lambda n, s: seen.append(n))

    async def main() -> list[list[str]]:
        first = asyncio.ensure_future(queue(["a"]))
        await _until(model.started)  # the model is busy with ["a"]
        rest = [asyncio.ensure_future(queue([f"q{i}", f"r{i}"])) for i in range(3)]
        rest.append(asyncio.ensure_future(queue(["z"])))
        await asyncio.sleep(0.05)
        model.release.set()
        return await asyncio.gather(first, *rest)

    got = asyncio.run(main())
    assert got == [["v(a)"], ["v(q0)", "v(r0)"], ["v(q1)", "v(r1)"], ["v(q2)", "v(r2)"], ["v(z)"]]
    # One call for "a", then one call for everything that waited, in arrival order.
    assert model.calls == [["a"], ["q0", "r0", "q1", "r1", "q2", "r2", "z"]]
    assert seen == [1, 7] and (queue.calls, queue.items) == (2, 8)


def test_a_call_never_exceeds_max_items_and_a_caller_is_never_split():
    model = GatedModel()
    queue = Coalescer(model, max_items=4)

    async def main() -> list[list[str]]:
        first = asyncio.ensure_future(queue(["a"]))
        await _until(model.started)
        waiting = [asyncio.ensure_future(queue(items)) for items in (["b", "c", "d"], ["e", "f"], ["g"], list("hijkl"))]
        await asyncio.sleep(0.05)
        model.release.set()
        return await asyncio.gather(first, *waiting)

    got = asyncio.run(main())
    assert got[4] == [f"v({x})" for x in "hijkl"]
    # ["b","c","d"] then ["e","f","g"] (4 would be exceeded by "hijkl"), then the 5-item caller alone.
    assert model.calls == [["a"], ["b", "c", "d"], ["e", "f", "g"], list("hijkl")]


def test_an_error_reaches_every_caller_of_that_call_and_the_next_call_goes_on():
    calls: list[list[str]] = []

    def model(items: list[str]) -> list[str]:
        calls.append(items)
        if "bad" in items:
            raise ValueError("cannot embed")
        return [x.upper() for x in items]

    queue = Coalescer(model, max_items=8)

    async def main() -> tuple[list, list[str]]:
        results = await asyncio.gather(queue(["ok", "bad"]), return_exceptions=True)
        return results, await queue(["fine"])

    failed, after = asyncio.run(main())
    assert isinstance(failed[0], ValueError) and after == ["FINE"]


def test_a_model_that_returns_the_wrong_number_of_results_is_an_error_not_a_misalignment():
    queue = Coalescer(lambda items: items[:-1], max_items=8)
    with pytest.raises(RuntimeError, match="returned 1 results for 2 inputs"):
        asyncio.run(queue(["a", "b"]))


def test_a_cancelled_caller_is_skipped_and_does_not_disturb_the_others():
    model = GatedModel()
    queue = Coalescer(model, max_items=32)

    async def main() -> tuple[list[str], list[str]]:
        first = asyncio.ensure_future(queue(["a"]))
        await _until(model.started)
        gone = asyncio.ensure_future(queue(["gone"]))
        kept = asyncio.ensure_future(queue(["kept"]))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.release.set()
        return await first, await kept

    assert asyncio.run(main()) == (["v(a)"], ["v(kept)"])
    assert model.calls == [["a"], ["kept"]]


def test_max_items_must_be_positive():
    with pytest.raises(ValueError, match="max_items"):
        Coalescer(lambda items: items, max_items=0)


def test_max_concurrent_runs_that_many_calls_at_once_and_merges_the_rest():
    started = threading.Semaphore(0)
    release = threading.Event()
    calls: list[list[int]] = []
    lock = threading.Lock()

    def model(items: list[int]) -> list[int]:
        with lock:
            calls.append(list(items))
        started.release()
        release.wait(10)
        return [x * 10 for x in items]

    queue = Coalescer(model, max_items=32, max_concurrent=2)

    async def main() -> list[list[int]]:
        running = []
        for x in (1, 2):  # the second runs while the first does: it does not wait for it
            running.append(asyncio.ensure_future(queue([x])))
            assert await asyncio.to_thread(started.acquire, True, 10)
        waiting = [asyncio.ensure_future(queue([x])) for x in (3, 4, 5)]
        await asyncio.sleep(0.05)
        assert not queue.idle()
        release.set()
        return await asyncio.gather(*running, *waiting)

    assert asyncio.run(main()) == [[10], [20], [30], [40], [50]]
    assert calls[:2] == [[1], [2]]
    # What waited behind two running calls went in at most two more calls, 3, 4, 5 in arrival order.
    assert [x for c in calls[2:] for x in c] == [3, 4, 5] and len(calls) <= 4
    assert queue.idle()


def test_calls_run_on_the_executor_given():
    from concurrent.futures import ThreadPoolExecutor

    seen: list[str] = []

    def model(items: list[str]) -> list[str]:
        seen.append(threading.current_thread().name)
        return items

    with ThreadPoolExecutor(1, thread_name_prefix="only-client") as pool:
        queue = Coalescer(model, max_items=8, executor=pool)
        assert asyncio.run(queue(["a", "b"])) == ["a", "b"]
    assert seen and seen[0].startswith("only-client")


def test_bad_max_concurrent_is_refused():
    with pytest.raises(ValueError, match="max_concurrent"):
        Coalescer(lambda items: items, max_items=4, max_concurrent=0)
