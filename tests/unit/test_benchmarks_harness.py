"""The benchmark harness's order of runs: alternating arms take turns at going first."""

from __future__ import annotations

from benchmarks.harness import Arm, BenchError, alternate


def _arms(order: list[str], reps: dict[str, int], fail: str | None = None) -> list[Arm]:
    def run_as(name: str):
        def run(rep: int) -> float:
            order.append(name)
            if name == fail and rep == 1:
                raise BenchError("boom")
            return 1.0

        return run

    return [Arm(name, run_as(name), n) for name, n in reps.items()]


def _rounds(order: list[str], sizes: list[int]) -> list[list[str]]:
    out, i = [], 0
    for n in sizes:
        out.append(order[i : i + n])
        i += n
    return out


def test_each_round_starts_one_arm_later_so_no_arm_always_goes_first() -> None:
    order: list[str] = []
    arms = _arms(order, {"runctl": 3, "s5cmd": 3, "aws": 3})
    alternate(arms, lambda _msg: None)
    assert _rounds(order, [3, 3, 3]) == [
        ["runctl", "s5cmd", "aws"],
        ["s5cmd", "aws", "runctl"],
        ["aws", "runctl", "s5cmd"],
    ]
    assert [len(a.samples) for a in arms] == [3, 3, 3]


def test_arms_with_fewer_reps_drop_out_and_the_two_left_swap_places_each_round() -> None:
    order: list[str] = []
    alternate(_arms(order, {"runctl": 5, "s5cmd": 5, "aws": 1, "boto3": 1}), lambda _msg: None)
    assert _rounds(order, [4, 2, 2, 2, 2]) == [
        ["runctl", "s5cmd", "aws", "boto3"],
        ["s5cmd", "runctl"],
        ["runctl", "s5cmd"],
        ["s5cmd", "runctl"],
        ["runctl", "s5cmd"],
    ]


def test_a_failed_arm_keeps_its_error_and_runs_no_more() -> None:
    order: list[str] = []
    arms = _arms(order, {"runctl": 3, "s5cmd": 3}, fail="runctl")
    alternate(arms, lambda _msg: None)
    assert order == ["runctl", "s5cmd", "s5cmd", "runctl", "s5cmd"]
    assert arms[0].error == "boom"
    assert arms[0].samples == [1.0]
    assert arms[1].samples == [1.0, 1.0, 1.0]
