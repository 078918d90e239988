"""Our Hub layout: write it, read it back by repo id from a local HF cache, model card, upload calls."""

import pytest
import torch
from huggingface_hub import hf_hub_download, scan_cache_dir

import sae_vision_ext  # noqa: F401  (registers the plugin's architectures)
from sae_vision_ext.loading import hub
from sae_vision_ext.loading.hub import model_card, push_to_hub, save_hub_folder
from sae_vision_ext.loading.hub_cache import seed_hf_cache
from sae_vision_ext.saes.archetypal import RASAE, RASAEConfig

REPO = "someone/vision-saes"


def _ra_sae(d_in=8, d_sae=24, seed=0):
    torch.manual_seed(seed)
    cfg = RASAEConfig(d_in=d_in, d_sae=d_sae, k=4, n_candidates=30, delta=0.5)
    cfg.metadata.model_name = "timm:vit_base_patch14_reg4_dinov2.lvd142m"
    cfg.metadata.hook_name = "blocks.7.hook_resid_post"
    cfg.metadata.modality = "vision"
    cfg.metadata.token_selection = "patches"
    sae = RASAE(cfg, candidates=torch.randn(30, d_in))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_dec.normal_()
        sae.archetypal.W.uniform_()
        sae.archetypal.project_()
    return sae


def _seed_folder(repo_id, folder):
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    return seed_hf_cache(repo_id, files)


def test_our_layout_loads_by_repo_id(tmp_path, hf_cache):
    from sae_lens import SAE

    sae = _ra_sae()
    metrics = {"blocks.7.hook_resid_post": {"fvu": 0.123456, "l0": 4.0, "dead_fraction": 0.01}}
    out = save_hub_folder({"blocks.7.hook_resid_post": sae}, tmp_path / "repo", REPO, metrics=metrics)
    assert (out / "blocks.7.hook_resid_post" / "cfg.json").is_file()
    assert (out / "blocks.7.hook_resid_post" / "sae_weights.safetensors").is_file()
    _seed_folder(REPO, out)

    loaded = SAE.from_pretrained(REPO, "blocks.7.hook_resid_post")
    assert isinstance(loaded, RASAE)
    assert loaded.cfg.metadata.model_name == "timm:vit_base_patch14_reg4_dinov2.lvd142m"
    assert loaded.cfg.metadata.token_selection == "patches" and loaded.cfg.metadata.modality == "vision"
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x))

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens")
    for text in (
        "timm:vit_base_patch14_reg4_dinov2.lvd142m",
        "blocks.7.hook_resid_post",
        "ra_sae",
        "fvu",
        "0.1235",
        "dead_fraction",
        "import sae_vision_ext",
        f'SAE.from_pretrained("{REPO}"',
    ):
        assert text in card


def test_seeded_cache_is_a_valid_hf_cache(tmp_path, hf_cache):
    seed_hf_cache(REPO, {"a/cfg.json": b"{}", "a/w.safetensors": b"\x00" * 10})
    snapshot = seed_hf_cache(REPO, {"README.md": b"hi"})  # a second commit keeps the first files
    assert hf_hub_download(REPO, "a/cfg.json") == str(snapshot / "a" / "cfg.json")
    assert (snapshot / "a" / "w.safetensors").is_symlink()
    info = scan_cache_dir(hf_cache)
    assert info.warnings == []
    (repo,) = info.repos
    head = [rev for rev in repo.revisions if "main" in rev.refs][0]
    assert {f.file_name for f in head.files} == {"cfg.json", "w.safetensors", "README.md"}
    assert seed_hf_cache(REPO, {"README.md": b"hi"}) == snapshot  # same contents, same commit
    with pytest.raises(ValueError, match="org/name"):
        seed_hf_cache("no-slash", {"x": b""})


def test_model_card_lists_every_sae():
    cfgs = {
        "hook_image_embed": {
            "architecture": "matryoshka_topk",
            "d_in": 768,
            "d_sae": 6144,
            "metadata": {"model_name": "open_clip:ViT-L-14/openai", "hook_name": "hook_image_embed"},
        },
        "blocks.11.hook_resid_post": {
            "architecture": "ra_sae",
            "d_in": 1024,
            "d_sae": 8192,
            "metadata": {"model_name": "open_clip:ViT-L-14/openai", "hook_name": "blocks.11.hook_resid_post"},
        },
    }
    card = model_card(REPO, cfgs, {"hook_image_embed": {"cosine": 0.99}})
    assert "| `hook_image_embed` | matryoshka_topk | open_clip:ViT-L-14/openai | hook_image_embed |" in card
    assert "| `blocks.11.hook_resid_post` | ra_sae |" in card
    assert "cosine" in card and "0.99" in card
    assert "- matryoshka_topk" in card and "- ra_sae" in card  # tags


class _FakeApi:
    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def repo_info(self, repo_id, **kwargs):
        _FakeApi.calls.append(("repo_info", repo_id))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in __import__("pathlib").Path(kwargs["folder_path"]).iterdir())
        _FakeApi.calls.append(("upload_folder", kwargs["path_in_repo"], files))

    def upload_file(self, **kwargs):
        _FakeApi.calls.append(
            ("upload_file", kwargs["path_in_repo"], kwargs["path_or_fileobj"].read().decode())
        )


def test_push_to_hub_reuses_saelens_uploader_then_uploads_the_card(monkeypatch):
    import huggingface_hub
    from sae_lens.training import upload_saes_to_huggingface as saelens_upload

    _FakeApi.calls = []
    monkeypatch.setattr(saelens_upload, "HfApi", _FakeApi)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(hub, "HfApi", _FakeApi)
    monkeypatch.setattr(saelens_upload, "create_repo", lambda *a, **k: pytest.fail("repo exists"))
    push_to_hub(
        {"blocks.7.hook_resid_post": _ra_sae()}, REPO, metrics={"blocks.7.hook_resid_post": {"fvu": 0.2}}
    )
    kinds = [c[0] for c in _FakeApi.calls]
    assert kinds == ["repo_info", "upload_folder", "upload_file"]
    assert _FakeApi.calls[1][1] == "blocks.7.hook_resid_post"
    assert _FakeApi.calls[1][2] == ["cfg.json", "sae_weights.safetensors"]
    assert _FakeApi.calls[2][1] == "README.md" and "blocks.7.hook_resid_post" in _FakeApi.calls[2][2]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no SAEs"):
        save_hub_folder({}, tmp_path / "out", REPO)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        save_hub_folder({"x": tmp_path / "empty"}, tmp_path / "out", REPO)
    with pytest.raises(ValueError, match="invalid sae id"):
        save_hub_folder({"../escape": _ra_sae()}, tmp_path / "out", REPO)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        push_to_hub({"x": tmp_path / "empty"}, REPO)  # validated before anything is uploaded
