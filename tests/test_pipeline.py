"""Pure tests of the pipeline split (runtime.pipeline_split) and of build_pipeline's checks:
no process group, no processes. The multi-process schedules are in test_pipeline_dist.py."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from planner.models import build_model
from runtime.pipeline import build_pipeline, local_stage_indices, validate_pipeline
from runtime.pipeline_split import SplitModel, clean_param_name, split_model
from specs import SpecError, Stage
from tests.plan_builders import block_names_of, make_plan


def _run_stages(split, *inputs):
    out = inputs
    for mod in split.stage_modules:
        out = mod(*out)
        out = out if isinstance(out, tuple) else (out,)
    return out[0]


def _with_stages(plan, stages):
    return plan.model_copy(update={"pipeline": plan.pipeline.model_copy(update={"stages": stages})})


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "mlp-tiny"])
@pytest.mark.parametrize("pp", [2, 3, 6])
def test_stages_compose_to_the_model(name, pp):
    built = build_model(name, batch=2, dtype=torch.float64)
    model = built.module
    x, _ = built.make_batch(2, torch.Generator().manual_seed(0))
    want = model(x)
    split = split_model(model, make_plan(name, pp=pp, num_micro_batches=pp, model=model))
    assert len(split.stage_modules) == pp
    torch.testing.assert_close(_run_stages(split, x), want, rtol=0, atol=0)


def test_resnet18_split_keeps_original_blocks():
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    names = block_names_of(model)
    assert names[0] == "conv1+bn1+relu+maxpool" and names[-1] == "avgpool+fc" and "layer3.1" in names
    plan = make_plan("resnet18", pp=4, model=model, num_micro_batches=4)
    split = split_model(model, plan)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(_run_stages(split, x), model(x), rtol=0, atol=0)
    # The stage holds the model's own module objects, under the model's own names.
    last = split.stage_modules[-1]
    assert last.get_submodule("fc") is model.fc
    assert {n for n, _ in last.named_parameters()} == {"layer4.1." + n for n, _ in model.layer4[1].named_parameters()} | {"fc.weight", "fc.bias"}


def test_every_parameter_in_exactly_one_stage_and_tied_copies():
    built = build_model("gpt-tiny", dtype=torch.float64)
    model = built.module
    full = dict(model.named_parameters(remove_duplicate=False))
    split = split_model(model, make_plan("gpt-tiny", pp=3, num_micro_batches=3, model=model))
    seen = [n for m in split.stage_modules for n, _ in m.named_parameters()]
    assert sorted(seen) == sorted(full)  # tied embed/head: both names, each in one stage
    assert len(split.tied) == 1
    tied = split.tied[0]
    assert tied.names == {0: "embed.tok.weight", 2: "head.lm_head.weight"}
    a = split.stage_modules[0].get_parameter("embed.tok.weight")
    b = split.stage_modules[2].get_parameter("head.lm_head.weight")
    assert a is not b and torch.equal(a, b)  # separate copies with equal values


def test_values_skipping_a_stage_are_passed_through():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            return self.c(self.b(h) + x) + h  # x and h cross two cuts

    model = Skip().double()
    plan = make_plan("skip", pp=3, num_micro_batches=3, model=model, block_names=["a", "b", "c"])
    split = split_model(model, plan)
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(_run_stages(split, x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpt-tiny", "mlp-tiny", "resnet18"])
def test_plan_builder_block_names_match_the_tracer(name):
    from planner import trace

    built = build_model(name, device="meta")
    inputs = built.example_inputs
    if name == "resnet18":
        inputs = (torch.zeros(1, 3, 64, 64, device="meta"),)
    assert block_names_of(built.module) == [b.name for b in trace(built.module, inputs).blocks]


def test_split_at_a_composite_block_name():
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    plan = make_plan("resnet18", pp=2, model=model, num_micro_batches=2)
    plan = _with_stages(plan, [Stage(first=0, last=8), Stage(first=9, last=9)])  # head "avgpool+fc" alone
    split = split_model(model, plan)
    assert {n for n, _ in split.stage_modules[1].named_parameters()} == {"fc.weight", "fc.bias"}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(_run_stages(split, x), model(x), rtol=0, atol=0)


def test_clean_param_name():
    assert clean_param_name("module.layers.0._checkpoint_wrapped_module.attn.q_proj.weight") == (
        "layers.0.attn.q_proj.weight")


@pytest.mark.parametrize(
    ("schedule", "v", "rank", "want"),
    [("1f1b", 1, 1, [1]), ("gpipe", 1, 3, [3]), ("interleaved_1f1b", 2, 1, [1, 5]),
     ("zero_bubble", 1, 2, [2]), ("zero_bubble", 2, 0, [0, 4])],
)
def test_local_stage_indices_loop_style(schedule, v, rank, want):
    assert local_stage_indices(schedule, rank, 4, v) == want


# ---------------------------------------------------------------------------- bad input
def _gpt():
    return build_model("gpt-tiny", dtype=torch.float64).module


def _raises_before_any_collective(model, plan, match):
    # A group that is not a ProcessGroup: any use of it would fail with another error.
    with pytest.raises(SpecError, match=match):
        build_pipeline(model, plan, object(), loss_fn=torch.nn.functional.mse_loss)


def test_unknown_block_name():
    model = _gpt()
    plan = make_plan("gpt-tiny", pp=2, num_micro_batches=2, model=model)
    names = list(plan.model.block_names)
    names[2] = "layer.1"
    bad = plan.model_copy(update={"model": plan.model.model_copy(update={"block_names": names})})
    _raises_before_any_collective(model, bad, r"model.block_names.2: 'layer.1' is not a module.*did you mean 'layers.1'")


def test_stages_that_do_not_cover_the_model():
    model = _gpt()
    plan = make_plan("gpt-tiny", pp=2, num_micro_batches=2, model=model)
    bad = _with_stages(plan, [Stage(first=0, last=1), Stage(first=2, last=4)])
    _raises_before_any_collective(model, bad, r"cover blocks 0..4, but the model has 6 blocks")
    gap = _with_stages(plan, [Stage(first=0, last=1), Stage(first=3, last=5)])
    _raises_before_any_collective(model, gap, r"pipeline.stages.1: covers blocks 3..5 but block 2 is next")


def test_blocks_out_of_execution_order():
    model = _gpt()
    plan = make_plan("gpt-tiny", pp=3, num_micro_batches=3, model=model)
    names = ["embed", "layers.0", "layers.3", "layers.2", "layers.1", "head"]
    bad = plan.model_copy(update={"model": plan.model.model_copy(update={"block_names": names})})
    with pytest.raises(SpecError, match="execution order"):
        split_model(model, bad)


def test_stage_starting_at_a_module_forward_never_calls():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.spare = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x))

    model = Unused()
    plan = make_plan("unused", pp=3, num_micro_batches=3, model=model, block_names=["a", "b", "spare"])
    with pytest.raises(SpecError, match=r"stages.2: its first block 'spare' is never called"):
        split_model(model, plan)


def test_schedule_micro_batch_rules():
    model = _gpt()
    with pytest.raises(SpecError, match=r"1f1b needs at least pp\(3\) micro-batches \(got 2\)"):
        validate_pipeline(model, make_plan("gpt-tiny", pp=3, num_micro_batches=2, model=model))
    plan = make_plan("gpt-tiny", pp=2, virtual_stages=2, schedule="interleaved_1f1b",
                     num_micro_batches=5, model=model)
    with pytest.raises(SpecError, match=r"num_micro_batches\(5\) % rounds\(2\)"):
        validate_pipeline(model, plan)
    validate_pipeline(model, make_plan("gpt-tiny", pp=2, virtual_stages=2, schedule="interleaved_1f1b",
                                       num_micro_batches=6, model=model))


def _hf_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.GPT2LMHeadModel(cfg)

        def forward(self, x):
            return self.m(input_ids=x, use_cache=False).logits

    names = ["m.transformer.wte+m.transformer.wpe+m.transformer.drop", "m.transformer.h.0",
             "m.transformer.h.1", "m.transformer.ln_f+m.lm_head"]
    return Wrap().double().eval(), names


def test_export_fallback_for_a_model_fx_cannot_trace():
    model, names = _hf_gpt2()
    x = torch.randint(0, 64, (2, 16))
    want = model(x)
    plan = make_plan("hf-gpt2", pp=2, micro_batch_size=2, num_micro_batches=2, model=model, block_names=names)
    with pytest.raises(SpecError, match="torch.fx cannot trace.*pass example_inputs"):
        split_model(model, plan)
    # a batch-1 example (autoplan's convention) is repeated to the micro-batch size export bakes in
    split = split_model(model, plan, (torch.zeros(1, 16, dtype=torch.long),))
    torch.testing.assert_close(_run_stages(split, x), want, rtol=0, atol=0)
    assert [t.names for t in split.tied] == [{0: "m.transformer.wte.weight", 1: "m.lm_head.weight"}]
    # torch's stale copy of the tied head weight in stage 0 is gone; every parameter is used once.
    assert "m.lm_head.weight" not in dict(split.stage_modules[0].named_parameters())
    assert "forward" not in vars(model.m.transformer.h[1])  # the split point's patch is undone


def _stage_io_counts(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """(inputs, outputs) of a stage module: its placeholders and the length of its output tuple."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return sum(n.op == "placeholder" for n in gm.graph.nodes), len(out) if isinstance(out, (tuple, list)) else 1


def test_export_split_carries_rotary_tables_through_every_stage():
    """HF Llama computes the rotary cos/sin and the causal mask once; torch's split feeds them from
    stage 0 to every stage, which PipelineStage cannot run; the rewired split passes them along."""
    pytest.importorskip("transformers")
    from torch.distributed.pipelining import SplitPoint, pipeline
    from torch.distributed.pipelining._IR import get_submod_name

    from runtime.pipeline_split import _check_neighbour_inputs, _thread_skipping_values
    from tests.hf_models import build_hf

    torch.manual_seed(0)
    model, names = build_hf("hf_llama")
    model.eval()
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    want = model(x)
    spec = {f"m.model.layers.{i}": SplitPoint.BEGINNING for i in (1, 2, 3)}
    pipe = pipeline(model, (x,), split_spec=spec)
    index = {get_submod_name(i): i for i in range(4)}
    with pytest.raises(SpecError, match="feeds stage 2 with .* from stage 0, not from stage 1"):
        _check_neighbour_inputs(pipe.split_gm.graph, index, "Wrap")  # torch's own split
    _thread_skipping_values(pipe.split_gm, index, "Wrap")
    _check_neighbour_inputs(pipe.split_gm.graph, index, "Wrap")
    counts = [_stage_io_counts(pipe.get_stage_module(i)) for i in range(4)]
    assert counts[0][0] == 1 and counts[-1][1] == 1  # tokens in, logits out
    for (_, outs), (ins, _) in zip(counts[:-1], counts[1:], strict=True):
        assert ins == outs  # stage s takes exactly stage s-1's outputs
    assert counts[1] == (4, 4)  # hidden, cos, sin, mask in; carried on to stage 2
    torch.testing.assert_close(pipe(x)[0], want, rtol=0, atol=0)  # runs the rebuilt split graph
    stages = [pipe.get_stage_module(i) for i in range(4)]
    torch.testing.assert_close(_run_stages(SplitModel(stages), x), want, rtol=0, atol=0)


@pytest.mark.parametrize(("family", "pp"), [("hf_qwen3", 3), ("hf_gpt2", 3)])
def test_export_split_of_hf_models_composes_to_the_model(family, pp):
    pytest.importorskip("transformers")
    from tests.hf_models import build_hf

    torch.manual_seed(0)
    model, names = build_hf(family)
    model.eval()
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    want = model(x)
    full = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    plan = make_plan(family, pp=pp, micro_batch_size=2, num_micro_batches=pp, model=model, block_names=names)
    split = split_model(model, plan, (x,))
    torch.testing.assert_close(_run_stages(split, x), want, rtol=0, atol=0)
    counts = [_stage_io_counts(m) for m in split.stage_modules]
    assert all(ins == outs for (_, outs), (ins, _) in zip(counts[:-1], counts[1:], strict=True)), counts
    seen = [n for m in split.stage_modules for n, _ in m.named_parameters()]
    assert len(seen) == len(set(seen)) and set(seen) == full  # each parameter in one stage
    if family == "hf_gpt2":  # wte and lm_head tied: a copy in the last stage, summed by the runtime
        assert [t.names for t in split.tied] == [{0: "m.transformer.wte.weight", pp - 1: "m.lm_head.weight"}]
    else:
        assert split.tied == []


def test_export_split_carries_a_model_input_and_a_gradient():
    """A model input read only by the last stage and an activation that skips two stages (with a
    gradient) are passed through; the stages' gradients equal the model's."""

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))

        def forward(self, x, y):
            h = self.a(x) + torch.zeros(x.shape[0], 4, dtype=x.dtype)  # a traced size: fx fails
            return self.d(self.c(self.b(h)) + h) * y

    model = Skip().double()
    plan = make_plan("skip", pp=4, micro_batch_size=2, num_micro_batches=4, model=model,
                     block_names=["a", "b", "c", "d"])
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    want = model(x, y)
    want.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    split = split_model(model, plan, (x, y))
    counts = [_stage_io_counts(m) for m in split.stage_modules]
    assert counts == [(2, 2), (2, 3), (3, 2), (2, 1)], counts  # y rides to stage 3, h to stage 2
    got = _run_stages(split, x, y)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    for m in split.stage_modules:
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
