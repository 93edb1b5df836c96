"""shim.framework.exits.ExitRouter: one test per rule of its docstring, with plain objects."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from shim.framework.exits import ExitRouter


@dataclass(eq=False)
class Proc:
    name: str
    pid: int = 0


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int = 0


@pytest.fixture
def router():
    handled: list = []
    r = ExitRouter(lambda process, exit_: handled.append((process.name, exit_.pid)))
    r.handled = handled
    return r


def test_a_watched_process_exit_is_handled_at_once(router):
    p = Proc("init", 10)
    router.watch(p)
    router.on_exit(Exit(10))
    assert router.handled == [("init", 10)] and not router.is_watched(p)


def test_an_orphan_exit_is_dropped(router):
    router.on_exit(Exit(99))
    assert router.handled == []


def test_rule1_exit_before_the_pid_is_known_is_held_until_the_start_ends(router):
    p = Proc("exec")
    with router.starting(p) as start:
        router.on_exit(Exit(20))  # runc exec has not returned yet
        start.running(20)
        assert router.handled == [], "handled before the start event could go out"
        assert not router.is_watched(p)  # its exit is already in: nothing more to wait for
    assert router.handled == [("exec", 20)] and p.pid == 20


def test_rule1_other_unknown_exits_are_not_taken_for_the_process(router):
    p = Proc("exec")
    with router.starting(p) as start:
        router.on_exit(Exit(21))
        start.running(20)
    assert router.handled == [] and router.is_watched(p)
    router.on_exit(Exit(20))
    assert router.handled == [("exec", 20)]


def test_rule1_two_starts_each_get_their_own_early_exit(router):
    a, b = Proc("a"), Proc("b")
    with router.starting(a) as start_a:
        with router.starting(b) as start_b:
            router.on_exit(Exit(31))
            router.on_exit(Exit(30))
            start_b.running(31)
        assert router.handled == [("b", 31)]
        start_a.running(30)
    assert router.handled == [("b", 31), ("a", 30)]


def test_rule2_exit_of_a_starting_process_with_a_known_pid_is_parked(router):
    p = Proc("init", 40)
    router.watch(p)
    with router.starting(p):
        router.on_exit(Exit(40))  # during `runc start`
        assert router.handled == []
    assert router.handled == [("init", 40)]


def test_rule3_a_failed_start_still_hands_on_a_parked_exit_but_drops_an_unknown_one(router):
    known, unknown = Proc("init", 50), Proc("exec")
    router.watch(known)
    with pytest.raises(RuntimeError):
        with router.starting(known):
            router.on_exit(Exit(50))
            raise RuntimeError("runc start failed")
    with pytest.raises(RuntimeError):
        with router.starting(unknown):
            router.on_exit(Exit(51))
            raise RuntimeError("runc exec failed")  # pid never read: 51 is nobody's
    assert router.handled == [("init", 50)]


def test_finished_runs_after_the_held_exit_is_handed_on(router):
    order = []
    p = Proc("exec")
    router._handle = lambda process, exit_: order.append(("exit", process.name))
    with router.starting(p, finished=lambda: order.append("finished")) as start:
        router.on_exit(Exit(60))
        start.running(60)
    assert order == [("exit", "exec"), "finished"]


def test_forget_stops_routing(router):
    p = Proc("exec", 70)
    router.watch(p)
    router.forget(p)
    router.on_exit(Exit(70))
    assert router.handled == []
