from planner.api import autoplan, plan_from_knobs  # noqa: F401
from planner.trace import trace  # noqa: F401
