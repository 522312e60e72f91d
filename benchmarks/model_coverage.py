"""Model coverage: trace and plan every torchvision classification model and a set of Hugging Face
transformers families for a 64-GPU H100 cluster.

    .venv/bin/python benchmarks/model_coverage.py [--hw dgx-h100-80gb:64] [--only NAME,...] [--skip-vision]

Models (random weights, built on the meta device, nothing downloaded):
- every name in torchvision.models.list_models(module=torchvision.models) (the classification
  models), input 2 x 3 x 224 x 224 (299 for inception_v3), global batch 1024, bf16;
- Hugging Face transformers built from small config classes (SMALL below: 2 layers, hidden 64,
  vocab 256, sequence 64): causal LMs gpt2, llama, mistral, qwen2, phi3, gpt_neox, opt, bloom,
  falcon, gemma, mixtral, plus BERT (masked LM) and T5 (encoder-decoder: the decoder gets the
  same tokens), global batch 256 sequences, bf16.
For each: planner.trace (how it was captured: fx or export; blocks), then planner.autoplan on the
traced graph; the table prints the chosen plan and the time to trace and to plan, or the failure
and the note that tracks it (FAILURE_NOTES). Results: benchmarks/results/coverage.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "coverage.json"
SEQ = 64
VOCAB = 256

# family -> (config class, model class, config kwargs). Small but complete architectures.
_DEC = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=128,
)
SMALL: dict[str, tuple[str, str, dict]] = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DEC, num_key_value_heads=2)),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(_DEC, num_key_value_heads=2, sliding_window=None),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DEC, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DEC, num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DEC, num_key_value_heads=4, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_DEC)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        ),
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DEC, num_key_value_heads=2, head_dim=16)),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(_DEC, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    ),
    "bert": (
        "BertConfig",
        "BertForMaskedLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        ),
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=VOCAB,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
    ),
}

# name -> why it fails and where that is tracked (filled from runs; empty means none failed).
FAILURE_NOTES: dict[str, str] = {}


class Seq2SeqLM(nn.Module):
    """T5 with one positional input: the decoder reads the same tokens (teacher forcing)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, decoder_input_ids=input_ids).logits


def build_hf(
    family: str, device: str = "meta", *, no_dropout: bool = False
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The small model of `family` and example inputs; `no_dropout` zeroes every dropout (for
    comparing a parallel run with one process)."""
    import transformers

    cfg_cls, model_cls, kwargs = SMALL[family]
    ids = {"bos_token_id": 0, "eos_token_id": 0} if family not in ("bert", "t5") else {}
    cfg = getattr(transformers, cfg_cls)(
        **ids, **kwargs, use_cache=False, attn_implementation="eager"
    )
    with torch.device(device):
        model = getattr(transformers, model_cls)(cfg)
    if no_dropout:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            for attr in ("attention_dropout", "dropout", "attn_dropout", "hidden_dropout"):
                if isinstance(getattr(m, attr, None), float):
                    setattr(m, attr, 0.0)
    if family == "t5":
        model = Seq2SeqLM(model)
    return model, (torch.zeros(2, SEQ, dtype=torch.long, device=device),)


def build_vision(name: str, device: str = "meta") -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import torchvision

    image = 299 if name == "inception_v3" else 224
    try:
        with torch.device(device):
            model = torchvision.models.get_model(name, weights=None)
    except NotImplementedError:
        # RegNet's constructor copies data out of a tensor (its width schedule), which a meta
        # tensor cannot give: build it on the CPU (random weights; the trace still runs on fakes).
        device = "cpu"
        model = torchvision.models.get_model(name, weights=None)
    return model, (torch.zeros(2, 3, image, image, device=device),)


def cases(include_vision: bool = True) -> dict[str, tuple[str, Callable[[], tuple]]]:
    out: dict[str, tuple[str, Callable[[], tuple]]] = {}
    if include_vision:
        import torchvision

        for name in torchvision.models.list_models(module=torchvision.models):
            out[f"tv/{name}"] = ("vision", lambda n=name: build_vision(n))
    for fam in SMALL:
        out[f"hf/{fam}"] = ("lm", lambda f=fam: build_hf(f))
    return out


def run_case(name: str, kind: str, build, hw) -> dict:
    from planner import autoplan, trace
    from specs import TrainSpec

    rec: dict = {"model": name}
    stage = "build"
    try:
        model, inputs = build()
        rec["params"] = sum(p.numel() for p in model.parameters())
        stage = "trace"
        t0 = time.perf_counter()
        graph = trace(model, inputs, name=name)
        rec["trace_s"] = time.perf_counter() - t0
        rec.update(
            traced_by=graph.traced_by, blocks=graph.num_blocks, layer_types=len(graph.layer_types)
        )
        stage = "plan"
        train = TrainSpec(global_batch_size=1024 if kind == "vision" else 256, precision="bf16")
        t0 = time.perf_counter()
        plan = autoplan(None, hw, graph=graph, train=train)
        rec["plan_s"] = time.perf_counter() - t0
        rec.update(
            plan=str(plan.knobs()),
            predicted_step_time_s=plan.predicted.step_time_s,
            fits=plan.predicted.fits,
            peak_memory_gib=plan.predicted.peak_memory_bytes / 2**30,
        )
        rec["ok"] = True
    except Exception as e:
        rec.update(
            ok=False,
            failed_at=stage,
            error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
            traceback=traceback.format_exc(limit=-4)[-1500:],
        )
        rec["note"] = FAILURE_NOTES.get(name, "untracked: see error")
    return rec


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from specs import HardwareSpec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hw", default="dgx-h100-80gb:64")
    p.add_argument(
        "--only", default=None, help="comma-separated names (tv/resnet50, hf/llama, ...)"
    )
    p.add_argument("--skip-vision", action="store_true")
    p.add_argument(
        "--update", action="store_true", help="replace only these models' rows in --output"
    )
    p.add_argument("-o", "--output", default=str(RESULTS))
    args = p.parse_args(argv)
    hw = HardwareSpec.load(args.hw)
    all_cases = cases(include_vision=not args.skip_vision)
    names = [s.strip() for s in args.only.split(",")] if args.only else list(all_cases)
    console = Console(width=160)
    rows = []
    t_all = time.perf_counter()
    for i, name in enumerate(names):
        kind, build = all_cases[name]
        rec = run_case(name, kind, build, hw)
        rows.append(rec)
        status = (
            rec.get("plan") if rec["ok"] else f"FAILED at {rec['failed_at']}: {rec['error'][:80]}"
        )
        console.print(f"[{i + 1}/{len(names)}] {name}: {status}", highlight=False)
        partial = Path(args.output).with_suffix(".partial.json")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(rows, indent=1) + "\n")  # a crash or timeout keeps what ran
    if args.update and Path(args.output).exists():
        fresh = {r["model"]: r for r in rows}
        old_rows = json.loads(Path(args.output).read_text())["models"]
        rows = [fresh.pop(r["model"], r) for r in old_rows] + list(fresh.values())
    table = Table(title=f"coverage on {hw}")
    for col in (
        "model",
        "params",
        "traced",
        "blocks",
        "chosen plan / failure",
        "trace s",
        "plan s",
    ):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["model"],
            f"{r.get('params', 0) / 1e6:.1f}M",
            r.get("traced_by", "-"),
            str(r.get("blocks", "-")),
            r["plan"] if r["ok"] else f"[red]{r['failed_at']}: {r['error']}[/red] ({r['note']})",
            f"{r.get('trace_s', 0):.2f}",
            f"{r.get('plan_s', 0):.2f}",
        )
    console.print(table)
    ok = sum(r["ok"] for r in rows)
    by = {}
    for r in rows:
        if r["ok"]:
            by[r["traced_by"]] = by.get(r["traced_by"], 0) + 1
    summary = {
        "planned": ok,
        "failed": len(rows) - ok,
        "total": len(rows),
        "traced_by": by,
        "this_run_wall_s": time.perf_counter() - t_all,
        "sum_trace_and_plan_s": sum(r.get("trace_s", 0) + r.get("plan_s", 0) for r in rows),
        "median_plan_s": sorted(r["plan_s"] for r in rows if r["ok"])[ok // 2] if ok else None,
    }
    console.print(
        f"planned {ok}/{len(rows)}; traced by {by}; trace + plan {summary['sum_trace_and_plan_s']:.0f} s "
        f"in all (this run {summary['this_run_wall_s']:.0f} s)"
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps({"hardware": args.hw, "summary": summary, "models": rows}, indent=1) + "\n"
    )
    Path(args.output).with_suffix(".partial.json").unlink(missing_ok=True)
    console.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
