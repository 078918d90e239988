"""Concept-based similarity search and the bias probe, on embeddings with planted concepts."""

import math

import pytest
import torch

from sae_vision_ext.analysis.bias import (
    bias_probe,
    fit_linear_probe,
    zero_shot_head,
)
from sae_vision_ext.analysis.concepts import ConceptName, ConceptNames
from sae_vision_ext.analysis.retrieval import concept_search, embed_images, nearest
from sae_vision_ext.analysis.toy import orthonormal_directions, planted_sae, synthetic_images, tiny_clip

D, D_SAE = 48, 32
CONCEPT = 7  # the planted concept latent


def _world(n, concept_rows, concept_value, seed):
    """Embeddings made of 3 random atoms (never the concept) plus the concept on ``concept_rows``."""
    generator = torch.Generator().manual_seed(seed)
    atoms = orthonormal_directions(D_SAE, D, seed=0)
    others = [i for i in range(D_SAE) if i != CONCEPT]
    x = torch.zeros(n, D)
    for row in range(n):
        chosen = torch.randperm(len(others), generator=generator)[:3]
        weights = 0.5 + torch.rand(3, generator=generator)
        x[row] = weights @ atoms[[others[i] for i in chosen]]
    x[concept_rows] += concept_value * atoms[CONCEPT]
    x += 0.02 * torch.randn(n, D, generator=generator)
    return x, atoms


def test_concept_search_returns_the_planted_images():
    planted = list(range(40, 400, 36))  # 10 gallery items carry the concept
    gallery, atoms = _world(400, planted, 3.0, seed=1)
    sae = planted_sae(atoms, "hook_image_embed")
    query = gallery[3]
    names = ConceptNames({CONCEPT: ConceptName(CONCEPT, ["stripes"], [0.9])})
    result = concept_search(
        sae, query, gallery, latent="stripes", strength=6.0, top_k=10, names=names, exclude=[3]
    )
    assert result.latent == CONCEPT
    assert set(result.indices[0].tolist()) == set(planted)
    assert (result.scores[0][:-1] >= result.scores[0][1:]).all()
    plain = concept_search(sae, query, gallery, latent=CONCEPT, strength=0.0, top_k=10)
    assert plain.indices[0, 0] == 3  # unsteered, the query finds itself
    assert len(set(plain.indices[0].tolist()) & set(planted)) <= 2
    clamped = concept_search(
        sae, query, gallery, latent=CONCEPT, strength=6.0, mode="clamp", top_k=10, exclude=[3]
    )
    assert set(clamped.indices[0].tolist()) == set(planted)


def test_nearest_is_chunk_invariant():
    generator = torch.Generator().manual_seed(3)
    gallery, queries = torch.randn(250, 16, generator=generator), torch.randn(4, 16, generator=generator)
    full_scores, full_index = nearest(queries, gallery, top_k=7)
    chunk_scores, chunk_index = nearest(queries, gallery, top_k=7, chunk_size=33)
    assert torch.equal(full_index, chunk_index)
    torch.testing.assert_close(full_scores, chunk_scores)


def test_query_images_are_embedded_with_the_model():
    model, preprocess = tiny_clip(seed=3)
    images = torch.stack([preprocess(image) for image in synthetic_images(6, seed=7)])
    gallery = embed_images(model, images, batch_size=4)
    assert gallery.shape == (6, model.cfg.d_image_embed)
    sae = planted_sae(orthonormal_directions(8, model.cfg.d_image_embed, seed=2), "hook_image_embed")
    result = concept_search(sae, images[2], gallery, latent=0, strength=0.0, top_k=1, model=model)
    assert result.indices.tolist() == [[2]]


def test_bias_probe_detects_the_planted_attribute_shift():
    n = 400
    attribute = torch.arange(n) % 2 == 0  # e.g. "Smiling": the concept is present on these images
    x, atoms = _world(n, attribute.nonzero().squeeze(1), 2.0, seed=5)
    sae = planted_sae(atoms, "hook_image_embed")
    probe = fit_linear_probe(x, attribute.long())
    assert (probe(x).argmax(dim=-1) == attribute.long()).double().mean() > 0.97
    control = 2
    names = {CONCEPT: "smile"}
    table = bias_probe(
        sae,
        x,
        probe,
        latents=["smile", control],
        strengths=[0.0, 1.0, 3.0],
        target_class=1,
        attributes={"Smiling": attribute},
        names=names,
    )
    assert table.baseline_rate == pytest.approx(0.5, abs=0.03)
    ablated = table.row(CONCEPT, 0.0)
    assert ablated["name"] == "smile"
    assert ablated["dp|Smiling=1"] < -0.8  # removing the concept flips the attribute's images
    assert abs(ablated["dp|Smiling=0"]) < 0.05
    assert ablated["drate"] < -0.45 and ablated["flip"] > 0.45
    unchanged = table.row(CONCEPT, 1.0)
    assert abs(unchanged["dp"]) < 1e-6 and unchanged["flip"] == 0.0
    for strength in (0.0, 3.0):
        assert abs(table.row(control, strength)["dp"]) < 0.05  # an unrelated concept moves nothing
    markdown = table.to_markdown()
    assert markdown.count("\n") == 1 + len(table.rows) and "dp|Smiling=1" in markdown


def test_zero_shot_prompts_follow_the_concept(tmp_path):
    n = 200
    attribute = torch.arange(n) % 4 == 0
    x, atoms = _world(n, attribute.nonzero().squeeze(1), 1.0, seed=6)
    sae = planted_sae(atoms, "hook_image_embed")
    classifier = zero_shot_head(torch.stack([atoms[0] + atoms[1], atoms[CONCEPT]]), logit_scale=20.0)
    table = bias_probe(sae, x, classifier, latents=[CONCEPT], strengths=[0.0, 1.0, 3.0], mode="add")
    shifts = [table.row(CONCEPT, s)["dp"] for s in (0.0, 1.0, 3.0)]
    assert shifts[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < shifts[1] < shifts[2]
    path = table.to_csv(tmp_path / "bias.csv")
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("latent,name,mode,strength,p,dp")
    assert not math.isnan(table.baseline_p)


def test_attribute_tables_celeba_and_csv(tmp_path):
    from sae_vision_ext.analysis.bias import load_attributes

    celeba = tmp_path / "list_attr_celeba.txt"
    celeba.write_text("3\nMale Smiling\n000001.jpg -1  1\n000002.jpg  1 -1\n000003.jpg  1  1\n")
    ids, attributes = load_attributes(celeba)
    assert ids == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert attributes["Male"].tolist() == [False, True, True]
    assert attributes["Smiling"].tolist() == [True, False, True]
    table = tmp_path / "attrs.csv"
    table.write_text("image,Eyeglasses,Young\na.png,true,0\nb.png,false,1\n")
    ids, attributes = load_attributes(table)
    assert ids == ["a.png", "b.png"] and attributes["Young"].tolist() == [False, True]
    table.write_text("image,Young\na.png,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        load_attributes(table)
