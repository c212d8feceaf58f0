"""The front scheduler of ``--engine vllm`` (``shirakit.vllm.GroupScheduler``), without vLLM: one group's
requests run at a time, the weights switch only with nothing in flight, the fused-only policies order
groups as documented (drain: a group as it stood; slice: turns by time), and ``auto`` runs mixed traffic
per row on the base weights and one adapter's traffic fused."""

from __future__ import annotations

import asyncio

import pytest

from shirakit.vllm import GroupScheduler


def run(policy: str, arrivals: list[tuple[float, str | None]], hold: float, slice_s: float = 0.05,
        max_wait_s: float = 10.0):
    """Requests (arrival time, group), each holding its turn ``hold`` seconds -> (order started, switches, log)."""
    log = []

    async def main():
        running: dict[str | None, int] = {}

        async def switch(group):
            assert not any(running.values()), "switched with requests in flight"
            log.append(("switch", group))
            await asyncio.sleep(0.001)

        scheduler = GroupScheduler(switch, policy, slice_s, max_wait_s)
        started = []

        async def request(i, at, group):
            await asyncio.sleep(at)
            async with scheduler.turn(group):
                assert scheduler.active == group
                assert all(n == 0 for g, n in running.items() if g != group), "two groups ran together"
                running[group] = running.get(group, 0) + 1
                started.append(i)
                await asyncio.sleep(hold)
                running[group] -= 1

        await asyncio.wait_for(asyncio.gather(*(request(i, at, g) for i, (at, g) in enumerate(arrivals))), 20)
        return started, scheduler.switches

    started, switches = asyncio.run(main())
    return started, switches, log


def test_drain_runs_a_group_as_it_stood_then_the_next():
    # a arrives first; b waits from t=0.01; the a that comes after b waits for b's turn
    arrivals = [(0.0, "a"), (0.0, "a"), (0.01, "b"), (0.02, "a"), (0.02, None)]
    started, switches, log = run("drain", arrivals, hold=0.05)
    assert started[:2] == [0, 1] and started[2] == 2  # a, a, then b before the later a
    assert [g for kind, g in log] == ["a", "b", "a", None]
    assert switches == 4


def test_a_switch_admits_the_whole_waiting_group_largest_first():
    # a runs; b, c, c, b, c queue behind it: c (3 waiting) goes before b (2, though older), each as one batch
    arrivals = [(0.0, "a"), (0.01, "b"), (0.01, "c"), (0.01, "c"), (0.01, "b"), (0.01, "c")]
    started, switches, log = run("drain", arrivals, hold=0.05)
    assert [g for kind, g in log] == ["a", "c", "b"] and switches == 3
    assert started == [0, 2, 3, 5, 1, 4]


def test_a_request_waiting_past_max_wait_goes_first():
    # b has waited longer than max_wait_s when a's turn ends: b goes before the larger group c
    arrivals = [(0.0, "a"), (0.01, "b"), (0.02, "c"), (0.02, "c")]
    _, _, log = run("drain", arrivals, hold=0.1, max_wait_s=0.05)
    assert [g for kind, g in log] == ["a", "b", "c"]
    _, _, log = run("drain", arrivals, hold=0.1, max_wait_s=5)
    assert [g for kind, g in log] == ["a", "c", "b"]


def test_slice_alternates_by_time():
    # a steady stream of a keeps coming; b must still get a turn within a slice
    arrivals = [(0.01 * i, "a") for i in range(30)] + [(0.02, "b")]
    started, _, log = run("slice", arrivals, hold=0.02, slice_s=0.05)
    assert started.index(30) < 25  # drain-free of the later a requests
    assert ("switch", "b") in log


def test_one_group_never_switches_again():
    started, switches, log = run("drain", [(0.0, "a")] * 6, hold=0.01)
    assert sorted(started) == list(range(6)) and switches == 1 and log == [("switch", "a")]


def test_base_requests_need_no_switch():
    _, switches, log = run("drain", [(0.0, None)] * 4, hold=0.01)
    assert switches == 0 and log == []


@pytest.mark.parametrize("kwargs, message", [({"policy": "fifo"}, "policy"), ({"slice_s": 0}, "slice_s"),
                                             ({"max_wait_s": -1}, "max_wait_s")])
def test_bad_settings_are_refused(kwargs, message):
    async def switch(group):
        pass

    with pytest.raises(ValueError, match=message):
        GroupScheduler(switch, **kwargs)


def test_a_cancelled_waiter_leaves_the_queue():
    async def main():
        async def switch(group):
            await asyncio.sleep(0.001)

        scheduler = GroupScheduler(switch, "drain")
        async with scheduler.turn("a"):
            waiter = asyncio.create_task(scheduler.turn("b").__aenter__())
            await asyncio.sleep(0.01)
            assert scheduler.waiting == 1
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            assert scheduler.waiting == 0
        return scheduler.active

    assert asyncio.run(main()) == "a"


def run_auto(arrivals: list[tuple[float, str | None, bool]], hold: float, fuse_after: int = 8):
    """``auto``: requests (arrival, group, flexible) -> ([(request, the group it ran under)], switch log).
    A flexible request (a SHiRA adapter the workers can serve per row) runs fused or on the base."""
    log, ran = [], []

    async def main():
        running: dict[str | None, int] = {}

        async def switch(group):
            assert not any(running.values()), "switched with requests in flight"
            log.append(group)
            await asyncio.sleep(0.001)

        scheduler = GroupScheduler(switch, "auto", fuse_after=fuse_after)

        async def request(i, at, group, flexible):
            await asyncio.sleep(at)
            async with scheduler.turn(group, flexible=flexible) as under:
                assert under == scheduler.active and under in ({group, None} if flexible else {group})
                assert all(n == 0 for g, n in running.items() if g != under), "two weights ran together"
                running[under] = running.get(under, 0) + 1
                ran.append((i, under))
                await asyncio.sleep(hold)
                running[under] -= 1

        await asyncio.wait_for(asyncio.gather(*(request(i, *a) for i, a in enumerate(arrivals))), 20)

    asyncio.run(main())
    return ran, log


def test_auto_runs_one_adapters_traffic_fused_after_fuse_after_requests():
    # the first 3 run per row on the base; then the batch ends and a is switched in, fused for the rest
    ran, log = run_auto([(0.01 * i, "a", True) for i in range(8)], hold=0.03, fuse_after=3)
    assert log == ["a"] and [u for _, u in ran[:3]] == [None] * 3 and [u for _, u in ran[3:]] == ["a"] * 5


def test_auto_runs_mixed_adapters_per_row_in_one_batch():
    ran, log = run_auto([(0.0, "a", True), (0.0, "b", True), (0.0, "c", True), (0.0, None, False)], hold=0.03)
    assert log == [] and sorted(ran) == [(0, None), (1, None), (2, None), (3, None)]


def test_auto_leaves_a_fused_adapter_for_the_base_when_another_waits():
    # two a's per row make a fused; b comes: a's turn ends as it stood, then b and the later a run per row
    arrivals = [(0.0, "a", True), (0.06, "a", True), (0.12, "a", True), (0.13, "b", True), (0.14, "a", True)]
    ran, log = run_auto(arrivals, hold=0.05, fuse_after=2)
    assert log == ["a", None] and ran == [(0, None), (1, None), (2, "a"), (3, None), (4, None)]


def test_auto_still_runs_a_fused_only_adapter_by_itself():
    # v (fused only: a worker that cannot serve it per row) waits for the per-row batch, runs alone, then the rest
    ran, log = run_auto([(0.0, "a", True), (0.0, "b", True), (0.01, "v", False), (0.02, "b", True)], hold=0.05)
    assert log == ["v", None] and dict(ran)[2] == "v" and dict(ran)[3] is None
