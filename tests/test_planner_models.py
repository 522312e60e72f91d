"""Issue 4 "works on": autoplan plans the bundled families, an MLP, torchvision resnet50 and
vit_b_16, and Hugging Face GPT-2 / Llama built from configs, for a 64-GPU H100 cluster."""

import pytest

from planner import autoplan
from specs import HardwareSpec, TrainSpec

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
