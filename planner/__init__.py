from planner.api import autoplan, plan_from_knobs  # noqa: F401
