"""The in-run side of duplicate reuse: who waits for whom, and how lookups are batched. The stored side
(find_reusable on PostgreSQL) is exercised by test_dedupe_and_store.py; here the lookup is a dict."""

from __future__ import annotations

import asyncio

from imgpipe_dagster.engine.dedupe import DuplicateImages
from imgpipe_dagster.store.versions import ReusableAnalysis

STORED = ReusableAnalysis(b"\x01" * 16, {"model_text": "stored"})


def finder(stored: dict[str, ReusableAnalysis], calls: list[list[str]], fail: bool = False) -> DuplicateImages:
    async def lookup(digests):
        calls.append(list(digests))
        if fail:
            raise ConnectionError("database gone")
        return {d: stored[d] for d in digests if d in stored}

    return DuplicateImages(lookup)


def test_followers_wait_for_the_leaders_analysis_and_lookups_are_batched():
    async def scenario():
        calls: list[list[str]] = []
        duplicates = finder({"old": STORED}, calls)
        leader, other, old = await asyncio.wait_for(asyncio.gather(
            duplicates.reusable("new"), duplicates.reusable("other"), duplicates.reusable("old")), 5)  # fmt: skip
        waiting = asyncio.create_task(duplicates.reusable("new"))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # the follower waits for the leader's GPU answer
        analysed = ReusableAnalysis(b"\x02" * 16, {"model_text": "fresh"})
        duplicates.settle("new", analysed)
        assert await asyncio.wait_for(waiting, 5) is analysed
        duplicates.settle("other", None)
        return leader, other, old, calls

    leader, other, old, calls = asyncio.run(scenario())
    assert (leader, other, old) == (None, None, STORED)  # new bytes go to the GPU; stored ones are reused
    assert calls == [["new", "old", "other"]]  # one query for the images that arrived together


def test_a_failed_leader_hands_the_bytes_to_the_next_url():
    async def scenario():
        duplicates = finder({}, [])
        assert await duplicates.reusable("x") is None
        follower = asyncio.create_task(duplicates.reusable("x"))
        await asyncio.sleep(0.01)
        duplicates.settle("x", None)  # the leader's analysis failed
        return await asyncio.wait_for(follower, 5)

    assert asyncio.run(scenario()) is None  # the follower sends its own image


def test_a_failed_lookup_sends_the_image():
    async def scenario():
        return await asyncio.wait_for(finder({"x": STORED}, [], fail=True).reusable("x"), 5)

    assert asyncio.run(scenario()) is None
