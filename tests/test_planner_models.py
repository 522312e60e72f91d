"""Issue 4 "works on": autoplan plans the bundled families, an MLP, torchvision resnet50 and
vit_b_16, and Hugging Face GPT-2 / Llama built from configs, for a 64-GPU H100 cluster."""

import pytest

from planner import autoplan
from specs import HardwareSpec, SpecError, TrainSpec

pytestmark = pytest.mark.tier2

MODELS = ["gpt2-125m", "llama-tiny", "mlp-tiny", "resnet50", "vit_b_16", "hf-gpt2-tiny", "hf-llama-tiny"]


@pytest.mark.parametrize("name", MODELS)
def test_autoplan_works_on(name):
    hw = HardwareSpec.load("dgx-h100-80gb:64")
    plan = autoplan(name, hw, train=TrainSpec(global_batch_size=256, precision="bf16"))
    k = plan.knobs()
    assert k.pp * k.dp * k.tp == 64
    assert plan.predicted is not None and plan.predicted.fits
    assert 0 < plan.predicted.step_time_s
    assert plan.predicted.peak_memory_bytes <= hw.device.memory_bytes
    assert k.tp <= hw.devices_per_node
    assert plan.search is not None and plan.search.candidates_scored >= 1


def test_a_factory_gives_its_loss_or_none(tmp_path, monkeypatch):
    """(module, inputs, loss_fn) carries the user's loss; (module, inputs) has none (runtime.launch
    then refuses to train instead of guessing mse_loss(output, inputs))."""
    import sys

    from planner.models import build_model

    (tmp_path / "facmod.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def loss(o, t):\n    return (o - t).abs().mean()\n"
        "def two():\n    return nn.Linear(4, 4), (torch.zeros(2, 4),)\n"
        "def three():\n    return nn.Linear(4, 4), (torch.zeros(2, 4),), loss\n"
        "def bad():\n    return nn.Linear(4, 4), (torch.zeros(2, 4),), 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("facmod:two").loss_fn is None
    assert build_model("facmod:three").loss_fn is sys.modules["facmod"].loss
    with pytest.raises(SpecError, match="third value must be loss_fn"):
        build_model("facmod:bad")
