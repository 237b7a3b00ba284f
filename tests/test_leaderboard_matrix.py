"""scripts/leaderboard_matrix.py: the condensed matrix and the before/after matrix of two leaderboards."""

import pytest

from .conftest import load_script


@pytest.fixture(scope="module")
def lm():
    yield from load_script("leaderboard_matrix")


def _row(defense, attack, asr, der, n=3, acc=0.9):
    stat = lambda v: {"mean": v, "std": 0.0, "n": n}  # noqa: E731
    return {"defense": defense, "attack": attack, "seeds_ok": n, "seeds_expected": 3,
            "metrics": {"acc": stat(acc), "asr": stat(asr), "der": stat(der), "wall_time": stat(10.0)}}  # fmt: skip


def test_before_after_pairs_delta_rows_with_plain_names_and_averages_der(lm):
    old = {"attacks": ["badnets", "blend"], "rows": [
        _row("no defense", "badnets", 1.0, 0.5), _row("fp", "badnets", 1.0, 0.49), _row("fp", "blend", 1.0, 0.47),
        _row("awm", "badnets", 0.02, 0.97), _row("awm", "blend", 0.4, 0.75), _row("clp", "badnets", 0.5, 0.7),
    ]}  # fmt: skip
    new = {"attacks": ["badnets", "blend", "sig"], "rows": [
        _row("no defense", "badnets", 1.0, 0.5), _row("fp[delta]", "badnets", 0.03, 0.98),
        _row("fp[delta]", "blend", 0.9, 0.55, n=2), _row("fp[paper]", "badnets", 0.5, 0.7),
        _row("awm", "badnets", 0.01, 0.98), _row("sau", "badnets", 0.01, 0.99),
    ]}  # fmt: skip
    lines = lm.before_after(new, old)
    assert lines[0] == "| defense | | badnets | blend | mean DER |"  # only the attacks both have
    body = lines[2:]
    assert [line.split(" | ")[:2] for line in body] == [
        ["| fp", "before"],
        ["| fp[delta]", "after"],
        ["| awm", "before"],
        ["| awm", "after"],
    ]  # fp[paper] and sau have no "before"; clp is not in NEW
    assert body[0].endswith("| 0.480 |") and "**90.00 ± 0.00 / 3.00 ± 0.00 (0.980)**" in body[1]  # bold: ASR <= 5%
    assert "[2/3 seeds]" in body[1] and body[1].endswith("| 0.765 |")
    assert body[3].split(" | ")[3] == "missing" and body[3].endswith("| — |")  # no mean DER over a missing cell


def test_wall_time_is_per_device_when_some_cells_ran_on_a_gpu(lm):
    stat = lambda *v: {"mean": sum(v) / len(v), "std": 0.0, "n": len(v), "values": list(v)}  # noqa: E731
    cpu_only = _row("fst", "badnets", 0.0, 0.98)  # written before devices were recorded: counts as CPU
    cpu_only["metrics"]["wall_time"] = stat(30.0, 40.0)
    mixed = _row("awm", "blend", 0.3, 0.8)
    mixed["wall_time_by_device"] = {"cpu": stat(354.0), "cuda": stat(16.0, 18.0)}
    gpu = _row("awm", "trojan", 0.03, 0.96)
    gpu["wall_time_by_device"] = {"cuda": stat(12.0)}
    assert lm.wall_time([cpu_only]) == "35 s"
    assert lm.wall_time([mixed, gpu]) == "cpu 354 s, cuda 15 s"
    assert lm.wall_time([gpu]) == "cuda 12 s" and lm.wall_time([]) == "—"
