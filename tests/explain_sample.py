"""Plans built by hand for the explainer's tests (test data, not predictions: the numbers are
chosen to be self-consistent, e.g. the time breakdown sums to the step time)."""

from __future__ import annotations

from specs import (
    Alternative,
    AxisComm,
    DataParallel,
    HardwareSpec,
    Knobs,
    Mesh,
    ModelRef,
    Pipeline,
    Plan,
    Prediction,
    Rejection,
    SearchStats,
    Stage,
    StageTimes,
    TensorParallel,
    TrainSpec,
)

GIB = 2**30

# The 1F1B schedule for pp=2, 4 micro-batches, forward 1 s and backward 2 s per micro-batch per
# stage, no p2p time: (rank, action, stage, micro-batch, start, end). Worked out by hand.
ONE_F_ONE_B_PP2_M4 = [
    (0, "F", 0, 0, 0, 1),
    (0, "F", 0, 1, 1, 2),
    (1, "F", 1, 0, 1, 2),
    (1, "B", 1, 0, 2, 4),
    (0, "B", 0, 0, 4, 6),
    (1, "F", 1, 1, 4, 5),
    (1, "B", 1, 1, 5, 7),
    (0, "F", 0, 2, 6, 7),
    (0, "B", 0, 1, 7, 9),
    (1, "F", 1, 2, 7, 8),
    (1, "B", 1, 2, 8, 10),
    (0, "F", 0, 3, 9, 10),
    (0, "B", 0, 2, 10, 12),
    (1, "F", 1, 3, 10, 11),
    (1, "B", 1, 3, 11, 13),
    (0, "B", 0, 3, 13, 15),
]


def _stages(num_blocks: int, n: int, recompute: str = "none") -> list[Stage]:
    edges = [round(i * num_blocks / n) for i in range(n + 1)]
    return [Stage(first=edges[i], last=edges[i + 1] - 1, recompute=recompute) for i in range(n)]


def big_plan(**overrides) -> Plan:
    """GPT-3 175B on 128 DGX A100 nodes: dp=16 tp=8 pp=8, interleaved 1F1B (v=2)."""
    hw = HardwareSpec.preset("dgx-a100-80gb", nodes=128)
    names = ["embed", *[f"layers.{i}" for i in range(96)], "head"]
    knobs = Knobs(
        pp=8,
        dp=16,
        tp=8,
        sharding="zero1",
        micro_batch_size=1,
        num_micro_batches=96,
        schedule="interleaved_1f1b",
        virtual_stages=2,
        recompute="selective",
        sequence_parallel=True,
    )
    terms = {
        "compute": 9.10,
        "recompute": 0.55,
        "comm_tp": 0.62,
        "comm_dp": 0.21,
        "comm_pp": 0.08,
        "bubble": 0.74,
        "offload": 0.0,
    }
    step = sum(terms.values())
    mem = {
        "parameters": 5.6 * GIB,
        "gradients": 5.6 * GIB,
        "optimizer_states": 4.2 * GIB,
        "activations": 38.0 * GIB,
        "buffers": 3.1 * GIB,
    }
    pred = Prediction(
        step_time_s=step,
        samples_per_s=1536 / step,
        tokens_per_s=1536 * 2048 / step,
        mfu=0.482,
        hfu=0.51,
        model_flops_per_step=6 * 175e9 * 1536 * 2048,
        time_breakdown_s=terms,
        memory_bytes=mem,
        peak_memory_bytes=sum(mem.values()),
        memory_capacity_bytes=80 * GIB,
        worst_rank_stage=0,
        memory_per_stage_bytes=[56.5 * GIB - i * GIB for i in range(8)],
        comm={
            "tp": AxisComm(volume_bytes=41e9, time_s=1.9, exposed_s=0.62),
            "dp": AxisComm(volume_bytes=5.5e9, time_s=0.9, exposed_s=0.21),
            "pp": AxisComm(volume_bytes=1.2e9, time_s=0.2, exposed_s=0.08),
        },
        bubble_fraction=0.066,
        stage_times=[
            StageTimes(forward_s=0.018, backward_s=0.036, p2p_s=0.0005) for _ in range(16)
        ],
        notes=["activations dominate: selective recompute keeps 38 GiB of them"],
    )
    alts = [
        Alternative(
            knobs=knobs.model_copy(update={"tp": 4, "dp": 32, "num_micro_batches": 48}),
            step_time_s=step * 1.07,
            samples_per_s=1536 / (step * 1.07),
            peak_memory_bytes=71 * GIB,
            note="tp=4 halves NVLink traffic but doubles the dp all-reduce across nodes",
        ),
        Alternative(
            knobs=knobs.model_copy(update={"virtual_stages": 1, "schedule": "1f1b"}),
            step_time_s=step * 1.05,
            samples_per_s=1536 / (step * 1.05),
            peak_memory_bytes=55 * GIB,
            note="bubble 11.8% vs 6.6% without interleaving",
        ),
        Alternative(
            knobs=knobs.model_copy(update={"recompute": "full"}),
            step_time_s=step * 1.21,
            samples_per_s=1536 / (step * 1.21),
            peak_memory_bytes=31 * GIB,
            note="recomputes every layer: +33% compute",
        ),
        Alternative(
            knobs=knobs.model_copy(
                update={"pp": 4, "dp": 32, "num_micro_batches": 48, "recompute": "none"}
            ),
            step_time_s=step * 0.97,
            samples_per_s=1536 / (step * 0.97),
            peak_memory_bytes=97 * GIB,
            fits=False,
            note="needs 97 GiB per device",
        ),
    ]
    plan = Plan(
        model=ModelRef(
            name="gpt3-175b",
            fingerprint="sha256:0f3a",
            num_blocks=98,
            num_params=174_600_000_000,
            block_names=names,
        ),
        hardware=hw,
        train=TrainSpec(global_batch_size=1536, precision="bf16"),
        mesh=Mesh(pp=8, dp=16, tp=8),
        data_parallel=DataParallel(sharding="zero1"),
        tensor_parallel=TensorParallel(
            sequence_parallel=True,
            loss_parallel=True,
            styles={"layers.*.attn.q": "colwise", "layers.*.attn.o": "rowwise"},
        ),
        pipeline=Pipeline(
            schedule="interleaved_1f1b",
            virtual_stages=2,
            micro_batch_size=1,
            num_micro_batches=96,
            stages=_stages(98, 16, "selective"),
        ),
        predicted=pred,
        alternatives=alts,
        rejected=[
            Rejection(
                region="tp=16", reason="tp groups would span 2 nodes (8 GPUs per node)", count=412
            ),
            Rejection(
                region="pp=1 zero<3",
                reason="parameters + gradients + states need 2.6 TiB per device vs 80 GiB",
                count=96,
            ),
        ],
        search=SearchStats(
            candidates_scored=1834, candidates_pruned=508, search_time_s=3.2, trace_time_s=1.1
        ),
    )
    return plan.model_copy(update=overrides) if overrides else plan


def small_plan(**pred_overrides) -> Plan:
    """gpt-tiny on the cpu preset, 4 processes: pp=2 dp=2, 1F1B with 4 micro-batches."""
    hw = HardwareSpec.preset("cpu", devices=4)
    terms = {"compute": 0.012, "comm_dp": 0.002, "bubble": 0.003}
    mem = {"parameters": 0.4e6, "gradients": 0.4e6, "optimizer_states": 0.8e6, "activations": 2.0e6}
    pred = dict(
        step_time_s=sum(terms.values()),
        samples_per_s=16 / 0.017,
        tokens_per_s=16 * 32 / 0.017,
        mfu=0.05,
        hfu=0.05,
        model_flops_per_step=1e9,
        time_breakdown_s=terms,
        memory_bytes=mem,
        peak_memory_bytes=sum(mem.values()),
        memory_capacity_bytes=hw.device.memory_bytes,
        memory_per_stage_bytes=[3.6e6, 3.1e6],
        comm={"dp": AxisComm(volume_bytes=0.8e6, time_s=0.004, exposed_s=0.002)},
        bubble_fraction=0.18,
        stage_times=[
            StageTimes(forward_s=1.0, backward_s=2.0),
            StageTimes(forward_s=1.0, backward_s=2.0),
        ],
    )
    pred.update(pred_overrides)
    return Plan(
        model=ModelRef(
            name="gpt-tiny",
            fingerprint="sha256:77aa",
            num_blocks=6,
            num_params=210_000,
            block_names=["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"],
        ),
        hardware=hw,
        train=TrainSpec(global_batch_size=16, precision="fp32"),
        mesh=Mesh(pp=2, dp=2, tp=1),
        data_parallel=DataParallel(sharding="none"),
        pipeline=Pipeline(
            schedule="1f1b", micro_batch_size=2, num_micro_batches=4, stages=_stages(6, 2)
        ),
        predicted=Prediction(**pred),
    )


def count_colour(png_path, hex_colour: str, tol: int = 30) -> int:
    """Pixels of a PNG within `tol` (sum of |channel differences|) of `hex_colour`."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png_path).convert("RGB"), dtype=np.int32)
    want = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int32)
    return int((np.abs(img - want).sum(axis=-1) < tol).sum())
