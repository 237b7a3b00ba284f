"""scripts/defend_zoo.py --summary: every verdict detector's decision on each model's recorded statistics."""

import json

import pytest

from onp.backdoor_verdict import backdoor_verdict

from .conftest import load_script


@pytest.fixture
def defend_zoo():
    yield from load_script("defend_zoo")


def _row(attack, seed, pvalue, index0, detector="combined"):
    info = {
        "estimated_target": 0,
        "anomaly_index": [index0] + [0.1 * i for i in range(1, 10)],
        "trigger_size": [30.0] * 10,
        "success": [1.0] * 10,
        "min_success": 0.9,
        "detector": detector,
        "max_margin": [25.6, 15.7, 12.1, 9.9, 11.0, 11.3, 8.4, 6.9, 12.6, 16.3],
        "max_margin_pvalue": pvalue,
        "max_margin_alpha": 0.05,
    }
    if detector == "trigger-size":
        info = {k: v for k, v in info.items() if not k.startswith("max_margin")}
    verdict = backdoor_verdict(info, estimator="synthesized-multi", threshold=2.0)
    return {"attack": attack, "seed": seed, "report": {"verdict": json.loads(json.dumps(verdict.to_dict()))}}


def test_the_summary_counts_each_detector_right_on_backdoored_and_clean_models(defend_zoo, tmp_path, capsys):
    rows = [
        _row("sig", 3, 0.071, -1.06),  # combined flags it (p 0.037), neither statistic alone does
        _row("sig", 4, 0.01, -0.2),  # max margin alone flags it
        _row("clean", 3, 0.46, 0.76),  # nothing flags a clean model
        _row("badnets", 3, 0.5, -3.0, detector="trigger-size"),  # no margins recorded: n/a for those rules
    ]
    table = defend_zoo.detector_table(rows)
    assert table[2].startswith("| sig s3 | 0, -1.06 | 0, 0.071 | 0.037 | not suspected ✗ | not suspected ✗ |")
    assert table[2].endswith("| not suspected ✗ | suspected ✓ |")
    assert "| badnets s3 | 0, -3.00 | – | – | suspected ✓ | n/a | n/a | n/a |" in table
    assert table[-4:] == [
        "* `trigger-size`: right on 2 of 4",
        "* `max-margin`: right on 2 of 3",
        "* `either`: right on 2 of 3",
        "* `combined`: right on 3 of 3",
    ]
    out = tmp_path / "vz"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert defend_zoo.main(["--summary", str(out)]) == 0
    assert "* `combined`: right on 3 of 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        defend_zoo.main([])
    assert "--out is required" in capsys.readouterr().err
