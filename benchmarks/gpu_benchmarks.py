"""The GPU check's benchmarks (issue 17): each a ratio of two variants timed in the same run, in float32
and in bfloat16, with every step's achieved TFLOP/s against a dense matmul timed in the same run.

Paper sizes on CUDA; tiny sizes on a CPU (``--tiny``, automatic without CUDA: seconds, a rehearsal of the
same code paths; targets are judged on CUDA only). Every timing: warm-up calls, then the variants take turns
for ``--repeats`` rounds and the median counts (benchmarks/_timing.py; the device is synchronised around each
timed call).

  msae_step        one SAELens ``SAETrainer.step`` (forward, firing statistics, backward, grad clipping,
                   Adam) of our MatryoshkaTopKTrainingSAE (the authors' k ladder, reverse weighting) / the
                   same step of SAELens's TopKTrainingSAE (k 64); d 768 -> 6144 and 1024 -> 8192, batch
                   4096, b_enc set so that 20% / 50% of the latents are positive. Targets <= 1.1x (0.2) and
                   <= 1.3x (0.5).
  nested_decode    forward + backward of the h level decodes on that MSAE's latents and unit-norm decoder:
                   naive_topk_reconstructions (one topk and one dense decode per level) / our
                   nested_reconstructions (decode_plan "auto"). Target >= 4x.
  rasae_step       RA-SAE step (d 768, d_sae 3840, n' 32,000 candidates, batch 4096, k 32) / a TopK step of
                   the same size: target <= 1.5x; and a reference-style step / ours: the reference
                   (overcomplete's get_dictionary()) projects W / Lambda and computes D = W C + Lambda at
                   each read, i.e. twice a step (the encoder's decoder-norm rescale, then the decoder), ours
                   once. All three rescale by the decoder norm and have no dead latents (no aux loss).
  capture          our HookedVisionModel's run_with_cache of the last block's hook_resid_post / the bare
                   open_clip encode_image; CLIP ViT-L/14 (OpenAI's architecture, random init: no download),
                   224 px, batch 256, no_grad under bf16 autocast (the runner's --autocast-model). bfloat16
                   only. Target <= 1.03x.
  cached_training  VisionSAETrainingRunner training that MSAE (768 -> 6144, batch 4096) from an on-disk
                   activation cache written here: its training seconds / those of the same number of
                   SAETrainer steps on batches already on the device (the data path's cost); rows/s of both.

bf16 is SAELens's mixed precision: float32 master weights and optimiser, ``SAETrainerConfig(autocast=True)``,
i.e. ``torch.autocast(device_type, dtype=torch.bfloat16)`` around the forward pass and loss; the backward
runs outside it (the decode benchmark does the same). The dense matmul of the bf16 rows takes bf16 operands.

FLOPs (counted analytically, 2 per multiply-add; B rows, d input width, n latents, n' candidates, h levels):
  SAE step        10 B d n: encoder forward 2Bdn, decoder forward 2Bdn, encoder weight gradient 2Bdn,
                  decoder weight and latent gradients 4Bdn; the dense work of a one-level SAE. The MSAE step
                  is counted the same, so its TFLOP/s is a TopK-equivalent rate (extra level work uncounted).
  RA-SAE step     10 B d n + 4 n n' d per computation of D (forward 2nn'd, gradient of W 2nn'd): once for
                  ours, twice for the reference-style step, none for TopK.
  level decodes   6 h B n d: per level a dense decode forward 2Bnd and its two gradients 4Bnd (the naive
                  specification's work). Ours is counted the same, so its rate is spec-equivalent and can
                  exceed the dense rate.
  ViT forward     B [L (T (8 d^2 + 4 d m) + 4 T^2 d) + 2 P (3 p^2) d + 2 d e]: per block the q, k, v and
                  output projections, the MLP (width m), the attention scores and their product with the
                  values; the patch embedding (P patches of p x p pixels), the projection to the width e.
  cached training 10 B d n per step.
Dense rate: one [M, K] @ [K, N] matmul in the row's dtype at a comparable shape, timed in the same run: the
encoder's [B, d] @ [d, n] for SAE steps, decodes and training, D's [n, n'] @ [n', d] for RA-SAE, the MLP's
[B T, d] @ [d, m] for the ViT. efficiency = achieved / dense (float32 matmuls at torch's default precision;
the JSON records whether TF32 was allowed).

The JSON (``--json``) is rewritten after every result, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from _timing import matmul_tflops, medians, synchronize, time_call, time_interleaved
from sae_lens import LoggingConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

import sae_vision_ext  # noqa: F401  (registers the architectures with SAELens)
from sae_vision_ext.activations.cache import ActivationCacheWriter, CachedActivations
from sae_vision_ext.saes.archetypal import RASAETrainingSAE, RASAETrainingSAEConfig
from sae_vision_ext.saes.matryoshka_topk import MatryoshkaTopKTrainingSAE, MatryoshkaTopKTrainingSAEConfig
from sae_vision_ext.saes.nested_decode import naive_topk_reconstructions, nested_reconstructions
from sae_vision_ext.training.config import VisionSAERunnerConfig
from sae_vision_ext.training.runner import VisionSAETrainingRunner
from sae_vision_ext.vision.load import load_vision_model

BENCHMARKS = ("msae_step", "nested_decode", "rasae_step", "capture", "cached_training")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CACHE_HOOK = "blocks.0.hook_resid_post"

EPILOG = """examples:
  python benchmarks/gpu_benchmarks.py --json gpu-results/gpu_results.json      # paper sizes on CUDA
  python benchmarks/gpu_benchmarks.py --tiny                                   # seconds: a CPU rehearsal
  python benchmarks/gpu_benchmarks.py --only msae_step,nested_decode --dtypes bfloat16
  python benchmarks/gpu_benchmarks.py --device cuda --repeats 20 --budget 240  # skip what starts after 240 s
"""


# --------------------------------------------------------------------------------------------------- sizes
@dataclass
class Sizes:
    msae_shapes: list[tuple[int, int]]  # (d_in, d_sae) of the MSAE / TopK steps and the level decodes
    batch: int
    fractions: list[float]  # fraction of latents with a positive pre-activation
    topk_k: int
    rasae: dict[str, int]  # d_in, d_sae, n_candidates, batch, k
    capture: dict[str, Any]  # spec, img_size, batch, model_kwargs (open_clip.create_model overrides)
    cached: dict[str, int]  # d_in, d_sae, batch, steps, context
    repeats: int
    warmup: int


PAPER = Sizes(
    msae_shapes=[(768, 6144), (1024, 8192)],
    batch=4096,
    fractions=[0.2, 0.5],
    topk_k=64,
    rasae=dict(d_in=768, d_sae=3840, n_candidates=32_000, batch=4096, k=32),
    capture=dict(spec="open_clip:ViT-L-14/openai", img_size=224, batch=256, model_kwargs={}),
    cached=dict(d_in=768, d_sae=6144, batch=4096, steps=30, context=256),
    repeats=10,
    warmup=3,
)
TINY = Sizes(
    msae_shapes=[(32, 256)],
    batch=256,
    fractions=[0.2, 0.5],
    topk_k=16,
    rasae=dict(d_in=32, d_sae=64, n_candidates=256, batch=128, k=8),
    capture=dict(  # open_clip's CLIP class shrunk to 2 blocks of width 64 (and a 1-block text tower)
        spec="open_clip:ViT-B-32",
        img_size=64,
        batch=4,
        model_kwargs=dict(
            embed_dim=32,
            vision_cfg=dict(image_size=64, layers=2, width=64, head_width=32, patch_size=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1),
        ),
    ),
    cached=dict(d_in=32, d_sae=256, batch=128, steps=6, context=16),
    repeats=3,
    warmup=1,
)


# --------------------------------------------------------------------------------------------------- results
@dataclass
class Result:
    """One ratio: ``seconds[ratio_of[0]] / seconds[ratio_of[1]]``."""

    benchmark: str
    name: str
    device: str
    dtype: str
    shapes: dict[str, Any]
    seconds: dict[str, float]  # median seconds of each variant (per step / call)
    ratio_of: tuple[str, str]
    target: dict[str, Any] | None  # {"op": "<=" or ">=", "value": x}; None: reported, not judged
    flops: dict[str, float]  # FLOPs of one call of each variant (module docstring)
    dense: dict[str, Any]  # the dense matmul of the same run: shape, TFLOP/s
    notes: dict[str, Any] = field(default_factory=dict)
    ratio: float = float("nan")
    passed: bool | None = None
    tflops: dict[str, float] = field(default_factory=dict)
    efficiency: dict[str, float] = field(default_factory=dict)

    def finish(self, judge: bool) -> Result:
        a, b = self.ratio_of
        self.ratio = self.seconds[a] / self.seconds[b]
        self.tflops = {k: self.flops[k] / self.seconds[k] / 1e12 for k in self.flops}
        self.efficiency = {k: v / self.dense["tflops"] for k, v in self.tflops.items()}
        if judge and self.target is not None:
            op, value = self.target["op"], self.target["value"]
            self.passed = self.ratio <= value if op == "<=" else self.ratio >= value
        return self


class Report:
    """Collects the results and rewrites the JSON after each one (a run cut short keeps what it has)."""

    def __init__(self, path: Path | None, meta: dict[str, Any]):
        self.path = path
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {
            **meta,
            "finished": False,
            "results": [],
            "dense_matmul": [],
            "skipped": [],
            "errors": [],
        }
        self.write()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def add(self, result: Result) -> None:
        self.data["results"].append(asdict(result))
        print(format_row(asdict(result)), flush=True)
        self.write()

    def add_dense(self, entry: dict[str, Any]) -> None:
        self.data["dense_matmul"].append(entry)
        self.write()

    def skip(self, benchmark: str, name: str, reason: str) -> None:
        self.data["skipped"].append({"benchmark": benchmark, "name": name, "reason": reason})
        print(f"  skipped {name}: {reason}", flush=True)
        self.write()

    def error(self, benchmark: str, name: str, err: BaseException) -> None:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        self.data["errors"].append(
            {"benchmark": benchmark, "name": name, "error": repr(err), "traceback": text}
        )
        print(f"  ERROR in {name}: {err!r}\n{text}", file=sys.stderr, flush=True)
        self.write()

    def finish(self) -> None:
        self.data["finished"] = True
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed, 3)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_json_default, allow_nan=True))
        os.replace(tmp, self.path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


TABLE_HEADER = (
    f"{'benchmark':15s} {'config':34s} {'dtype':8s} {'numerator':>21s} {'denominator':>21s} {'ratio':>7s} "
    f"{'target':>8s} {'pass':>4s}  {'TFLOP/s (num / den / dense)':>28s}"
)


def format_row(r: dict[str, Any]) -> str:
    a, b = r["ratio_of"]
    target = "" if r["target"] is None else f"{r['target']['op']}{r['target']['value']:g}"
    passed = {True: "yes", False: "NO", None: "-"}[r["passed"]]
    rates = f"{r['tflops'][a]:.3g} / {r['tflops'][b]:.3g} / {r['dense']['tflops']:.3g}"
    config = r["name"].split("/", 1)[1] if "/" in r["name"] else r["name"]
    return (
        f"{r['benchmark']:15s} {config:34s} {r['dtype']:8s} {_label(a):>10s} {_ms(r['seconds'][a]):>10s} "
        f"{_label(b):>10s} {_ms(r['seconds'][b]):>10s} {r['ratio']:7.3f} {target:>8s} {passed:>4s}  "
        f"{rates:>28s}"
    )


SHORT_LABELS = {"reference_d_twice": "ref (2 D)", "hooked_capture": "capture", "bare_forward": "bare"}


def _label(side: str) -> str:
    return SHORT_LABELS.get(side, side)[:10]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}ms"


def print_table(report: Report) -> None:
    data = report.data
    print(f"\n{data['device_name']} ({data['device']}), torch {data['torch']}, sizes {data['sizes_name']}")
    print(TABLE_HEADER)
    for r in data["results"]:
        print(format_row(r))
    for s in data["skipped"]:
        print(f"{s['benchmark']:15s} {s['name']:34s} skipped: {s['reason']}")
    for e in data["errors"]:
        print(f"{e['benchmark']:15s} {e['name']:34s} ERROR: {e['error']}")
    judged = [r for r in data["results"] if r["passed"] is not None]
    if judged:
        print(f"targets met: {sum(r['passed'] for r in judged)} of {len(judged)}")
    else:
        print("targets not judged (they apply to CUDA runs at the paper's sizes)")


# --------------------------------------------------------------------------------------------------- helpers
class Context:
    """What every benchmark needs: device, sizes, dtypes, the report, and the dense rates measured so far."""

    def __init__(self, args: argparse.Namespace, report: Report, sizes: Sizes):
        self.device = torch.device(args.device)
        self.sizes = sizes
        self.dtypes = [DTYPES[name] for name in args.dtypes]
        self.report = report
        self.budget = args.budget
        self.repeats = args.repeats or sizes.repeats
        self.warmup = sizes.warmup
        self.judge = self.device.type == "cuda" and not args.tiny
        self._dense: dict[tuple, dict[str, Any]] = {}

    def dense(self, m: int, k: int, n: int, dtype: torch.dtype) -> dict[str, Any]:
        """The dense [m, k] @ [k, n] rate in ``dtype`` on this device, measured once per shape and dtype."""
        key = (m, k, n, dtype)
        if key not in self._dense:
            tflops, seconds = matmul_tflops(m, k, n, dtype, self.device, repeats=max(3, self.repeats))
            entry = {"shape": [m, k, n], "dtype": dtype_name(dtype), "seconds": seconds, "tflops": tflops}
            self._dense[key] = entry
            self.report.add_dense(entry)
        return self._dense[key]

    def autocast(self, dtype: torch.dtype) -> contextlib.AbstractContextManager:
        """bf16: autocast as SAELens's trainer does; float32: nothing."""
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def over_budget(self) -> bool:
        return self.budget is not None and self.report.elapsed > self.budget

    @contextlib.contextmanager
    def case(self, benchmark: str, name: str) -> Iterator[bool]:
        """Run one configuration: skipped past the time budget; an error is recorded and the run goes on."""
        if self.over_budget():
            self.report.skip(benchmark, name, f"time budget of {self.budget:g} s used up")
            yield False
            return
        try:
            yield True
        except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
            self.report.error(benchmark, name, err)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_trainer(sae: Any, batch: int, device: torch.device, dtype: torch.dtype) -> SAETrainer:
    """SAELens's trainer; bf16: its own mixed precision (autocast=True, float32 weights)."""
    cfg = SAETrainerConfig(
        total_training_samples=10**12,
        train_batch_size_samples=batch,
        lr=1e-4,
        lr_end=1e-4,
        device=str(device),
        autocast=dtype == torch.bfloat16,
        logger=LoggingConfig(log_to_wandb=False),
    )
    return SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))


@torch.no_grad()
def set_active_fraction(sae: MatryoshkaTopKTrainingSAE, x: torch.Tensor, fraction: float) -> None:
    """Shift b_enc per latent so that about ``fraction`` of its pre-activations on x (first 1024 rows) are
    positive: the quantile 1 - fraction of each latent's pre-activations moves to 0."""
    _, pre = sae.encode_with_hidden_pre(x[:1024])
    rank = min(pre.shape[0], max(1, math.ceil((1.0 - fraction) * pre.shape[0])))
    sae.b_enc -= torch.kthvalue(pre.float(), rank, dim=0).values.to(sae.b_enc.dtype)


def sae_step_flops(batch: int, d_in: int, d_sae: int) -> float:
    return 10.0 * batch * d_in * d_sae


class DictionaryTwiceRASAE(RASAETrainingSAE):
    """Reference-style RA-SAE: in a training step every read of ``W_dec`` projects W / Lambda in place and
    computes D anew, as overcomplete's ``get_dictionary()`` does at each call (no one-D-per-step sharing)."""

    def one_dictionary(self) -> contextlib.AbstractContextManager:  # type: ignore[override]
        return contextlib.nullcontext()

    def _current_dictionary(self, for_step: bool = False) -> torch.Tensor:
        if not (self.training and self.archetypal.needs_grad()):
            return super()._current_dictionary(for_step)
        self.archetypal.project_()
        return self.archetypal.compute_for_step()


# ------------------------------------------------------------------------------------------------ benchmarks
def bench_msae_step(ctx: Context) -> None:
    """MSAE step / TopK step, per shape, fraction of positive latents and dtype."""
    s = ctx.sizes
    for d_in, d_sae in s.msae_shapes:
        for fraction in s.fractions:
            for dtype in ctx.dtypes:
                name = f"msae_step/{d_in}x{d_sae}/B{s.batch}/pos{fraction:g}"
                with ctx.case("msae_step", name) as go:
                    if go:
                        _msae_step_case(ctx, name, d_in, d_sae, fraction, dtype)


def _msae_and_batch(ctx: Context, d_in: int, d_sae: int, batch: int, fraction: float):
    torch.manual_seed(0)
    x = torch.randn(batch, d_in, device=ctx.device)
    cfg = MatryoshkaTopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, level_weighting="reverse", device=str(ctx.device)
    )
    msae = MatryoshkaTopKTrainingSAE(cfg)
    set_active_fraction(msae, x, fraction)
    return msae, x


def _msae_step_case(ctx: Context, name: str, d_in: int, d_sae: int, fraction: float, dtype) -> None:
    s = ctx.sizes
    msae, x = _msae_and_batch(ctx, d_in, d_sae, s.batch, fraction)
    topk_cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=s.topk_k, device=str(ctx.device))
    topk = TopKTrainingSAE(topk_cfg)
    with torch.no_grad():
        positive = (msae.encode_with_hidden_pre(x)[1] > 0).sum(-1).float()
    trainers = {
        "msae": make_trainer(msae, s.batch, ctx.device, dtype),
        "topk": make_trainer(topk, s.batch, ctx.device, dtype),
    }
    steps = {key: (lambda t=t: t.step(x)) for key, t in trainers.items()}
    seconds = medians(time_interleaved(steps, ctx.device, ctx.repeats, ctx.warmup))
    flops = sae_step_flops(s.batch, d_in, d_sae)
    target = {"op": "<=", "value": 1.1 if fraction <= 0.2 else 1.3}
    result = Result(
        "msae_step", name, str(ctx.device), dtype_name(dtype),
        shapes={"d_in": d_in, "d_sae": d_sae, "batch": s.batch, "active_fraction": fraction,
                "k_levels": msae.cfg.k_levels, "topk_k": s.topk_k},
        seconds=seconds, ratio_of=("msae", "topk"), target=target,
        flops={"msae": flops, "topk": flops}, dense=ctx.dense(s.batch, d_in, d_sae, dtype),
        notes={"positive_latents_per_row_mean": float(positive.mean()),
               "positive_latents_per_row_max": float(positive.max()), "decode_plan": msae.cfg.decode_plan},
    )  # fmt: skip
    ctx.report.add(result.finish(ctx.judge))


def bench_nested_decode(ctx: Context) -> None:
    s = ctx.sizes
    for d_in, d_sae in s.msae_shapes:
        for fraction in s.fractions:
            for dtype in ctx.dtypes:
                name = f"nested_decode/{d_in}x{d_sae}/B{s.batch}/pos{fraction:g}"
                with ctx.case("nested_decode", name) as go:
                    if go:
                        _nested_decode_case(ctx, name, d_in, d_sae, fraction, dtype)


def _nested_decode_case(ctx: Context, name: str, d_in: int, d_sae: int, fraction: float, dtype) -> None:
    s = ctx.sizes
    msae, x = _msae_and_batch(ctx, d_in, d_sae, s.batch, fraction)
    levels = list(msae.cfg.k_levels)
    with torch.no_grad():
        z = msae.encode_with_hidden_pre(x)[0].detach()
        decoder = (msae.W_dec / msae.W_dec.norm(dim=-1, keepdim=True)).detach()
    del msae

    def run(decode: Callable) -> Callable[[], None]:
        def call() -> None:
            z_leaf, decoder_leaf = z.detach().requires_grad_(), decoder.detach().requires_grad_()
            with ctx.autocast(dtype):
                outs = decode(z_leaf, decoder_leaf, levels)
                # ours returns the levels that equal the full decode once; the same loss terms either way
                loss = sum(outs[min(i, len(outs) - 1)].float().square().sum() for i in range(len(levels)))
            loss.backward()

        return call

    variants = {"naive": run(naive_topk_reconstructions), "nested": run(nested_reconstructions)}
    seconds = medians(time_interleaved(variants, ctx.device, ctx.repeats, ctx.warmup))
    flops = 6.0 * len(levels) * s.batch * d_sae * d_in
    result = Result(
        "nested_decode", name, str(ctx.device), dtype_name(dtype),
        shapes={"d_in": d_in, "d_sae": d_sae, "batch": s.batch, "active_fraction": fraction,
                "k_levels": levels},
        seconds=seconds, ratio_of=("naive", "nested"), target={"op": ">=", "value": 4.0},
        flops={"naive": flops, "nested": flops}, dense=ctx.dense(s.batch, d_in, d_sae, dtype),
        notes={"positive_latents_per_row_mean": float((z > 0).sum(-1).float().mean())},
    )  # fmt: skip
    ctx.report.add(result.finish(ctx.judge))


def bench_rasae_step(ctx: Context) -> None:
    r = ctx.sizes.rasae
    for dtype in ctx.dtypes:
        name = f"rasae_step/{r['d_in']}x{r['d_sae']}/n'{r['n_candidates']}/B{r['batch']}"
        with ctx.case("rasae_step", name) as go:
            if go:
                _rasae_case(ctx, name, dtype)


def _rasae_case(ctx: Context, name: str, dtype: torch.dtype) -> None:
    r = ctx.sizes.rasae
    d, n, n_cand, batch = r["d_in"], r["d_sae"], r["n_candidates"], r["batch"]
    torch.manual_seed(0)
    candidates = torch.randn(n_cand, d, device=ctx.device)
    x = torch.randn(batch, d, device=ctx.device)
    common = dict(d_in=d, d_sae=n, k=r["k"], device=str(ctx.device), rescale_acts_by_decoder_norm=True)
    saes = {
        "rasae": RASAETrainingSAE(RASAETrainingSAEConfig(**common, delta=1.0), candidates=candidates),
        "reference_d_twice": DictionaryTwiceRASAE(
            RASAETrainingSAEConfig(**common, delta=1.0), candidates=candidates
        ),
        "topk": TopKTrainingSAE(TopKTrainingSAEConfig(**common)),
    }  # fmt: skip
    trainers = {key: make_trainer(sae, batch, ctx.device, dtype) for key, sae in saes.items()}
    steps = {key: (lambda t=t: t.step(x)) for key, t in trainers.items()}
    archetypal = {key: saes[key].archetypal for key in ("rasae", "reference_d_twice")}
    before = {key: a.n_computations for key, a in archetypal.items()}
    times = time_interleaved(steps, ctx.device, ctx.repeats, ctx.warmup)
    n_steps = ctx.repeats + ctx.warmup
    d_per_step = {key: (a.n_computations - before[key]) / n_steps for key, a in archetypal.items()}
    seconds = medians(times)
    sae_flops, d_flops = sae_step_flops(batch, d, n), 4.0 * n * n_cand * d
    flops = {
        "rasae": sae_flops + d_per_step["rasae"] * d_flops,
        "reference_d_twice": sae_flops + d_per_step["reference_d_twice"] * d_flops,
        "topk": sae_flops,
    }
    shapes = {"d_in": d, "d_sae": n, "n_candidates": n_cand, "batch": batch, "k": r["k"]}
    notes = {"d_computations_per_step": d_per_step, "rescale_acts_by_decoder_norm": True, "delta": 1.0}
    dense = ctx.dense(n, n_cand, d, dtype)
    for suffix, ratio_of, target in (
        ("vs_topk", ("rasae", "topk"), {"op": "<=", "value": 1.5}),
        ("vs_reference", ("reference_d_twice", "rasae"), None),
    ):
        result = Result(
            "rasae_step", f"{name}/{suffix}", str(ctx.device), dtype_name(dtype), shapes=shapes,
            seconds={k: seconds[k] for k in ratio_of}, ratio_of=ratio_of, target=target,
            flops={k: flops[k] for k in ratio_of}, dense=dense, notes=notes,
        )  # fmt: skip
        ctx.report.add(result.finish(ctx.judge))


def bench_capture(ctx: Context) -> None:
    c = ctx.sizes.capture
    if torch.bfloat16 not in ctx.dtypes:
        ctx.report.skip("capture", "capture", "measured in bfloat16 only (not in --dtypes)")
        return
    name = f"capture/{c['spec'].split(':', 1)[1]}/{c['img_size']}px/B{c['batch']}"
    with ctx.case("capture", name) as go:
        if go:
            _capture_case(ctx, name)


def vit_forward_flops(model: Any, batch: int) -> tuple[float, int, int]:
    """``(FLOPs of one forward, MLP width m, tokens T)`` of a hooked open_clip ViT (module docstring)."""
    visual = model.visual
    d, n_layers = model.cfg.d_model, model.n_layers
    tokens, patches = model.token_layout.n_tokens, model.token_layout.n_patches
    block = model._library_blocks()[0]
    mlp = getattr(getattr(block, "mlp", None), "c_fc", None)
    width = mlp.out_features if mlp is not None else 4 * d
    conv = getattr(visual, "conv1", None)
    patch = conv.kernel_size[0] if conv is not None else 16
    proj = getattr(visual, "proj", None)
    embed = proj.shape[1] if proj is not None else 0
    per_block = tokens * (8 * d * d + 4 * d * width) + 4 * tokens * tokens * d
    per_image = n_layers * per_block + 2 * patches * 3 * patch * patch * d + 2 * d * embed
    return float(batch * per_image), width, tokens


def _capture_case(ctx: Context, name: str) -> None:
    c = ctx.sizes.capture
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model, _ = load_vision_model(
        c["spec"], pretrained=False, device=str(ctx.device), img_size=c["img_size"], **c["model_kwargs"]
    )
    bare = model.model
    height, width = model.cfg.image_size
    images = torch.randn(c["batch"], 3, height, width, device=ctx.device)
    last = f"blocks.{model.n_layers - 1}.hook_resid_post"

    def under_autocast(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad(), ctx.autocast(dtype):
                return fn()

        return call

    variants = {
        "hooked_capture": under_autocast(lambda: model.run_with_cache(images, names_filter=last)),
        "bare_forward": under_autocast(lambda: bare.encode_image(images)),
    }
    seconds = medians(time_interleaved(variants, ctx.device, ctx.repeats, ctx.warmup))
    flops, mlp_width, tokens = vit_forward_flops(model, c["batch"])
    result = Result(
        "capture", name, str(ctx.device), dtype_name(dtype),
        shapes={"model": c["spec"], "img_size": c["img_size"], "batch": c["batch"], "tokens": tokens,
                "d_model": model.cfg.d_model, "n_layers": model.n_layers, "hook": last},
        seconds=seconds, ratio_of=("hooked_capture", "bare_forward"), target={"op": "<=", "value": 1.03},
        flops={"hooked_capture": flops, "bare_forward": flops},
        dense=ctx.dense(c["batch"] * tokens, model.cfg.d_model, mlp_width, dtype),
        notes={"weights": "random init", "precision": "float32 weights, bf16 autocast, no_grad"},
    )  # fmt: skip
    ctx.report.add(result.finish(ctx.judge))


def bench_cached_training(ctx: Context) -> None:
    c = ctx.sizes.cached
    for dtype in ctx.dtypes:
        name = f"cached_training/{c['d_in']}x{c['d_sae']}/B{c['batch']}/{c['steps']}steps"
        with ctx.case("cached_training", name) as go:
            if go:
                _cached_training_case(ctx, name, dtype)


def write_synthetic_cache(path: Path, n_rows: int, d_in: int, context: int) -> CachedActivations:
    """An activation cache of random rows in our on-disk format (what ``sae-vision cache`` writes)."""
    n_images = n_rows // context
    writer = ActivationCacheWriter(
        path,
        n_images,
        images_per_shard=max(1, n_images // 4),
        settings={"synthetic": True, "d_in": d_in},
        metadata={"model_name": "synthetic (benchmarks/gpu_benchmarks.py)", "token_selection": "all"},
    )
    generator = torch.Generator().manual_seed(0)
    for index in writer.prepare():
        start, end = writer.shard_range(index)
        rows = torch.randn((end - start) * context, d_in, generator=generator)
        writer.write_shard(index, {CACHE_HOOK: rows}, context, {"n_images_ok": end - start})
    return writer.commit()


def _cached_training_case(ctx: Context, name: str, dtype: torch.dtype) -> None:
    c = ctx.sizes.cached
    d_in, d_sae, batch, steps = c["d_in"], c["d_sae"], c["batch"], c["steps"]
    sae_fields = {
        "architecture": "matryoshka_topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "level_weighting": "reverse",
    }
    n_rows = batch * steps
    device = ctx.device

    def bare_steps(n: int) -> Callable[[], None]:
        torch.manual_seed(0)
        cfg = MatryoshkaTopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, level_weighting="reverse", device=str(device)
        )
        trainer = make_trainer(MatryoshkaTopKTrainingSAE(cfg), batch, device, dtype)
        batches = torch.randn(n, batch, d_in, device=device)

        def call() -> None:
            for b in batches:
                trainer.step(b)

        return call

    with tempfile.TemporaryDirectory(prefix="gpu_bench_cache_") as tmp:
        started = time.perf_counter()
        cache = write_synthetic_cache(Path(tmp) / "cache", n_rows, d_in, c["context"])
        cache_seconds = time.perf_counter() - started
        time_call(bare_steps(min(steps, 3)), device)  # warm-up: kernels, the decode plan's calibration
        cfg = VisionSAERunnerConfig(
            sae=sae_fields, use_cached_activations=True, cached_activations_path=str(cache.path),
            hook_name=CACHE_HOOK, token_selection="all", training_rows=n_rows, train_batch_size_rows=batch,
            buffer_size_rows=n_rows, n_batches_for_norm_estimate=1, lr=1e-4,
            output_path=str(Path(tmp) / "run"),
            device=str(device), autocast=dtype == torch.bfloat16, seed=0, verbose=False,
        )  # fmt: skip
        synchronize(device)
        result = VisionSAETrainingRunner(cfg, say=lambda message: None).run()
        runner_seconds = result.seconds
        bare_seconds = time_call(bare_steps(steps), device)
    rows = result.n_training_rows
    flops = sae_step_flops(batch, d_in, d_sae) * steps
    out = Result(
        "cached_training", name, str(device), dtype_name(dtype),
        shapes={"d_in": d_in, "d_sae": d_sae, "batch": batch, "steps": steps,
                "architecture": "matryoshka_topk", "cache_rows": cache.n_rows, "cache_dtype": "float32"},
        seconds={"runner": runner_seconds, "bare_steps": bare_seconds}, ratio_of=("runner", "bare_steps"),
        target=None, flops={"runner": flops, "bare_steps": flops}, dense=ctx.dense(batch, d_in, d_sae, dtype),
        notes={"rows_per_s": {"runner": rows / runner_seconds, "bare_steps": n_rows / bare_seconds},
               "rows_trained": rows, "cache_write_seconds": cache_seconds,
               "seconds_are": "whole run of `steps` steps (not per step)"},
    )  # fmt: skip
    ctx.report.add(out.finish(ctx.judge))


RUNNERS: dict[str, Callable[[Context], None]] = {
    "msae_step": bench_msae_step,
    "nested_decode": bench_nested_decode,
    "rasae_step": bench_rasae_step,
    "capture": bench_capture,
    "cached_training": bench_cached_training,
}


# --------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if available"
    )
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds; automatic without CUDA)")
    p.add_argument("--paper-sizes", action="store_true", help="the paper's sizes even on a CPU (slow)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (rewritten after each)")
    p.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 10 paper, 3 tiny)")
    p.add_argument(
        "--budget", type=float, default=None, help="skip configurations that would start after S s"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 when tiny)")
    p.add_argument(
        "--note",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recorded under 'check' in the JSON (gpu_check.sh: the cuda tests' outcome); repeatable",
    )
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.device == "cpu" and not args.paper_sizes:
        args.tiny = True
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    for value, known, flag in ((args.dtypes, DTYPES, "--dtypes"), (args.only, BENCHMARKS, "--only")):
        unknown = [v for v in value if v not in known]
        if unknown:
            p.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    return args


def run_metadata(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    return {
        "schema": 1,
        "argv": sys.argv[1:],
        "benchmarks": args.only,
        "dtypes": args.dtypes,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "tiny": args.tiny,
        "sizes_name": "tiny" if args.tiny else "paper",
        "sizes": asdict(TINY if args.tiny else PAPER),
        "targets_judged": cuda and not args.tiny,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "tf32_matmul_allowed": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "started_unix": time.time(),
        "check": dict(note.partition("=")[::2] for note in args.note),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads or args.tiny:  # tiny ops: one thread avoids start-up and oversubscription costs
        torch.set_num_threads(args.threads or 1)
    report = Report(args.json, run_metadata(args))
    ctx = Context(args, report, TINY if args.tiny else PAPER)
    print(
        f"device {args.device} ({report.data['device_name']}), sizes {report.data['sizes_name']}, dtypes "
        f"{','.join(args.dtypes)}, repeats {ctx.repeats}, benchmarks {','.join(args.only)}"
    )
    print(TABLE_HEADER, flush=True)
    for benchmark in BENCHMARKS:  # in order of value: a run cut short keeps the first
        if benchmark in args.only:
            RUNNERS[benchmark](ctx)
    report.finish()
    print_table(report)
    print(f"elapsed {report.elapsed:.1f} s" + (f"; results in {args.json}" if args.json else ""))
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
