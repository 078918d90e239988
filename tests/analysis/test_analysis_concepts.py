"""Concept naming: planted vocabularies name the right atoms; shipped vocabulary; text-embedding disk
cache."""

import pytest
import torch

from sae_vision_ext.analysis.concepts import (
    clip_text_encoder,
    name_concepts,
    text_embedding_cache_path,
    weights_fingerprint,
)
from sae_vision_ext.analysis.toy import make_sae, orthonormal_directions, planted_sae, tiny_clip
from sae_vision_ext.analysis.vocabulary import default_vocabulary, load_vocabulary, vocabulary_hash


def _random_words(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        "".join(letters[i] for i in torch.randint(0, 26, (7,), generator=generator).tolist()) + str(j)
        for j in range(n)
    ]


def test_default_vocabulary_is_shipped_and_sane():
    words = default_vocabulary()
    assert len(words) > 9000
    assert len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() and len(w) >= 3 for w in words)
    for common in ("dog", "cat", "red", "beach", "car", "tree", "smile"):
        assert common in words
    for fragment in ("ing", "ers", "the", "and"):
        assert fragment not in words
    assert load_vocabulary(["b", "a", "b"]) == ["b", "a"]
    assert vocabulary_hash(["a", "b"]) != vocabulary_hash(["b", "a"])


def test_planted_word_names_its_atom():
    d, d_sae = 32, 24
    atoms = orthonormal_directions(d_sae, d, seed=0)
    sae = planted_sae(atoms * 0.3, "hook_image_embed")  # atom norms do not matter for cosine
    words = _random_words(300)
    text = torch.randn(len(words), d, generator=torch.Generator().manual_seed(1))
    planted = {5: 17, 11: 230, 20: 42}  # latent -> word index
    for latent, word_index in planted.items():
        text[word_index] = 2.5 * atoms[latent]
    names = name_concepts(sae, words, text_embeddings=text, top_n=3)
    assert len(names) == d_sae and names.vocabulary_size == 300
    for latent, word_index in planted.items():
        assert names[latent].name == words[word_index]
        assert names[latent].score == pytest.approx(1.0, abs=1e-5)
        assert names.latent_for(words[word_index]) == latent
        assert len(names[latent].words) == 3 and names[latent].scores[0] >= names[latent].scores[1]
    restricted = name_concepts(sae, words, text_embeddings=text, latents=[11])
    assert list(restricted.names) == [11] and restricted[11].name == words[230]


def test_standardised_sae_is_named_in_raw_space():
    """With per-dimension input standardisation, the raw-space atom (not W_dec) carries the name."""
    from sae_lens import StandardSAE

    class StandardisingSAE(StandardSAE):
        def decode(self, feature_acts):
            return super().decode(feature_acts) * self.sigma + self.mu

    d = 16
    base = planted_sae(orthonormal_directions(8, d, seed=4), "hook_image_embed")
    sae = StandardisingSAE(base.cfg)
    sae.load_state_dict(base.state_dict())
    sae.sigma = torch.cat([torch.full((8,), 0.1), torch.full((8,), 5.0)])
    sae.mu = torch.randn(d)
    words = ["raw", "stored"] + _random_words(50, seed=5)
    text = torch.randn(len(words), d, generator=torch.Generator().manual_seed(6))
    text[0] = sae.W_dec[3].detach() * sae.sigma  # the atom in raw (CLIP) space
    text[1] = sae.W_dec[3].detach()  # the atom as stored
    assert name_concepts(sae, words, text_embeddings=text, latents=[3], space="raw")[3].name == "raw"
    assert name_concepts(sae, words, text_embeddings=text, latents=[3], space="sae")[3].name == "stored"


def test_clip_text_encoder_path_and_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_VISION_CACHE", str(tmp_path))
    model, _ = tiny_clip(seed=2)
    words = ["dog", "cat", "ocean", "guitar", "forest", "pizza"]
    encode = clip_text_encoder(model)
    text = torch.nn.functional.normalize(encode(words), dim=-1)
    atoms = torch.stack([text[2], text[4]])  # latent 0 = "ocean", latent 1 = "forest"
    sae = make_sae(model.cfg.d_image_embed, 2, "hook_image_embed", model_name=model.spec)
    with torch.no_grad():
        sae.W_dec.copy_(atoms)
    names = name_concepts(sae, words, model=model, top_n=2)
    assert names.best() == {0: "ocean", 1: "forest"}
    cache_file = text_embedding_cache_path(f"{model.spec}@{weights_fingerprint(model)}", words, "{}")
    assert cache_file.exists() and str(cache_file).startswith(str(tmp_path))

    def broken(*args, **kwargs):
        raise AssertionError("the text encoder must not run when the cache is warm")

    import sae_vision_ext.analysis.concepts as concepts

    monkeypatch.setattr(concepts, "embed_texts", broken)
    assert name_concepts(sae, words, model=model).best() == {0: "ocean", 1: "forest"}
    other_template = text_embedding_cache_path(
        f"{model.spec}@{weights_fingerprint(model)}", words, "a photo of a {}"
    )
    assert other_template != cache_file
    other_weights, _ = tiny_clip(
        seed=3
    )  # same spec string, different (random) weights: a different cache entry
    assert weights_fingerprint(other_weights) != weights_fingerprint(model)


def test_dimension_mismatch_is_explained():
    sae = make_sae(16, 4, "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="hook_image_embed"):
        name_concepts(sae, ["a", "b"], text_embeddings=torch.randn(2, 32))


def test_truncated_text_forward_matches_the_full_one():
    from sae_vision_ext.analysis.concepts import _truncatable

    model, _ = tiny_clip(seed=4)
    assert _truncatable(model.model)
    words = ["dog", "a photo of a red sports car", "lighthouse", "x"] * 3
    fast = clip_text_encoder(model)(words)
    full = clip_text_encoder(model, truncate=False)(words)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5)
    assert model.model.positional_embedding.shape[0] == 16  # restored after the truncated pass
