import numpy as np
import pytest
import torch

from sae_vision_ext.evals.data import load_rows


def test_load_rows_from_files(tmp_path):
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)  # [batch, tokens, d] -> 6 rows
    torch.save({"activations": x, "labels": torch.zeros(2)}, tmp_path / "acts.pt")
    rows = load_rows(str(tmp_path / "acts.pt"))
    assert (
        rows.x.shape == (6, 4) and torch.equal(rows.x[1], x[0, 1]) and "torch tensor file" in rows.description
    )
    assert load_rows(str(tmp_path / "acts.pt"), key="labels").x.shape == (1, 2)
    np.save(tmp_path / "acts.npy", x.reshape(6, 4).numpy())
    rows = load_rows(str(tmp_path / "acts.npy"), max_rows=4)
    assert rows.x.shape == (4, 4) and torch.equal(rows.x, x.reshape(6, 4)[:4])
    torch.save({"a": x, "b": x}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="--key"):
        load_rows(str(tmp_path / "two.pt"))
    with pytest.raises(FileNotFoundError):
        load_rows(str(tmp_path / "missing.npy"))


def test_load_rows_synthetic_keeps_ground_truth():
    rows = load_rows("synthetic-sparse", max_rows=100, synthetic_kwargs=dict(d_in=8, n_atoms=10, k=2))
    assert rows.x.shape == (100, 8) and rows.synthetic.atoms.shape == (10, 8)
    assert rows.description.startswith("synthetic sparse")
