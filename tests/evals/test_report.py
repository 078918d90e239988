import json
import math

import pytest
import torch

from sae_vision_ext.commands.report import report_config
from sae_vision_ext.evals.compare import (
    MethodSpec,
    TrainedSAE,
    build_training_sae,
    evaluate_trained,
    matryoshka_widths,
)
from sae_vision_ext.evals.plots import plot_fvu_vs_l0, point_annotation
from sae_vision_ext.evals.reconstruction import evaluate_sae
from sae_vision_ext.evals.report import (
    ReportConfig,
    fvu_points,
    interpolate_fvu,
    main_specs,
    matched_l0,
    run_report,
    seed_summary,
    topk_at_family_l0,
)
from sae_vision_ext.evals.report_markdown import MAIN_COLUMNS, markdown_table, matched_l0_table
from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKSAE, MatryoshkaTopKSAEConfig


def test_markdown_table_formats_values():
    table = markdown_table([{"a": 0.123456, "b": None}, {"a": 3, "b": "x"}], [("a", "A"), ("b", "B")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 0.1235 | - |", "| 3 | x |"]


def test_cli_arguments_override_the_tiny_preset(tmp_path):
    cfg, options = report_config(
        [
            "--output",
            str(tmp_path),
            "--tiny",
            "--topk-ks",
            "2",
            "3",
            "--k",
            "3",
            "--stability-seeds",
            "0",
            "--families",
            "topk",
            "relu",
        ]
    )
    assert options.tiny and cfg.out == str(tmp_path)
    assert cfg.topk_ks == [2, 3] and cfg.k == 3 and cfg.families == ["topk", "relu"]
    assert cfg.stability is False and cfg.d_sae == ReportConfig.tiny().d_sae
    assert cfg.synthetic_kwargs == ReportConfig.tiny().synthetic_kwargs  # not a flag: from the preset
    cfg, _ = report_config(["--out", str(tmp_path), "--no-standardize"])
    assert cfg == ReportConfig(out=str(tmp_path), standardize=False)  # the full-size defaults
    assert cfg.seeds == 3 and ReportConfig.tiny().seeds == 2 and cfg.matryoshka_widths == []
    cfg, _ = report_config(
        ["--out", str(tmp_path), "--seeds", "1", "--matryoshka-widths", "8", "16", "256"]
        + ["--weights-dir", str(tmp_path / "w")]
    )
    assert cfg.seeds == 1 and cfg.matryoshka_widths == [8, 16, 256] and cfg.weights_dir == str(tmp_path / "w")
    with pytest.raises(SystemExit):
        report_config([])  # --output is required


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = run_report(ReportConfig.tiny(out=str(out)), command="sae-vision report --tiny")
    return out, path


def test_tiny_report_runs_end_to_end(tiny_report):
    out, path = tiny_report
    text = path.read_text()
    payload = json.loads((out / "results.json").read_text())
    for png in ("fvu_vs_l0.png", "stability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in text
    # it states the data and the weights
    assert "synthetic hierarchical" in text and payload["data"]["n_train"] + payload["data"]["n_test"] == 2048
    assert payload["data"]["preprocessing"]["standardize"] is True
    names = {w["name"] for w in payload["weights"]}
    first_seed = {
        "topk_k2",
        "topk_k4",
        "topk_k8",
        "batchtopk_k4",
        "matryoshka_batchtopk_k4",
        "relu",
        "msae_uw",
        "msae_rw",
        "a_sae_k4",
        "ra_sae_k4",
    }
    second_seed = {n + "_seed1" for n in first_seed if "a_sae" not in n} | {
        "a_sae_k4_seed1_kmeans1",
        "ra_sae_k4_seed1_kmeans1",
    }
    assert first_seed | second_seed | {"topk_centroids_k4"} <= names
    for weights in payload["weights"]:
        assert (out / "saes" / weights["name"] / "cfg.json").exists()
        assert weights["folder"] in text


def test_tiny_report_numbers_are_consistent(tiny_report):
    out, _ = tiny_report
    payload = json.loads((out / "results.json").read_text())
    results = payload["results"]
    msae = [r for r in results if r["method"] == "msae_rw"]
    assert [r["k_inference"] for r in msae] == [1, 2, 4, 8, 16, "relu"]
    by_k = {r["k_inference"]: r for r in msae}
    assert by_k[1]["l0"] <= 1.0 and by_k[16]["l0"] <= 16.0
    assert by_k[16]["fvu"] < by_k[1]["fvu"]  # more latents reconstruct better, from ONE model
    for row in results:
        assert 0.0 <= row["fraction_zero"] <= 1.0 and row["fvu"] >= 0.0
        assert row["explained_variance"] == pytest.approx(1.0 - row["fvu"])
        assert -1.0 <= row["cknna"] <= 1.0 + 1e-6 and 0.0 <= row["downstream_agreement"] <= 1.0
        assert row["identifiability"] is not None and row["identifiability"] <= 1.0 + 1e-6
        if row["family"] == "topk":
            assert row["l0"] == pytest.approx(row["k_train"])
        if row["family"].startswith("msae") and row["k_inference"] != "relu":
            assert row["l0"] <= row["k_inference"] + 1e-9  # measured, never more than asked
    nominal = {m["k"]: m for m in payload["fvu_at_nominal_k"]}
    assert set(nominal) == {2, 4, 8} and all("msae_uw" in m and "topk" in m for m in nominal.values())
    assert all(m["msae_rw_l0"] <= k + 1e-9 for k, m in nominal.items())
    # matched L0: the targets are the TopK SAEs' measured L0s; every family is reported at each of them
    matched = {m["k"]: m for m in payload["fvu_at_matched_l0"]}
    assert set(matched) == {2, 4, 8}
    for k, entry in matched.items():
        assert entry["target_l0"] == pytest.approx(k)
        assert set(entry["families"]) == {
            "batchtopk_k4",
            "matryoshka_batchtopk_k4",
            "relu",
            "msae_uw",
            "msae_rw",
            "a_sae_k4",
            "ra_sae_k4",
        }
        for family in entry["families"].values():
            # reached exactly when the target is inside the measured L0 range of that seed's curve
            for seed in family["per_seed"]:
                inside = seed["l0_min"] * (1 - 1e-6) <= k <= seed["l0_max"] * (1 + 1e-6)
                assert (seed["fvu"] is not None) == inside
    # the TopK-trained A-SAE sits at L0 = k = 4: reached at the target 4 with its own FVU, not at 2 or 8
    a_sae = [r["fvu"] for r in results if r["setting"] == "a_sae_k4"]
    assert matched[4]["families"]["a_sae_k4"]["fvu"] == pytest.approx(sum(a_sae) / len(a_sae))
    assert matched[2]["families"]["a_sae_k4"]["n_reached"] == 0
    ident = {r["method"]: r["identifiability"] for r in payload["identifiability"]}
    assert ident["true atoms, permuted (baseline)"] == pytest.approx(1.0, abs=1e-6)


def test_tiny_report_stability_protocols(tiny_report):
    out, _ = tiny_report
    payload = json.loads((out / "results.json").read_text())
    stability = {r["protocol"]: r for r in payload["stability"]}
    assert len(stability) == 5
    for row in stability.values():
        assert len(row["runs"]) == 2 and len(set(row["runs"])) == 2 and 0.0 < row["stability"] <= 1.0 + 1e-9
    # the paper protocol starts every run at the SAME dictionary, so after a short run it is far more stable
    # than independently initialised TopK: the inflation the fair protocol removes
    shared = stability["TopK from one shared set of centroids (control)"]["stability"]
    assert shared > stability["TopK, random init, init seed varies"]["stability"]
    fair = stability["RA-SAE, k-means seed varies (fair)"]["runs"]
    assert fair == ["ra_sae_k4", "ra_sae_k4_seed1_kmeans1"]
    assert (out / "candidates" / "kmeans_seed1.safetensors").exists()


def test_report_weights_load_back_and_reproduce_the_table(tiny_report):
    from sae_lens import SAE

    from sae_vision_ext.evals.reconstruction import evaluate_sae

    out, _ = tiny_report
    payload = json.loads((out / "results.json").read_text())
    row = next(r for r in payload["results"] if r["method"] == "ra_sae_k4")
    sae = SAE.load_from_disk(row["weights"])
    assert sae.cfg.architecture() == "ra_sae"
    # the test rows are the last rows of the (re-generated, standardised) synthetic data
    from sae_vision_ext.evals.data import load_rows

    cfg = ReportConfig.tiny()
    x = load_rows(cfg.data, max_rows=cfg.max_rows, synthetic_kwargs=cfg.synthetic_kwargs).x
    n_test = payload["data"]["n_test"]
    train, test = x[:-n_test], x[-n_test:]
    mu = train.mean(0)
    scale = payload["data"]["preprocessing"]["scale"]
    assert evaluate_sae(sae, [(test - mu) * scale])["fvu"] == pytest.approx(row["fvu"], rel=1e-4)


def test_tiny_report_seeds_give_spread_columns(tiny_report):
    out, path = tiny_report
    payload = json.loads((out / "results.json").read_text())
    text = path.read_text()
    summary = {(r["method"], str(r["k_inference"])): r for r in payload["summary"]}
    assert all(r["n_seeds"] == 2 and r["seeds"] == [0, 1] for r in summary.values())
    for (method, k), row in summary.items():
        runs = [
            r for r in payload["results"] if r["setting"] == method and str(r["k_inference"]) == k
        ]  # every per-seed row is kept in results.json
        assert sorted(r["seed"] for r in runs) == [0, 1]
        fvus = [r["fvu"] for r in runs]
        assert row["fvu"] == pytest.approx(sum(fvus) / 2)
        assert row["fvu_std"] == pytest.approx(abs(fvus[0] - fvus[1]) / math.sqrt(2))
        assert row["fvu_min"] == min(fvus) and row["fvu_max"] == max(fvus)
        assert row["l0"] == pytest.approx(sum(r["l0"] for r in runs) / 2)
    ra = [r for r in payload["results"] if r["setting"] == "ra_sae_k4"]
    assert sorted((r["seed"], r["kmeans_seed"]) for r in ra) == [(0, 0), (1, 1)]  # k-means seed varies too
    # the table prints mean ± std and the measured L0 next to the nominal k
    assert "| method | k (nominal) | L0 (measured) |" in text and "mean ± std over 2 seeds" in text
    fvu = summary[("topk_k4", "4")]
    assert "| topk_k4 | 4 | 4 ± 0 | " in text and f"{fvu['fvu']:.4g} ± {fvu['fvu_std']:.2g}" in text
    assert "## FVU at matched L0" in text and "<details>" in text


def test_tiny_report_trains_and_evaluates_matryoshka_batchtopk(tiny_report):
    out, _ = tiny_report
    payload = json.loads((out / "results.json").read_text())
    weights = {w["name"]: w for w in payload["weights"]}
    for name in ("matryoshka_batchtopk_k4", "matryoshka_batchtopk_k4_seed1"):
        assert weights[name]["architecture"] == "jumprelu"  # SAELens saves it as JumpReLU
        assert weights[name]["spec"]["matryoshka_widths"] == [2, 4, 8, 16, 32]
        [row] = [r for r in payload["results"] if r["method"] == name]
        assert row["family"] == "matryoshka_batchtopk" and row["k_inference"] == 4
        assert math.isfinite(row["fvu"]) and 0 < row["l0"] <= 32 and row["identifiability"] is not None


def test_matryoshka_widths_and_training_sae():
    assert matryoshka_widths(256) == [16, 32, 64, 128, 256] and matryoshka_widths(8) == [1, 2, 4, 8]
    spec = MethodSpec(name="m", family="matryoshka_batchtopk", k=3, matryoshka_widths=[4, 8, 16])
    sae = build_training_sae(spec, d_in=6, d_sae=16)
    assert sae.cfg.architecture() == "matryoshka_batchtopk" and sae.cfg.matryoshka_widths == [4, 8, 16]
    assert spec.setting == "m"
    cfg = ReportConfig.tiny(families=["matryoshka_batchtopk"], seeds=3, matryoshka_widths=[8, 32])
    specs = main_specs(cfg)
    assert [s.name for s in specs] == [
        "matryoshka_batchtopk_k4",
        "matryoshka_batchtopk_k4_seed1",
        "matryoshka_batchtopk_k4_seed2",
    ]
    assert {s.setting for s in specs} == {"matryoshka_batchtopk_k4"} and specs[2].seed == 2
    assert all(s.matryoshka_widths == [8, 32] for s in specs)


def test_interpolate_fvu_is_log_linear_and_never_extrapolates():
    points = [(8.0, 0.2), (2.0, 0.5), (4.0, 0.3)]  # unsorted on purpose
    assert interpolate_fvu(points, 2.0) == 0.5 and interpolate_fvu(points, 8.0) == 0.2
    # linear in log L0: sqrt(2 * 4) is halfway between 2 and 4 on the log axis
    assert interpolate_fvu(points, math.sqrt(8.0)) == pytest.approx(0.4)
    assert interpolate_fvu(points, 6.0) == pytest.approx(0.3 - 0.1 * math.log(1.5) / math.log(2.0))
    assert interpolate_fvu(points, 1.99) is None and interpolate_fvu(points, 8.01) is None  # outside: None
    assert interpolate_fvu(points, 0.0) is None and interpolate_fvu([], 3.0) is None
    # between two neighbours the value stays between their FVUs (no overshoot)
    for l0 in (2.1, 3.0, 3.9, 4.5, 7.9):
        value = interpolate_fvu(points, l0)
        low, high = (0.3, 0.5) if l0 < 4 else (0.2, 0.3)
        assert low <= value <= high
    # one point covers only its own L0; equal L0s are merged
    assert interpolate_fvu([(6.0, 0.1)], 6.0) == 0.1 and interpolate_fvu([(6.0, 0.1)], 6.1) is None
    assert interpolate_fvu([(3.0, 0.2), (3.0, 0.4), (6.0, 0.1)], 3.0) == pytest.approx(0.3)


def _row(setting, family, seed, k_inference, l0, fvu, k_train=None):
    return {
        "method": setting if not seed else f"{setting}_seed{seed}",
        "setting": setting,
        "family": family,
        "seed": seed,
        "kmeans_seed": None,
        "k_train": k_train,
        "k_inference": k_inference,
        "l0": l0,
        "fvu": fvu,
    }


def test_matched_l0_on_a_hand_made_example():
    results = []
    for seed in (0, 1):
        for k, fvu in ((2, 0.6), (4, 0.4), (8, 0.25)):
            results.append(_row(f"topk_k{k}", "topk", seed, k, float(k), fvu + 0.01 * seed, k_train=k))
    # an MSAE whose ReLU support is small: asked for k = 8 it keeps 5 (seed 0) or 6 (seed 1) latents;
    # seed 1's ReLU mode reaches L0 8.5, seed 0's only 5.5
    msae = {0: [(1, 1.0, 0.7), (2, 2.0, 0.5), (4, 4.0, 0.3), (8, 5.0, 0.25), ("relu", 5.5, 0.24)]}
    msae[1] = [(1, 1.0, 0.7), (2, 2.0, 0.52), (4, 4.0, 0.32), (8, 6.0, 0.22), ("relu", 8.5, 0.2)]
    for seed, curve in msae.items():
        results += [_row("msae_rw", "msae_rw", seed, k, l0, fvu) for k, l0, fvu in curve]
    results += [_row("batchtopk_k4", "batchtopk", s, 4, 4.0, 0.35 + 0.1 * s, k_train=4) for s in (0, 1)]
    results += [_row("relu", "relu", s, None, 17.0, 0.1) for s in (0, 1)]

    entries = {e["k"]: e for e in matched_l0(results, [2, 4, 8])}
    assert [entries[k]["target_l0"] for k in (2, 4, 8)] == [2.0, 4.0, 8.0]
    assert entries[2]["topk"]["fvu"] == pytest.approx(0.605)
    assert entries[2]["topk"]["fvu_std"] == pytest.approx(0.01 / math.sqrt(2))
    msae2, msae8 = entries[2]["families"]["msae_rw"], entries[8]["families"]["msae_rw"]
    assert msae2["fvu"] == pytest.approx(0.51) and msae2["n_reached"] == 2
    # L0 8 is beyond seed 0's curve (max 5.5): only seed 1 counts, interpolated between L0 6 and 8.5
    expected = 0.22 + (0.2 - 0.22) * math.log(8 / 6) / math.log(8.5 / 6)
    assert msae8["n_reached"] == 1 and msae8["n_seeds"] == 2 and msae8["fvu"] == pytest.approx(expected)
    assert [p["fvu"] is None for p in msae8["per_seed"]] == [True, False]
    # a single point is reached only at its own L0, and never extrapolated elsewhere
    assert entries[4]["families"]["batchtopk_k4"]["fvu"] == pytest.approx(0.4)
    assert entries[2]["families"]["batchtopk_k4"]["n_reached"] == 0
    assert all(entries[k]["families"]["relu"]["fvu"] is None for k in (2, 4, 8))
    table = matched_l0_table(list(entries.values()))
    assert "not reached (L0 17)" in table and "(1/2 seeds)" in table and "not reached (L0 4)" in table

    # the other direction: the TopK curve at each run's measured L0
    back = {(e["method"], str(e["k_inference"])): e for e in topk_at_family_l0(results)}
    assert back[("msae_rw", "8")]["l0"] == pytest.approx(5.5)  # the measured L0, not 8
    at5 = [
        0.4 + (0.25 - 0.4) * math.log(5 / 4) / math.log(2),
        0.41 + (0.26 - 0.41) * math.log(6 / 4) / math.log(2),
    ]
    assert back[("msae_rw", "8")]["topk_fvu"] == pytest.approx(sum(at5) / 2)
    assert back[("relu", "None")]["n_reached"] == 0 and back[("msae_rw", "1")]["topk_fvu"] is None


def test_msae_with_fewer_than_k_nonzeros_sits_at_its_measured_l0(tmp_path):
    torch.manual_seed(0)
    sae = MatryoshkaTopKSAE(MatryoshkaTopKSAEConfig(d_in=8, d_sae=16, k_levels=[2, 16]))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(8, 16))
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(16, 8), dim=1))
        sae.b_enc.fill_(-100.0)
        sae.b_enc[:3] = 0.0  # at most 3 latents can ever be non-zero
    x = torch.randn(300, 8)
    with torch.no_grad():
        assert ((sae.encode(x, k=8) != 0).sum(-1) <= 3).all()
    spec = MethodSpec(name="msae_rw", family="msae_rw", inference_ks=[2, 8, None])
    rows = evaluate_trained(TrainedSAE(spec, sae, tmp_path, 0.0), x, cknna_rows=100)
    at8 = next(r for r in rows if r["k_inference"] == 8)
    measured = evaluate_sae(sae, [x], encode_kwargs={"k": 8}, progress=False)["l0"]
    assert at8["l0"] == pytest.approx(measured) and measured < 3.0 + 1e-9 < 8
    topk = [_row(f"topk_k{k}", "topk", 0, k, float(k), 0.5 / k, k_train=k) for k in (2, 8)]
    summary = seed_summary(topk + rows)
    # the plot places the k = 8 point at its measured L0 and says so
    point = next(p for p in fvu_points(summary) if p["group"] == "msae_rw" and p["label"] == "k=8")
    assert point["l0"] == pytest.approx(measured)
    assert point_annotation(point, "msae_rw") == f"k=8, L0 {measured:.3g}"
    assert plot_fvu_vs_l0(fvu_points(summary), tmp_path / "p.png", log_fvu=True)[:4] == b"\x89PNG"
    # the table prints the nominal k next to the measured L0
    table = markdown_table(summary, MAIN_COLUMNS, spread=True)
    assert f"| msae_rw | 8 | {measured:.4g} |" in table
    # and at the TopK target L0 = 8 the MSAE is not reached: its curve stops below
    [entry] = [e for e in matched_l0(topk + rows, [8])]
    assert entry["families"]["msae_rw"]["fvu"] is None
    assert entry["families"]["msae_rw"]["l0_max"] == pytest.approx(max(r["l0"] for r in rows))


def test_report_help_shows_the_new_flags(capsys):
    from sae_vision_ext.commands.report import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for snippet in (
        "--seeds int",
        "runs of every family",
        "(default: 3)",
        "--matryoshka-widths W",
        "prefix widths of matryoshka_batchtopk",
        "--weights-dir [str]",
        "trained checkpoints",
        "matryoshka_batchtopk",
    ):
        assert snippet in text, snippet


@pytest.mark.slow
def test_full_size_report(tmp_path):
    path = run_report(ReportConfig(out=str(tmp_path)))
    payload = json.loads((tmp_path / "results.json").read_text())
    assert path.exists() and len(payload["stability"]) == 5
    topk = {r["k_train"]: r["fvu"] for r in payload["summary"] if r["family"] == "topk"}
    assert topk[24] < topk[3]
    assert torch.isfinite(torch.tensor([r["fvu"] for r in payload["results"]])).all()
