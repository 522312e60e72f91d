"""Generate the README's figures from a real planner run, so they stay true.

    .venv/bin/python scripts/readme_figures.py            # writes docs/explain.txt, docs/timeline.png

Plans GPT-3 175B for 1024 A100s (dgx-a100-80gb, 128 nodes, global batch 1536, bf16) with
`planner.autoplan`, then writes:
- docs/explain.txt  — `autoplan explain` of that plan as plain text at 100 columns;
- docs/timeline.png — its pipeline timeline (the recorded stage times replayed through the cost
  model's schedule simulator); when the best plan has no pipeline (pp=1), the timeline of the
  planner's best plan with pp pinned (--pin-pp, default 8), saved as docs/MODEL-ppN.yaml;
- docs/gpt3-175b.yaml — the plan itself, so `autoplan explain docs/gpt3-175b.yaml` reproduces both.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from planner import autoplan  # noqa: E402
from planner.explain import timeline as tl  # noqa: E402
from planner.explain.render import render_explain  # noqa: E402
from specs import Constraints, HardwareSpec, TrainSpec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs"), help="output folder (default: docs/)")
    p.add_argument("--model", default="gpt3-175b")
    p.add_argument("--hw", default="dgx-a100-80gb:128n")
    p.add_argument("--batch", type=int, default=1536)
    p.add_argument(
        "--pin-pp", type=int, default=8, help="pp for the picture when the best plan has none"
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    train = TrainSpec(global_batch_size=args.batch, precision="bf16")
    plan = autoplan(args.model, HardwareSpec.load(args.hw), train=train)
    plan_s = time.perf_counter() - t0
    plan.to_file(out / f"{args.model}.yaml")

    buf = io.StringIO()
    con = Console(
        file=buf, width=100, no_color=True, force_terminal=False, highlight=False, soft_wrap=False
    )
    con.print(f"$ autoplan explain docs/{args.model}.yaml")
    render_explain(plan, con)
    text = "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"
    (out / "explain.txt").write_text(text, encoding="utf-8")

    entries, why = tl.plan_timeline(plan)
    title = f"{args.model}: {plan}"
    if not entries:
        # The best plan has no pipeline; picture the planner's best plan with pp pinned instead
        # (Megatron-LM's choice for GPT-3 175B on 1024 GPUs is pp=8), and say so in the title.
        print(f"best plan has no timeline ({why}); planning again with pp={args.pin_pp} pinned")
        pinned = autoplan(
            args.model,
            HardwareSpec.load(args.hw),
            train=train,
            constraints=Constraints(pp=args.pin_pp),
        )
        pinned.to_file(out / f"{args.model}-pp{args.pin_pp}.yaml")
        entries, why = tl.plan_timeline(pinned)
        title = f"{args.model} with pp={args.pin_pp} pinned: {pinned}"
        if not entries:
            print(f"no timeline picture: {why}", file=sys.stderr)
            return 1
    tl.draw_timeline(entries, out / "timeline.png", title=title)
    print(f"planned {args.model} on {args.hw} in {plan_s:.1f} s: {plan}")
    for name in ("explain.txt", "timeline.png", f"{args.model}.yaml"):
        print(f"wrote {out / name} ({(out / name).stat().st_size} bytes)")
    if out.resolve() == (ROOT / "docs").resolve():
        update_readme(ROOT / "README.md", text)
    return 0


BEGIN, END = "<!-- explain:begin (scripts/readme_figures.py) -->", "<!-- explain:end -->"


def update_readme(readme: Path, explain_text: str, max_lines: int = 60) -> None:
    """Put the head of the generated explanation between the README's markers."""
    doc = readme.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        print(f"{readme}: no explain markers; left unchanged")
        return
    lines = explain_text.splitlines()
    shown = lines[:max_lines] + ([f"... ({len(lines) - max_lines} more lines in docs/explain.txt)"]
                                 if len(lines) > max_lines else [])
    block = "\n".join([BEGIN, "```", *shown, "```", END])
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + block + tail, encoding="utf-8")
    print(f"updated {readme}")


if __name__ == "__main__":
    sys.exit(main())
