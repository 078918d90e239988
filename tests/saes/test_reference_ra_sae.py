"""RA-SAE and A-SAE against the reference implementation, ``overcomplete`` 0.3.0 (issue 16).

Both sides are built from the SAME candidates C, encoder weight and bias, and mixing matrix W (identity in
both), fed the same batches and stepped with Adam for ``STEPS`` steps (lr 1e-2, default betas, no weight
decay, no gradient clipping, float64; W is moved by Adam itself, ``mixing_update="adam"`` (our default and
the reference's update), and projected afterwards). The reference trains in its own loop,
``overcomplete.sae.train_sae``, with its own loss ``mse_l1`` at penalty 0; ours through SAELens's
``training_forward_pass`` in a plain Adam loop. W, Lambda (``Relax``), the global scale (``log_scale`` vs
``multiplier``), the encoder, D and every per-step loss must agree.

How the forward passes correspond::

    overcomplete RATopKSAE:   z = TopK(ReLU(x A^T + a))                 x_hat = z D
    ours (SAELens TopK):      z = ReLU(TopK((x - b_dec) W_enc + b_enc))  x_hat = z D + b_dec
    both:                     D = exp(m) (W C + Lambda)

with A, a the reference encoder's ``nn.Linear`` (its default "linear" encoder: Linear, Identity norm,
ReLU): W_enc = A^T, b_enc = a. TopK of ReLU and ReLU of TopK give the same latents and gradients (the
selected positive entries; a zero or negative one contributes nothing either way).

Deliberate differences, and how each is neutralised here:

1. Decoder bias: SAELens has b_dec (subtracted from the input, added to the output); the reference has
   none. b_dec is set to 0 and frozen (not given to the optimizer).
2. Loss normalisation: the reference's MSE is the mean over all B * d_in entries; SAELens's ``mse_loss``
   sums over d_in and averages over the batch, so ours is exactly d_in times larger. Compared as
   ours / d_in. Adam is invariant to a constant loss factor c except through eps, so our Adam gets
   eps * d_in (then m / (sqrt(v) + eps) is identical); d_in is a power of two, so the factor is exact.
3. Auxiliary loss: SAELens's TopK AuxK is off (``aux_loss_coefficient=0`` and no dead-neuron mask); the
   reference adds none. Asserted to be exactly 0 every step.
4. Row normalisation eps: the reference divides by (row sum + 1e-8), ours by the row sum exactly, so its
   rows sum to 1 - 1e-8, a relative change of ~1e-8 per step. It is the only source of the residual
   difference: the "published" variant runs the reference unchanged and tolerates it (measured after 100
   steps: 8e-9 on W, 1.4e-8 on D, 1.6e-8 relative on the losses); the "eps-cancelled" variant rescales
   the reference's rows to sum 1 exactly after its own projection (``cancel_row_sum_eps``) and then both
   agree to float64 rounding (measured 2e-16 on the parameters, 4e-16 relative on the losses).
5. Projection placement and count: the reference projects W and Relax inside ``get_dictionary`` before
   every training forward and again in its loop's ``criterion(..., model.get_dictionary())`` (D twice per
   step); ours projects once, lazily, before the first use after an optimizer step, and computes D once.
   The sequence step -> project -> forward is the same, and the second reference projection only repeats
   the eps effect of item 4.
6. Rows of W with no positive entry: the reference leaves them at 0 (0 / 1e-8), ours makes them uniform.
   Never hit here (asserted).
7. delta = 0 (A-SAE): the reference computes clamp(0 / ||Relax_i||) = 0 / 0 = NaN for its zero Relax and
   the whole dictionary becomes NaN (asserted below, with ours finite). Our A-SAE has no Lambda at all; the
   reference's A-SAE is emulated by a positive delta with ``Relax`` frozen at 0 (not optimised), for which
   its projection is a no-op and D = exp(m) W C exactly.
8. The global scale exp(m): optional in ours (``learn_dictionary_scale``), on by default in the reference
   (``use_multiplier``); compared both on and off.

Parameters (W, Lambda, m, encoder, D) and every per-step loss must agree in float64 within ``TOLERANCES``:
"published" atol 2e-7 / rtol 1e-6 on parameters, rtol 5e-7 on losses (about 20x the eps effect of item 4);
"eps-cancelled" atol 1e-12 / rtol 1e-10 and 1e-12. The projections must actually have acted (W left the
simplex and Relax rows left the delta-ball after the optimizer steps; the largest ||Lambda_i|| ends at
delta), the loss must have fallen and W moved far from the identity, so a broken projection, clip or scale
cannot pass (each was checked to fail both variants by at least 1e-2).
"""

from functools import partial

import pytest
import torch
from helpers import forget_overcomplete, import_overcomplete_sae
from sae_lens.saes.sae import TrainStepInput

import sae_vision_ext  # noqa: F401  (registers the architectures)
from sae_vision_ext.saes.archetypal import (
    ASAETrainingSAE,
    ASAETrainingSAEConfig,
    RASAETrainingSAE,
    RASAETrainingSAEConfig,
)

D_IN, D_SAE, N_CAND, K = 8, 16, 32, 4  # D_IN a power of two: the loss factor of item 2 is exact
BATCH, STEPS, LR, DELTA = 64, 100, 1e-2, 0.05
ADAM_EPS = 1e-8  # the reference's; ours uses ADAM_EPS * D_IN (item 2)
DTYPE = torch.float64
# (param atol, param rtol, loss rtol): the reference as published (item 4's eps leaves ~1e-8) and with that
# eps cancelled (float64 rounding only: measured 2e-16 on the parameters, 4e-16 relative on the losses)
TOLERANCES = {"published": (2e-7, 1e-6, 5e-7), "eps-cancelled": (1e-12, 1e-10, 1e-12)}


@pytest.fixture(scope="module")
def oc():
    """The real ``overcomplete.sae``, imported once for this module (plotting stubbed) and forgotten after."""
    yield import_overcomplete_sae()
    forget_overcomplete()


def make_data():
    g = torch.Generator().manual_seed(0)
    candidates = torch.randn(N_CAND, D_IN, generator=g, dtype=DTYPE)
    batches = [torch.randn(BATCH, D_IN, generator=g, dtype=DTYPE) for _ in range(STEPS)]
    return candidates, batches


def cancel_row_sum_eps(dictionary) -> None:
    """Item 4 cancelled: after the reference's own projection (relu, rows / (sum + 1e-8), Relax clip) its W
    rows are rescaled to sum to 1 exactly and D is recomputed from them by the reference's formula."""
    projected = dictionary.get_dictionary  # the instance's bound method, the published code

    def get_dictionary():
        projected()
        if not dictionary.training:
            return dictionary._fused_dictionary
        with torch.no_grad():
            dictionary.W.div_(dictionary.W.sum(dim=-1, keepdim=True))
        return (dictionary.W @ dictionary.C + dictionary.Relax) * torch.exp(dictionary.multiplier)

    dictionary.get_dictionary = get_dictionary  # forward() and SAE.get_dictionary() call it


def make_pair(oc, candidates, asae: bool, multiplier: bool, reference: str):
    """(reference, ours) with the same C, encoder and W; b_dec zero and frozen; AuxK off."""
    torch.manual_seed(0)
    ref = oc.RATopKSAE(D_IN, D_SAE, candidates.clone(), top_k=K, delta=DELTA, use_multiplier=multiplier)
    ref = ref.to(DTYPE)
    if reference == "eps-cancelled":
        cancel_row_sum_eps(ref.dictionary)
    if asae:  # item 7: the reference's A-SAE is its RA-SAE with Relax frozen at 0
        ref.dictionary.Relax.requires_grad_(False)
    cls, cfg_cls = (
        (ASAETrainingSAE, ASAETrainingSAEConfig) if asae else (RASAETrainingSAE, RASAETrainingSAEConfig)
    )
    cfg = cfg_cls(
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        delta=0.0 if asae else DELTA,
        learn_dictionary_scale=multiplier,
        mixing_update="adam",  # W itself moved by the optimizer, as in the reference
        aux_loss_coefficient=0.0,
        dtype="float64",
    )
    ours = cls(cfg, candidates=candidates.clone())
    assert ours.archetypal.mixing_parameter is ours.archetypal.W
    linear = ref.encoder.final_block[0]
    assert isinstance(linear, torch.nn.Linear) and isinstance(ref.encoder.final_block[1], torch.nn.Identity)
    with torch.no_grad():
        ours.W_enc.copy_(linear.weight.T)
        ours.b_enc.copy_(linear.bias)
        ours.b_dec.zero_()
    ours.b_dec.requires_grad_(False)  # item 1
    assert torch.equal(ours.archetypal.W, ref.dictionary.W)  # both start at the identity
    assert torch.equal(ours.archetypal.C, ref.dictionary.C)
    return ref, ours


def train_reference(oc, ref, batches):
    """The reference's own loop and loss; returns per-step losses and how often the projections acted."""
    activity = {"W_off_simplex": 0, "Relax_outside_ball": 0, "W_row_without_positive": 0}
    d = ref.dictionary

    def after_step(optimizer, args, kwargs):  # raw parameters after each step, before its next projection
        W = d.W.detach()
        activity["W_off_simplex"] += bool(W.min() < 0 or (W.sum(1) - 1).abs().max() > 1e-6)
        activity["Relax_outside_ball"] += bool((d.Relax.norm(dim=1) > DELTA * (1 + 1e-9)).any())
        activity["W_row_without_positive"] += bool((W.max(dim=1).values <= 0).any())

    params = [p for p in ref.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LR, eps=ADAM_EPS)
    optimizer.register_step_post_hook(after_step)
    criterion = partial(oc.mse_l1, penalty=0.0)  # the reference's MSE; its L1 term times 0
    logs = oc.train_sae(ref, batches, criterion, optimizer, nb_epochs=1, clip_grad=None, monitoring=1)
    ref.train().get_dictionary()  # projects W and Relax in place, as before a next step
    return torch.tensor(logs["step_loss"], dtype=DTYPE), activity


def train_ours(sae, batches):
    params = [p for p in sae.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LR, eps=ADAM_EPS * D_IN)  # item 2
    losses = []
    for step, x in enumerate(batches):
        optimizer.zero_grad()
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=step, is_logging_step=False
            )
        )
        assert out.losses["auxiliary_reconstruction_loss"].item() == 0.0  # item 3
        assert torch.equal(out.loss, out.losses["mse_loss"])
        out.loss.backward()
        optimizer.step()
        losses.append(out.losses["mse_loss"].item() / D_IN)  # item 2
    sae.archetypal.ensure_projected_()  # as before a next step (state_dict() would do the same)
    return torch.tensor(losses, dtype=DTYPE)


def assert_params_close(ours, ref, multiplier: bool, reference: str):
    d_ours, d_ref = ours.archetypal, ref.dictionary
    atol, rtol, _ = TOLERANCES[reference]

    def close(actual, expected, name):
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")

    close(d_ours.W.detach(), d_ref.W.detach(), "W")
    close(ours.W_enc.detach(), ref.encoder.final_block[0].weight.detach().T, "W_enc")
    close(ours.b_enc.detach(), ref.encoder.final_block[0].bias.detach(), "b_enc")
    if multiplier:
        close(d_ours.log_scale.detach(), d_ref.multiplier.detach(), "log scale m")
        assert abs(d_ref.multiplier.item()) > 1e-3  # the scale was learned, not left at 0
    else:
        assert d_ours.log_scale is None and d_ref.multiplier.item() == 0.0
    close(d_ours.compute().detach(), d_ref.get_dictionary().detach(), "D")
    # training went somewhere: W far from the identity it started at
    assert (d_ref.W.detach() - torch.eye(D_SAE, N_CAND, dtype=DTYPE)).abs().max() > 0.5


@pytest.mark.parametrize(
    "multiplier, reference",
    [(True, "published"), (False, "published"), (True, "eps-cancelled")],
    ids=["multiplier-published", "no-multiplier-published", "multiplier-eps-cancelled"],
)
def test_ra_sae_trains_like_overcomplete(oc, multiplier, reference):
    candidates, batches = make_data()
    ref, ours = make_pair(oc, candidates, asae=False, multiplier=multiplier, reference=reference)
    atol, rtol, loss_rtol = TOLERANCES[reference]
    ref_losses, activity = train_reference(oc, ref, batches)
    our_losses = train_ours(ours, batches)

    # both projections acted in (nearly) every step, and no W row lost all its positive entries (item 6)
    assert activity["W_off_simplex"] == STEPS
    assert activity["Relax_outside_ball"] >= STEPS // 2
    assert activity["W_row_without_positive"] == 0
    torch.testing.assert_close(our_losses, ref_losses, rtol=loss_rtol, atol=0)
    assert our_losses[-1] < 0.2 * our_losses[0]  # it learned
    assert_params_close(ours, ref, multiplier, reference)
    Lambda, Relax = ours.archetypal.Lambda.detach(), ref.dictionary.Relax.detach()
    torch.testing.assert_close(Lambda, Relax, atol=atol, rtol=rtol)
    assert torch.isclose(Relax.norm(dim=1).max(), torch.tensor(DELTA, dtype=DTYPE))  # the clip is active


@pytest.mark.parametrize("reference", list(TOLERANCES))
def test_a_sae_trains_like_overcomplete_with_frozen_relaxation(oc, reference):
    candidates, batches = make_data()
    ref, ours = make_pair(oc, candidates, asae=True, multiplier=True, reference=reference)
    assert ours.archetypal.Lambda is None
    ref_losses, activity = train_reference(oc, ref, batches)
    our_losses = train_ours(ours, batches)

    assert activity["W_off_simplex"] == STEPS and activity["W_row_without_positive"] == 0
    assert activity["Relax_outside_ball"] == 0 and not ref.dictionary.Relax.any()  # frozen at 0
    torch.testing.assert_close(our_losses, ref_losses, rtol=TOLERANCES[reference][2], atol=0)
    assert_params_close(ours, ref, multiplier=True, reference=reference)
    # D = exp(m) W C: every atom in the cone of the candidates' convex hull
    d = ours.archetypal
    torch.testing.assert_close(d.compute().detach(), d.log_scale.exp().detach() * d.W.detach() @ d.C)


def test_delta_zero_is_nan_in_overcomplete_and_finite_in_ours(oc):
    """Why item 7 freezes Relax instead of passing delta = 0 to the reference."""
    candidates, batches = make_data()
    torch.manual_seed(0)
    ref = oc.RATopKSAE(D_IN, D_SAE, candidates.clone(), top_k=K, delta=0.0).to(DTYPE).train()
    assert torch.isnan(ref(batches[0])[2]).all()  # 0 / 0 in its Relax clip poisons D and x_hat
    cfg = ASAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float64")
    ours = ASAETrainingSAE(cfg, candidates=candidates.clone())
    torch.testing.assert_close(ours.archetypal.compute().detach(), candidates[:D_SAE], atol=0, rtol=0)
    assert torch.isfinite(ours(batches[0])).all()
