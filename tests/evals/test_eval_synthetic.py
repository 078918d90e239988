import pytest
import torch

from sae_vision_ext.evals.synthetic import hierarchical_data, identifiability, sparse_dictionary_data


def test_sparse_dictionary_data_is_k_sparse_over_unit_atoms():
    data = sparse_dictionary_data(n_rows=500, d_in=8, n_atoms=20, k=3, seed=1)
    assert data.x.shape == (500, 8) and data.atoms.shape == (20, 8)
    assert torch.allclose(data.atoms.norm(dim=1), torch.ones(20))
    assert ((data.codes != 0).sum(dim=1) == 3).all()
    assert (data.codes >= 0).all() and data.codes.max() <= 1.5
    assert torch.allclose(data.x, data.codes @ data.atoms)
    again = sparse_dictionary_data(n_rows=500, d_in=8, n_atoms=20, k=3, seed=1)
    assert torch.equal(again.x, data.x)
    assert not torch.equal(sparse_dictionary_data(n_rows=500, d_in=8, n_atoms=20, k=3, seed=2).x, data.x)


def test_hierarchical_children_fire_only_with_their_parent():
    data = hierarchical_data(n_rows=2000, d_in=16, n_coarse=5, n_fine=3, k_coarse=2, p_fine=0.5, seed=0)
    n_coarse = 5
    assert data.atoms.shape == (20, 16) and data.parents.tolist()[:6] == [-1] * 5 + [0]
    coarse_codes, fine_codes = data.codes[:, :n_coarse], data.codes[:, n_coarse:]
    assert ((coarse_codes != 0).sum(dim=1) == 2).all()
    parent_of_fine = data.parents[n_coarse:]
    fine_active = fine_codes != 0
    assert (coarse_codes[:, parent_of_fine][fine_active] > 0).all()
    # at most one child per active parent, and about p_fine of active parents are refined
    per_parent = fine_active.reshape(2000, n_coarse, 3).sum(dim=2)
    assert per_parent.max() <= 1
    assert fine_active.sum() / (2 * 2000) == pytest.approx(0.5, abs=0.05)
    cosine_to_parent = (data.atoms[n_coarse:] * data.atoms[parent_of_fine]).sum(dim=1)
    assert torch.allclose(cosine_to_parent, torch.full((15,), 0.3), atol=1e-5)
    assert torch.allclose(data.x, data.codes @ data.atoms, atol=1e-5)
    assert "hierarchical" in data.describe() and data.coarse_atoms.shape == (5, 16)


def test_identifiability_of_perfect_and_random_dictionaries():
    data = sparse_dictionary_data(n_rows=10, d_in=16, n_atoms=24, k=2, seed=0)
    permuted = data.atoms[torch.randperm(24)]
    assert identifiability(permuted, data.atoms) == pytest.approx(1.0, abs=1e-6)
    extra = torch.cat([torch.randn(8, 16), permuted])  # more learned atoms than true ones
    assert identifiability(extra, data.atoms) == pytest.approx(1.0, abs=1e-6)
    random_atoms = torch.nn.functional.normalize(
        torch.randn(24, 16, generator=torch.Generator().manual_seed(5))
    )
    assert identifiability(random_atoms, data.atoms) < 0.5
    # a negated dictionary is not identified unless sign flips are allowed
    assert identifiability(-permuted, data.atoms) < 0.5
    assert identifiability(-permuted, data.atoms, allow_sign_flip=True) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        identifiability(permuted[:5], data.atoms)


def test_synthetic_command_config_sizes_follow_the_ground_truth(tmp_path):
    from sae_vision_ext.commands.synthetic import synthetic_config

    cfg, _ = synthetic_config(
        [
            "--kind",
            "hierarchical",
            "--output",
            str(tmp_path),
            "--tiny",
            "--n-coarse",
            "5",
            "--n-fine",
            "3",
            "--true-k",
            "2",
        ]
    )
    assert cfg.data == "synthetic-hierarchical" and cfg.d_sae == 5 * (1 + 3)
    assert cfg.synthetic_kwargs["k_coarse"] == 2 and cfg.k == 4 and cfg.topk_ks == [2, 4, 8]
    assert cfg.stability is False and cfg.n_candidates >= 4 * cfg.d_sae
    assert cfg.seeds == 2 and "matryoshka_batchtopk" in cfg.families  # the tiny preset's seeds, every family
    cfg, _ = synthetic_config(["--output", str(tmp_path), "--d-sae", "40", "--k", "3"])
    assert cfg.data == "synthetic-sparse" and cfg.d_sae == 40 and cfg.k == 3
    assert cfg.synthetic_kwargs == {"d_in": 32, "n_atoms": 64, "k": 4, "noise_std": 0.01}
    assert cfg.n_candidates >= 4 * 40  # the candidates follow the d_sae given
    assert synthetic_config(["--output", str(tmp_path), "-k", "3"])[0].k == 3  # the short alias counts too
    cfg, _ = synthetic_config(["--kind", "hierarchical", "--output", str(tmp_path), "--stability-seeds", "3"])
    assert cfg.stability is True  # the epilog's stability example does run the stability study


def test_synthetic_help_shows_the_defaults_of_the_kind_asked_for(capsys):
    from sae_vision_ext.commands.synthetic import main

    for argv, d_sae in ((["--kind", "hierarchical", "--tiny"], 6 * 3), (["--kind", "sparse"], 64)):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        assert f"latents of every SAE (default: {d_sae})" in " ".join(capsys.readouterr().out.split())


def test_synthetic_command_reports_identifiability_against_baselines(tmp_path):
    import json

    from sae_vision_ext.commands.synthetic import main

    assert (
        main(
            [
                "--kind",
                "sparse",
                "--output",
                str(tmp_path),
                "--tiny",
                "--families",
                "topk",
                "ra_sae",
                "--topk-ks",
                "2",
                "--n-train-rows",
                "6144",
                "--quiet",
            ]
        )
        == 0
    )
    payload = json.loads((tmp_path / "results.json").read_text())
    ident = {row["method"]: row["identifiability"] for row in payload["identifiability"]}
    assert ident["true atoms, permuted (baseline)"] == pytest.approx(1.0, abs=1e-6)
    random_baseline = ident["random unit atoms, 16 (baseline)"]
    assert ident["topk_k2"] > random_baseline + 0.1 and ident["ra_sae_k2"] > random_baseline + 0.1
    seeds = {row["method"]: row for row in payload["identifiability"] if "n_seeds" in row}
    assert seeds["ra_sae_k2"]["n_seeds"] == 2  # the mean of one run per seed (k-means seed varied too)
    assert set(seeds["ra_sae_k2"]["per_seed"]) == {"ra_sae_k2", "ra_sae_k2_seed1_kmeans1"}
    assert "## Identifiability" in (tmp_path / "results.md").read_text()
