"""OpenCLIP category embeddings with the tiny registered text tower (real open_clip, no hub)."""

from __future__ import annotations

import os

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


PEAK_SCRIPT = """
import sys, resource
from taxonomy import Node, Taxonomy
from taxonomy.embeddings import TINY_MODEL, EmbeddingSpec, embed_categories
n = int(sys.argv[1])
nodes = [Node("r", "root")]
nodes += [Node(f"x{k}", f"thing {k} kind {k * 7919 % 100003}", ("r",), k + 1) for k in range(n)]
tax = Taxonomy(nodes)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
spec = EmbeddingSpec(model=TINY_MODEL, templates=("a photo of a {}.", "art of the {}."))
embed_categories(tax, spec, sys.argv[2], progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_embedding_memory_does_not_grow_with_the_number_of_prompts(tmp_path):
    """Measured in fresh processes: 2,800 more prompts may cost their result rows and names,
    not the ~45 KB a prompt that encoding them all at once with glibc's moving mmap threshold
    cost (a million prompts did not fit in 18 GB)."""
    import subprocess
    import sys

    grown = {}
    for n in (600, 2000):
        done = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(n), str(tmp_path / f"{n}.pt")],
            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        grown[n] = int(done.stdout.split()[-1]) * 1024  # ru_maxrss is in KB
    per_prompt = (grown[2000] - grown[600]) / (2 * 1400)
    assert per_prompt < 4096, f"{per_prompt:.0f} bytes a prompt"


def test_shared_names_are_encoded_once_and_count_for_every_category_that_has_them():
    from taxonomy.embeddings import TINY_MODEL, EmbeddingSpec, embed_categories, load_text_model

    nodes = [Node("r", "root"), Node("a", "yawl", ("r",), 1), Node("b", "yawl", ("r",), 2)]
    nodes.append(Node("c", "sloop", ("r",), 3, synonyms=("yawl",)))
    tax = Taxonomy(nodes)
    spec = EmbeddingSpec(model=TINY_MODEL, templates=("a {}.", "the {}."), use_synonyms=True)
    result, _ = embed_categories(tax, spec, progress=False)
    assert result.metadata["num_prompts"] == 8 and result.metadata["num_distinct_prompts"] == 4
    model, tokenizer = load_text_model(spec)
    with torch.no_grad():

        def prompt(text):  # noqa: E306
            return torch.nn.functional.normalize(model.encode_text(tokenizer([text])), dim=-1)[0]

        yawl = prompt("a yawl.") + prompt("the yawl.")
        sloop = prompt("a sloop.") + prompt("the sloop.")
    expected = torch.nn.functional.normalize(torch.stack([yawl, yawl, sloop + yawl]), dim=-1)
    torch.testing.assert_close(result.embeddings, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_openclip_files_as_downloaded_load_and_give_that_models_embeddings(tmp_path):
    """The two files an OpenCLIP model's page offers, `open_clip_pytorch_model.bin` and
    `open_clip_model.safetensors`, written by open_clip's own `save_for_hf` from a randomly
    initialised model of a config open_clip ships; each loads as `--checkpoint` and gives the
    text embeddings that model gives."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_for_hf

    from taxonomy.embeddings import EmbeddingSpec, embed_categories

    class NoTokenizerFiles:  # open_clip's own BPE tokenizer ships in the package
        def save_pretrained(self, directory):
            pass

    name = "ViT-S-32-alt"
    torch.manual_seed(1)
    model = open_clip.create_model(name, pretrained=None).eval()
    save_for_hf(model, NoTokenizerFiles(), open_clip.get_model_config(name), tmp_path)
    tax = Taxonomy([Node("r", "root"), Node("a", "yawl", ("r",), 1), Node("b", "sloop", ("r",), 2)])
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        text = tokenizer(["a photo of a yawl.", "a photo of a sloop."])
        expected = torch.nn.functional.normalize(model.encode_text(text).float(), dim=-1)
    for file in (HF_WEIGHTS_NAME, HF_SAFE_WEIGHTS_NAME):
        spec = EmbeddingSpec(
            model=name, checkpoint=str(tmp_path / file), templates=("a photo of a {}.",)
        )
        result, _ = embed_categories(tax, spec, progress=False)
        torch.testing.assert_close(result.embeddings, expected, atol=1e-5, rtol=1e-5)
        assert result.metadata["random_init"] is False
