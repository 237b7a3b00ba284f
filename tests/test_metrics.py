import pytest
import torch

from onp.metrics import accuracy, der, evaluate_backdoor, with_der


def test_accuracy_hand_computed():
    assert accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == pytest.approx(0.5)
    assert accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 0.0


@pytest.mark.parametrize(
    "before, after, expected",
    [
        ((0.92, 1.00), (0.92, 0.00), 1.0),  # ASR removed, no ACC loss
        ((0.92, 1.00), (0.92, 1.00), 0.5),  # nothing changed
        ((0.92, 1.00), (0.82, 0.00), 0.95),  # (1 - 0.10 + 1) / 2
        ((0.90, 0.50), (0.95, 0.80), 0.5),  # ASR *rose* and ACC rose: both clipped at 0
        ((0.90, 0.50), (0.80, 0.90), 0.45),  # ASR rose (clipped), ACC fell 0.10 -> (0 - 0.1 + 1)/2
        ((0.90, 0.90), (0.00, 0.00), 0.5),  # killing the model: ASR gain cancelled by ACC loss
    ],
)
def test_der_sign_and_values(before, after, expected):
    assert der(before[0], before[1], after[0], after[1]) == pytest.approx(expected)


class _Fixed(torch.nn.Module):
    """Predicts class 0 if pixel (0,0) is bright, else the label encoded in pixel (0,1)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        label = (x[:, 0, 0, 1] * 10).round().long().clamp(0, 9)
        out = torch.nn.functional.one_hot(label, 10).float()
        bright = x[:, 0, 0, 0] > 0.5
        out[bright] = torch.nn.functional.one_hot(torch.zeros(int(bright.sum()), dtype=torch.long), 10).float()
        return out + 0 * self.p


class _Corner:
    """Trigger: bright pixel (0,0); target 0; all-to-one excludes target-class images."""

    def poisoned_eval_set(self, x, y):
        keep = y != 0
        xb = x[keep].clone()
        xb[:, 0, 0, 0] = 1.0
        return xb, torch.zeros(int(keep.sum()), dtype=torch.long), y[keep]


def test_evaluate_backdoor_acc_asr_ra():
    y = torch.tensor([0, 1, 2, 3, 4])
    x = torch.zeros(5, 1, 4, 4)
    x[:, 0, 0, 1] = y.float() / 10
    x[4, 0, 0, 1] = 0.9  # one clean mistake: label 4 predicted as 9
    m = evaluate_backdoor(_Fixed(), x, y, _Corner())
    assert m["acc"] == pytest.approx(0.8)
    assert m["asr"] == pytest.approx(1.0)  # 4 non-target images all flipped to 0
    assert m["ra"] == pytest.approx(0.0)
    assert with_der({"acc": 0.8, "asr": 1.0}, {"acc": 0.8, "asr": 0.0})["der"] == pytest.approx(1.0)
