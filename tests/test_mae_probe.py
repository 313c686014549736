"""MAE's linear probe in one process: its LARS step, and a run stopped between epochs continuing
exactly where it stopped."""
import pytest
import torch

from energyvit.distributed import DistInfo
from energyvit.evaluation.mae_probe import MAEProbeOptions, train_mae_probe
from energyvit.lars import LARS
from helpers import tiny_model
from test_distributed_evaluation import splits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lars_rescales_weight_matrices_only():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]).repeat(2, 1))  # |w| = 5 sqrt(2)
    b = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    w.grad, b.grad = torch.tensor([[0.0, 0.5]]).repeat(2, 1), torch.tensor([0.5, -1.0])
    opt = LARS([w, b], lr=0.1, weight_decay=0.2, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    update = w.grad + 0.2 * torch.tensor([[3.0, 4.0]]).repeat(2, 1)  # weight decay on the matrix
    ratio = 0.001 * (5 * 2 ** 0.5) / update.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]).repeat(2, 1) - 0.1 * ratio * update)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.05, 2.0 + 0.1]))  # plain SGD step, no decay
    opt.step()  # momentum: the buffer holds the first update
    update2 = w.grad + 0.2 * w.detach()
    ratio2 = 0.001 * w.detach().norm() / update2.norm()
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], 0.9 * ratio * update + ratio2 * update2)
    torch.testing.assert_close(opt.state[b]["momentum_buffer"], 0.9 * b.grad + b.grad)


def test_lars_keeps_the_plain_step_for_a_zero_matrix():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([w], lr=0.5).step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.5))


OPTIONS = MAEProbeOptions(epochs=3, warmup_epochs=1, batch_size=16, blr=16.0, seed=3)


def test_a_stopped_probe_continues_exactly(tmp_path):
    data = splits()
    straight = train_mae_probe(tiny_model(), "tokens", data, OPTIONS, DistInfo(), "cpu", log=lambda s: None,
                               save_to=tmp_path / "straight.pth")

    def stop_after_epoch_2(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_mae_probe(tiny_model(), "tokens", data, OPTIONS, DistInfo(), "cpu", log=stop_after_epoch_2,
                        save_to=tmp_path / "stopped.pth")
    assert torch.load(tmp_path / "stopped.pth", weights_only=True)["epoch"] == 2
    lines = []
    resumed = train_mae_probe(tiny_model(), "tokens", data, OPTIONS, DistInfo(), "cpu", log=lines.append,
                              save_to=tmp_path / "stopped.pth", resume_from=tmp_path / "stopped.pth")
    assert lines[0].startswith("continuing") and len(lines) == 2  # one epoch left
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    for name, value in straight["head"].state_dict().items():
        assert torch.equal(resumed["head"].state_dict()[name], value), name
    assert resumed["top1"] == straight["top1"] == 1.0


def test_a_probe_state_continues_only_the_same_probe(tmp_path):
    data = splits()
    train_mae_probe(tiny_model(), "tokens", data, MAEProbeOptions(epochs=1, batch_size=16, blr=16.0), DistInfo(), "cpu",
                    log=lambda s: None, save_to=tmp_path / "s.pth")
    with pytest.raises(ValueError, match=r"s.pth is the probe of other settings.*blr 16.0 \(now 8.0\)"):
        train_mae_probe(tiny_model(), "tokens", data, MAEProbeOptions(epochs=1, batch_size=16, blr=8.0), DistInfo(),
                        "cpu", resume_from=tmp_path / "s.pth")
    with pytest.raises(ValueError, match=r"encoder \["):  # other weights
        train_mae_probe(tiny_model(seed=1), "tokens", data, MAEProbeOptions(epochs=1, batch_size=16, blr=16.0),
                        DistInfo(), "cpu", resume_from=tmp_path / "s.pth")
