"""Rank 0's node, checked by the driver before Ray Train waits for it (for ever, without)."""

from __future__ import annotations

import pytest

from llmray_trainer.placement import (
    PlacementError,
    label_selector,
    rank0_node_error,
    wait_for_rank0_node,
)

LABEL = {"llmray.io/rank0": "true"}


def node(labels=None, cpu=1.0, alive=True):
    resources = {"CPU": cpu} if cpu else {}
    return {
        "Alive": alive,
        "Labels": {"ray.io/node-id": "x", **(labels or {})},
        "Resources": resources,
    }


def test_bundle_0_goes_to_the_labelled_node():
    assert label_selector(LABEL, 3) == [LABEL, {}, {}]
    assert label_selector({}, 3) is None


def test_a_labelled_node_with_room_for_a_worker_will_do():
    nodes = [node(cpu=0), node(), node(LABEL, cpu=2)]
    assert rank0_node_error(nodes, LABEL, {"CPU": 1.0}) is None


@pytest.mark.parametrize(
    "nodes",
    [
        pytest.param([node(cpu=0), node(), node()], id="no node has the label"),
        pytest.param([node(LABEL, cpu=0), node()], id="the labelled node has no CPU"),
        pytest.param([node(LABEL, alive=False), node()], id="the labelled node is dead"),
    ],
)
def test_no_node_for_rank0_is_an_error_that_says_what_to_fix(nodes):
    error = rank0_node_error(nodes, LABEL, {"CPU": 1.0})
    assert error.startswith(
        "rank 0 needs a Ray node with the label llmray.io/rank0=true and room for one worker "
        "(CPU 1)"
    )
    assert "spec.compute.rank0" in error and "ray.io/node-id" not in error


def test_waiting_ends_with_the_error_or_the_node():
    with pytest.raises(PlacementError, match="rank 0 needs a Ray node"):
        wait_for_rank0_node(LABEL, {"CPU": 1.0}, nodes=lambda: [node()], timeout=0, poll=0)
    joined = iter([[node()], [node(), node(LABEL)]])
    wait_for_rank0_node(LABEL, {"CPU": 1.0}, nodes=lambda: next(joined), timeout=5, poll=0)
    wait_for_rank0_node({}, {"CPU": 1.0}, nodes=lambda: [], timeout=0)  # no rank-0 group
