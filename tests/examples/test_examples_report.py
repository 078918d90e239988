import pytest
from helpers import load_script, run_example

SCRIPT = "examples/compare_saes.py"


def test_compare_saes_help_has_an_example(capsys):
    module = load_script(SCRIPT)  # in-process: the subprocess import of SAELens alone takes seconds
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--tiny" in out and "--data" in out


def test_compare_saes_tiny_writes_a_report_its_weights_reproduce(tmp_path):
    """The test loads the saved SAEs back and measures them on the regenerated held-out rows itself."""
    import json

    from sae_lens import SAE

    import sae_vision_ext  # noqa: F401  (registers matryoshka_topk)
    from sae_vision_ext.evals.data import load_rows
    from sae_vision_ext.evals.reconstruction import evaluate_sae
    from sae_vision_ext.evals.report_config import ReportConfig

    result = run_example(
        SCRIPT,
        "--output",
        str(tmp_path),
        "--tiny",
        "--families",
        "topk",
        "msae_rw",
        "--topk-ks",
        "4",
        "--stability-seeds",
        "0",
        "--weights-dir",
        str(tmp_path / "weights"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "results.md").read_text()
    assert "## Data" in text and "## Weights" in text and "Stability" not in text
    assert (
        not (tmp_path / "saes").exists() and (tmp_path / "weights" / "saes" / "topk_k4" / "cfg.json").exists()
    )
    assert (tmp_path / "fvu_vs_l0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((tmp_path / "results.json").read_text())
    cfg = ReportConfig.tiny()
    x = load_rows(cfg.data, max_rows=cfg.max_rows, seed=cfg.seed, synthetic_kwargs=cfg.synthetic_kwargs).x
    n_test = payload["data"]["n_test"]
    train, test = x[:-n_test], x[-n_test:]
    test = (test - train.mean(0)) * payload["data"]["preprocessing"]["scale"]
    topk = next(r for r in payload["results"] if r["method"] == "topk_k4")
    measured = evaluate_sae(SAE.load_from_disk(topk["weights"]), [test], progress=False)
    assert measured["l0"] == pytest.approx(4.0) and measured["fvu"] == pytest.approx(topk["fvu"], rel=1e-4)
    msae_rows = [r for r in payload["results"] if r["method"] == "msae_rw" and r["k_inference"] != "relu"]
    msae = SAE.load_from_disk(msae_rows[0]["weights"])
    fvus = []
    for row in msae_rows:
        at_k = evaluate_sae(msae, [test], encode_kwargs={"k": row["k_inference"]}, progress=False)
        assert at_k["fvu"] == pytest.approx(row["fvu"], rel=1e-4)
        fvus.append(at_k["fvu"])
    assert fvus[0] > fvus[-1]  # one Matryoshka SAE: FVU falls as the inference k grows
    assert "msae_rw" in result.stdout and " ± " in result.stdout  # the example prints the table with spread
