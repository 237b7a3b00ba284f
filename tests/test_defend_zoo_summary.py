"""scripts/defend_zoo.py --summary: every verdict detector's decision on each model's recorded statistics."""

import json

import pytest

from onp.backdoor_verdict import backdoor_verdict

from .conftest import load_script
from .test_max_margin import _info


@pytest.fixture
def defend_zoo():
    yield from load_script("defend_zoo")


def _row(attack, seed, pvalue, index0, detector="combined", target=0, index6=0.6):
    """One results.jsonl line: the verdict of a synthesized-multi run (class 0: the largest margin; class 6's
    trigger-size index ``index6``); ``target``: the real target recorded (absent: ``None``)."""
    info = _info(detector, pvalue, index0=index0)
    info["anomaly_index"][6] = index6
    if detector == "trigger-size":
        info = {k: v for k, v in info.items() if not k.startswith("max_margin")}
    verdict = backdoor_verdict(info, estimator="synthesized-multi", threshold=2.0)
    row = {"attack": attack, "seed": seed, "report": {"verdict": json.loads(json.dumps(verdict.to_dict()))}}
    return row if target is None or attack == "clean" else {**row, "target": target}


def _gap_row():
    info = _info("confirmed", 0.5)
    info = {k: v for k, v in info.items() if not k.startswith("max_margin")}
    info["anomaly_index"][8], info["estimated_target"] = -3.47, 8
    info.update(latent_gap=[0.1] * 10, latent_gap_index=[0.0] * 8 + [-0.36, 0.0])
    verdict = backdoor_verdict(info, estimator="synthesized-multi", threshold=2.0)
    return {"attack": "clean", "seed": 12, "report": {"verdict": json.loads(json.dumps(verdict.to_dict()))}}


def _trojan_row():
    """A Trojan model: nothing confirms a small trigger, the max margin of class 0 is significant."""
    info = {**_info("confirmed-or-margin", 1e-6), "max_margin_alpha": 0.005}
    info.update(latent_gap=[0.1] * 10, latent_gap_index=[0.5] + [0.0] * 9)
    verdict = backdoor_verdict(info, estimator="synthesized-multi", threshold=2.0)
    return {
        "attack": "trojan",
        "seed": 4,
        "target": 0,
        "report": {"verdict": json.loads(json.dumps(verdict.to_dict()))},
    }


def test_the_summary_counts_each_detector_right_on_backdoored_and_clean_models(defend_zoo, tmp_path, capsys):
    rows = [
        _row("sig", 3, 0.071, -1.06),  # combined flags it (p 0.037), neither statistic alone does
        _row("sig", 4, 0.01, -0.2),  # max margin alone flags it
        _row("clean", 3, 0.46, 0.76),  # nothing flags a clean model
        _row("badnets", 3, 0.5, -3.0, detector="trigger-size"),  # no margins recorded: n/a for those rules
        _row("sig", 6, 0.3, -0.5, index6=-4.0),  # the trigger size flags class 6: the wrong target
        _row("sig", 7, 0.3, -0.5, index6=-4.0, target=None),  # the same, from a row without the real target
        _gap_row(),  # a clean model's natural patch: the trigger size flags class 8, the latent gap does not
        _trojan_row(),  # confirmed misses it, the max margin does not
    ]
    table = defend_zoo.detector_table(rows)
    assert table[2].startswith("| sig s3 | 0, -1.06 | 0, 0.071 | 0.037 | not suspected ✗ | not suspected ✗ |")
    assert table[2].endswith("| not suspected ✗ | suspected (0) ✓ | n/a | n/a |")  # no latent gaps recorded
    assert "| badnets s3 | 0, -3.00 | – | – | suspected (0) ✓ | n/a | n/a | n/a | n/a | n/a |" in table
    wrong = "suspected (6) ✗"
    assert (
        table[6] == f"| sig s6 | 6, -4.00 | 0, 0.3 | 0.23 | {wrong} | not suspected ✗ | {wrong} | {wrong} | n/a | n/a |"
    )
    assert table[7].startswith("| sig s7 | 6, -4.00 | 0, 0.3 | 0.23 | suspected (6) ✓ |")
    assert table[8] == "| clean s12 | 8, -3.47 | – | – | suspected (8) ✗ | n/a | n/a | n/a | not suspected ✓ | n/a |"
    assert table[9].endswith("| not suspected ✗ | suspected (0) ✓ |")  # trojan s4: confirmed, confirmed-or-margin
    assert table[-6:] == [
        "* `trigger-size`: right on 3 of 8",
        "* `max-margin`: right on 3 of 6",
        "* `either`: right on 4 of 6",
        "* `combined`: right on 5 of 6",
        "* `confirmed`: right on 1 of 2",
        "* `confirmed-or-margin`: right on 1 of 1",
    ]
    out = tmp_path / "vz"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert defend_zoo.main(["--summary", str(out)]) == 0
    assert "* `combined`: right on 5 of 6" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        defend_zoo.main([])
    assert "--out is required" in capsys.readouterr().err
