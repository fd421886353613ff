"""OpenCLIP category embeddings with the tiny registered text tower (real open_clip, no hub)."""

from __future__ import annotations

import pytest
import torch

from taxonomy import Node, Taxonomy
from taxonomy.embeddings import (
    TINY_MODEL,
    CategoryEmbeddings,
    EmbeddingSpec,
    embed_categories,
    encode_prompts,
    load_text_model,
    register_tiny_model,
)

TEMPLATES = ("a photo of a {}.", "a {} in the wild.")


@pytest.fixture
def cats() -> Taxonomy:
    return Taxonomy(
        [
            Node("a", "tabby cat", category_id=3, synonyms=("house cat",)),
            Node("b", "fire truck", category_id=1),
            Node("c", "tabby cat", category_id=2),  # V3Det repeats names: same prompts as #3
            Node("g", "group"),  # not a category: no embedding
        ]
    )


def reference(spec: EmbeddingSpec, texts: list[list[str]]) -> torch.Tensor:
    """Per category: mean of the L2-normalised prompt embeddings, normalised again."""
    model, tokenizer = load_text_model(spec)
    rows = []
    for category_texts in texts:
        prompts = [t.format(x) for x in category_texts for t in spec.templates]
        with torch.no_grad():
            e = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1)
        rows.append(torch.nn.functional.normalize(e.mean(0), dim=0))
    return torch.stack(rows)


def test_embeddings_match_the_prompt_ensemble_reference(cats, caplog):
    spec = EmbeddingSpec(model=TINY_MODEL, templates=TEMPLATES)
    with caplog.at_level("WARNING"):
        result, path = embed_categories(cats, spec, progress=False)
    assert "randomly initialised" in caplog.text and path is None
    assert result.category_ids.tolist() == [1, 2, 3]
    assert result.names == ["fire truck", "tabby cat", "tabby cat"]
    assert result.embeddings.shape == (3, 64)
    torch.testing.assert_close(result.embeddings.norm(dim=1), torch.ones(3))
    expected = reference(spec, [["fire truck"], ["tabby cat"], ["tabby cat"]])
    torch.testing.assert_close(result.embeddings, expected, atol=1e-5, rtol=1e-5)
    # identical prompts are encoded once
    assert result.metadata["num_prompts"] == 6 and result.metadata["num_distinct_prompts"] == 4


def test_synonym_averaging(cats):
    spec = EmbeddingSpec(model=TINY_MODEL, templates=TEMPLATES, use_synonyms=True)
    result, _ = embed_categories(cats, spec, progress=False)
    expected = reference(spec, [["fire truck"], ["tabby cat"], ["tabby cat", "house cat"]])
    torch.testing.assert_close(result.embeddings, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(result.embeddings[1], result.embeddings[2])


def test_cache_file_is_reused_for_the_same_key(cats, tmp_path, monkeypatch):
    spec = EmbeddingSpec(model=TINY_MODEL, templates=TEMPLATES)
    first, path = embed_categories(cats, spec, cache_dir=tmp_path, progress=False)
    assert path.parent == tmp_path and path.name.startswith(TINY_MODEL)
    stamp = path.stat().st_mtime_ns

    def no_model(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr("taxonomy.embeddings.load_text_model", no_model)
    again, same = embed_categories(cats, spec, cache_dir=tmp_path, progress=False)
    assert same == path and path.stat().st_mtime_ns == stamp
    torch.testing.assert_close(again.embeddings, first.embeddings)
    # another template set is another key: computed anew into another file
    monkeypatch.undo()
    other, other_path = embed_categories(
        cats, EmbeddingSpec(model=TINY_MODEL, templates=("{}",)), cache_dir=tmp_path, progress=False
    )
    assert other_path != path and not torch.allclose(other.embeddings, first.embeddings)


def test_output_file_with_other_key_is_recomputed(cats, tmp_path):
    out = tmp_path / "emb.pt"
    embed_categories(
        cats, EmbeddingSpec(model=TINY_MODEL, templates=TEMPLATES), out, progress=False
    )
    changed, _ = embed_categories(
        cats, EmbeddingSpec(model=TINY_MODEL, templates=("{}",)), out, progress=False
    )
    assert CategoryEmbeddings.load(out).metadata["key"]["templates"] == ["{}"]
    torch.testing.assert_close(CategoryEmbeddings.load(out).embeddings, changed.embeddings)


def test_local_checkpoint_round_trip(cats, tmp_path):
    import open_clip

    register_tiny_model()
    torch.manual_seed(123)
    model = open_clip.create_model(TINY_MODEL)  # other weights than the seeded random default
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    spec = EmbeddingSpec(model=TINY_MODEL, checkpoint=str(ckpt), templates=TEMPLATES)
    loaded, _ = embed_categories(cats, spec, progress=False)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    model.eval()
    direct = encode_prompts(
        model,
        tokenizer,
        ["a photo of a fire truck.", "a fire truck in the wild."],
        batch_size=8,
        progress=False,
    )
    expected = torch.nn.functional.normalize(direct.mean(0), dim=0)
    torch.testing.assert_close(loaded.embeddings[0], expected, atol=1e-5, rtol=1e-5)
    random_init, _ = embed_categories(
        cats, EmbeddingSpec(model=TINY_MODEL, templates=TEMPLATES), progress=False
    )
    assert not torch.allclose(loaded.embeddings, random_init.embeddings)
    assert loaded.metadata["key"]["checkpoint_sha256"] is not None


def test_missing_checkpoint_and_bad_templates_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local file"):
        EmbeddingSpec(model=TINY_MODEL, checkpoint="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="exactly one"):
        EmbeddingSpec(model=TINY_MODEL, templates=("no placeholder",))


def test_embedding_file_format_is_checked(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"embeddings": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a vastdet category-embedding file"):
        CategoryEmbeddings.load(path)
