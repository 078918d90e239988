"""Streaming k-means candidates: recovery, exact streaming statistics, refinement, files and CLI."""

import numpy as np
import pytest
import torch

from sae_vision_ext.activations.rows import open_row_source, rows_from_array
from sae_vision_ext.training.candidates import (
    Candidates,
    Reservoir,
    RunningMoments,
    candidates_shape,
    compute_candidates,
    load_candidates,
    load_candidates_file,
)


def clustered_rows(n_centres=8, d=16, per_centre=400, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    # centres far apart in every coordinate scale; dimension scales differ a lot (standardisation matters)
    scales = np.geomspace(0.1, 100, d)
    centres = rng.uniform(-1, 1, size=(n_centres, d)) * scales + 5 * scales
    labels = np.repeat(np.arange(n_centres), per_centre)
    rows = centres[labels] + rng.standard_normal((len(labels), d)) * spread * scales
    perm = rng.permutation(len(rows))
    return rows[perm].astype(np.float32), centres.astype(np.float32), labels[perm]


def test_kmeans_recovers_well_separated_centres():
    rows, centres, _ = clustered_rows()
    source = rows_from_array(rows, chunk_rows=500)  # streamed in 7 chunks
    result = compute_candidates(source, n_candidates=8, sample_rows=1000, seed=0)
    got = result.candidates.numpy()
    scales = np.geomspace(0.1, 100, 16)
    # relative error per dimension: each true centre has exactly one candidate very close to it
    dist = np.abs((got[:, None, :] - centres[None]) / scales).max(axis=-1)  # [cand, centre]
    assert (dist.min(axis=0) < 0.02).all()
    assert sorted(dist.argmin(axis=0)) == list(range(8))
    assert result.counts.sum() == 1000 and (result.counts > 0).all()
    # standardisation is exact over every row (not only the sample)
    np.testing.assert_allclose(result.mean.numpy(), rows.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(result.std.numpy(), rows.astype(np.float64).std(0), rtol=1e-4)
    torch.testing.assert_close(result.candidates, result.centroids_standardized * result.std + result.mean,
                               rtol=1e-5, atol=1e-3)


def test_refine_pass_is_one_exact_lloyd_step_over_every_row():
    rows, _, _ = clustered_rows(n_centres=5, d=6, per_centre=300, spread=0.3)
    before = compute_candidates(rows_from_array(rows, 256), 5, sample_rows=200, refine_passes=0, seed=1)
    after = compute_candidates(rows_from_array(rows, 256), 5, sample_rows=200, refine_passes=1, seed=1)
    assert after.counts.sum() == len(rows)
    # each refined centroid is the mean (over ALL rows, standardised) of the rows nearest to it before
    z = (rows.astype(np.float64) - after.mean.numpy()) / after.std.numpy()
    c0 = before.centroids_standardized.numpy()
    assign = ((z[:, None, :] - c0[None]) ** 2).sum(-1).argmin(1)
    for j in range(5):
        np.testing.assert_allclose(after.centroids_standardized[j].numpy(), z[assign == j].mean(0), atol=1e-5)
        assert after.counts[j] == (assign == j).sum()
    assert after.metadata["stream_inertia"] is not None


def test_running_moments_and_reservoir_are_exact_streaming_statistics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 3)) * [1, 10, 100] + [5, -5, 0]
    m = RunningMoments()
    for chunk in np.array_split(x, 7):
        m.update(chunk)
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std, x.std(0), rtol=1e-12)
    # reservoir: rows are distinct stream rows; every part of the stream is represented about uniformly
    ids = np.arange(20000, dtype=np.float32)[:, None]
    hits = np.zeros(4)
    for seed in range(10):
        r = Reservoir(500, 1, seed=seed)
        for chunk in np.array_split(ids, 13):
            r.update(chunk)
        s = r.sample[:, 0].astype(int)
        assert len(np.unique(s)) == 500
        hits += np.bincount(s // 5000, minlength=4)
    assert (np.abs(hits / hits.sum() - 0.25) < 0.03).all()


def test_candidates_file_round_trip(tmp_path):
    rows, _, _ = clustered_rows(n_centres=4, d=5, per_centre=50)
    result = compute_candidates(rows_from_array(rows), 4, seed=0)
    path = result.save(tmp_path / "c.safetensors")
    assert candidates_shape(path) == (4, 5)
    assert torch.equal(load_candidates(path), result.candidates)
    assert torch.equal(load_candidates(path, space="standardized"), result.centroids_standardized)
    full = load_candidates_file(path)
    assert full.metadata["n_rows"] == len(rows) and full.metadata["n_candidates"] == 4
    assert torch.equal(full.std, result.std)
    with pytest.raises(ValueError, match="space"):
        load_candidates(path, space="whitened")


def test_bad_rows_and_sizes_fail_clearly(tmp_path):
    rows = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="only 50 rows for 64 centroids"):
        compute_candidates(rows_from_array(rows), 64, sample_rows=64)
    bad = rows.copy()
    bad[33, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/inf .* row 33"):
        compute_candidates(rows_from_array(bad, chunk_rows=10), 4)
    with pytest.raises(ValueError, match="n_candidates must be >= 1"):
        compute_candidates(rows_from_array(rows), 0)
    with pytest.raises(ValueError, match="no rows"):
        compute_candidates([], 2)
    with pytest.raises(FileNotFoundError, match="sae-vision candidates"):
        candidates_shape(tmp_path / "nope.safetensors")
    (tmp_path / "rows.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported row file"):
        open_row_source(tmp_path / "rows.txt")
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(3, 3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a candidates file"):
        load_candidates(tmp_path / "foreign.safetensors")


def test_cli_reads_npy_safetensors_and_activation_cache(tmp_path, capsys):
    import datasets
    from safetensors.torch import save_file

    from sae_vision_ext.commands.candidates import main

    rows, _, _ = clustered_rows(n_centres=4, d=8, per_centre=60)
    np.save(tmp_path / "rows.npy", rows)
    save_file({"acts": torch.from_numpy(rows)}, str(tmp_path / "rows.safetensors"))
    hook = "blocks.0.hook_resid_post"
    ctx = 6  # 240 rows = 40 examples of 6 tokens
    features = datasets.Features({hook: datasets.Array2D(shape=(ctx, 8), dtype="float32")})
    ds = datasets.Dataset.from_dict({hook: rows.reshape(-1, ctx, 8)}, features=features)
    ds.save_to_disk(str(tmp_path / "cache"))

    outs = {}
    for name, src, extra in [("npy", "rows.npy", []), ("st", "rows.safetensors", []),
                             ("cache", "cache", ["--hook", hook, "--chunk-rows", "50"])]:
        out = tmp_path / f"{name}.safetensors"
        argv = [str(tmp_path / src), "--n-candidates", "4", "--output", str(out), "--quiet", *extra]
        assert main(argv) == 0
        outs[name] = load_candidates_file(out)
        assert outs[name].metadata["n_rows"] == 240
    assert "wrote 4 candidates (d=8) from 240 rows" in capsys.readouterr().out
    # same rows, same seed: same statistics whatever the container
    for name in ("st", "cache"):
        torch.testing.assert_close(outs[name].mean, outs["npy"].mean)
    assert outs["cache"].metadata["hook_name"] == hook
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "sae-vision candidates" in capsys.readouterr().out  # the epilog example


def test_saved_candidates_feed_an_archetypal_sae(tmp_path):
    import sae_vision_ext  # noqa: F401
    from sae_vision_ext.saes.archetypal import RASAETrainingSAE, RASAETrainingSAEConfig

    rows, _, _ = clustered_rows(n_centres=10, d=8, per_centre=40)
    compute_candidates(rows_from_array(rows), 10, seed=0).save(tmp_path / "c.safetensors")
    cfg = RASAETrainingSAEConfig(d_in=8, d_sae=6, k=2, candidates_path=str(tmp_path / "c.safetensors"))
    sae = RASAETrainingSAE(cfg)
    assert cfg.n_candidates == 10
    torch.testing.assert_close(sae.W_dec, load_candidates(tmp_path / "c.safetensors")[:6])
    assert Candidates is not None
