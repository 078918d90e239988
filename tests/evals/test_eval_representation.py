import math

import pytest
import torch

from sae_vision_ext.evals.dictionary import atom_data_distance, coherence, dictionary_report, stable_rank
from sae_vision_ext.evals.reconstruction import fvu
from sae_vision_ext.evals.representation import (
    cknna,
    downstream_preservation,
    evaluate_downstream,
    fit_linear_probe,
    mutual_knn,
    zero_shot_head,
)


def _unit_2d(degrees):
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_mutual_knn_hand_value():
    # top-1 neighbours: a: 0->1, 1->0, 2->1, 3->2 ; b: 0->1, 1->2, 2->1, 3->2 -> 3 of 4 shared
    a, b = _unit_2d([0, 10, 30, 90]), _unit_2d([0, 40, 45, 90])
    assert mutual_knn(a, b, topk=1) == pytest.approx(0.75)


def _reference_cknna(a, b, topk):
    """Loop implementation of the formula in the module docstring (unbiased HSIC on k-NN-masked kernels)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    n = a.shape[0]
    K, L = (a @ a.T).tolist(), (b @ b.T).tolist()

    def knn(G):
        return [set(sorted((j for j in range(n) if j != i), key=lambda j: -G[i][j])[:topk]) for i in range(n)]

    def hsic(A, B):
        A = [[0.0 if i == j else A[i][j] for j in range(n)] for i in range(n)]
        B = [[0.0 if i == j else B[i][j] for j in range(n)] for i in range(n)]
        trace = sum(A[i][j] * B[j][i] for i in range(n) for j in range(n))
        sum_a, sum_b = sum(map(sum, A)), sum(map(sum, B))
        cross = sum(A[i][j] * B[j][q] for i in range(n) for j in range(n) for q in range(n))
        return (trace + sum_a * sum_b / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))

    nk, nl = knn(K), knn(L)

    def masked(G, keep):
        return [[G[i][j] if keep(i, j) else 0.0 for j in range(n)] for i in range(n)]

    mutual = lambda i, j: j in nk[i] and j in nl[i]  # noqa: E731
    cross = hsic(masked(K, mutual), masked(L, mutual))
    self_k = hsic(masked(K, lambda i, j: j in nk[i]), masked(K, lambda i, j: j in nk[i]))
    self_l = hsic(masked(L, lambda i, j: j in nl[i]), masked(L, lambda i, j: j in nl[i]))
    return cross / math.sqrt(self_k * self_l)


def test_cknna_matches_loop_reference_on_small_example():
    torch.manual_seed(0)
    a = torch.randn(9, 4)
    b = a + 0.5 * torch.randn(9, 4)
    assert cknna(a, b, topk=3) == pytest.approx(_reference_cknna(a, b, 3), rel=1e-9)


def test_cknna_identity_invariance_and_unrelated():
    torch.manual_seed(1)
    a = torch.randn(200, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    assert cknna(a, a, topk=10) == pytest.approx(1.0, abs=1e-6)
    assert cknna(a, 3.0 * a @ rotation, topk=10) == pytest.approx(1.0, abs=1e-6)
    assert abs(cknna(a, torch.randn(200, 16), topk=10)) < 0.15
    noisy = cknna(a, a + 0.5 * torch.randn(200, 16), topk=10)
    very_noisy = cknna(a, a + 2.0 * torch.randn(200, 16), topk=10)
    assert 1.0 > noisy > very_noisy
    with pytest.raises(ValueError):
        cknna(a, a[:10])


def test_downstream_preservation_hand_values():
    # row 1: p = [1/4, 3/4], q = [3/4, 1/4] -> KL = ln 3 / 2, disagree ; row 2 identical -> KL 0, agree
    original = torch.tensor([[0.0, math.log(3)], [1.0, 2.0]])
    reconstructed = torch.tensor([[math.log(3), 0.0], [1.0, 2.0]])
    result = downstream_preservation(original, reconstructed, labels=torch.tensor([1, 0]))
    assert result["kl"] == pytest.approx(math.log(3) / 4)
    assert result["agreement"] == pytest.approx(0.5)
    assert result["accuracy_original"] == pytest.approx(0.5)  # predicts [1, 1]
    assert result["accuracy_reconstructed"] == pytest.approx(0.0)  # predicts [0, 1]


def test_zero_shot_head_is_scaled_cosine():
    head = zero_shot_head(torch.tensor([[2.0, 0.0], [0.0, 5.0]]), logit_scale=10.0)
    assert torch.allclose(head(torch.tensor([[3.0, 4.0]])), torch.tensor([[6.0, 8.0]]))


class ShrinkSAE(torch.nn.Module):
    """x_hat = factor * x (a stand-in SAE with encode/decode)."""

    def __init__(self, factor):
        super().__init__()
        self.factor = torch.nn.Parameter(torch.tensor(factor))

    def encode(self, x):
        return x * self.factor

    def decode(self, z):
        return z


def test_linear_probe_and_evaluate_downstream():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (300,))
    centers = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    x = centers[labels] + 0.5 * torch.randn(300, 2)
    probe = fit_linear_probe(x, labels)
    assert (probe(x).argmax(-1) == labels).float().mean() > 0.97
    batches = [(x[:150], labels[:150]), (x[150:], labels[150:])]
    exact = evaluate_downstream(ShrinkSAE(1.0), batches, probe)
    assert exact["kl"] == pytest.approx(0.0, abs=1e-9) and exact["agreement"] == 1.0
    shrunk = evaluate_downstream(ShrinkSAE(0.3), batches, probe)
    with torch.no_grad():
        direct = downstream_preservation(probe(x), probe(0.3 * x), labels)
    assert shrunk["kl"] == pytest.approx(direct["kl"], rel=1e-5) and shrunk["kl"] > 0.01
    assert shrunk["accuracy_original"] == pytest.approx(exact["accuracy_reconstructed"])


D = torch.tensor([[1.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 5.0]])


def test_coherence_hand_value():
    # |cos|: (1,2) = 0.6, (1,3) = 0, (2,3) = 0
    result = coherence(D, chunk_size=2)
    assert result["max"] == pytest.approx(0.6)
    assert result["mean_max"] == pytest.approx((0.6 + 0.6 + 0.0) / 3)


def test_stable_rank_hand_values():
    # unit atoms: Gram [[1, .6, 0], [.6, 1, 0], [0, 0, 1]] -> top eigenvalue 1.6, ||U||_F^2 = 3
    assert stable_rank(D) == pytest.approx(3 / 1.6)
    # raw: D D^T = [[1, 3, 0], [3, 25, 0], [0, 0, 25]] -> top eigenvalue (26 + sqrt(612)) / 2, ||D||_F^2 = 51
    assert stable_rank(D, normalize_atoms=False) == pytest.approx(51 / ((26 + math.sqrt(612)) / 2))
    assert stable_rank(torch.eye(4)) == pytest.approx(4.0)


def test_atom_data_distance_hand_values():
    atoms = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    data = torch.tensor([[2.0, 0.0], [0.5, 1.0]])
    cosine = atom_data_distance(atoms, data, chunk_size=1)
    assert cosine.tolist() == pytest.approx([0.0, 1 - 1 / math.sqrt(1.25)])
    assert atom_data_distance(atoms, data, metric="euclidean").tolist() == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError):
        atom_data_distance(atoms, data, metric="manhattan")
    report = dictionary_report(atoms, data)
    assert report["coherence_max"] == pytest.approx(0.0) and report["stable_rank"] == pytest.approx(2.0)
    assert report["atom_data_cosine_distance"] == pytest.approx((1 - 1 / math.sqrt(1.25)) / 2)


def test_evaluate_all_on_an_exact_sae():
    from sae_vision_ext.evals.compare import evaluate_all

    torch.manual_seed(0)
    x = torch.randn(120, 4)
    probe = fit_linear_probe(x, (x[:, 0] > 0).long())
    metrics = evaluate_all(ShrinkSAE(1.0), x, head=probe, cknna_rows=50, eval_batch_size=32, dictionary=False)
    assert metrics["fvu"] == pytest.approx(0.0, abs=1e-12) and metrics["cosine"] == pytest.approx(1.0)
    assert metrics["cknna"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["downstream_kl"] == pytest.approx(0.0, abs=1e-9) and metrics["downstream_agreement"] == 1.0
    half = evaluate_all(ShrinkSAE(0.5), x, head=probe, cknna_rows=50, dictionary=False)
    assert half["fvu"] == pytest.approx(fvu(x, 0.5 * x)) and half["cknna"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_linear_probe_is_scikit_learns_logistic_regression(n_classes):
    """The probe's probabilities are scikit-learn's on the standardised rows (two classes included, where
    scikit-learn keeps one row of weights), and its penalty is ``l2 * ||W||^2`` on the mean loss."""
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(1)
    labels = torch.arange(400) % n_classes
    centres = torch.randn(n_classes, 5)
    x = (centres[labels] + torch.randn(400, 5)) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 4.0
    probe = fit_linear_probe(x, labels, l2=1e-3)
    standardised = ((x - x.mean(0)) / x.std(0)).double().numpy()
    reference = LogisticRegression(C=1 / (2 * 1e-3 * 400), max_iter=500).fit(standardised, labels.numpy())
    expected = torch.as_tensor(reference.predict_proba(standardised), dtype=torch.float32)
    assert probe.predict_proba(x).shape == (400, n_classes)
    assert torch.allclose(probe.predict_proba(x), expected, atol=1e-4)
    assert torch.allclose(probe(x).softmax(dim=-1), expected, atol=1e-4)  # forward gives the logits
    assert not any(p.requires_grad for p in probe.parameters())


def test_linear_probe_keeps_classes_missing_from_the_labels():
    x = torch.randn(60, 3)
    probe = fit_linear_probe(x, (x[:, 0] > 0).long() * 2, n_classes=4)  # classes 0 and 2 only
    probabilities = probe.predict_proba(x)
    assert probabilities.shape == (60, 4) and float(probabilities[:, [1, 3]].max()) < 1e-6
