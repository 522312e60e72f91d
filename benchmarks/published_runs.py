"""Published, measured large training runs, as data: the table benchmarks/fidelity_published.py
pins and predicts.

Each row of RUNS (a PublishedRun) is one measured run from a public paper: the model rebuilt to the
paper's shape (a planner.models.transformer.TransformerConfig), every knob the paper (or the
authors' own launch script) states (`PublishedRun.knobs`), the hardware preset the paper used
(`build_hardware`), where every figure was read (`source`) and, in words, where a knob had to be
approximated (`flags`). A measured throughput is turned into a step time with the paper's own FLOP
formula (`measured_step_time_s`, FLOPS[throughput_flops]), stated per source below; the paper's
model-FLOP formula (`model_flops_per_step`, FLOPS[model_flops]) gives MFU. Rows flagged
`comparable=False` cannot express their setting closely enough to be scored. DROPPED lists what
was read but not pinned, and why.

Split: FIT = Narayanan et al. 2021 Table 1 and Korthikanti et al. 2022 Table 5 (the Megatron runs the
model has been examined against); HELD-OUT (`held_out=True`) = Narayanan et al. 2021 Table 2, Zhao et
al. 2023 (FSDP), Liang et al. 2025 (torchtitan) and Dubey et al. 2024 (Llama 3) Table 4.

Sources were read from stored public copies (the search tool of this workplace); where the paper's
own text was not available, the transcription used is named and, where possible, cross-checked
(e.g. Korthikanti Table 5's iteration times reproduce the MFU column the Megatron-LM README states).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.models.transformer import TransformerConfig
from specs import HardwareSpec, Knobs

# ----------------------------------------------------------------------------------- model shapes
V_MEGATRON = 51200  # Narayanan 2021 sec. 5.1 / Korthikanti 2022 Table 3: vocabulary 51,200, s = 2048


def gpt(hidden: int, layers: int, heads: int, vocab: int = V_MEGATRON, seq: int = 2048) -> TransformerConfig:
    """GPT as Megatron trains it: ffn 4h, learned positions, tied embedding (Narayanan 2021 Eq. 2)."""
    return TransformerConfig(vocab_size=vocab, hidden=hidden, num_layers=layers, num_heads=heads, seq_len=seq)


# attention "sdpa": both Llama 3 rows' trainers call fused attention (torchtitan's Llama 3 model calls
# F.scaled_dot_product_attention; Meta's pre-training used flash attention), so on H100 the cost model
# keeps q, k, v, the output and the log-sum-exp per layer, not the math path's a*s^2 scores
_LLAMA = dict(style="llama", tie_embeddings=False, bias=False, rope_theta=500000.0, vocab_size=128256, seq_len=8192,
              attention="sdpa")
# Llama 3 / 3.1 shapes: Dubey et al. 2024 Table 3 (as planner.models LLAMA_CONFIGS).
LLAMA3_8B = TransformerConfig(hidden=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_hidden=14336, **_LLAMA)
LLAMA3_405B = TransformerConfig(hidden=16384, num_layers=126, num_heads=128, num_kv_heads=8, ffn_hidden=53248,
                                **_LLAMA)


# ----------------------------------------------------------------------------------- FLOP formulas
def megatron_hw_flops(cfg: TransformerConfig, batch: int) -> float:
    """Narayanan et al. 2021 Eq. 3 (full recompute: 4 passes): 96 B s l h^2 (1 + s/6h + V/16lh)."""
    b, s, n_l, h, v = batch, cfg.seq_len, cfg.num_layers, cfg.hidden, cfg.vocab_size
    return 96 * b * s * n_l * h**2 * (1 + s / (6 * h) + v / (16 * n_l * h))


def megatron_model_flops(cfg: TransformerConfig, batch: int) -> float:
    """Korthikanti et al. 2022 Eq. 7 (model FLOPs, no recompute): 72 B l s h^2 (1 + s/6h + V/12hl)."""
    b, s, n_l, h, v = batch, cfg.seq_len, cfg.num_layers, cfg.hidden, cfg.vocab_size
    return 72 * b * n_l * s * h**2 * (1 + s / (6 * h) + v / (12 * h * n_l))


def llama_params_no_embedding(cfg: TransformerConfig) -> int:
    """Parameters without the token embedding (torchtitan counts the untied output head)."""
    h, f, kv = cfg.hidden, cfg.ffn, cfg.kv_heads * cfg.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return cfg.num_layers * per_layer + h + cfg.vocab_size * h


def torchtitan_flops(cfg: TransformerConfig, batch: int) -> float:
    """torchtitan utils.get_num_flop_per_token: 6 N + 12 l h q t per token, N without the token
    embedding (h heads, q head_dim, t seq_len); times the tokens of the step."""
    per_token = 6 * llama_params_no_embedding(cfg) + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * cfg.seq_len
    return per_token * batch * cfg.seq_len


FLOPS = {"megatron_eq3": megatron_hw_flops, "korthikanti_eq7": megatron_model_flops, "torchtitan": torchtitan_flops}


# ----------------------------------------------------------------------------------- hardware
def grand_teton_h100(nodes: int) -> HardwareSpec:
    """torchtitan's benchmark machine: H100 SXM with 96 GB HBM2e at 2.4 TB/s, 500 W power limit,
    400 Gb/s RDMA per GPU (torchtitan docs/performance.md, commit eaea6f6). The dgx-h100-80gb preset
    with the stated memory size and bandwidth; its peak FLOP/s stays the SXM datasheet's (torchtitan:
    'the actual peak TFLOPs number is between SXM and NVL, and we don't know its exact value')."""
    data = HardwareSpec.preset("dgx-h100-80gb", nodes=nodes).model_dump(mode="json")
    data["name"] = "grand-teton-h100-96gb"
    data["device"]["name"] = "H100-SXM-96GB-HBM2e-500W"
    data["device"]["memory_bytes"] = 96 * 10**9
    data["device"]["memory_bandwidth_bytes_per_s"] = 2.4e12
    data.setdefault("sources", {})["device"] = ("torchtitan docs/performance.md: 96GB HBM2e, 2.4 TB/sec, 500W "
                                               "power limit; peak FLOP/s kept at the SXM datasheet's")
    return HardwareSpec.model_validate(data)


def build_hardware(kind: str, num_gpus: int) -> HardwareSpec:
    if num_gpus % 8:
        raise ValueError(f"{num_gpus} GPUs is not a whole number of 8-GPU nodes")
    if kind == "grand-teton-h100-96gb":
        return grand_teton_h100(num_gpus // 8)
    return HardwareSpec.preset(kind, nodes=num_gpus // 8)


# ----------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str  # paper, table, row: where every figure of this row was read
    model: TransformerConfig
    hardware: str  # preset name (or grand-teton-h100-96gb)
    num_gpus: int
    tp: int
    pp: int
    dp: int
    micro_batch: int
    global_batch: int
    measured_kind: str  # "tflops_per_gpu" | "step_time_s" | "tokens_per_s_per_gpu"
    measured: float
    throughput_flops: str  # key of FLOPS converting measured TFLOP/s to a step time
    model_flops: str  # key of FLOPS for MFU
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "full"
    sequence_parallel: bool = False
    sharding: str = "none"
    cp: int = 1  # context parallelism (the row's tokens split over cp ranks)
    held_out: bool = False
    comparable: bool = True
    flags: tuple[str, ...] = field(default_factory=tuple)  # approximations and assumptions, in words

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def knobs(self) -> Knobs:
        return Knobs(pp=self.pp, dp=self.dp, tp=self.tp, sharding=self.sharding,
                     micro_batch_size=self.micro_batch, num_micro_batches=self.num_micro_batches,
                     schedule=self.schedule if self.pp > 1 else "1f1b", virtual_stages=self.virtual_stages,
                     recompute=self.recompute, sequence_parallel=self.sequence_parallel, cp=self.cp)

    def measured_step_time_s(self) -> float:
        if self.measured_kind == "step_time_s":
            return self.measured
        if self.measured_kind == "tflops_per_gpu":
            return FLOPS[self.throughput_flops](self.model, self.global_batch) / (self.measured * 1e12 * self.num_gpus)
        if self.measured_kind == "tokens_per_s_per_gpu":
            return self.global_batch * self.model.seq_len / (self.measured * self.num_gpus)
        raise ValueError(self.measured_kind)

    def model_flops_per_step(self) -> float:
        return FLOPS[self.model_flops](self.model, self.global_batch)


# Megatron-LM examples/sc21/run_table_1.sh (NVIDIA/Megatron-LM, the authors' scripts "used to produce
# the results" of the SC21 paper, examples/sc21/README.md): micro-batch (MBS), interleaving
# (--num-layers-per-virtual-pipeline-stage), full recompute ("--recompute-method uniform"), DDP
# torch/local (no optimizer sharding). Table 1 figures (heads, hidden, layers, t, p, GPUs, batch,
# achieved TF/s per GPU): Narayanan et al. SC'21 Table 1, read from two independent transcriptions
# in the store (ids 66890646596, 55320678230; identical rows), consistent with run_table_1.sh.
# A100 80GB (Selene). "Mixed precision": predicted as bf16 (same A100 peak and bytes as fp16;
# the runtime refuses fp16 with pp > 1).
_N21 = "Narayanan et al. SC'21, Table 1, row {}; knobs: Megatron-LM examples/sc21/run_table_1.sh MODEL_SIZE={}"
_T1 = dict(hardware="dgx-a100-80gb", measured_kind="tflops_per_gpu", throughput_flops="megatron_eq3",
           model_flops="korthikanti_eq7", recompute="full", flags=("mixed precision predicted as bf16",))


def _t1(size: str, script: str, heads, hidden, layers, tp, pp, gpus, batch, mbs, tflops, v=1) -> PublishedRun:
    return PublishedRun(
        name=f"narayanan21-t1-{size}", source=_N21.format(size, script), model=gpt(hidden, layers, heads),
        num_gpus=gpus, tp=tp, pp=pp, dp=gpus // (tp * pp), micro_batch=mbs, global_batch=batch, measured=tflops,
        schedule="interleaved_1f1b" if v > 1 else "1f1b", virtual_stages=v, **_T1)


NARAYANAN_T1 = [
    #    size     script  heads hidden layers tp pp  GPUs batch mbs TF/s  v (layers / pp / layers-per-virtual)
    _t1("1.7B", "1.7B", 24, 2304, 24, 1, 1, 32, 512, 16, 137),
    _t1("3.6B", "3.6B", 32, 3072, 30, 2, 1, 64, 512, 16, 138),
    _t1("7.5B", "7.5B", 32, 4096, 36, 4, 1, 128, 512, 16, 142),
    _t1("18.4B", "18B", 48, 6144, 40, 8, 1, 256, 1024, 8, 135),
    _t1("39.1B", "39B", 64, 8192, 48, 8, 2, 512, 1536, 4, 138),
    _t1("76.1B", "76B", 80, 10240, 60, 8, 4, 1024, 1792, 2, 140, v=3),  # 60/4 = 15 layers, 5 per chunk
    _t1("145.6B", "145B", 96, 12288, 80, 8, 8, 1536, 2304, 2, 148, v=2),  # 10 layers, 5 per chunk
    _t1("310.1B", "310B", 128, 16384, 96, 8, 16, 1920, 2160, 1, 155, v=2),  # 6 layers, 3 per chunk
    _t1("529.6B", "530B", 128, 20480, 105, 8, 35, 2520, 2520, 1, 163, v=3),  # 3 layers, 1 per chunk
    _t1("1008.0B", "1T", 160, 25600, 128, 8, 64, 3072, 3072, 1, 163),
]

# Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"):
# Table 3 (heads, hidden, layers, t, p, GPUs, global batch, micro-batch; s = 2048, V = 51200,
# A100 80GB, interleaving m = 3 for 175B and 530B, no data parallelism) and Table 5 (iteration time,
# full recompute vs "present work" = sequence parallelism + selective recompute; MFU, HFU), read
# from a transcription in the store (id 55271916660, sec. 12-13). Cross-check: the Megatron-LM
# README (NVIDIA/Megatron-LM, id 48396507078) states MFU 41.5 / 51.4 / 56.0 / 56.3% for 22B / 175B /
# 530B / 1T "measured using a data parallel size of one"; Eq. 7 over the present-work times gives
# the same MFUs (tests/test_fidelity_published.py checks this to 0.5 points).
_K22 = "Korthikanti et al. 2022, Table 5 ({}), row {}; config Table 3 row {}"
_T5 = dict(hardware="dgx-a100-80gb", measured_kind="step_time_s", throughput_flops="korthikanti_eq7",
           model_flops="korthikanti_eq7")


def _t5(size, heads, hidden, layers, tp, pp, gpus, batch, mbs, full_s, present_s, v=1) -> list[PublishedRun]:
    common = dict(model=gpt(hidden, layers, heads), num_gpus=gpus, tp=tp, pp=pp, dp=gpus // (tp * pp),
                  micro_batch=mbs, global_batch=batch, schedule="interleaved_1f1b" if v > 1 else "1f1b",
                  virtual_stages=v, **_T5)
    return [
        PublishedRun(name=f"korthikanti22-{size}-selective-sp", source=_K22.format("present work", size, size),
                     measured=present_s, recompute="selective", sequence_parallel=True,
                     flags=("mixed precision predicted as bf16",), **common),
        PublishedRun(name=f"korthikanti22-{size}-full", source=_K22.format("full recompute", size, size),
                     measured=full_s, recompute="full", sequence_parallel=False,
                     flags=("mixed precision predicted as bf16",
                            "baseline assumed without sequence parallelism (Table 4's full-recompute baseline)"),
                     **common),
    ]


KORTHIKANTI_T5 = [
    #    size  heads hidden layers tp pp GPUs batch mbs  full_s present_s  v
    *_t5("22B", 64, 6144, 48, 8, 1, 8, 4, 4, 1.42, 1.10),
    *_t5("175B", 96, 12288, 96, 8, 8, 64, 64, 1, 18.13, 13.75, v=3),
    *_t5("530B", 128, 20480, 105, 8, 35, 280, 280, 1, 49.05, 37.83, v=3),
    *_t5("1T", 160, 25600, 128, 8, 64, 512, 512, 1, 94.42, 71.49),
]

# Narayanan et al. SC'21 Table 2 (PTD-P vs ZeRO-3 without model parallelism; 174.6B = 96 layers,
# h 12288, 96 heads; 529.6B = Table 1's shape), from the transcription id 66890646596 (columns:
# params, model-parallel size, batch, GPUs, micro-batch, TF/s per GPU). Batch = GPUs x micro-batch /
# model-parallel size holds on every ZeRO-3 row, so their model-parallel size is 1 (one cell of the
# transcription reads 2; taken as a slip). TF/s per GPU converted with Eq. 3 (the paper's formula for
# all its throughput figures, full recompute).
_N21T2 = "Narayanan et al. SC'21, Table 2, {} row: {} params, {} GPUs, batch {}, micro-batch {}"
_T2 = dict(hardware="dgx-a100-80gb", measured_kind="tflops_per_gpu", throughput_flops="megatron_eq3",
           model_flops="korthikanti_eq7", recompute="full", held_out=True)
GPT_175B = gpt(12288, 96, 96)
GPT_530B = gpt(20480, 105, 128)


def _t2_ptdp(params, cfg, mp, gpus, batch, tflops) -> PublishedRun:
    pp = mp // 8
    return PublishedRun(
        name=f"narayanan21-t2-ptdp-{params}-{gpus}", source=_N21T2.format("PTD-P", params, gpus, batch, 1),
        model=cfg, num_gpus=gpus, tp=8, pp=pp, dp=gpus // mp, micro_batch=1, global_batch=batch,
        measured=tflops, flags=(f"model-parallel size {mp} split as tp=8 x pp={pp} (tp = GPUs per node, the "
                                "paper's Takeaway #1; 530B's split is Table 1's)",
                                "schedule not stated: predicted as non-interleaved 1f1b",
                                "mixed precision predicted as bf16"), **_T2)


def _t2_zero3(params, cfg, gpus, batch, mbs, tflops) -> PublishedRun:
    return PublishedRun(
        name=f"narayanan21-t2-zero3-{params}-{gpus}", source=_N21T2.format("ZeRO-3", params, gpus, batch, mbs),
        model=cfg, num_gpus=gpus, tp=1, pp=1, dp=gpus, micro_batch=mbs, global_batch=batch, measured=tflops,
        sharding="zero3", flags=("DeepSpeed ZeRO-3 predicted as FSDP zero3",
                                 "recompute not stated: full assumed (Eq. 3)", "mixed precision predicted as bf16"),
        **_T2)


NARAYANAN_T2 = [
    _t2_ptdp("174.6B", GPT_175B, 96, 384, 1536, 153),
    _t2_ptdp("174.6B", GPT_175B, 96, 768, 1536, 149),
    _t2_ptdp("174.6B", GPT_175B, 96, 1536, 1536, 141),
    _t2_ptdp("529.6B", GPT_530B, 280, 560, 2240, 171),
    _t2_ptdp("529.6B", GPT_530B, 280, 1120, 2240, 167),
    _t2_ptdp("529.6B", GPT_530B, 280, 2240, 2240, 159),
    _t2_zero3("174.6B", GPT_175B, 384, 1536, 4, 144),
    _t2_zero3("174.6B", GPT_175B, 768, 1536, 2, 88),
    _t2_zero3("174.6B", GPT_175B, 1536, 1536, 1, 44),
    _t2_zero3("529.6B", GPT_530B, 640, 2560, 4, 138),
    _t2_zero3("529.6B", GPT_530B, 1120, 2240, 2, 98),
    _t2_zero3("529.6B", GPT_530B, 2240, 2240, 1, 48),
]

# Zhao et al. VLDB 2023 ("PyTorch FSDP"), sec. 5.4 (paper text in the store, id 30044630722):
# minGPT 175B, vocab 50000, block size 2048, batch size 1 and 2 (per GPU), 128..512 A100 80GB,
# full sharding, backward prefetch, BF16, activation checkpointing, Adam: "more than 173 and 186
# TFLOPS per GPU with batch size equal to 1 and 2 ... linear scalability from 128 GPUs to 512 GPUs".
_Z23 = ("Zhao et al. VLDB 2023 (PyTorch FSDP), sec. 5.4: minGPT-175B, batch {} per GPU, "
        "'more than {} TFLOPS per GPU' over 128-512 GPUs")
_ZHAO = dict(hardware="dgx-a100-80gb", measured_kind="tflops_per_gpu", throughput_flops="megatron_eq3",
             model_flops="korthikanti_eq7", recompute="full", sharding="zero3", held_out=True, tp=1, pp=1)
_ZHAO_FLAGS = ("shape not listed: GPT-3 175B's (96 layers, h 12288, 96 heads) with the stated vocab 50000",
               "GPU count for the figure not stated: 512 used (TFLOPS stated linear over 128-512)",
               "FLOP formula not stated: Narayanan Eq. 3 used (the paper calls the figure hardware utilization)",
               "figure is a lower bound ('more than')")
ZHAO_FSDP = [
    PublishedRun(name="zhao23-fsdp-175b-bs1", source=_Z23.format(1, 173), model=gpt(12288, 96, 96, vocab=50000),
                 num_gpus=512, dp=512, micro_batch=1, global_batch=512, measured=173, flags=_ZHAO_FLAGS, **_ZHAO),
    PublishedRun(name="zhao23-fsdp-175b-bs2", source=_Z23.format(2, 186), model=gpt(12288, 96, 96, vocab=50000),
                 num_gpus=512, dp=512, micro_batch=2, global_batch=1024, measured=186, flags=_ZHAO_FLAGS, **_ZHAO),
]

# torchtitan (Liang et al., ICLR 2025), docs/performance.md at commit eaea6f6 (the paper's tables):
# Table 1 "1D Parallelism (FSDP). Llama 3.1 8B model. 8 GPUs. Local batch size 2, global batch size 16.
# Selective activation checkpointing." FSDP row 5,762 TPS/GPU; Table 3 the same on 128 GPUs, global
# batch 256: 5,605. seq_len 8192 and selective_ac_option 'op': torchtitan llama3_8b.toml.
# Tables 4-6 (70B, 405B) all use Float8 + torch.compile (+ AsyncTP): not expressible, dropped.
_TT = dict(model=LLAMA3_8B, hardware="grand-teton-h100-96gb", measured_kind="tokens_per_s_per_gpu",
           throughput_flops="torchtitan", model_flops="torchtitan", recompute="selective", sharding="zero3",
           tp=1, pp=1, micro_batch=2, held_out=True,
           flags=("torchtitan op-level selective AC predicted as autoplan 'selective' (attention core)",
                  "FSDP2 full shard = zero3"))
TORCHTITAN = [
    PublishedRun(name="torchtitan-8b-fsdp-8gpu", source="Liang et al. 2025 (torchtitan), Table 1, row FSDP",
                 num_gpus=8, dp=8, global_batch=16, measured=5762, **_TT),
    PublishedRun(name="torchtitan-8b-fsdp-128gpu", source="Liang et al. 2025 (torchtitan), Table 3, row FSDP",
                 num_gpus=128, dp=128, global_batch=256, measured=5605, **_TT),
]

# Dubey et al. 2024 ("The Llama 3 Herd of Models"), Table 4 (arXiv 2407.21783; several transcriptions
# in the store agree, e.g. id 70888892482): GPUs, TP, CP, PP, DP, seq 8192, batch size/DP, 16M
# tokens/batch, TFLOPs/GPU, BF16 MFU. Sec. 3.3.2 text (same transcriptions): FSDP "shards optimizer
# states and gradients", parameters not resharded after forward (= zero2); interleaved schedule;
# "pre-train without activation checkpointing" for 8K sequences. The CP=16 row is dropped (context
# parallelism is not a knob). H100 80GB HBM3 at 700 W: dgx-h100-80gb.
_L3 = dict(model=LLAMA3_405B, hardware="dgx-h100-80gb", measured_kind="tflops_per_gpu",
           throughput_flops="torchtitan", model_flops="torchtitan", tp=8, pp=16, micro_batch=1,
           schedule="interleaved_1f1b", virtual_stages=2, recompute="none", sharding="zero2", held_out=True,
           flags=("micro-batch size not stated: 1 assumed", "virtual stages not stated: 2 assumed (even split)",
                  "FLOP formula not stated: torchtitan's 6N + 12lhqt assumed",
                  "first/last stage one layer short not modelled (even split)"))
# Table 4 row 3: the long-context phase, 131,072 tokens, TP 8, CP 16, PP 16, DP 8, 16 sequences per
# DP rank (16M tokens per batch: 128 sequences), 380 TFLOPs/GPU, 38% MFU. Flash attention (sdpa);
# the paper does not state recompute for this phase: none assumed as for 8K (flagged). Context
# parallelism modelled as torch's all-gather of keys and values (Meta's CP is all-gather based too,
# sec. 3.3.2: "all-gather based method ... first all-gather the key (K) and value (V) tensors").
LLAMA3_405B_128K = TransformerConfig(hidden=16384, num_layers=126, num_heads=128, num_kv_heads=8, ffn_hidden=53248,
                                     **{**_LLAMA, "seq_len": 131072})
LLAMA3 = [
    PublishedRun(name="llama3-405b-8k-gpus", source="Dubey et al. 2024, Table 4, row 1 (8,192 GPUs, DP 64)",
                 num_gpus=8192, dp=64, global_batch=2048, measured=430, **_L3),
    PublishedRun(name="llama3-405b-16k-gpus", source="Dubey et al. 2024, Table 4, row 2 (16,384 GPUs, DP 128)",
                 num_gpus=16384, dp=128, global_batch=2048, measured=400, **_L3),
    PublishedRun(name="llama3-405b-128k-cp16", source="Dubey et al. 2024, Table 4, row 3 (16,384 GPUs, CP 16, "
                 "131,072 tokens)", num_gpus=16384, dp=8, cp=16, global_batch=128, measured=380,
                 **{**_L3, "model": LLAMA3_405B_128K,
                    "flags": (*_L3["flags"], "recompute not stated for the long-context phase: none assumed")}),
]

RUNS: list[PublishedRun] = [*NARAYANAN_T1, *KORTHIKANTI_T5, *NARAYANAN_T2, *ZHAO_FSDP, *TORCHTITAN, *LLAMA3]

DROPPED = [
    "torchtitan Tables 2, 4, 5, 6 (8B CP, 70B 2D, 405B 3D/4D): Float8 + torch.compile (+AsyncTP); fp8 is "
    "not a precision knob, and Table 5/6's micro-batch counts are not stated",
    "Narayanan Table 1's aggregate PF/s and % of peak columns: derived from TF/s per GPU (not used twice)",
    "Zhao et al. T5-11B, DHEN and 128-GPU batch-2 figures: read off figures, not stated in text",
]
