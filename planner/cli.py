"""The `autoplan` command line: plan, explain (why-not, picture, html), compare, export, schema, trace,
run.

Thin on purpose: argument parsing and dispatch only; the work is in planner.explain.* and the
planner itself. `run` checks a launch (plan, world size, model, data, options, folders) in this
process and only then starts torchrun (planner.run_cmd). Files (plans, hardware specs) are data:
nothing they name is imported or called;
only a model REF on the user's own command line (`plan REF`, `trace REF`, `explain --model REF`)
may name code to import. Every user error (specs.SpecError and friends) exits with code 2 and one
message on stderr, never a traceback; a part of autoplan that this build lacks exits with 1.
`--format json` on every command prints machine-readable JSON instead of the rich text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from specs import SpecError

SCHEMAS = ("plan", "hardware", "train", "constraints")


class Unavailable(RuntimeError):
    """A part of autoplan this command needs is not in this build."""


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _console(args):
    from planner.explain.render import make_console

    return make_console(width=args.width)


# ------------------------------------------------------------------ commands
def cmd_plan(args) -> int:
    from planner.explain.knobs import constraints_from_pins
    from specs import HardwareSpec, TrainSpec
    from specs._base import validate_model

    hw = HardwareSpec.load(args.hw)
    from specs.hardware import foreign_host_note

    note = foreign_host_note(hw)  # a preset calibrated on another host than this one: say so
    if note:
        print(f"autoplan plan: {note}", file=sys.stderr)
    train_fields: dict[str, Any] = {"precision": args.precision, "optimizer": args.optimizer}
    if args.batch is not None:
        train_fields["global_batch_size"] = args.batch
    if args.allow_offload:
        train_fields["allow_offload"] = True
    if getattr(args, "allow_context_parallel", False):
        train_fields["allow_context_parallel"] = True
    train = validate_model(TrainSpec, train_fields, "train")
    extra = {"top_k": args.top_k} if args.top_k is not None else {}
    constraints = constraints_from_pins(args.pin or [], **extra)
    from planner.api import autoplan

    plan = autoplan(args.model, hw, train=train, constraints=constraints)
    # the name is how `explain --why-not` rebuilds a bundled model (a factory it never imports
    # from a file: the user passes `--model REF` again)
    if plan.model.name != args.model:
        plan = plan.model_copy(update={"model": plan.model.model_copy(update={"name": args.model})})
    if args.output:
        plan.to_file(args.output)
    if args.format == "json":
        from planner.explain.report import explain_data

        _print_json(
            {
                "plan": plan.model_dump(mode="json"),
                "explain": explain_data(plan),
                "written_to": args.output,
            }
        )
        return 0
    from planner.explain.render import render_explain

    con = _console(args)
    render_explain(plan, con)
    if args.output:
        con.print(f"\nwritten to {args.output}")
    return 0


def _load_plan(path: str):
    from specs import Plan

    return Plan.from_file(path)


def cmd_explain(args) -> int:
    if args.top_k is not None and args.top_k < 1:
        raise SpecError(f"--top-k: must be >= 1 (got {args.top_k}); leave it out for 5")
    plan = _load_plan(args.plan)
    out: dict[str, Any] = {}
    if args.picture:
        from planner.explain import timeline as tl

        entries, why = tl.plan_timeline(plan)
        if not entries:
            raise SpecError(f"--picture {args.picture}: no timeline to draw: {why}")
        tl.draw_timeline(entries, args.picture, title=str(plan))
        out["picture"] = args.picture
    if args.html:
        from planner.explain.html import write_html

        write_html(plan, args.html)
        out["html"] = args.html
    if args.why_not:
        return _why_not(args, plan, out)
    if args.format == "json":
        from planner.explain.report import explain_data

        _print_json({"explain": explain_data(plan, top_k=args.top_k or 5), **out})
        return 0
    from planner.explain.render import render_explain

    con = _console(args)
    render_explain(plan, con, top_k=args.top_k or 5)
    for kind, path in out.items():
        con.print(f"{kind} written to {path}")
    return 0


def _why_not(args, plan, out: dict) -> int:
    from planner.explain.knobs import parse_assignments
    from planner.explain.whynot import why_not

    files = [
        w
        for w in args.why_not
        if Path(w).suffix.lower() in (".yaml", ".yml", ".json") or Path(w).is_file()
    ]
    knobs = [w for w in args.why_not if w not in files]
    if files and knobs:
        raise SpecError("--why-not: give knob changes or one plan file, not both")
    if len(files) > 1:
        raise SpecError("--why-not: give one plan file at a time")
    try:
        if files:
            result = why_not(plan, other=_load_plan(files[0]), model=args.model)
        else:
            result = why_not(plan, overrides=parse_assignments(knobs), model=args.model)
    except SpecError as e:
        if "this build has no" in str(e):
            raise Unavailable(str(e)) from None
        raise
    if args.format == "json":
        _print_json({"why_not": result, **out})
        return 0
    from planner.explain.render import render_why_not

    render_why_not(result, _console(args))
    return 0


def cmd_compare(args) -> int:
    from planner.explain.compare import compare_data, render_compare

    d = compare_data(_load_plan(args.a), _load_plan(args.b))
    if args.format == "json":
        _print_json(d)
        return 0
    render_compare(d, _console(args), name_a=Path(args.a).name, name_b=Path(args.b).name)
    return 0


def cmd_export(args) -> int:
    from planner.explain.export import export_plan

    ex = export_plan(_load_plan(args.plan), args.to)
    if args.output:
        Path(args.output).write_text(ex.text, encoding="utf-8")
    if args.format == "json":
        _print_json({**ex.as_dict(), "written_to": args.output})
        return 0
    if args.output:
        print(f"wrote {args.to} config to {args.output}")
        for n in ex.notes:
            print(f"note: {n}")
    else:
        sys.stdout.write(ex.text)
        if args.to == "deepspeed" and ex.notes:  # JSON has no comments: notes go to stderr
            for n in ex.notes:
                print(f"note: {n}", file=sys.stderr)
    return 0


def cmd_schema(args) -> int:
    from specs import Constraints, HardwareSpec, Plan, TrainSpec

    cls = {"plan": Plan, "hardware": HardwareSpec, "train": TrainSpec, "constraints": Constraints}[
        args.what
    ]
    _print_json(cls.model_json_schema())
    return 0


def cmd_trace(args) -> int:
    from planner.models import build_model
    from planner.tracer import trace

    built = build_model(args.model, batch=1, device="meta")
    graph = trace(built.module, built.example_inputs)
    if args.format == "json":
        _print_json(graph.model_dump(mode="json"))
        return 0
    from planner.trace_report import block_table_text

    sys.stdout.write(block_table_text(graph, width=args.width or 100).rstrip("\n") + "\n")
    return 0


def cmd_calibrate(args) -> int:
    """`python -m runtime.calibrate ARGS` in a child process: planner/ never imports runtime/ (the
    layering rule), and the calibration's exit code is returned."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "runtime.calibrate", *args.args])


def cmd_run(args) -> int:
    from planner.run_cmd import cmd_run as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text (rich, for people) or json (for scripts)",
    )
    common.add_argument(
        "--width", type=int, default=None, help="terminal width (default: the terminal's, or 100)"
    )
    p = argparse.ArgumentParser(
        prog="autoplan", description="Declarative parallelism planner for PyTorch training."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser(
        "plan", parents=[common], help="plan a model for some hardware and explain the plan"
    )
    sp.add_argument(
        "model", help="bundled model name (see `autoplan plan --help`) or package.module:factory"
    )
    sp.add_argument(
        "--hw",
        required=True,
        help="hardware: preset[:devices|:Nn] (e.g. dgx-h100-80gb:32) or a YAML/JSON file",
    )
    sp.add_argument(
        "--batch", type=int, default=None, help="global batch size (samples per optimizer step)"
    )
    sp.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    sp.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw")
    sp.add_argument(
        "--allow-offload", action="store_true", help="let the planner offload optimizer states"
    )
    sp.add_argument(
        "--allow-context-parallel",
        action="store_true",
        help="let the planner split sequences over ranks (cp); such plans are for export to "
        "torchtitan/Megatron-LM: autoplan's runtime does not run them yet",
    )
    sp.add_argument(
        "--pin",
        action="append",
        metavar="KNOB=VALUE",
        help="fix a knob (tp=8, pp=4, zero=1, ckpt=full, sched=1f1b, mb=2, ...); repeatable",
    )
    sp.add_argument("--top-k", type=int, default=None, help="alternatives to record")
    sp.add_argument("-o", "--output", help="write the plan to this YAML/JSON file")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("explain", parents=[common], help="explain a plan file")
    sp.add_argument("plan", help="plan YAML/JSON file")
    sp.add_argument(
        "--why-not",
        action="append",
        metavar="KNOB=VALUE|PLAN",
        help="cost of a different choice (tp=4, zero=3, ...) or of another plan file; repeatable",
    )
    sp.add_argument(
        "--model",
        metavar="REF",
        help="the plan's model for --why-not when it is not bundled: package.module:factory "
        "(imported and called; a plan file never names code to import)",
    )
    sp.add_argument("--picture", metavar="OUT.png|OUT.svg", help="draw the pipeline timeline")
    sp.add_argument("--html", metavar="REPORT.html", help="write a self-contained HTML report")
    sp.add_argument("--top-k", type=int, default=None, help="alternatives to show (default 5)")
    sp.set_defaults(fn=cmd_explain)

    sp = sub.add_parser("compare", parents=[common], help="two plans side by side")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.set_defaults(fn=cmd_compare)

    sp = sub.add_parser(
        "export", parents=[common], help="a plan as DeepSpeed/torchtitan/Megatron-LM config"
    )
    sp.add_argument("plan")
    sp.add_argument("--to", required=True, choices=("deepspeed", "torchtitan", "megatron"))
    sp.add_argument("-o", "--output", help="write the config to this file")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("schema", parents=[common], help="JSON Schema of a spec file")
    sp.add_argument("what", choices=SCHEMAS)
    sp.set_defaults(fn=cmd_schema)

    sp = sub.add_parser("trace", parents=[common], help="trace a model and print its block table")
    sp.add_argument("model")
    sp.set_defaults(fn=cmd_trace)

    sp = sub.add_parser(
        "run",
        help="check a launch, then train a plan on this machine under torchrun",
        description="Check the plan, its world size, the model, --data, the options and folders "
        "(one line and exit 2 on a problem, before any process starts), then run torchrun "
        "--standalone --nproc-per-node N -m runtime.launch with the same options.",
    )
    from specs.launch_args import add_launch_arguments

    add_launch_arguments(sp)
    sp.add_argument(
        "--nproc", type=int, default=None, help="processes to start (default: the plan's pp*dp*tp)"
    )
    sp.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="torchrun restarts after a failure (each resumes from --checkpoint-dir)",
    )
    sp.add_argument(
        "--dry-run", action="store_true", help="check everything, print the torchrun command, stop"
    )
    sp.set_defaults(fn=cmd_run)

    # `calibrate` times collectives with torch.distributed, so it lives in runtime/ (the only
    # package that may use it); run as `python -m runtime.calibrate`, which parses its own options.
    sp = sub.add_parser(
        "calibrate",
        add_help=False,
        prefix_chars="+",
        help="measure this machine, write a HardwareSpec (autoplan calibrate --help)",
    )
    sp.add_argument("args", nargs="*")
    sp.set_defaults(fn=cmd_calibrate)
    # argparse's own errors (a bad choice, a missing or unknown flag) as one line too, like ours
    p.error = lambda message: _one_line_usage_error("", message)  # type: ignore[method-assign]
    for name, parser in sub.choices.items():
        parser.error = lambda message, name=name: _one_line_usage_error(name, message)  # type: ignore[method-assign]
    return p


def _one_line_usage_error(command: str, message: str):
    """argparse's error: one line (its usage block would bury it), exit 2."""
    prog = f"autoplan {command}".strip()
    print(f"{prog}: error: {message} ({prog} --help lists the options)", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    import pydantic

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _one_line_usage_error(args.command, f"unrecognized arguments: {' '.join(extra)}")
    # A model REF the user types (`autoplan plan mymodel:build`) is found in the current folder, as
    # `python -m` and torchrun find it; REFs read from files are never imported (module docstring).
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return int(args.fn(args) or 0)
    except SpecError as e:
        print(f"autoplan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except pydantic.ValidationError as e:
        from specs._base import format_validation_error

        print(f"autoplan {args.command}: error: {format_validation_error(e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        print(f"autoplan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Unavailable as e:
        print(f"autoplan {args.command}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
