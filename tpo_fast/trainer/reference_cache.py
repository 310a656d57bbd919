"""The precomputed reference's cache (`TPOConfig(precompute_reference=True)`): what identifies it, and its tables.

The cache file holds one table of reference sequence scores per dataset, keyed by record index: the train
table's {"fingerprint", "index", "scores", "checksum"} at the top level and "eval_tables": {"eval" or
"eval/<key>": the same} for each eval dataset. A table is reused only when its fingerprint matches: the loss settings,
the processor (`processor_identity`) and how its tokenizer encodes (`tokenization_identity`), the reference's weights
(`weights_digest`), their dtypes and its config (`config_digest`), and the dataset's content (`dataset_digest`); and
only while its indices and scores match their `table_checksum`.
`TPOTrainer` scores, stores and reads the tables; this module holds the pieces that need no trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tpo_fast.trainer.data import image_path

logger = logging.getLogger("tpo_fast")

_POSITION_PRIME = 65521  # weights (flat position mod this prime) + 1 of `weights_digest`'s third sum
_DIGEST_CHUNK = 1 << 22  # elements per chunk of the position-weighted sum (bounded temporaries on a GPU)


def _position_weighted_sum(flat: torch.Tensor, start: int) -> torch.Tensor:
    """float64 sum of `flat[j] * ((start + j) mod 65521 + 1)`, in chunks; `start`: flat position of `flat[0]`."""
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for lo in range(0, flat.numel(), _DIGEST_CHUNK):
        chunk = flat[lo : lo + _DIGEST_CHUNK].double()
        positions = torch.arange(start + lo, start + lo + chunk.numel(), dtype=torch.int64, device=flat.device)
        total += (chunk * (positions % _POSITION_PRIME + 1).double()).sum()
    return total


def _partition_start(p: torch.Tensor, local: torch.Tensor) -> int:
    """Flat position of a ZeRO-3 partition's first element in its parameter (rank in the group x partition size)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    return torch.distributed.get_rank(group=getattr(p, "ds_process_group", None)) * local.numel()


def weights_digest(named_parameters) -> str:
    """sha256 of every parameter's name and shape and of three float64 reductions of its values: the sum, the sum
    of squares and a position-weighted sum (element at flat position i weighted by (i mod 65521) + 1).

    What it detects: another set of names or shapes, and any change of values that moves one of the three sums by
    more than fp32 rounding (they are hashed as fp32): a perturbation or an optimizer step that is not negligible
    against the sums, a row or column permutation (the weighted sum sees elements move). What it does not: a change
    that keeps all three sums within fp32 rounding (relative 6e-8), such as an update far below the weights'
    scale, or an exchange of elements a multiple of 65521 positions apart (or of equal values). It is a cheap
    identity check for the reference cache, not a cryptographic hash of the weights. Conversely the same weights
    summed in another order (another device, world size or partitioning) may give another digest: the cache is
    then recomputed, never wrongly reused on that account.

    Sums add up over shards, so under ZeRO-3 each rank reduces its partition (positions offset by the partition's
    start) and an all-reduce gives every rank the same digest. O(parameters) reads, once per cache check.
    """
    names, stats, partitioned, device = [], [], False, None
    for name, p in named_parameters:
        partitioned |= hasattr(p, "ds_tensor")
        local = getattr(p, "ds_tensor", p).detach()
        device = local.device
        start = _partition_start(p, local) if hasattr(p, "ds_tensor") else 0
        names.append(f"{name}:{tuple(getattr(p, 'ds_shape', p.shape))}")
        flat = local.reshape(-1)
        stats.append(torch.stack([flat.double().sum(), flat.double().square().sum(),
                                  _position_weighted_sum(flat, start)]))
    values = torch.stack(stats) if stats else torch.zeros(0, 3, dtype=torch.float64, device=device)
    if partitioned and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    digest = hashlib.sha256("\n".join(names).encode())
    digest.update(values.float().cpu().numpy().tobytes())
    return digest.hexdigest()


# Config fields that do not change the reference's scores: where it was loaded from and with which transformers
# version, what the checkpoint says about itself, how its weights were initialised (the weights digest sees the
# weights) and whether generate() keeps a KV cache.
CONFIG_BOOKKEEPING = ("_name_or_path", "transformers_version", "_commit_hash", "architectures", "initializer_range",
                      "use_cache")


def config_digest(config: Any) -> str:
    """sha256 of a model config's `to_dict()` (as sorted JSON) without the `CONFIG_BOOKKEEPING` fields, at any depth
    (LLaVA's text and vision configs too): the same weights under another config (`vision_feature_layer`, the
    dtype, the RMSNorm epsilon, ...) score otherwise. A model without a config (`None`): the digest of null."""

    def kept(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): kept(v) for k, v in value.items() if k not in CONFIG_BOOKKEEPING}
        if isinstance(value, (list, tuple)):
            return [kept(v) for v in value]
        return value

    fields = None if config is None else kept(config.to_dict() if hasattr(config, "to_dict") else vars(config))
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def leaf_datasets(ds: Any) -> list[Any]:
    """The datasets under `torch.utils.data.Subset` and `ConcatDataset` wrappers, at any depth, each once, in order
    (`[ds]` when there is none): where the corruption settings of the items live."""
    if isinstance(ds, torch.utils.data.Subset):
        return leaf_datasets(ds.dataset)
    if isinstance(ds, torch.utils.data.ConcatDataset):
        leaves: list[Any] = []
        for part in ds.datasets:
            leaves += [leaf for leaf in leaf_datasets(part) if not any(leaf is seen for seen in leaves)]
        return leaves
    return [ds]


def _record_sources(ds: Any) -> list[tuple[Any, int]] | None:
    """(dataset holding the record, its position in that dataset's `records`) of every item of `ds` in order,
    through Subsets and ConcatDatasets; None when a dataset under them has no `records` list."""
    if isinstance(ds, torch.utils.data.Subset):
        inner = _record_sources(ds.dataset)
        return None if inner is None else [inner[int(i)] for i in ds.indices]
    if isinstance(ds, torch.utils.data.ConcatDataset):
        parts = [_record_sources(part) for part in ds.datasets]
        return None if any(part is None for part in parts) else [source for part in parts for source in part]
    records = getattr(ds, "records", None)
    return [(ds, i) for i in range(len(records))] if isinstance(records, list) else None


def _pixels_digest(image: Any) -> str | None:
    """blake2b of a loaded image's pixels with its mode and size (a PIL image), or of an array's values with its
    dtype and shape; None for anything else (no image loaded, or a path)."""
    if image is None or isinstance(image, (str, bytes, os.PathLike)):
        return None
    if hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):  # PIL
        head, data = f"{image.mode}:{tuple(image.size)}", image.tobytes()
    else:
        try:
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        except Exception:  # noqa: BLE001 - not an image we can read: its key alone identifies it
            return None
        if array.dtype == object:
            return None
        head, data = f"{array.dtype}:{array.shape}", np.ascontiguousarray(array).tobytes()
    digest = hashlib.blake2b(head.encode(), digest_size=16)
    digest.update(data)
    return digest.hexdigest()


def dataset_digest(ds: Any) -> str:
    """sha256 of a preference dataset's content, to tell whether a reference cache was scored from it.

    A `PreferenceDataset` (or `Subset`s and `ConcatDataset`s of them, at any depth): per dataset under them its
    image folder's absolute path and, per record in order, the index, the image (the absolute path it opens,
    `data.image_path`: a relative path with no image folder is the working directory's file, so runs from two
    folders are two datasets; or the blake2b digest of inline bytes), prompt, chosen and rejected; an image file
    replaced in place under the same path is not seen (delete the cache). Any other dataset: the same fields of
    every item, `image_key` for the image, and a digest of the pixels of its loaded clean and corrupted images (a
    wrapper's items carry no image folder or corruption settings the fingerprint could read: another image folder
    or another noise is seen in the pixels); that loads every item once (images decoded).

    Raises ValueError when two records share an index: the cache is keyed by index.
    """
    sources = _record_sources(ds)
    digest = hashlib.sha256()
    indices: list[int] = []
    if sources is not None:
        folders = []  # each folder once: parts of one dataset in a ConcatDataset digest as the whole dataset
        for leaf in leaf_datasets(ds):
            folder = getattr(leaf, "image_folder", None)
            folder = None if folder is None else os.path.abspath(os.fspath(folder))
            folders += [] if folder in folders else [folder]
        digest.update(f"records|{folders[0] if len(folders) == 1 else json.dumps(folders)}".encode())
        for leaf, i in sources:
            r = leaf.records[i]
            image = r["image"]
            image_id = "bytes:" + hashlib.blake2b(image, digest_size=16).hexdigest() if isinstance(image, bytes) else (
                f"path:{image_path(image, getattr(leaf, 'image_folder', None))}"
            )
            indices.append(int(r["index"]))
            digest.update(json.dumps([indices[-1], image_id, r["prompt"], r["chosen"], r["rejected"]]).encode())
    else:
        digest.update(b"items")
        for i in range(len(ds)):
            item = ds[i]
            indices.append(int(item["index"]))
            digest.update(json.dumps(
                [indices[-1], str(item.get("image_key")), item["prompt"], item["chosen"], item["rejected"],
                 _pixels_digest(item.get("image")), _pixels_digest(item.get("corrupted_image"))]
            ).encode())
    if len(set(indices)) != len(indices):
        repeated = sorted(i for i, n in Counter(indices).items() if n > 1)
        raise ValueError(
            f"records share the index values {repeated[:10]}: with precompute_reference=True the reference cache is "
            "keyed by each record's 'index', which must be unique within a dataset: list each record once (a Subset "
            "or ConcatDataset may repeat one), and drop the 'index' keys of hand-built records whose indices repeat "
            "to number them by position"
        )
    return digest.hexdigest()


def processor_identity(processor: Any) -> dict[str, Any]:
    """What identifies a processor for the reference cache: its class, the tokenizer's name_or_path, length and a
    digest of its vocabulary, and a digest of the image processor's settings."""
    tokenizer = getattr(processor, "tokenizer", processor)
    identity: dict[str, Any] = {"class": None if processor is None else type(processor).__name__}
    if tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
        identity.update(
            tokenizer=type(tokenizer).__name__, name_or_path=str(getattr(tokenizer, "name_or_path", "")),
            vocab_size=len(tokenizer), vocab=hashlib.sha256(vocab.encode()).hexdigest(),
        )
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and hasattr(image_processor, "to_json_string"):
        identity["image_processor"] = hashlib.sha256(image_processor.to_json_string().encode()).hexdigest()
    return identity


# Tokenizer attributes that change how a text is split or which special tokens frame it, where a tokenizer has them
# (slow / SentencePiece ones keep them as attributes; a fast one's are in its serialized backend as well).
TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "do_lower_case")


def tokenization_identity(tokenizer: Any) -> dict[str, Any]:
    """What makes tokenizers with the same class, name and vocabulary (`processor_identity`) encode a row otherwise:
    the bos and eos token ids (the collator ends every response with the eos token), the flags of `TOKENIZER_FLAGS`
    a tokenizer has, and a digest of its whole serialized pipeline (a fast tokenizer's normalizer, pre-tokenizer,
    post-processor that adds a bos token, added tokens) or of a SentencePiece model. {} without a tokenizer."""
    if tokenizer is None:
        return {}
    identity: dict[str, Any] = {"bos_token_id": getattr(tokenizer, "bos_token_id", None),
                                "eos_token_id": getattr(tokenizer, "eos_token_id", None)}
    for flag in TOKENIZER_FLAGS:
        value = getattr(tokenizer, flag, None)
        if isinstance(value, (bool, int, str)):
            identity[flag] = value
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        identity["backend"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    sp_model = getattr(tokenizer, "sp_model", None)
    if sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
        identity["sentencepiece"] = hashlib.sha256(sp_model.serialized_model_proto()).hexdigest()
    return identity


def table_checksum(entry: dict[str, Any]) -> str:
    """sha256 of a table's record indices and scores (their dtype, shape and bytes): what `write_reference_cache`
    stores beside them and `read_reference_cache` checks, so that a file whose bytes changed after it was written
    is not read as scores."""
    digest = hashlib.sha256()
    for key in ("index", "scores"):
        value = entry[key].detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ScoreTable:
    """A cache entry's scores by record index: `index` (R,) int64 sorted ascending, `scores` (R, K) float64 in that
    order. Only the indices present are held, so a record index as large as a corpus id (3e9) costs one row."""

    index: torch.Tensor
    scores: torch.Tensor


def score_table(entry: dict[str, torch.Tensor]) -> ScoreTable:
    """A cache entry's `ScoreTable`: its rows sorted by record index (with the indices 0..R-1 the row of index i is
    row i, as the dense table of earlier versions had it)."""
    index, order = torch.sort(entry["index"].to(torch.int64))
    return ScoreTable(index=index, scores=entry["scores"].double()[order])


def lookup_scores(table: ScoreTable, index: torch.Tensor, name: str, path: str) -> torch.Tensor:
    """The (B, K) rows of `table` for record indices `index`, or a ValueError naming the records it lacks."""
    index = index.to(torch.int64)
    rows = torch.full((index.numel(), table.scores.shape[1]), math.nan, dtype=torch.float64)
    if table.index.numel():
        position = torch.searchsorted(table.index, index).clamp(max=table.index.numel() - 1)
        found = table.index[position] == index
        rows[found] = table.scores[position[found]]
    missing = torch.isnan(rows).any(1)
    if missing.any():
        raise ValueError(
            f"records {index[missing].tolist()} are not in the reference cache's {name!r} table ({path}, "
            f"{int((~torch.isnan(table.scores).any(1)).sum())} records scored at TPOTrainer init): with "
            "precompute_reference=True every dataset trained or evaluated on must be given to TPOTrainer "
            "(train_dataset=..., eval_dataset=... or a dict of them) and keep its records; delete the cache file "
            "to recompute it"
        )
    return rows


def read_reference_cache(path: str) -> dict[str, dict[str, Any]]:
    """The tables of a cache file by name ({} without a file): the train table at the top level, as a cache with
    only a train set always had it, and the eval datasets' under "eval_tables".

    A file that cannot be read as a cache (empty, truncated by a run killed while writing it before writes were
    atomic, or not a cache at all) is treated as absent, with a warning naming it: every table is recomputed and
    the file replaced. A table whose indices or scores do not match the checksum written with them (bytes changed
    on disk or in a copy; torch.load checks no checksum) is left out with a warning, and recomputed; a table
    written before checksums were (none stored) is read as it is."""
    if not os.path.exists(path):
        return {}
    try:
        cached = torch.load(path, weights_only=True)
        if not isinstance(cached, dict):
            raise TypeError(f"holds a {type(cached).__name__}, not a dict of tables")
        tables = dict(cached.get("eval_tables", {}))
        if "fingerprint" in cached:
            tables["train"] = {key: cached[key] for key in ("fingerprint", "index", "scores", "checksum")
                               if key in cached}
        sums = {name: table_checksum(entry) for name, entry in tables.items() if "checksum" in entry}
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, the remedy is the same: score again
        logger.warning("reference cache %s cannot be read (%s: %s); ignoring it and recomputing every table",
                       path, type(e).__name__, e)
        return {}
    for name, checksum in sums.items():
        if tables[name]["checksum"] != checksum:
            logger.warning("reference cache %s: the %s table's scores do not match the checksum written with them "
                           "(the file changed after it was written); recomputing it", path, name)
            del tables[name]
    return tables


def write_reference_cache(path: str, tables: dict[str, dict[str, Any]]) -> None:
    """Write the tables (a "train" one and any eval ones), each with its `table_checksum`, to `path` as
    `read_reference_cache` reads them, atomically:
    into a temporary file in the same folder, then renamed over `path`, so a run killed while writing leaves the
    previous file (or none), never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tables = {name: {**entry, "checksum": table_checksum(entry)} for name, entry in tables.items()}
    evals = {name: entry for name, entry in tables.items() if name != "train"}
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        torch.save({**tables["train"], "eval_tables": evals}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
