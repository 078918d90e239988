"""Concept naming for SAEs on a CLIP-family image embedding (MSAE paper, Zaigrajew et al. 2025).

Each latent ``i`` has a decoder atom; mapped back to the CLIP embedding space it is ``a_i = decode(e_i) -
decode(0)`` (for a plain SAE this is ``W_dec[i]``; for an SAE that standardises its inputs, ``x' = (x - mu) *
s``, it is ``W_dec[i] / s``: the same direction in raw CLIP space, which is what matters here). With ``t_w``
the CLIP text embedding of word ``w`` (optionally wrapped in a prompt template), the score is

    score(i, w) = cos(a_i, t_w) = <a_i, t_w> / (||a_i|| ||t_w||)

and the latent is named by the words with the highest scores. ``space="sae"`` scores ``W_dec[i]`` as stored,
without going through ``decode``. ``center_text=True`` subtracts the vocabulary's mean text embedding first
(removes the component shared by all captions; off by default, as in the paper).

Text embeddings are cached on disk (``$SAE_VISION_CACHE`` or ``~/.cache/sae_vision_ext``) under a key made of
the model spec (plus a fingerprint of its weights), the prompt template and a hash of the word list.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from sae_vision_ext.analysis.steering import latent_directions
from sae_vision_ext.analysis.vocabulary import load_vocabulary, vocabulary_hash

TextEncoder = Callable[[Sequence[str]], Tensor]


def cache_dir() -> Path:
    """Root folder of the plugin's on-disk caches (``$SAE_VISION_CACHE`` or ``~/.cache/sae_vision_ext``)."""
    root = os.environ.get("SAE_VISION_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "sae_vision_ext"


def model_spec_of(model: Any) -> str:
    """A string naming the model (``model.spec``, ``model.cfg.model_name``, or the class name)."""
    spec = getattr(model, "spec", None)
    if not spec:
        cfg = getattr(model, "cfg", None)
        spec = getattr(cfg, "model_name", None) if cfg is not None else None
    return str(spec or type(model).__name__)


def weights_fingerprint(model: Any, n_tensors: int = 4, n_values: int = 4096) -> str:
    """A short hash of some of the model's weights, so cached text embeddings of a randomly initialised model
    and of the pretrained one (same spec string) never mix."""
    params = [p for p in model.parameters()] if hasattr(model, "parameters") else []
    digest = hashlib.sha256(str(sum(p.numel() for p in params)).encode())
    for param in params[:n_tensors] + params[-n_tensors:]:
        values = param.detach().reshape(-1)[:n_values].float().cpu().numpy().tobytes()
        digest.update(values)
    return digest.hexdigest()[:12]


def clip_text_encoder(
    model: Any, device: str | torch.device | None = None, truncate: bool = True
) -> TextEncoder:
    """A text encoder ``words -> [n, d]`` from a model exposing ``encode_text`` and ``tokenizer``.

    Works on a ``HookedVisionModel`` over an open_clip model, or on an open_clip model with a tokenizer
    passed as ``model.tokenizer``. ``truncate``: for open_clip CLIP text towers with a causal mask and EOT
    ("argmax") pooling, run only the first ``L`` context positions (``L`` = longest prompt in the batch)
    instead of all 77: the pooled EOT feature depends on earlier positions only, so the result is the same
    (checked against the full forward on the first call; falls back when it differs) and short words cost ~10x
    less.
    """
    encode_text = getattr(model, "encode_text", None)
    tokenizer = getattr(model, "tokenizer", None)
    if encode_text is None or tokenizer is None:
        raise TypeError(
            f"{type(model).__name__} has no encode_text/tokenizer; concept naming needs a CLIP-family model "
            "(e.g. 'open_clip:ViT-B-32/...') or an explicit text_encoder"
        )
    if device is None:
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = param.device if param is not None else "cpu"
    inner = getattr(model, "model", model)
    state = {"truncate": truncate and _truncatable(inner), "checked": False}

    def encode(words: Sequence[str]) -> Tensor:
        tokens = tokenizer(list(words))
        if isinstance(tokens, Tensor):
            tokens = tokens.to(device)
        with torch.no_grad():
            if state["truncate"] and isinstance(tokens, Tensor):
                fast = _encode_truncated(inner, tokens)
                if not state["checked"]:
                    full = encode_text(tokens[:4]).float()
                    state["checked"] = True
                    if not torch.allclose(fast[:4], full, rtol=1e-3, atol=1e-4):
                        state["truncate"] = False
                        return encode_text(tokens).float()
                return fast
            return encode_text(tokens).float()

    return encode


def _truncatable(clip: Any) -> bool:
    needed = (
        "token_embedding",
        "positional_embedding",
        "attn_mask",
        "transformer",
        "ln_final",
        "encode_text",
    )
    return (
        all(hasattr(clip, name) for name in needed)
        and getattr(clip, "text_pool_type", None) == "argmax"
        and isinstance(getattr(clip, "attn_mask", None), Tensor)
    )


def _encode_truncated(clip: Any, tokens: Tensor) -> Tensor:
    """``clip.encode_text`` on the first L positions only (positional embedding and causal mask cut to L)."""
    length = int(tokens.argmax(dim=-1).max()) + 1  # the EOT token has the largest id
    positional, mask = clip.positional_embedding, clip.attn_mask
    try:
        clip.positional_embedding = torch.nn.Parameter(positional.detach()[:length], requires_grad=False)
        clip.attn_mask = mask[:length, :length]
        return clip.encode_text(tokens[:, :length]).float()
    finally:
        clip.positional_embedding = positional
        clip.attn_mask = mask


def embed_texts(
    words: Sequence[str],
    text_encoder: TextEncoder,
    batch_size: int = 256,
    template: str = "{}",
    progress: bool = True,
) -> Tensor:
    """L2-normalised text embeddings ``[len(words), d]`` of ``template.format(word)``, in batches;
    ``progress`` shows a tqdm bar (words/s) on stderr."""
    chunks = []
    bar = tqdm(
        total=len(words),
        unit="words",
        desc="embedding vocabulary",
        disable=not progress,
        leave=None,
        dynamic_ncols=True,
    )
    with bar:
        for start in range(0, len(words), batch_size):
            prompts = [template.format(word) for word in words[start : start + batch_size]]
            with torch.no_grad():
                chunks.append(text_encoder(prompts).detach().float().cpu())
            bar.update(len(prompts))
    embeddings = torch.cat(chunks) if chunks else torch.zeros(0, 0)
    return torch.nn.functional.normalize(embeddings, dim=-1)


def text_embedding_cache_path(model_spec: str, words: Sequence[str], template: str = "{}") -> Path:
    """Where the text embeddings of ``words`` under ``model_spec`` and ``template`` are cached."""
    key = hashlib.sha256(f"{model_spec}\n{template}\n{vocabulary_hash(words)}".encode()).hexdigest()[:24]
    safe_spec = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_spec)[:80]
    return cache_dir() / "text_embeddings" / f"{safe_spec}-{key}.safetensors"


def cached_text_embeddings(
    words: Sequence[str],
    text_encoder: TextEncoder,
    model_spec: str,
    template: str = "{}",
    batch_size: int = 256,
    use_cache: bool = True,
    progress: bool = True,
) -> Tensor:
    """:func:`embed_texts` with an on-disk cache keyed by model spec + template + vocabulary hash."""
    path = text_embedding_cache_path(model_spec, words, template)
    if use_cache and path.exists():
        stored = load_file(str(path))["text_embeddings"]
        if stored.shape[0] == len(words):
            return stored
    embeddings = embed_texts(words, text_encoder, batch_size=batch_size, template=template, progress=progress)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(
            {"text_embeddings": embeddings.contiguous()},
            str(tmp),
            metadata={"model_spec": model_spec, "template": template, "n_words": str(len(words))},
        )
        os.replace(tmp, path)
    return embeddings


def concept_atoms(sae: Any, latents: Sequence[int] | None = None, space: str = "raw") -> Tensor:
    """Decoder atoms ``[n, d_in]``: ``space="raw"`` maps them back to the SAE's input (CLIP) space through
    ``decode``; ``space="sae"`` returns ``W_dec`` rows as stored."""
    if latents is None:
        latents = range(int(sae.cfg.d_sae))
    index = list(latents)
    if space == "sae":
        return sae.W_dec.detach()[torch.as_tensor(index, dtype=torch.long)].float().cpu()
    if space != "raw":
        raise ValueError(f"space must be 'raw' or 'sae', got {space!r}")
    return latent_directions(sae, index).float().cpu()


@dataclass
class ConceptName:
    """Best words for one latent, best first, with their cosine scores."""

    latent: int
    words: list[str]
    scores: list[float]

    @property
    def name(self) -> str:
        return self.words[0] if self.words else ""

    @property
    def score(self) -> float:
        return self.scores[0] if self.scores else float("nan")


@dataclass
class ConceptNames:
    """Names for a set of latents: ``names[latent]`` is a :class:`ConceptName`."""

    names: dict[int, ConceptName] = field(default_factory=dict)
    vocabulary_size: int = 0

    def __getitem__(self, latent: int) -> ConceptName:
        return self.names[latent]

    def __contains__(self, latent: object) -> bool:
        return latent in self.names

    def __len__(self) -> int:
        return len(self.names)

    def best(self) -> dict[int, str]:
        """Latent -> its best word."""
        return {latent: concept.name for latent, concept in self.names.items()}

    def latent_for(self, word: str) -> int:
        """The latent whose best word is ``word`` (the highest-scoring one if several share it)."""
        matches = [(c.score, latent) for latent, c in self.names.items() if c.name == word]
        if not matches:
            raise KeyError(f"no latent is named {word!r}")
        return max(matches)[1]

    def to_rows(self) -> list[dict[str, Any]]:
        return [
            {"latent": c.latent, "name": c.name, "score": c.score, "words": c.words, "scores": c.scores}
            for c in sorted(self.names.values(), key=lambda c: c.latent)
        ]


def score_atoms(atoms: Tensor, text_embeddings: Tensor, center_text: bool = False) -> Tensor:
    """Cosine similarities ``[n_atoms, n_words]`` between atoms and text embeddings."""
    text = text_embeddings.float()
    if center_text:
        text = text - text.mean(dim=0, keepdim=True)
    atoms = torch.nn.functional.normalize(atoms.float(), dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    if atoms.shape[-1] != text.shape[-1]:
        raise ValueError(
            f"atoms have dimension {atoms.shape[-1]} but text embeddings {text.shape[-1]}: the SAE must be "
            "trained on the joint image-text embedding (hook_image_embed) for concept naming"
        )
    return atoms @ text.T


def name_concepts(
    sae: Any,
    vocabulary: str | Path | Sequence[str] | None = None,
    *,
    model: Any = None,
    text_encoder: TextEncoder | None = None,
    text_embeddings: Tensor | None = None,
    latents: Sequence[int] | None = None,
    top_n: int = 5,
    template: str = "{}",
    space: str = "raw",
    center_text: bool = False,
    model_spec: str | None = None,
    use_cache: bool = True,
    batch_size: int = 256,
    chunk_size: int = 4096,
    progress: bool = True,
) -> ConceptNames:
    """Name SAE latents by the vocabulary words whose text embeddings best match their decoder atoms.

    Text embeddings come from, in order: ``text_embeddings`` (``[n_words, d]``, aligned with the vocabulary),
    ``text_encoder`` (a callable ``list[str] -> [n, d]``) or ``model`` (a CLIP-family model with
    ``encode_text`` and ``tokenizer``). Embeddings from an encoder are cached on disk under ``model_spec``
    (default: the model's spec plus a fingerprint of its weights; with a bare ``text_encoder`` and no
    ``model_spec`` nothing is cached). ``progress`` shows a tqdm bar (words/s) on stderr while the vocabulary
    is embedded.
    """
    words = load_vocabulary(vocabulary)
    if not words:
        raise ValueError("the vocabulary is empty")
    if text_embeddings is None:
        spec = model_spec
        if text_encoder is None:
            if model is None:
                raise ValueError("give one of text_embeddings, text_encoder or model")
            text_encoder = clip_text_encoder(model)
            spec = spec or f"{model_spec_of(model)}@{weights_fingerprint(model)}"
        if spec is None:
            text_embeddings = embed_texts(
                words, text_encoder, batch_size=batch_size, template=template, progress=progress
            )
        else:
            text_embeddings = cached_text_embeddings(
                words,
                text_encoder,
                spec,
                template=template,
                batch_size=batch_size,
                use_cache=use_cache,
                progress=progress,
            )
    if text_embeddings.shape[0] != len(words):
        raise ValueError(f"{text_embeddings.shape[0]} text embeddings for {len(words)} words")
    latent_list = list(range(int(sae.cfg.d_sae))) if latents is None else [int(i) for i in latents]
    top_n = max(1, min(top_n, len(words)))
    result = ConceptNames(vocabulary_size=len(words))
    for start in range(0, len(latent_list), chunk_size):
        chunk = latent_list[start : start + chunk_size]
        scores = score_atoms(concept_atoms(sae, chunk, space=space), text_embeddings, center_text=center_text)
        best_scores, best_words = scores.topk(top_n, dim=-1)
        for row, latent in enumerate(chunk):
            result.names[latent] = ConceptName(
                latent=latent,
                words=[words[j] for j in best_words[row].tolist()],
                scores=[float(s) for s in best_scores[row].tolist()],
            )
    return result
