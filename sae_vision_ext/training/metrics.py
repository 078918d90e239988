"""The reconstruction metrics a training run reports, streamed over batches (``evaluate_sae``), and the
evaluator SAELens's trainers call with them on held-out rows (:class:`VisionSAEEvaluator`).

Notation: ``x`` is a batch of activation rows ``[N, d]``, ``x_hat`` its reconstruction, ``z`` the latents
``[N, d_sae]``.

- FVU over the dataset: ``sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mu||^2`` with ``mu`` the dataset mean row
  (the fraction of variance unexplained of Gao et al.; explained variance / R^2 is ``1 - FVU``).
- FVU per sample, as the MSAE paper measures it "per sample, over the embedding dimensions":
  ``mean_n [ mean_d (x_hat_nd - x_nd)^2 / mean_d (x_nd - m_n)^2 ]`` where ``m_n = mean_d x_nd`` is the mean of
  that sample's own coordinates (``center="sample"``, the default). ``center="none"`` divides by
  ``mean_d x_nd^2`` instead, the normalised MSE of the OpenAI / MSAE training code (identical on data centred
  per sample).
- Cosine similarity: ``mean_n cos(x_n, x_hat_n)``.
- L0: ``mean_n #{j : z_nj != 0}``; fraction of zeros: ``1 - L0 / d_sae`` (the MSAE paper's "L0").
- Dead latents: a latent is dead when its firing frequency over the window of ``n_rows`` rows is below
  ``threshold`` (MSAE: 10^-5.5), or when it never fired.

``sae_vision_ext.evals.reconstruction`` re-exports these next to the single-batch metrics (``fvu``, ``l0``,
...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

DEAD_FREQUENCY_THRESHOLD = 10**-5.5
EPS = 1e-12


def flat_rows(t: Tensor) -> Tensor:
    """Flatten leading dims so that ``t`` is ``[N, d]``."""
    return t.reshape(-1, t.shape[-1])


def per_sample_fvu(x: Tensor, x_hat: Tensor, center: str = "sample") -> Tensor:
    """Per-row FVU ``mean_d (x_hat - x)^2 / mean_d (x - m)^2`` (see :func:`fvu`); returns ``[N]``."""
    x, x_hat = flat_rows(x).double(), flat_rows(x_hat).double()
    if center == "sample":
        denominator = (x - x.mean(dim=1, keepdim=True)).pow(2).mean(dim=1)
    elif center == "none":
        denominator = x.pow(2).mean(dim=1)
    else:
        raise ValueError(f"center must be 'sample' or 'none', got {center!r}")
    return (x_hat - x).pow(2).mean(dim=1) / denominator.clamp_min(EPS)


def dead_latents(fire_counts: Tensor, n_rows: int, threshold: float = DEAD_FREQUENCY_THRESHOLD) -> Tensor:
    """Boolean mask of dead latents: ``fire_counts / n_rows < threshold`` or ``fire_counts == 0``.

    ``n_rows`` is the window (number of rows over which ``fire_counts`` was accumulated).
    """
    if n_rows <= 0:
        raise ValueError("n_rows must be positive")
    fire_counts = torch.as_tensor(fire_counts)
    frequency = fire_counts.double() / n_rows
    return (frequency < threshold) | (fire_counts == 0)


class ReconstructionAccumulator:
    """Streams the sums needed by :func:`evaluate_sae`, one batch at a time, in float64.

    The dataset-level denominator ``sum ||x - mu||^2`` is accumulated around a shift (the first batch's
    mean) to avoid cancellation: ``sum ||x - mu||^2 = sum ||x - s||^2 - N ||mu - s||^2``.
    """

    def __init__(self, per_sample_center: str = "sample"):
        self.per_sample_center = per_sample_center
        self.n_rows = 0
        self.sum_sq_error = 0.0
        self.shift: Tensor | None = None
        self.sum_shifted: Tensor | None = None
        self.sum_sq_shifted = 0.0
        self.sum_fvu_per_sample = 0.0
        self.sum_cosine = 0.0
        self.sum_l0 = 0.0
        self.d_sae: int | None = None
        self.fire_counts: Tensor | None = None

    def update(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        x, x_hat, z = flat_rows(x).double(), flat_rows(x_hat).double(), flat_rows(z)
        n = x.shape[0]
        if n == 0:
            return
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.sum_shifted = torch.zeros_like(self.shift)
            self.d_sae = z.shape[-1]
            self.fire_counts = torch.zeros(self.d_sae, dtype=torch.long)
        shifted = x - self.shift
        self.sum_shifted += shifted.sum(dim=0)
        self.sum_sq_shifted += float(shifted.pow(2).sum())
        self.sum_sq_error += float((x - x_hat).pow(2).sum())
        self.sum_fvu_per_sample += float(per_sample_fvu(x, x_hat, center=self.per_sample_center).sum())
        self.sum_cosine += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).sum())
        active = z != 0
        self.sum_l0 += float(active.sum())
        self.fire_counts += active.sum(dim=0).cpu().long()
        self.n_rows += n

    def total_sum_of_squares(self) -> float:
        assert self.sum_shifted is not None
        mean_shifted = self.sum_shifted / self.n_rows
        return self.sum_sq_shifted - self.n_rows * float(mean_shifted.pow(2).sum())

    def result(self, dead_threshold: float = DEAD_FREQUENCY_THRESHOLD) -> dict[str, Any]:
        if self.n_rows == 0:
            raise ValueError("no rows were evaluated")
        assert self.fire_counts is not None and self.d_sae is not None
        dataset_fvu = self.sum_sq_error / max(self.total_sum_of_squares(), EPS)
        mean_l0 = self.sum_l0 / self.n_rows
        dead = dead_latents(self.fire_counts, self.n_rows, dead_threshold)
        return {
            "fvu": dataset_fvu,
            "fvu_per_sample": self.sum_fvu_per_sample / self.n_rows,
            "explained_variance": 1.0 - dataset_fvu,
            "cosine": self.sum_cosine / self.n_rows,
            "l0": mean_l0,
            "fraction_zero": 1.0 - mean_l0 / self.d_sae,
            "dead_fraction": float(dead.double().mean()),
            "mse": self.sum_sq_error / (self.n_rows * self.shift.numel()),
            "n_rows": self.n_rows,
            "d_sae": self.d_sae,
        }


def _known_rows(batches: Iterable[Tensor], max_rows: int | None) -> int | None:
    """Rows in ``batches`` when it is a list or tuple of tensors (else None), capped at ``max_rows``."""
    total = None
    if isinstance(batches, (list, tuple)) and all(isinstance(b, Tensor) for b in batches):
        total = sum(b.shape[:-1].numel() for b in batches)
    if max_rows is not None:
        total = max_rows if total is None else min(total, max_rows)
    return total


def _sae_device_dtype(sae: Any) -> tuple[torch.device, torch.dtype]:
    try:
        parameter = next(sae.parameters())
        return parameter.device, parameter.dtype
    except (StopIteration, AttributeError):
        return torch.device("cpu"), torch.float32


def evaluate_sae(
    sae: Any,
    batches: Iterable[Tensor],
    encode_kwargs: dict[str, Any] | None = None,
    max_rows: int | None = None,
    dead_threshold: float = DEAD_FREQUENCY_THRESHOLD,
    per_sample_center: str = "sample",
    encode: Callable[[Tensor], Tensor] | None = None,
    return_fire_counts: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Stream ``batches`` (each ``[B, d]`` or ``[..., d]``) through ``sae.encode`` / ``sae.decode``, no grad.

    Returns ``fvu`` (dataset), ``fvu_per_sample`` (MSAE), ``explained_variance`` (1 - fvu), ``cosine``,
    ``l0``, ``fraction_zero``, ``dead_fraction`` (firing frequency < ``dead_threshold`` over the rows seen),
    plus ``mse``, ``n_rows`` and ``d_sae``. ``encode_kwargs`` go to ``sae.encode`` (e.g. ``{"k": 32}`` for the
    Matryoshka SAE); ``encode`` replaces ``sae.encode`` entirely. ``max_rows`` stops after that many rows.
    ``progress`` shows a tqdm bar (rows/s) on stderr; nested under another bar (a training run, a report) it
    is cleared when done.
    """
    device, dtype = _sae_device_dtype(sae)
    encode_kwargs = encode_kwargs or {}
    encode_fn = encode if encode is not None else (lambda rows: sae.encode(rows, **encode_kwargs))
    accumulator = ReconstructionAccumulator(per_sample_center=per_sample_center)
    bar = tqdm(
        total=_known_rows(batches, max_rows),
        unit="rows",
        unit_scale=True,
        desc="evaluating SAE",
        disable=not progress,
        leave=None,
        dynamic_ncols=True,
    )
    with torch.no_grad(), bar:
        for batch in batches:
            rows = flat_rows(torch.as_tensor(batch)).to(device=device, dtype=dtype)
            if max_rows is not None:
                remaining = max_rows - accumulator.n_rows
                if remaining <= 0:
                    break
                rows = rows[:remaining]
            z = encode_fn(rows)
            x_hat = sae.decode(z)
            accumulator.update(rows, x_hat, z)
            bar.update(rows.shape[0])
    result = accumulator.result(dead_threshold)
    if return_fire_counts:
        result["fire_counts"] = accumulator.fire_counts
    return result


def evaluate_rows(
    sae: Any,
    rows: torch.Tensor,
    scaler: Any = None,
    batch_size: int = 4096,
    encode_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """FVU, cosine, L0, dead fraction (:func:`evaluate_sae`) of ``sae`` on ``rows``, in eval mode.

    ``scaler`` (SAELens ``ActivationScaler``) maps raw rows to what the SAE is trained on, while training;
    ``encode_kwargs`` go to ``sae.encode`` (``{"k": 64}`` for a Matryoshka SAE).
    """

    def batches():
        for start in range(0, rows.shape[0], batch_size):
            batch = rows[start : start + batch_size]
            yield scaler(batch) if scaler is not None else batch

    was_training = sae.training
    sae.eval()
    try:
        # no bar of its own: the run has one
        return evaluate_sae(sae, batches(), encode_kwargs=encode_kwargs, progress=False)
    finally:
        sae.train(was_training)


class VisionSAEEvaluator:
    """SAELens evaluator (``SAETrainer``'s and ``MultiSAETrainer``'s protocols) on fixed held-out rows.

    ``eval_rows``: ``{hook: [N, d_in]}``. Usable with wandb off: call :meth:`metrics` directly.
    """

    def __init__(self, eval_rows: dict[str, torch.Tensor], source: str = "held-out images"):
        # rows with a non-finite value (or squared norm) are left out, as in training: one would make every
        # metric NaN
        self.eval_rows = {
            h: rows[torch.isfinite(rows.float().square().sum(-1))] for h, rows in eval_rows.items()
        }
        self.source = source

    def metrics(self, sae: Any, hook: str, scaler: Any = None, encode_kwargs: dict | None = None) -> dict:
        return evaluate_rows(sae, self.eval_rows[hook], scaler, encode_kwargs=encode_kwargs)

    def __call__(
        self,
        sae=None,
        data_provider=None,
        activation_scaler=None,
        *,
        saes=None,
        activation_scalers=None,
        hook_names=None,
    ) -> dict[str, Any]:
        if saes is not None:  # MultiSAETrainer protocol
            out = {}
            for name, one in saes.items():
                scaler = activation_scalers.get(name) if activation_scalers else None
                for key, value in self.metrics(one, hook_names[name], scaler).items():
                    out[f"{name}/eval/{key}"] = value
            return out
        hook = next(iter(self.eval_rows))
        return {f"eval/{k}": v for k, v in self.metrics(sae, hook, activation_scaler).items()}
