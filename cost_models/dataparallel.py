"""Single-process `torch.nn.DataParallel`, scored so the explainer can say why DDP wins.

One Python process drives all n devices (torch/nn/parallel/data_parallel.py). Per step, with
the global batch B split into n chunks of ceil(B/n):

1. scatter: device 0 sends each other device its input chunk (serial from device 0);
2. replicate: the parameters are broadcast from device 0 to every device, EVERY step
   (`broadcast_coalesced`, an NCCL broadcast);
3. parallel_apply: one Python thread per device runs the forward; the threads share the GIL,
   so kernel launches are serialised: forward = max(compute of one chunk,
   n x ops x kernel_launch_s);
4. gather: every output chunk is copied to device 0 (for a language model, the logits);
5. the loss runs on device 0 alone (memory-bound over the gathered outputs);
6. backward: the output gradient is scattered back (as in 1), the replicas' backward runs in
   the autograd engine's per-device threads (parallel), and the parameter gradients are
   summed onto device 0 (`ReduceAddCoalesced`, a reduce: timed as a broadcast of the same size);
7. the optimizer steps all parameters on device 0 only.

Memory: device 0 holds the model states of a single-device run (params, grads, optimizer),
its chunk's activations and all gathered outputs plus their loss buffers; the others a replica
of the parameters and gradients and their chunk's activations. Peak = device 0.
DDP (one process per device) instead overlaps a bucketed all-reduce with backward and needs
neither the per-step broadcast nor the gather through device 0.
"""

from __future__ import annotations

import math

from cost_models import comm
from cost_models.compute import itemsize, peak_flops_per_s
from cost_models.efficiency import curves_for, memory_efficiency
from cost_models.estimate import TIME_TERMS, AxisCommEstimate, StepEstimate
from cost_models.memory import margin_bytes, optimizer_step_bytes_per_param
from specs import HardwareSpec, ModelGraph, SpecError, TrainSpec


def estimate_data_parallel_single_process(graph: ModelGraph, hw: HardwareSpec, train: TrainSpec,
                                          num_devices: int) -> StepEstimate:
    """Score nn.DataParallel over `num_devices` devices of one node (see module docstring)."""
    n = num_devices
    if n < 1 or n > hw.devices_per_node:
        raise SpecError(
            f"num_devices: nn.DataParallel drives devices of one node; got {n}, the node has "
            f"{hw.devices_per_node}"
        )
    from cost_models.model import CostModel

    model = CostModel(graph, hw, train)
    B = train.global_batch_size
    chunk = math.ceil(B / n)
    bc = model.block_costs(1, False, chunk, "none")
    whole = bc.stage(0, graph.num_blocks - 1)
    link = comm.group_link(hw, n, 1)
    bw, alpha = link.bandwidth_bytes_per_s, link.latency_s
    bpp = model.bpp
    params = graph.num_params
    in_bytes = graph.input_bytes_per_sample * chunk
    out_bytes = model.final_output_bytes * chunk
    serial = (n - 1) if n > 1 else 0
    scatter = serial * (in_bytes / bw + alpha)
    replicate = comm.broadcast_s(params * bpp.param, link)
    num_ops = sum(len(graph.layer(i).ops) or 1 for i in range(graph.num_blocks))
    launch = n * num_ops * hw.device.kernel_launch_s
    fwd_compute = whole.forward_s
    fwd = max(fwd_compute, launch)
    gather = serial * (out_bytes / bw + alpha)
    curves = curves_for(hw)
    mem_bw = hw.device.memory_bandwidth_bytes_per_s
    loss_bytes = 3 * out_bytes * n * 4 / itemsize(model.dtype)  # fp32 upcast read, softmax, grad write
    loss = loss_bytes / (mem_bw * memory_efficiency(curves, loss_bytes, "loss")) if loss_bytes else 0.0
    grad_out = gather
    bwd = whole.backward_s + whole.weight_compute_s
    reduce = comm.broadcast_s(params * bpp.grad, link)
    step_bytes = params * optimizer_step_bytes_per_param(bpp, model.train.optimizer)
    opt = step_bytes / (mem_bw * memory_efficiency(curves, step_bytes, "elementwise"))
    comm_s = scatter + replicate + gather + grad_out + reduce
    step = comm_s + fwd + loss + bwd + opt
    breakdown = dict.fromkeys(TIME_TERMS, 0.0)
    breakdown.update(compute_forward_s=fwd_compute + loss, compute_backward_s=bwd, dp_comm_s=comm_s,
                     optimizer_s=opt, host_overhead_s=fwd - fwd_compute)
    # memory of device 0
    acts = whole.activation_bytes
    states = {"parameters": params * bpp.param, "gradients": params * bpp.grad, "optimizer": params * bpp.optimizer}
    trans = out_bytes * n * (1 + 2 * 4 / itemsize(model.dtype)) + params * bpp.working  # + autocast copies
    tensors = sum(states.values()) + acts + trans
    mem = {**states, "activations": acts, "transient": trans, "margin": margin_bytes(tensors, hw.device.memory_bytes)}
    peak = sum(mem.values())
    model_flops = model.model_flops_per_sample * B
    peak_flops = peak_flops_per_s(hw, model.dtype) * n
    notes: tuple[str, ...] = (
        f"nn.DataParallel: one Python process drives {n} devices; parameters broadcast every step "
        f"({replicate:.3g} s), outputs gathered and the loss computed on device 0, optimizer on device 0",
    )
    if launch > fwd_compute:
        notes += (f"forward bound by kernel launches under the GIL ({launch:.3g} s > compute {fwd_compute:.3g} s)",)
    return StepEstimate(
        step_time_s=step, fits=peak <= hw.device.memory_bytes, peak_memory_bytes=peak,
        memory_capacity_bytes=float(hw.device.memory_bytes), memory_bytes=mem, memory_per_rank_bytes=(peak,),
        memory_by_rank_raw=(tuple(mem.values()),), worst_rank=0, time_breakdown_s=breakdown,
        comm={"dp": AxisCommEstimate(2 * (n - 1) * (in_bytes + out_bytes) + 2 * params * bpp.param, comm_s, comm_s)},
        bubble_fraction=0.0, mfu=model_flops / (step * peak_flops), hfu=model_flops / (step * peak_flops),
        samples_per_s=B / step, tokens_per_s=B * graph.tokens_per_sample / step,
        model_flops_per_step=model_flops, hardware_flops_per_step=model_flops,
        stage_times_raw=((fwd, bwd, 0.0, 0.0),), peak_in_flight=(1,), notes=notes,
    )
