"""The optimizer state inside an ONNX Runtime training checkpoint. ORT's bindings expose a
CheckpointState's parameters but not its optimizer moments and step, which a resume or a rollback
must restore; they are read from, and written into, the checkpoint file (flatbuffers, schema
`ort_training_checkpoint.fbs`, through the bindings ORT ships in `tools/ort_format_model`)."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np

STEP = "ort.optimizer_step"  # the state key of the optimizer's step count (AdamW's bias correction)


def _fbs():
    """ORT's generated flatbuffers modules, imported without `onnxruntime.tools` (whose package
    imports torch where it is installed)."""
    spec = importlib.util.find_spec("onnxruntime")
    root = os.path.join(list(spec.submodule_search_locations)[0], "tools", "ort_format_model")
    if root not in sys.path:
        sys.path.append(root)
    from ort_flatbuffers_py.fbs import Checkpoint, ModuleState, OptimizerGroup, ParameterOptimizerState, Tensor

    return Checkpoint, ModuleState, OptimizerGroup, ParameterOptimizerState, Tensor


def moment_key(param: str, name: str) -> str:
    return f"{param}.ort.{name}"


def read_optimizer_state(data: bytes, names: dict[str, str]) -> dict[str, np.ndarray]:
    """The moments of every parameter (`names`: ORT parameter name -> manifest name) and the step
    count, from the bytes of a checkpoint saved with its optimizer state."""
    Checkpoint, *_ = _fbs()
    c = Checkpoint.Checkpoint.GetRootAs(data, 0)
    if c.OptimizerGroupsLength() != 1:
        raise ValueError(f"expected one optimizer group, found {c.OptimizerGroupsLength()}")
    g = c.OptimizerGroups(0)
    out = {STEP: np.array(float(g.Step()))}
    for i in range(g.OptimizerStatesLength()):
        s = g.OptimizerStates(i)
        param = names[s.ParamName().decode()]
        for j in range(s.MomentumsLength()):
            m = s.Momentums(j)
            out[moment_key(param, m.Name().decode())] = _array(m)
    return out


def _array(t) -> np.ndarray:
    if t.DataType() != 1:  # FLOAT
        raise ValueError(f"optimizer state '{t.Name().decode()}' is not float32")
    return t.RawDataAsNumpy().view(np.float32).reshape([int(d) for d in t.DimsAsNumpy()]).copy()


def write_optimizer_state(data: bytes, names: dict[str, str], state: dict[str, np.ndarray]) -> bytes:
    """The checkpoint `data` with its moments and step replaced by those in `state` (keys as
    read_optimizer_state gives them); everything else is copied as it is."""
    Checkpoint, ModuleState, OptimizerGroup, ParameterOptimizerState, Tensor = _fbs()
    import flatbuffers

    c = Checkpoint.Checkpoint.GetRootAs(data, 0)
    b = flatbuffers.Builder(len(data) + 1024)

    def string(s: bytes | None):
        return None if s is None else b.CreateString(s)

    def tensor(t, values: np.ndarray | None = None) -> int:
        name, doc = string(t.Name()), string(t.DocString())
        dims = b.CreateNumpyVector(np.asarray(t.DimsAsNumpy(), dtype=np.int64)) if not t.DimsIsNone() else None
        if values is not None:
            raw = b.CreateNumpyVector(np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint8))
        else:
            raw = None if t.RawDataIsNone() else b.CreateNumpyVector(t.RawDataAsNumpy())
        strings = None
        if not t.StringDataIsNone():
            offsets = [b.CreateString(t.StringData(i)) for i in range(t.StringDataLength())]
            strings = vector(Tensor.StartStringDataVector, offsets)
        Tensor.Start(b)
        for add, v in ((Tensor.AddName, name), (Tensor.AddDocString, doc), (Tensor.AddDims, dims),
                       (Tensor.AddRawData, raw), (Tensor.AddStringData, strings)):
            if v is not None:
                add(b, v)
        Tensor.AddDataType(b, t.DataType())
        if t.ExternalDataOffset() != -1:
            Tensor.AddExternalDataOffset(b, t.ExternalDataOffset())
        return Tensor.End(b)

    def vector(start, offsets: list[int]) -> int:
        start(b, len(offsets))
        for o in reversed(offsets):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    ms = c.ModuleState()
    grads = [tensor(ms.RequiresGradParams(i)) for i in range(ms.RequiresGradParamsLength())]
    frozen = [tensor(ms.FrozenParams(i)) for i in range(ms.FrozenParamsLength())]
    grads_v = vector(ModuleState.StartRequiresGradParamsVector, grads)
    frozen_v = vector(ModuleState.StartFrozenParamsVector, frozen)
    ModuleState.Start(b)
    ModuleState.AddRequiresGradParams(b, grads_v)
    ModuleState.AddFrozenParams(b, frozen_v)
    ModuleState.AddIsNominalState(b, ms.IsNominalState())
    ModuleState.AddHasExternalData(b, ms.HasExternalData())
    module = ModuleState.End(b)

    groups = []
    for gi in range(c.OptimizerGroupsLength()):
        g = c.OptimizerGroups(gi)
        states = []
        for i in range(g.OptimizerStatesLength()):
            s = g.OptimizerStates(i)
            param = names[s.ParamName().decode()]
            moments = [tensor(s.Momentums(j), state[moment_key(param, s.Momentums(j).Name().decode())])
                       for j in range(s.MomentumsLength())]
            pname, moments_v = string(s.ParamName()), vector(ParameterOptimizerState.StartMomentumsVector, moments)
            ParameterOptimizerState.Start(b)
            ParameterOptimizerState.AddParamName(b, pname)
            ParameterOptimizerState.AddMomentums(b, moments_v)
            states.append(ParameterOptimizerState.End(b))
        gname, states_v = string(g.GroupName()), vector(OptimizerGroup.StartOptimizerStatesVector, states)
        OptimizerGroup.Start(b)
        OptimizerGroup.AddGroupName(b, gname)
        OptimizerGroup.AddStep(b, int(state[STEP]))
        OptimizerGroup.AddInitialLearningRate(b, g.InitialLearningRate())
        OptimizerGroup.AddOptimizerStates(b, states_v)
        groups.append(OptimizerGroup.End(b))
    groups_v = vector(Checkpoint.StartOptimizerGroupsVector, groups)
    if c.PropertyBag() is not None:
        raise ValueError("checkpoints with a property bag are not supported")
    Checkpoint.Start(b)
    Checkpoint.AddVersion(b, c.Version())
    Checkpoint.AddModuleState(b, module)
    Checkpoint.AddOptimizerGroups(b, groups_v)
    b.Finish(Checkpoint.End(b), file_identifier=b"ODTC")
    return bytes(b.Output())
