"""Copies and batched matmuls of the fidelity GPT on this CPU: predicted vs profiled.

Model: GPT hidden 384, 8 layers, 8 heads, seq 128, micro-batch MB (argv[1], default 4), fp32, one
thread (benchmarks/fidelity.py's model). Prediction: the traced graph's per-op copy bytes
(planner/measure.py) timed by cost_models.compute on the `cpu` preset (one process); batched
matmul time at one GEMM's efficiency. Measurement: torch.profiler over 3 fwd+bwd steps after 3
warm-up steps; aten::copy_ split into the copies the tracer counts (under aten::clone, not under
masked_fill) and those inside other kernels (addmm's bias broadcast, masked_fill's clone), which
the model charges as part of those ops.

Run: .venv/bin/python benchmarks/copies_cpu.py [MB]
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from cost_models.compute import gemm_flops, layer_compute, op_time_s, peak_flops_per_s
from cost_models.efficiency import curves_for
from planner.models import lm_loss
from planner.models.transformer import Transformer, TransformerConfig
from planner.tracer import trace
from specs import HardwareSpec

CFG = TransformerConfig(vocab_size=2048, hidden=384, num_layers=8, num_heads=8, seq_len=128,
                        tie_embeddings=False)
STEPS = 3


def predicted(mb: int) -> dict[str, float]:
    with torch.device("meta"):
        model = Transformer(CFG)
    g = trace(model, (torch.zeros(1, CFG.seq_len, dtype=torch.long, device="meta"),))
    hw = HardwareSpec.preset("cpu", devices=1)
    curves = curves_for(hw)
    peak = peak_flops_per_s(hw, "fp32")
    out = {"copy_s": 0.0, "copy_kernels": 0, "bmm_s": 0.0, "bmm_s_at_total": 0.0}
    for i in range(g.num_blocks):
        lt = g.layer(i)
        lc = layer_compute(lt, hw, precision="fp32", traced_activation_dtype="fp32", traced_param_dtype="fp32",
                           tp=1, sequence_parallel=False, micro_batch_size=mb)
        out["copy_s"] += lc.copy_s
        for op in lt.ops:
            out["copy_kernels"] += op.num_copies + op.num_bwd_copies
            gf = gemm_flops(op)
            if gf is None:
                continue
            f, b = op.fwd_flops_per_sample * mb, op.bwd_flops_per_sample * mb
            nb = op.bytes_per_sample * mb
            out["bmm_s"] += (op_time_s(f, nb, op.kind, hw, curves, peak, eff_flops=gf)
                             + op_time_s(b, 2 * nb, op.kind, hw, curves, peak, eff_flops=gf))
            out["bmm_s_at_total"] += (op_time_s(f, nb, op.kind, hw, curves, peak)
                                      + op_time_s(b, 2 * nb, op.kind, hw, curves, peak))
    return out


def measured(mb: int) -> dict[str, float]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(CFG)
    x = torch.randint(0, CFG.vocab_size, (mb, CFG.seq_len))
    y = torch.randint(0, CFG.vocab_size, (mb, CFG.seq_len))
    for _ in range(3):
        lm_loss(model(x), y).backward()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(STEPS):
            lm_loss(model(x), y).backward()
    counted = other = bmm = 0.0
    n_counted = 0
    for e in p.events():
        if e.name == "aten::bmm":
            bmm += e.self_cpu_time_total
        if e.name != "aten::copy_":
            continue
        chain, q = [], e.cpu_parent
        while q is not None:
            chain.append(q.name)
            q = q.cpu_parent
        if "aten::clone" in chain and "aten::masked_fill" not in chain:
            counted += e.self_cpu_time_total
            n_counted += 1
        else:
            other += e.self_cpu_time_total
    return {"copy_s": counted / STEPS / 1e6, "copy_kernels": n_counted / STEPS,
            "other_copy_s": other / STEPS / 1e6, "bmm_s": bmm / STEPS / 1e6}


def main() -> None:
    mb = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    pr, me = predicted(mb), measured(mb)
    print(f"fidelity GPT, micro-batch {mb}, fp32, 1 thread; per training step (fwd+bwd), cpu preset")
    print(f"copies the tracer counts: predicted {pr['copy_s'] * 1e3:6.2f} ms ({pr['copy_kernels']} kernels), "
          f"profiled {me['copy_s'] * 1e3:6.2f} ms ({me['copy_kernels']:.0f} kernels)")
    print(f"copies inside other kernels (addmm bias, masked_fill; not counted): profiled "
          f"{me['other_copy_s'] * 1e3:6.2f} ms")
    print(f"attention bmm: predicted {pr['bmm_s'] * 1e3:6.2f} ms at one GEMM's efficiency "
          f"({pr['bmm_s_at_total'] * 1e3:.2f} ms at the op total's), profiled {me['bmm_s'] * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
