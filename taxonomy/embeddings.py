"""OpenCLIP text embeddings of categories, computed once and cached on disk.

Each category's prompts are its name (and, optionally, synonyms) placed into every template;
each prompt is encoded once even when categories share it (V3Det repeats names), the prompt
embeddings are L2-normalised, averaged per category and normalised again (CLIP's prompt
ensembling). The result file holds `embeddings [N, D]`, `category_ids [N]`, `names` and the
metadata that keys it: model, checkpoint digest, templates, synonym use and a digest of the
category texts. Asking for the same key again reuses the file.

Nothing comes from a model hub: `checkpoint` must be a local file. Without one the text tower is
randomly initialised and the log says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from taxonomy.files import atomic_output, file_sha256, load_data
from taxonomy.tree import Taxonomy

log = logging.getLogger(__name__)

TINY_MODEL = "vastdet-tiny-clip"
_TINY_CONFIG = Path(__file__).parent / "data" / f"{TINY_MODEL}.json"
# The 7-prompt ensemble from CLIP's ImageNet evaluation.
DEFAULT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
FILE_FORMAT = "vastdet.category-embeddings/1"


@dataclass(frozen=True)
class EmbeddingSpec:
    """What determines an embedding file: change any field and the cache key changes."""

    model: str = "ViT-B-32"
    checkpoint: str | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    use_synonyms: bool = False
    batch_size: int = 256
    device: str | None = None  # None: the first accelerator torch sees, else the CPU

    def __post_init__(self) -> None:
        bad = [t for t in self.templates if t.count("{}") != 1]
        if not self.templates or bad:
            raise ValueError(f"each prompt template needs exactly one '{{}}' for the name: {bad}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise FileNotFoundError(
                f"OpenCLIP checkpoint {self.checkpoint!r} is not a local file "
                "(weights are never downloaded: give the path of a saved checkpoint)"
            )


@dataclass
class CategoryEmbeddings:
    """L2-normalised text embeddings, row i for `category_ids[i]`."""

    embeddings: torch.Tensor  # [N, D] float32
    category_ids: torch.Tensor  # [N] int64, ascending
    names: list[str]
    metadata: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary name, then rename)."""
        payload = {"format": FILE_FORMAT, **asdict(self), "metadata": json.dumps(self.metadata)}
        with atomic_output(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CategoryEmbeddings:
        payload = load_data(path)  # tensors, strings and lists, maybe from a user: data only
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a vastdet category-embedding file")
        return cls(
            payload["embeddings"],
            payload["category_ids"],
            list(payload["names"]),
            json.loads(payload["metadata"]),
        )


def register_tiny_model() -> str:
    """Make the tiny test/demo text tower known to open_clip (idempotent); returns its name."""
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_TINY_CONFIG)
    return TINY_MODEL


def category_texts(
    taxonomy: Taxonomy, use_synonyms: bool
) -> tuple[list[int], list[str], list[list[str]]]:
    """(category ids ascending, names, texts to prompt per category)."""
    ids = taxonomy.category_ids().tolist()
    names, texts = [], []
    for cat in ids:
        node = taxonomy.node(taxonomy.node_of_category(cat))
        names.append(node.name)
        texts.append([node.name, *node.synonyms] if use_synonyms else [node.name])
    return ids, names, texts


def cache_key(spec: EmbeddingSpec, ids: list[int], texts: list[list[str]]) -> dict:
    """The metadata that identifies an embedding file (stored in it and compared on reuse)."""
    content = hashlib.sha256(json.dumps([ids, texts], ensure_ascii=False).encode()).hexdigest()
    return {
        "model": spec.model,
        "checkpoint": os.fspath(spec.checkpoint) if spec.checkpoint else None,
        "checkpoint_sha256": file_sha256(spec.checkpoint) if spec.checkpoint else None,
        "templates": list(spec.templates),
        "use_synonyms": spec.use_synonyms,
        "categories_sha256": content,
    }


def default_cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['model']}-{digest}.pt"


def _pick_device(spec: EmbeddingSpec) -> torch.device:
    if spec.device:
        return torch.device(spec.device)
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


class _SaidAlready(logging.Filter):
    """Drops another library's log records that repeat what our own message said."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def load_text_model(spec: EmbeddingSpec):
    """(model, tokenizer) for `spec`, from the local checkpoint or randomly initialised."""
    import open_clip

    register_tiny_model()
    if spec.checkpoint is None:
        log.warning(
            "no OpenCLIP checkpoint given: %s is randomly initialised, so its category "
            "embeddings carry no language knowledge (give a local OpenCLIP file for real ones: `--checkpoint` on `vastdet taxonomy embed`)",
            spec.model,
        )
    quiet = _SaidAlready("No pretrained weights loaded")  # open_clip's own, on the root logger
    logging.getLogger().addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):  # a random tower is the same one every run
            torch.manual_seed(0)
            model = open_clip.create_model(
                spec.model, pretrained=spec.checkpoint, device=_pick_device(spec)
            )
    finally:
        logging.getLogger().removeFilter(quiet)
    model.visual = None  # only the text tower is used
    model.eval()
    return model, open_clip.get_tokenizer(spec.model)


@torch.no_grad()
def encode_prompts(
    model, tokenizer, prompts: list[str], batch_size: int, progress: bool = True
) -> torch.Tensor:
    """L2-normalised text embeddings of `prompts` [P, D] float32, in batches with a progress bar."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=len(prompts), desc="encoding prompts", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size]).to(device)
        out.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
        bar.update(tokens.shape[0])
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, model.text_projection.shape[-1])


TEXTS_PER_PASS = 4096  # distinct texts whose prompts are encoded together


def accumulate_texts(
    model, tokenizer, owners: dict[str, list[int]], rows: int, spec: EmbeddingSpec,
    progress: bool = True,
) -> torch.Tensor:  # fmt: skip
    """[rows, D]: for each row, the sum over its texts and the templates of the L2-normalised
    prompt embeddings. Each distinct text's prompts are encoded once and streamed into the
    rows that hold it, so memory holds the [rows, D] result, not one entry per prompt."""
    from tqdm import tqdm

    texts = list(owners)
    summed = None
    bar = tqdm(
        total=len(texts) * len(spec.templates), desc="encoding prompts", unit="prompt",
        disable=not progress,
    )  # fmt: skip
    with keep_heap_flat():
        for start in range(0, len(texts), TEXTS_PER_PASS):
            chunk = texts[start : start + TEXTS_PER_PASS]
            prompts = [template.format(t) for t in chunk for template in spec.templates]
            encoded = encode_prompts(model, tokenizer, prompts, spec.batch_size, progress=False)
            per_text = encoded.view(len(chunk), len(spec.templates), -1).sum(1)
            if summed is None:
                summed = torch.zeros(rows, per_text.shape[1])
            index = [row for t in chunk for row in owners[t]]
            repeat = torch.tensor([len(owners[t]) for t in chunk])
            summed.index_add_(0, torch.tensor(index), per_text.repeat_interleave(repeat, 0))
            bar.update(len(prompts))
    bar.close()
    return summed if summed is not None else torch.zeros(rows, 0)


@contextmanager
def keep_heap_flat():
    """glibc's allocator raises its mmap threshold to the largest block freed so far, after
    which every batch's activations come from the heap and fragment it: encoding a million
    prompts grew by ~45 KB a prompt. A fixed threshold (which turns the raising off) hands
    large blocks back to the system at once; the default is restored after. No-op off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        yield
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 256 * 1024)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, 128 * 1024)


def embed_categories(
    taxonomy: Taxonomy,
    spec: EmbeddingSpec,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[CategoryEmbeddings, Path | None]:
    """Embed every category; reuse `path` (or the keyed file in `cache_dir`) when its key matches.

    Returns the embeddings and the file they were read from or written to (None if neither
    `path` nor `cache_dir` was given).
    """
    ids, names, texts = category_texts(taxonomy, spec.use_synonyms)
    key = cache_key(spec, ids, texts)
    if path is None and cache_dir is not None:
        path = default_cache_path(cache_dir, key)
    if path is not None and Path(path).is_file():
        cached = CategoryEmbeddings.load(path)
        if cached.metadata.get("key") == key:
            log.info("reusing category embeddings from %s", path)
            return cached, Path(path)
        log.info("%s was computed with other settings; recomputing", path)

    owners: dict[str, list[int]] = {}  # each distinct text, once per time a category has it
    for row, category_texts_ in enumerate(texts):
        for text in category_texts_:
            owners.setdefault(text, []).append(row)
    num_prompts = sum(len(t) for t in texts) * len(spec.templates)
    distinct = len(owners) * len(spec.templates)
    log.info("%d categories, %d prompts, %d distinct", len(ids), num_prompts, distinct)
    model, tokenizer = load_text_model(spec)
    summed = accumulate_texts(model, tokenizer, owners, len(ids), spec, progress)
    result = CategoryEmbeddings(
        embeddings=torch.nn.functional.normalize(summed, dim=-1),
        category_ids=torch.tensor(ids, dtype=torch.int64),
        names=names,
        metadata={
            "key": key,
            "num_prompts": num_prompts,
            "num_distinct_prompts": distinct,
            "random_init": spec.checkpoint is None,
        },
    )
    if path is not None:
        result.save(path)
        log.info("category embeddings written to %s", path)
    return result, Path(path) if path is not None else None
