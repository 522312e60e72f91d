"""autoplan specs: the data every other package speaks (hardware, training, constraints, plans,
and the traced model graph). Pure pydantic; imports only pydantic, yaml and the stdlib."""

from specs._base import SpecError
from specs.graph import Block, CutPoint, ExpertsInfo, LayerType, ModelGraph, OpInfo, TPCandidate
from specs.hardware import (
    DeviceSpec,
    DTensorOverhead,
    EfficiencyPoint,
    HardwareSpec,
    HostSpec,
    LinkSpec,
)
from specs.mesh_dims import MeshDims
from specs.plan import (
    PLAN_VERSION,
    Alternative,
    AxisComm,
    DataParallel,
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
)
from specs.train import Constraints, TrainSpec

__all__ = [
    "PLAN_VERSION", "Alternative", "AxisComm", "Block", "Constraints", "CutPoint", "DataParallel",
    "DeviceSpec", "DTensorOverhead", "EfficiencyPoint", "HardwareSpec", "HostSpec", "Knobs", "LayerType", "LinkSpec",
    "ExpertsInfo", "Mesh", "MeshDims", "ModelGraph", "ModelRef", "OpInfo", "Pipeline", "Plan", "Prediction", "Rejection",
    "SearchStats", "SpecError", "Stage", "StageTimes", "TPCandidate", "TensorParallel", "TrainSpec",
]
