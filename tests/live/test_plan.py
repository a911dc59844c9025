"""plan_run, the pure decision of an incremental run: property tests, no kernel."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vault_runner.live.plan import first_difference, first_mismatch, plan_run

hashes = st.lists(st.sampled_from("abcdefgh"), max_size=8)


@given(digests=hashes, executed=hashes)
def test_the_first_mismatch_is_where_the_kernel_and_the_note_part(digests: list[str], executed: list[str]) -> None:
    position = first_mismatch(digests, executed)
    if position is None:
        assert executed[: len(digests)] == digests
    else:
        assert digests[:position] == executed[:position]
        assert position >= len(executed) or executed[position] != digests[position]


@given(new=hashes, old=hashes)
def test_first_difference_is_none_only_for_equal_lists(new: list[str], old: list[str]) -> None:
    assert (first_difference(new, old) is None) == (new == old)


@given(digests=hashes, executed=hashes, seen=st.none() | hashes, kept=st.sets(st.sampled_from("abcdefgh")))
def test_blocks_above_the_start_are_never_run_and_only_kept_outputs_are_restored(
    digests: list[str], executed: list[str], seen: list[str] | None, kept: set[str]
) -> None:
    stale = [pos for pos, digest in enumerate(digests) if digest not in executed]
    for mode in ("changed", "run", "restart-run"):
        plan = plan_run(mode, digests, executed=executed, seen=seen, kept=kept, stale=stale)
        if plan.start is not None:
            # Everything above the start already ran in this kernel with the same hashes.
            assert plan.start == 0 or digests[: plan.start] == executed[: plan.start]
        until = len(digests) if plan.start is None else plan.start
        assert all(pos < until and digests[pos] in kept and pos in stale for pos in plan.restores)


@given(digests=hashes.filter(bool), executed=hashes)
def test_restart_runs_everything_and_a_block_run_stops_at_its_block(digests: list[str], executed: list[str]) -> None:
    assert plan_run("restart-run", digests, executed=executed, seen=None, kept=set(), stale=[]).start == 0
    target = len(digests) - 1
    plan = plan_run("block", digests, executed=executed, seen=None, kept=set(), stale=[], target=target)
    assert plan.stop == target and plan.start is not None and plan.start <= target


def test_a_save_that_changed_no_code_runs_nothing() -> None:
    digests = ["a", "b"]
    plan = plan_run("changed", digests, executed=digests, seen=digests, kept=set(), stale=[])
    assert plan.start is None and plan.restores == ()


def test_a_block_that_does_not_run_is_reported_not_guessed() -> None:
    assert plan_run("block", ["a"], executed=[], seen=None, kept=set(), stale=[], target=None).no_such_block
