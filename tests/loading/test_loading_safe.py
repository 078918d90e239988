"""The restricted unpickler: what it loads, and that crafted pickles are refused without running."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from sae_vision_ext.loading.safe_load import (
    NUMPY_SCALAR_GLOBALS,
    PickledModule,
    UnsafeCheckpointError,
    module_graph_globals,
    safe_torch_load,
)


def test_loads_tensors_and_numpy_float_scalars(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save(
        {
            "model": {"w": torch.arange(6.0).reshape(2, 3)},
            "scaling_factor": 2.5,
            "target_norm": np.float64(27.7),
            "half": np.float32(0.5),
        },
        path,
    )
    # plain weights-only loading refuses the numpy scalar: that is why the allow-list exists
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    obj = safe_torch_load(path)
    assert obj["target_norm"] == np.float64(27.7) and isinstance(obj["target_norm"], np.float64)
    assert obj["half"] == np.float32(0.5)
    assert torch.equal(obj["model"]["w"], torch.arange(6.0).reshape(2, 3))


def _rename_in_pickle(src, dst, old: bytes, new: bytes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, data.replace(old, new) if name.endswith("data.pkl") else data)


def test_numpy1_written_scalar_is_accepted(tmp_path):
    """Files written under numpy 1.x name numpy.core.multiarray.scalar; the allow-list maps that name."""
    torch.save({"target_norm": np.float64(3.0)}, tmp_path / "a.pth")
    _rename_in_pickle(
        tmp_path / "a.pth", tmp_path / "b.pth", b"numpy._core.multiarray", b"numpy.core.multiarray"
    )
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(
        tmp_path / "b.pth"
    )
    assert safe_torch_load(tmp_path / "b.pth")["target_norm"] == 3.0


class _Payload:
    """Unpickling this object runs ``os.system`` (the classic malicious-checkpoint payload)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"encoder": torch.zeros(2, 2)}, "scaling_factor": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(
        UnsafeCheckpointError, match=r"refused to unpickle .*evil\.pth.*(posix|os)\.system"
    ) as err:
        safe_torch_load(path)
    assert "Nothing in the file was executed" in str(err.value)
    assert not marker.exists()
    # also refused when only the module-graph allow-list is in force
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(path, NUMPY_SCALAR_GLOBALS + module_graph_globals(["torch.nn.modules.linear.Linear"]))
    assert not marker.exists()


def test_malicious_legacy_format_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pth"
    torch.save({"x": _Payload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        safe_torch_load(path)
    assert not marker.exists()


def test_allowed_class_name_cannot_be_used_to_call_code(tmp_path):
    """A pickle that REDUCEs an allow-listed class name only reaches the inert record, which takes no args."""
    payload = b"\x80\x02ctorch.nn.modules.linear\nLinear\nq\x00X\x06\x00\x00\x00whoamiq\x01\x85q\x02Rq\x03."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    path = tmp_path / "reduce.pth"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        safe_torch_load(path, module_graph_globals(["torch.nn.modules.linear.Linear"]))


def test_module_graph_becomes_inert_records(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.save(net, tmp_path / "net.pth")
    names = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "net.pth")
    with pytest.raises(UnsafeCheckpointError, match="Sequential"):
        safe_torch_load(tmp_path / "net.pth")
    obj = safe_torch_load(tmp_path / "net.pth", module_graph_globals(names))
    assert isinstance(obj, PickledModule) and obj.class_name == "torch.nn.modules.container.Sequential"
    assert not isinstance(obj, torch.nn.Module)
    sd = obj.state_dict()
    assert set(sd) == set(net.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())
    assert obj.__dict__["_modules"]["1"].eps == 1e-5


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        safe_torch_load(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        safe_torch_load(tmp_path / "junk.pth")
