"""Explaining plans to people: renders the planner's own records, never a second opinion.

- report.py   the explanation as plain data (`explain_data`): layout, time terms, memory, alternatives
- render.py   rich terminal output (`render_explain`, `render_why_not`), 100 columns
- timeline.py the pipeline timeline (cost_models' simulator replaying the recorded stage times):
              text chart and matplotlib PNG/SVG
- html.py     one self-contained HTML report with inline SVG charts and a sortable table
- whynot.py   counterfactuals scored by planner.plan_from_knobs; knobs.py parses `tp=4 zero=3`
- compare.py  two plans side by side; export.py DeepSpeed / torchtitan / Megatron-LM configs
"""
