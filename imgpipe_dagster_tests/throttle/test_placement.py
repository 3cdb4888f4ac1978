"""Placement of new shard runs on nodes: most free slots first, equals take turns, nothing without nodes."""

from __future__ import annotations

from collections import Counter

from imgpipe_dagster.throttle.placement import Node, place


def test_equal_idle_nodes_share_the_shards_in_turn():
    nodes = [Node("node-a", 3), Node("node-b", 3)]
    placed = place([f"s{i}" for i in range(6)], nodes, load={})
    assert list(placed.values()) == ["node-a", "node-b"] * 3


def test_the_node_with_more_free_slots_takes_more():
    nodes = [Node("node-a", 5), Node("node-b", 1)]
    placed = place(["s1", "s2", "s3", "s4"], nodes, load={"node-a": 1})
    # free: a 4, b 1 -> a, a, a (1 left), then a 1 vs b 1 (a just used: b)
    assert Counter(placed.values()) == {"node-a": 3, "node-b": 1}


def test_a_busy_node_gets_nothing_while_another_has_room():
    nodes = [Node("node-a", 2), Node("node-b", 2)]
    assert set(place(["s1", "s2"], nodes, load={"node-a": 2}).values()) == {"node-b"}


def test_the_turn_rotates_who_goes_first_among_equals():
    nodes = [Node("node-a", 1), Node("node-b", 1), Node("node-c", 1)]
    firsts = {place(["s"], nodes, load={}, turn=turn)["s"] for turn in range(3)}
    assert firsts == {"node-a", "node-b", "node-c"}


def test_shards_beyond_the_free_slots_wait_for_a_later_tick():
    nodes = [Node("node-a", 1), Node("node-b", 2)]
    assert place(["s1", "s2", "s3"], nodes, load={"node-b": 1}) == {"s1": "node-a", "s2": "node-b"}
    assert place(["s"], nodes, load={"node-a": 3, "node-b": 2}) == {}


def test_no_nodes_means_no_placement():
    assert place(["s1"], [], load={}) is None
