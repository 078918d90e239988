"""Does the reconstruction preserve the representation? CKNNA and downstream-head preservation.

CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis"): with inner-product kernels
``K = A A^T`` and ``L = B B^T`` over the same ``n`` samples (rows L2-normalised by default) and the mutual
k-nearest-neighbour mask ``M_ij = 1[j in knn_K(i) and j in knn_L(i)]`` (``i`` is never its own neighbour),

    CKNNA(A, B) = HSIC(M o K, M o L) / sqrt( HSIC(M_K o K, M_K o K) * HSIC(M_L o L, M_L o L) )

where ``M_K`` (``M_L``) is the k-NN mask of ``K`` (``L``) alone and HSIC is the unbiased estimator of Song et
al. (2012): with ``K~``, ``L~`` the kernels with zeroed diagonals,
``HSIC = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``.
It is 1 for identical representations and near 0 for unrelated ones; the MSAE paper reports it between
original and reconstructed embeddings.

Downstream preservation: run a classifier or zero-shot head ``h`` on the original ``x`` and the reconstruction
``x_hat``; report ``KL(softmax h(x) || softmax h(x_hat))`` averaged over samples, the agreement
``mean 1[argmax h(x) = argmax h(x_hat)]``, and, with labels, both accuracies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import Tensor

Head = Callable[[Tensor], Tensor]


def _hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """Unbiased HSIC estimator of Song et al. (2012); needs ``n >= 4``."""
    n = K.shape[0]
    K = K.clone().fill_diagonal_(0)
    L = L.clone().fill_diagonal_(0)
    trace_term = (K * L.T).sum()
    sums_term = K.sum() * L.sum() / ((n - 1) * (n - 2))
    cross_term = 2.0 * (K @ L).sum() / (n - 2)
    return (trace_term + sums_term - cross_term) / (n * (n - 3))


def _knn_mask(K: Tensor, topk: int) -> Tensor:
    """``mask[i, j] = 1`` when ``j`` is one of the ``topk`` largest ``K[i, :]`` with ``j != i``."""
    n = K.shape[0]
    scores = K.clone().fill_diagonal_(float("-inf"))
    indices = scores.topk(topk, dim=1).indices
    return torch.zeros(n, n, dtype=K.dtype, device=K.device).scatter_(1, indices, 1.0)


def cknna(a: Tensor, b: Tensor, topk: int = 10, normalize: bool = True) -> float:
    """Centred kernel nearest-neighbour alignment between two representations ``[n, d_a]``, ``[n, d_b]``."""
    a = a.reshape(-1, a.shape[-1]).double()
    b = b.reshape(-1, b.shape[-1]).double()
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"both representations need the same samples, got {n} and {b.shape[0]} rows")
    if n < 4 or not 0 < topk < n:
        raise ValueError(f"CKNNA needs n >= 4 and 0 < topk < n, got n={n}, topk={topk}")
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    K, L = a @ a.T, b @ b.T
    mask_k, mask_l = _knn_mask(K, topk), _knn_mask(L, topk)
    mutual = mask_k * mask_l
    cross = _hsic_unbiased(mutual * K, mutual * L)
    self_k = _hsic_unbiased(mask_k * K, mask_k * K)
    self_l = _hsic_unbiased(mask_l * L, mask_l * L)
    return float(cross / (torch.sqrt(self_k * self_l) + 1e-12))


def mutual_knn(a: Tensor, b: Tensor, topk: int = 10) -> float:
    """Mean fraction of each sample's ``topk`` cosine neighbours shared by the two representations."""
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    mutual = _knn_mask(a @ a.T, topk) * _knn_mask(b @ b.T, topk)
    return float(mutual.sum(dim=1).mean() / topk)


# ----------------------------------------------------------------------------------------------- downstream


def downstream_preservation(
    logits_original: Tensor, logits_reconstructed: Tensor, labels: Tensor | None = None
) -> dict[str, float]:
    """KL(p_orig || p_recon) (nats, mean over samples), top-1 agreement, and accuracies when labels are
    given."""
    log_p = F.log_softmax(logits_original.double(), dim=-1)
    log_q = F.log_softmax(logits_reconstructed.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    pred_original, pred_reconstructed = log_p.argmax(dim=-1), log_q.argmax(dim=-1)
    result = {
        "kl": float(kl.mean()),
        "agreement": float((pred_original == pred_reconstructed).double().mean()),
    }
    if labels is not None:
        labels = labels.to(pred_original.device)
        result["accuracy_original"] = float((pred_original == labels).double().mean())
        result["accuracy_reconstructed"] = float((pred_reconstructed == labels).double().mean())
    return result


def zero_shot_head(class_embeddings: Tensor, logit_scale: float = 100.0) -> Head:
    """CLIP-style zero-shot head: ``logits = logit_scale * normalize(x) @ normalize(class_embeddings)^T``
    (``logit_scale`` is CLIP's temperature)."""
    weights = F.normalize(class_embeddings.detach().float(), dim=-1)

    def head(x: Tensor) -> Tensor:
        return logit_scale * F.normalize(x.float(), dim=-1) @ weights.to(x.device).T

    return head


class LinearProbe(torch.nn.Module):
    """Multinomial logistic regression on standardised rows: ``logits = ((x - mean) / scale) W^T + b``.

    A head (``forward`` gives logits, as ``downstream_preservation`` and ``bias_probe`` expect);
    ``predict_proba`` gives the class probabilities.
    """

    def __init__(self, d_in: int, n_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(d_in, n_classes)
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(d_in))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear((x.float() - self.mean) / self.scale)

    def predict_proba(self, x: Tensor) -> Tensor:
        return self.forward(x).softmax(dim=-1)


def fit_linear_probe(
    x: Tensor,
    labels: Tensor,
    l2: float = 1e-4,
    max_iter: int = 500,
    standardize: bool = True,
    n_classes: int | None = None,
) -> LinearProbe:
    """Fit a :class:`LinearProbe` with scikit-learn's ``LogisticRegression`` (L-BFGS, multinomial).

    Minimises ``mean cross-entropy + l2 * ||W||^2`` (scikit-learn's ``C = 1 / (2 * l2 * n)``) on the rows
    standardised per feature (``standardize``; otherwise as given). The fit is deterministic. ``n_classes``
    (default: ``max(labels) + 1``) sets the width of the logits; classes absent from ``labels`` get logit
    ``-inf``-like bias ``-1e4``.
    """
    features = x.detach().float().cpu().reshape(-1, x.shape[-1])
    targets = torch.as_tensor(labels).long().cpu().reshape(-1)
    n_classes = n_classes or int(targets.max()) + 1
    probe = LinearProbe(features.shape[1], n_classes)
    if standardize:
        probe.mean.copy_(features.mean(dim=0))
        probe.scale.copy_(features.std(dim=0).clamp_min(1e-6))
    inputs = ((features - probe.mean) / probe.scale).double().numpy()
    model = LogisticRegression(C=1.0 / (2 * l2 * inputs.shape[0]), max_iter=max_iter)
    model.fit(inputs, targets.numpy())
    coef = torch.as_tensor(model.coef_, dtype=torch.float32)
    intercept = torch.as_tensor(model.intercept_, dtype=torch.float32)
    if coef.shape[0] == 1:  # two classes: scikit-learn keeps one row, the logit of class 1 against class 0
        coef = torch.cat([torch.zeros_like(coef), coef])
        intercept = torch.cat([torch.zeros_like(intercept), intercept])
    weight = torch.zeros(n_classes, features.shape[1])
    bias = torch.full((n_classes,), -1e4)
    seen = torch.as_tensor(model.classes_, dtype=torch.long)
    weight[seen], bias[seen] = coef, intercept
    with torch.no_grad():
        probe.linear.weight.copy_(weight)
        probe.linear.bias.copy_(bias)
    probe.requires_grad_(False)
    return probe.eval()


def evaluate_downstream(
    sae: Any,
    batches: Iterable[Tensor | tuple[Tensor, Tensor]],
    head: Head,
    encode_kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Stream ``batches`` (``x`` or ``(x, labels)``) through the SAE and compare ``head`` on ``x`` and on
    ``x_hat``."""
    encode_kwargs = encode_kwargs or {}
    parameter = next(sae.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    originals, reconstructions, all_labels = [], [], []
    with torch.no_grad():
        for batch in batches:
            x, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            x = x.reshape(-1, x.shape[-1]).to(device=device, dtype=dtype)
            x_hat = sae.decode(sae.encode(x, **encode_kwargs))
            originals.append(head(x).double().cpu())
            reconstructions.append(head(x_hat).double().cpu())
            if labels is not None:
                all_labels.append(labels.reshape(-1).cpu())
    labels_cat = torch.cat(all_labels) if all_labels else None
    return downstream_preservation(torch.cat(originals), torch.cat(reconstructions), labels_cat)
