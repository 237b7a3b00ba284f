"""Fine-tuning after pruning (agents.finetune_pruned) and the FT loop's BN-statistics switch."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from agents import finetune_pruned
from baselines.base import DefenseError, PassCounter
from baselines.ft import FTParams, finetune
from envs import NeuronPruningEnv
from onp.evidence import EvidenceRule
from onp.masks import apply_pruning
from onp.train_config import FinetuneConfig, RolloutConfig

from .conftest import random_defense_data

#: keeps any pruning (no significance test, any accuracy cost: the env's delta is 1 too), so the
#: mechanics are tested on any neurons
RULE = EvidenceRule(alpha=None, max_acc_drop=1.0)


@pytest.fixture(scope="module")
def env(tiny_bundle):
    e = NeuronPruningEnv(tiny_bundle, delta=1.0)  # any accuracy cost is allowed, as by RULE
    yield e
    e.close()


@pytest.fixture(scope="module")
def target(env):
    return env.target


def _pruned(tiny_bundle, target, pruned):
    model = apply_pruning(tiny_bundle.model, target.graph, pruned, "gamma").eval()
    initial = {"acc": target.initial.acc, "asr": target.initial.asr}
    ev = target.evaluate_model(model)
    judgement = RULE.judge(initial, {"acc": ev.acc, "asr": ev.asr, "n_pruned": len(pruned)}, len(target.probe.images))
    return model, judgement


def _finish(tiny_bundle, env, model, judgement, config, pruned=(), **kwargs):
    """``finetune_pruned`` on ``model`` (``pruned`` written in) with RULE's settings."""
    return finetune_pruned(
        model,
        list(pruned),
        env=env,
        data=tiny_bundle.defense_data,
        rollout=RolloutConfig(evidence_alpha=None, finetune=config),
        judgement=judgement,
        seed=0,
        **kwargs,
    )


def _run(tiny_bundle, env, pruned, config):
    model, judgement = _pruned(tiny_bundle, env.target, pruned)
    before = copy.deepcopy(model.state_dict())
    out = _finish(tiny_bundle, env, model, judgement, config, pruned)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is not modified
    return model, judgement, out


def test_pruned_neurons_stay_pruned_and_bn_statistics_stay_frozen(tiny_bundle, env, target):
    pruned = [1, 4, 20, 33]
    model, judgement, out = _run(tiny_bundle, env, pruned, FinetuneConfig(epochs=3, lr=0.01))
    assert out.info["epochs"] == 3 and len(out.info["history"]) == 4
    returns = [h["score"] for h in out.info["history"]]
    assert returns[out.info["best_epoch"]] == max(returns)  # the best defense-val return, epoch 0 included
    assert out.info["history"][0]["acc"] == pytest.approx(judgement.acc_after)  # epoch 0 is the pruning alone
    ev = target.evaluate_model(out.model)
    assert (out.judgement.acc_after, out.judgement.asr_after) == (ev.acc, ev.asr)  # judged on the model handed out
    assert out.info["best_epoch"] > 0  # here a fine-tuned epoch wins (lr 0.01 on the tiny model)
    assert out.model is not model and out.val == {"acc": ev.acc, "asr": ev.asr}
    tuned = dict(out.model.named_modules())
    changed = False
    for node in pruned:
        layer = target.graph.layers[int(target.graph.node_layer[node])]
        assert tuned[layer.bn_name].weight[int(target.graph.node_channel[node])] == 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(tuned[name].running_mean, module.running_mean)
            assert torch.equal(tuned[name].running_var, module.running_var)
            changed |= not torch.equal(tuned[name].weight, module.weight)
    assert changed  # it did train


def test_a_fine_tuning_that_only_hurts_keeps_the_pruning_alone(tiny_bundle, env, target):
    model, judgement, out = _run(tiny_bundle, env, [2, 7], FinetuneConfig(epochs=2, lr=10.0, momentum=0.0))
    assert out.info["best_epoch"] == 0 and out.model is model and out.judgement == judgement and out.val is None
    assert out.info["history"][1]["score"] < out.info["history"][0]["score"]


def test_off_or_nothing_pruned_does_nothing(tiny_bundle, env, target):
    model, judgement, out = _run(tiny_bundle, env, [3], FinetuneConfig(epochs=0))
    assert out.model is model and out.judgement is judgement and "off" in out.info["note"]
    model, judgement, out = _run(tiny_bundle, env, [], FinetuneConfig())
    assert out.model is model and out.info["epochs"] == 0 and "nothing is pruned" in out.info["note"]


def test_the_ft_loop_freezes_or_updates_bn_statistics():
    from onp.models import build_model

    data = random_defense_data(n_train=32, n_val=16)
    for bn_stats, same in (("frozen", True), ("update", False)):
        model = build_model("small_cnn", in_channels=1, width=4).eval()
        stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        p = FTParams(epochs=1, batch_size=16, augment=False, bn_stats=bn_stats)
        finetune(model, data, p, seed=0, augment=None, counter=PassCounter())
        now = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(torch.equal(a, b) for a, b in zip(stats, now)) == same
    with pytest.raises(DefenseError, match="bn_stats.*valid: update, frozen"):
        finetune(model, data, FTParams(bn_stats="eval"), seed=0, augment=None, counter=PassCounter())


def test_unlearning_stamps_a_fraction_of_each_batch_and_keeps_the_labels():
    from agents.finetune import TriggerUnlearning

    x = torch.rand(2000, 1, 8, 8) * 0.5
    x0 = x.clone()
    stamp = lambda b: torch.ones_like(b)  # noqa: E731 -- a trigger that paints the image white
    out = TriggerUnlearning(stamp, 0.2, base=None)(x, torch.Generator().manual_seed(0))
    stamped = (out == 1).flatten(1).all(1)
    assert 0.17 < stamped.float().mean() < 0.23  # about the fraction asked for
    assert torch.equal(out[~stamped], x0[~stamped]) and torch.equal(x, x0)  # the others and the input untouched
    again = TriggerUnlearning(stamp, 0.2, base=None)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator decides which images


def test_unlearning_fine_tunes_on_the_estimators_trigger(tiny_bundle, env, target, monkeypatch):
    """rollout.finetune.unlearn stamps the probe's own trigger (here the real one: ``trigger``)."""
    assert target.probe.stamp is not None
    x = tiny_bundle.defense_data.val_x
    keep = tiny_bundle.defense_data.val_y != int(target.probe.target_labels[0])
    assert torch.allclose(target.probe.stamp(x[keep])[: len(target.probe.images)], target.probe.images)
    calls = []
    real = target.probe.stamp
    monkeypatch.setattr(target.probe, "stamp", lambda b: calls.append(len(b)) or real(b))
    pruned = [1, 4, 20, 33]
    _, _, plain = _run(tiny_bundle, env, pruned, FinetuneConfig(epochs=2, lr=0.01, unlearn=[0.0]))
    assert not calls
    _, _, out = _run(tiny_bundle, env, pruned, FinetuneConfig(epochs=2, lr=0.01, unlearn=[0.5]))
    n_train = len(tiny_bundle.defense_data.train_y)
    assert 0.3 * 2 * n_train < sum(calls) < 0.7 * 2 * n_train  # about half of every epoch's images
    assert out.info["history"][1]["train_loss"] != plain.info["history"][1]["train_loss"]  # it trained on them
    # a trigger-agnostic estimate would judge the trigger it was trained against: no unlearning, unless asked
    monkeypatch.setattr(target.probe, "trigger_aware", False)
    calls.clear()
    _, _, agnostic = _run(tiny_bundle, env, pruned, FinetuneConfig(epochs=2, lr=0.01, unlearn=[0.0, 0.5]))
    assert not calls and agnostic.info["history"] == plain.info["history"]
    assert "trained against" in agnostic.info["candidates"][1]["skipped"]
    cfg = FinetuneConfig(epochs=2, lr=0.01, unlearn=[0.0, 0.5], unlearn_estimated=True)
    _, _, opted = _run(tiny_bundle, env, pruned, cfg)
    assert calls and opted.info["candidates"][1]["best_return"] == out.info["candidates"][0]["best_return"]
    monkeypatch.setattr(target.probe, "stamp", None)  # an estimator with no trigger to stamp: plain fine-tuning
    _, _, only = _run(tiny_bundle, env, pruned, FinetuneConfig(epochs=2, lr=0.01, unlearn=[0.0, 0.2]))
    assert only.info["unlearn"] == 0.0 and only.info["history"] == plain.info["history"]
    assert only.info["candidates"][1] == {"unlearn": 0.2, "skipped": "the ASR estimator has no trigger to stamp"}


def test_the_fine_tuning_with_the_best_defense_val_return_is_kept(tiny_bundle, env):
    pruned = [1, 4, 20, 33]
    _, _, out = _run(tiny_bundle, env, pruned, FinetuneConfig(epochs=2, lr=0.01, unlearn=[0.0, 0.5]))
    cands = out.info["candidates"]
    assert [c["unlearn"] for c in cands] == [0.0, 0.5]
    best = max(cands, key=lambda c: c["best_return"])  # max() keeps the first of equals, as the rule does
    assert out.info["unlearn"] == best["unlearn"]
    assert max(h["score"] for h in out.info["history"]) == best["best_return"]


def test_a_tie_between_fine_tunings_goes_to_the_first_listed(tiny_bundle, env, monkeypatch):
    import agents.finetune as ft

    real = ft._train_pruned

    def equal_scores(*args):
        tuned, info, records = real(*args)
        return tuned, {**info, "best_epoch": 1, "best_score": 0.5}, records

    monkeypatch.setattr(ft, "_train_pruned", equal_scores)
    for order in ([0.2, 0.0], [0.0, 0.2]):
        _, _, out = _run(tiny_bundle, env, [1, 4, 20, 33], FinetuneConfig(epochs=1, lr=0.01, unlearn=order))
        assert out.info["unlearn"] == order[0]


def test_the_fst_finisher_tunes_the_whole_pruned_model_with_a_new_head_and_keeps_its_last_epoch(
    tiny_bundle, env, target
):
    """``method: fst``: the pruned neurons stay pruned, the head is re-initialised and pushed away from the
    original (cosine < 1), the BN statistics move (FST trains in train mode), the last epoch is handed out
    and judged on the model handed out; the record says fst."""
    from baselines.fst import classifier_head

    pruned = [1, 4, 20, 33]
    model, judgement, out = _run(tiny_bundle, env, pruned, FinetuneConfig(method="fst", epochs=2))
    assert out.info["method"] == "fst" and out.info["best_epoch"] == 2 and out.info["unlearn"] == 0.0
    assert [h["epoch"] for h in out.info["history"]] == [0, 1, 2]
    assert out.info["history"][0]["acc"] == pytest.approx(judgement.acc_after)
    ret = (out.judgement.acc_after - target.initial.acc) - env.lam * (out.judgement.asr_after - target.initial.asr)
    assert out.info["candidates"] == [{"method": "fst", "best_epoch": 2, "best_return": pytest.approx(ret)}]
    assert out.info["history"][2]["cos_to_original"] < 0.99  # the head moved away from the original
    ev = target.evaluate_model(out.model)
    assert (out.judgement.acc_after, out.judgement.asr_after) == (ev.acc, ev.asr)
    assert out.info["history"][2]["acc"] == ev.acc and out.val == {"acc": ev.acc, "asr": ev.asr}
    tuned = dict(out.model.named_modules())
    for node in pruned:
        layer = target.graph.layers[int(target.graph.node_layer[node])]
        assert tuned[layer.bn_name].weight[int(target.graph.node_channel[node])] == 0
    stats_moved = any(
        not torch.equal(tuned[name].running_mean, m.running_mean)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    )
    assert stats_moved
    _, head = classifier_head(out.model, tiny_bundle.defense_data.num_classes)
    _, original = classifier_head(model, tiny_bundle.defense_data.num_classes)
    assert float(head.weight.norm()) == pytest.approx(float(original.weight.norm()), rel=1e-4)  # FST's norm constraint


def _rejected(tiny_bundle, target, pruned):
    """The unpruned model and the judgement ``select_pruning`` hands on when it rejects ``pruned``."""
    _, judgement = _pruned(tiny_bundle, target, pruned)
    rejected = dataclasses.replace(judgement, keep=False, verdict="nothing pruned", reason="rejected (test)")
    return copy.deepcopy(tiny_bundle.model).eval(), rejected


def test_a_rejected_pruning_of_a_suspected_model_is_replaced_by_fst_on_the_unpruned_model(tiny_bundle, env, target):
    """``finish_unpruned`` with ``method: fst``: FST runs on the unpruned model, starts from and is judged
    against its figures (not the rejected pruning's), and its last epoch is handed out with 0 neurons pruned."""
    model, rejected = _rejected(tiny_bundle, target, [1, 4, 20, 33])
    before = copy.deepcopy(model.state_dict())
    out = _finish(tiny_bundle, env, model, rejected, FinetuneConfig(method="fst", epochs=2), finish_unpruned=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is not modified
    assert out.info["unpruned"] is True and out.info["best_epoch"] == 2 and out.model is not model
    assert out.info["history"][0]["acc"] == pytest.approx(target.initial.acc)  # epoch 0: the unpruned model
    assert out.info["val_before"] == {"acc": target.initial.acc, "asr": target.initial.asr}
    ev = target.evaluate_model(out.model)
    j = out.judgement
    assert j.keep and j.n_pruned == 0 and j.verdict in ("removed", "not removed")
    assert (j.acc_before, j.asr_before, j.acc_after, j.asr_after) == (
        target.initial.acc,
        target.initial.asr,
        ev.acc,
        ev.asr,
    )


def test_without_a_suspected_backdoor_or_with_plain_fine_tuning_a_rejected_pruning_stays_unrepaired(
    tiny_bundle, env, target
):
    model, rejected = _rejected(tiny_bundle, target, [2, 7])
    for config, suspected in ((FinetuneConfig(method="fst", epochs=1), False), (FinetuneConfig(epochs=1), True)):
        out = _finish(tiny_bundle, env, model, rejected, config, finish_unpruned=suspected)
        assert out.model is model and out.judgement is rejected and "nothing is pruned" in out.info["note"]


def test_an_fst_repair_the_rule_refuses_hands_back_the_rejected_pruning(tiny_bundle, env, target, monkeypatch):
    class Refusing(EvidenceRule):
        def judge(self, before, after, n_triggered, *, repaired=False):
            j = super().judge(before, after, n_triggered, repaired=repaired)
            return dataclasses.replace(j, keep=False, reason="refused (test)") if repaired else j

    monkeypatch.setattr(RolloutConfig, "evidence_rule", lambda self, delta: Refusing(alpha=None, max_acc_drop=1.0))
    model, rejected = _rejected(tiny_bundle, target, [2, 7])
    out = _finish(tiny_bundle, env, model, rejected, FinetuneConfig(method="fst", epochs=1), finish_unpruned=True)
    assert out.model is model and out.judgement is rejected
    assert (
        out.info["unpruned"] is True and out.info["note"] == "not kept: refused (test)" and out.info["best_epoch"] == 0
    )
    assert out.val is None


def test_an_unknown_finisher_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="'ft' or 'fst'"):
        FinetuneConfig(method="sau")


def test_the_fst_finisher_is_the_fst_baseline_with_the_augmentation_it_is_given(tiny_bundle, env, target):
    """On the unpruned model, the FST finisher hands out exactly the FST baseline's model when both get the
    same augmentation and seed (the dataset's, as onp.train/onp.evaluate pass it and onp.baseline gives the
    baseline); with pad-and-crop only (no augmentation passed) the weights differ (docs/results.md §25a)."""
    from baselines import build_defense
    from onp.data.augment import Augment

    flips = Augment.for_spec(tiny_bundle.spec)
    assert flips.hflip  # Fashion-MNIST: flips are the dataset's augmentation
    model, rejected = _rejected(tiny_bundle, target, [2, 7])
    config = FinetuneConfig(method="fst", epochs=2)
    given = _finish(tiny_bundle, env, model, rejected, config, finish_unpruned=True, augment=flips)
    default = _finish(tiny_bundle, env, model, rejected, config, finish_unpruned=True)
    baseline = build_defense("fst", epochs=2).fit(copy.deepcopy(model), tiny_bundle.defense_data, seed=0, augment=flips)
    assert given.info["unpruned"] is True and given.model is not model
    tuned, reference, other = given.model.state_dict(), baseline.model.state_dict(), default.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in tuned.items())
    assert not all(torch.equal(v, other[k]) for k, v in tuned.items())
