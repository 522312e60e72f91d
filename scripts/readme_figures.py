"""Generate the README's figures from a real planner run, so they stay true.

    .venv/bin/python scripts/readme_figures.py            # writes docs/explain.txt, docs/timeline.png

Plans GPT-3 175B for 1024 A100s (dgx-a100-80gb, 128 nodes, global batch 1536, bf16) with
`planner.autoplan`, then writes:
- docs/explain.txt  — `autoplan explain` of that plan as plain text at 100 columns;
- docs/timeline.png — its pipeline timeline (the recorded stage times replayed through the cost
  model's schedule simulator);
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
from specs import HardwareSpec, TrainSpec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs"), help="output folder (default: docs/)")
    p.add_argument("--model", default="gpt3-175b")
    p.add_argument("--hw", default="dgx-a100-80gb:128n")
    p.add_argument("--batch", type=int, default=1536)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    plan = autoplan(
        args.model,
        HardwareSpec.load(args.hw),
        train=TrainSpec(global_batch_size=args.batch, precision="bf16"),
    )
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
    if not entries:
        print(f"no timeline picture: {why}", file=sys.stderr)
        return 1
    tl.draw_timeline(entries, out / "timeline.png", title=f"{args.model}: {plan}")
    print(f"planned {args.model} on {args.hw} in {plan_s:.1f} s: {plan}")
    for name in ("explain.txt", "timeline.png", f"{args.model}.yaml"):
        print(f"wrote {out / name} ({(out / name).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
