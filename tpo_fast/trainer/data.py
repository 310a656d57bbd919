"""Preference records (RLHF-V / RLAIF-V / POVID shape) from JSON, JSONL or parquet.

A record holds an image (a path relative to an image folder, or inline bytes as in the RLAIF-V
parquet files), a prompt, a chosen and a rejected response. Records that cannot be used are
found when the data is loaded, reported with their index, and skipped or rejected as the user
chooses (`on_bad="skip" | "error"`), so an epoch never dies half-way on a bad file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from tpo_fast.trainer.corruption import NUM_DIFFUSION_STEPS, OVERFLOW_MODES, add_diffusion_noise, example_seed, is_int

logger = logging.getLogger("tpo_fast")

IMAGE_KEYS = ("image", "image_path", "img_path", "images")
PROMPT_KEYS = ("prompt", "question", "query")
IMAGE_PLACEHOLDER = "<image>"  # LLaVA's image token as written in text; the prompt template places the image
CHOSEN_KEYS = ("chosen",)
REJECTED_KEYS = ("rejected",)
BAD_RECORD_MODES = ("skip", "error")
RECORD_FIELDS = ("image", "prompt", "chosen", "rejected")


@dataclass(frozen=True)
class BadRecord:
    """One record that was left out: its 0-based position in the file and why."""

    index: int
    reason: str


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read raw records from a `.json` (a list of objects), `.jsonl` or `.parquet` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark (Windows editors) is not text
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    # Kept as a record so that it is reported with its index like any other bad one.
                    records.append({"__error__": f"line {line_no + 1} is not valid JSON ({e.msg})"})
        return records
    if suffix == ".json":
        with open(path, encoding="utf-8-sig") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); a .json preference "
                    "file holds one list of records (use .jsonl for one record per line)"
                ) from e
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json preference file must hold a list of records, got {type(data).__name__}")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported preference file type {suffix!r}; use .json, .jsonl or .parquet")


def _first(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    return None


def _content_text(content: Any) -> str | None:
    """A message's content as text: a string as is, or a TRL / HF list of typed parts.

    In a list of parts the `{"type": "text", "text": ...}` parts are joined with a space (as LLaVA-1.5's chat
    template does) and `{"type": "image"}` parts are dropped: the record's one image is placed by the collator's
    prompt template, which is also what becomes of an image placeholder written in a string prompt. None when the
    content is neither, or a part is not one of those two types, or the parts hold no text.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if not isinstance(part, dict):
            return None
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind != "image":
            return None
    return " ".join(t.strip() for t in texts) if texts else None


def _as_text(value: Any) -> str | None:
    # Chat lists (RLHF-V, TRL conversational): [{"role": ..., "content": ...}]; keep the last message's content.
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        value = value[-1]["content"]
    return _content_text(value)


def _text_field(record: dict[str, Any], keys: tuple[str, ...], name: str) -> tuple[str | None, str | None]:
    """(text, None), or (None, why): a missing field and a field of the wrong type are told apart."""
    value = _first(record, keys)
    where = f"one of {list(keys)}" if len(keys) > 1 else repr(keys[0])
    if value is None:
        return None, f"missing {name} ({where})"
    text = _as_text(value)
    if text is None:
        return None, (
            f"{name} ({where}) must be a string or a chat list of {{'role', 'content'}} messages whose last "
            f"content is a string or a list of {{'type': 'text', 'text': ...}} / {{'type': 'image'}} parts with some "
            f"text, got {_describe(value)}"
        )
    return text, None


def _chat_turn_problem(value: Any, name: str) -> str | None:
    """Why a chat-list prompt or response cannot be reduced to its last message, or None (a string, or a chat whose
    other messages hold no text). Only the last message's content is kept, and the prompt template holds one user
    turn: a system message or earlier turns of a prompt would be dropped without a word, and a prompt that ends
    with the assistant's message (or a response with the user's) has its roles the wrong way round."""
    if not (isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]):
        return None
    role = value[-1].get("role")
    if name == "prompt" and role == "assistant":
        return "prompt: its last message is the assistant's, not the user's question"
    if name != "prompt" and role in ("user", "system"):
        return f"{name}: its last message is the {role}'s, not the assistant's answer"
    if name != "prompt":
        return None  # a response's earlier messages (TRL's implicit prompt) repeat the prompt
    dropped = [
        i for i, m in enumerate(value[:-1])
        if not isinstance(m, dict) or (_content_text(m.get("content")) or "").strip()
    ]
    if dropped:
        return (
            f"prompt: a conversation of {len(value)} messages (roles {[_role(m) for m in value]}) of which only the "
            f"last is kept: the text of message(s) {dropped} would be dropped, as the prompt template holds one user "
            "turn; write a system text or earlier turns into that one message"
        )
    return None


def _role(message: Any) -> str:
    return str(message.get("role", "?")) if isinstance(message, dict) else type(message).__name__


def _describe(value: Any) -> str:
    """A short description of a bad field value for an error message (its type, and a chat list's last content)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return f"a chat list whose last content is {value[-1]['content']!r:.120}"
    return f"{type(value).__name__} {value!r:.120}"


def _image_source(value: Any) -> str | bytes | None:
    if isinstance(value, list):  # TRL-style "images": [one image]
        if len(value) != 1:
            return None
        value = value[0]
    if isinstance(value, dict):  # parquet image struct {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        return value
    return None


def image_path(source: str | os.PathLike, image_folder: str | os.PathLike | None) -> Path:
    """The absolute path (symbolic links resolved) of the file an image path opens: relative to `image_folder`
    unless absolute, and a relative path without a folder (or a relative folder) relative to the working directory.
    What identifies an image file in the corrupted-image cache and in the reference cache's dataset digest."""
    path = Path(source)
    if image_folder is not None and not path.is_absolute():
        path = Path(image_folder) / path
    return path.resolve()


def open_image(source: str | bytes, image_folder: str | os.PathLike | None) -> Image.Image:
    """Open an image from a path (relative to `image_folder` unless absolute) or inline bytes, as RGB."""
    if isinstance(source, bytes):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(image_path(source, image_folder))
    image.load()
    return _to_rgb(image)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# How `open_image` decodes: part of the corrupted-image cache's entry names, raised when a decoding change would
# change a corrupted image (2: 16-bit greyscale scaled to 8 bits, no longer clipped at 255)
DECODE_VERSION = 2


def _to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. PIL's `convert("RGB")` clips a 16-bit greyscale image (a 16-bit PNG or TIFF) at 255
    instead of scaling it: every pixel above 255 of 65535 became white. Such an image is scaled to 8 bits
    (65535 -> 255) as a viewer shows it; a 32-bit integer image ("I") too where its values fit 16 bits and some
    exceed 255 (a 16-bit file opened as "I")."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        import numpy as np

        values = np.asarray(image).astype(np.int64)
        if image.mode == "I" and (values.size == 0 or values.max() <= 255 or values.min() < 0 or values.max() > 65535):
            return image.convert("RGB")
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def validate_record(
    record: Any, image_folder: str | os.PathLike | None, check_images: bool = True
) -> tuple[dict[str, Any] | None, str | None]:
    """Normalise one raw record to `{"image", "prompt", "chosen", "rejected"}` or say why it is unusable."""
    if not isinstance(record, dict):
        return None, f"not an object but {type(record).__name__}"
    if "__error__" in record:
        return None, record["__error__"]
    given = _first(record, IMAGE_KEYS)
    if isinstance(given, list) and len(given) > 1:
        return None, f"{len(given)} images; a preference pair has one image (TPO corrupts that one)"
    image = _image_source(given)
    if image is None:
        return None, f"missing image (one of {list(IMAGE_KEYS)})"
    prompt, why = _text_field(record, PROMPT_KEYS, "prompt")
    if prompt is None:
        return None, why
    why = _chat_turn_problem(_first(record, PROMPT_KEYS), "prompt")
    if why is not None:
        return None, why
    fields = {"image": image, "prompt": prompt}
    for name, keys in (("chosen", CHOSEN_KEYS), ("rejected", REJECTED_KEYS)):
        text, why = _text_field(record, keys, f"{name} response")
        if text is None:
            return None, why
        if not text.strip():
            return None, f"empty {name} response"
        why = _chat_turn_problem(_first(record, keys), f"{name} response")
        if why is not None:
            return None, why
        if IMAGE_PLACEHOLDER in text:
            return None, (f"the {name} response holds the image placeholder {IMAGE_PLACEHOLDER!r}: the image goes "
                          "before the prompt, never inside a response")
        fields[name] = text
    if check_images:
        try:
            open_image(image, image_folder)
        except Exception as e:  # noqa: BLE001 - any decoder error means the same: unusable image
            where = "inline bytes" if isinstance(image, bytes) else repr(image)
            return None, f"unreadable image {where}: {type(e).__name__}: {e}"
    return fields, None


def load_preference_records(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    on_bad: str = "skip",
    check_images: bool = True,
) -> tuple[list[dict[str, Any]], list[BadRecord]]:
    """Load and validate preference records.

    Args:
        path: a `.json`, `.jsonl` or `.parquet` file of records with an image, a prompt (or
            question), a chosen and a rejected response.
        image_folder: folder that relative image paths are resolved against.
        on_bad: "skip" leaves bad records out with a warning naming their indices; "error" raises
            one `ValueError` listing every bad record.
        check_images: open every image now (decoding it) so that unreadable files are found
            before training rather than mid-epoch.

    Returns:
        (records, bad): the usable records, each with its original file index under "index", and
        the bad ones as `BadRecord(index, reason)`.
    """
    if on_bad not in BAD_RECORD_MODES:
        raise ValueError(f"on_bad must be one of {BAD_RECORD_MODES}, got {on_bad!r}")
    records, bad = [], []
    for index, raw in enumerate(read_records(path)):
        fields, reason = validate_record(raw, image_folder, check_images)
        if fields is None:
            bad.append(BadRecord(index, reason))
        else:
            fields["index"] = index
            records.append(fields)
    if bad:
        listing = "; ".join(f"#{b.index}: {b.reason}" for b in bad[:20])
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        if on_bad == "error":
            raise ValueError(
                f"{path}: {len(bad)} bad preference record(s): {listing}{more}. "
                "Fix them or pass on_bad='skip' (CLI: --bad-records skip) to leave them out."
            )
        logger.warning("%s: skipped %d bad preference record(s): %s%s", path, len(bad), listing, more)
    if not records:
        raise ValueError(f"{path}: no usable preference records ({len(bad)} bad)")
    same = [r["index"] for r in records if r["chosen"].strip() == r["rejected"].strip()]
    if same:
        listing = ", ".join(f"#{i}" for i in same[:20]) + (f" (and {len(same) - 20} more)" if len(same) > 20 else "")
        logger.warning(
            "%s: %d preference record(s) have the same chosen and rejected response (up to the whitespace at their "
            "ends, which the collator strips): %s. Such a pair carries no preference: its DPO / TPO loss is a "
            "constant (log 2 for the sigmoid loss) with zero gradient, and it never counts as a right pair in the "
            "reward accuracy (POVID still trains its chosen response against the noisy "
            "image)", path, len(same), listing,
        )
    return records, bad


def check_noise_options(noise_step: Any, noise_seed: Any, overflow: Any) -> None:
    """Raise ValueError unless `noise_step` is an int in [0, 999], `noise_seed` an int or None and `overflow`
    one of "wrap", "clamp"; the message says what to pass."""
    if not is_int(noise_step) or not 0 <= noise_step < NUM_DIFFUSION_STEPS:
        raise ValueError(
            f"noise_step must be an int in [0, {NUM_DIFFUSION_STEPS - 1}] (the diffusion step of the image "
            f"corruption; the paper uses 500), got {noise_step!r}"
        )
    if noise_seed is not None and not is_int(noise_seed):
        raise ValueError(f"noise_seed must be an int, or None for fresh noise on every load, got {noise_seed!r}")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(
            f"overflow must be one of {OVERFLOW_MODES} ('wrap': the official code's modulo 256, 'clamp': to "
            f"[0, 255]), got {overflow!r}"
        )


def _indexed_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` with every one checked for the normalised fields, and a record without "index" given its
    position (a copy; the caller's dicts are not changed)."""
    out = []
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {position} is a {type(record).__name__}, not a dict")
        missing = [k for k in RECORD_FIELDS if k not in record]
        if missing:
            raise ValueError(
                f"record {position} lacks {missing}: PreferenceDataset takes normalised records "
                f"({list(RECORD_FIELDS)} and optionally 'index'); load raw files with PreferenceDataset.from_file "
                "or load_preference_records"
            )
        if "index" not in record:
            record = {**record, "index": position}
        index = record["index"]
        if not is_int(index) or index < 0:
            raise ValueError(
                f"record {position} has index {index!r}; an index must be an int >= 0 (leave it out to number "
                "the records by position)"
            )
        out.append(record)
    return out


class PreferenceDataset(Dataset):
    """Preference pairs with their clean and corrupted images.

    `records` are normalised records, as `load_preference_records` returns them: dicts with `image` (a path
    relative to `image_folder`, an absolute path, or inline bytes), `prompt`, `chosen`, `rejected` and `index`
    (the record's position in its source file; it keys the reference cache, so it must be unique). A record
    without `index` gets its position in `records`. Raw file records (`question`, chat lists, ...) go through
    `load_preference_records` or `PreferenceDataset.from_file` first.

    Each item is a dict: `index`, `image_key` (identifies the image, so the collator encodes a shared image
    once), `image` and `corrupted_image` (PIL), `prompt`, `chosen`, `rejected`.

    Corruption (docs/math.md): diffusion noise at `noise_step` (0 to 999, default 500), pixels past [0, 255]
    handled by `overflow` ("wrap", the official code's, or "clamp"). With `noise_seed` set (the default 0) the
    noise of each image is seeded from the seed and the image's key, so a rerun, another rank or a resumed run
    sees the same corrupted image, and a cached reference is exact; `noise_seed=None` draws fresh noise on every
    load, as the official code does. `corrupted_cache_dir` stores the corrupted images as PNG (lossless) on
    first use; it needs a seeded noise. A cache entry is named after the noise (seed, step, overflow) and the
    image file itself (its absolute path, size and modification time; the content digest of inline bytes), so
    two data sets sharing a cache folder never share an entry for different images, and an image replaced in
    place gets a new entry. A cache that cannot be read or written (a damaged entry, a read-only folder) never
    drops a record: its corrupted image is computed from the seeded noise, with one warning naming the folder.
    """

    def __init__(
        self,
        records: list[dict[str, Any]],
        image_folder: str | os.PathLike | None = None,
        *,
        noise_step: int = 500,
        noise_seed: int | None = 0,
        overflow: str = "wrap",
        corrupted_cache_dir: str | os.PathLike | None = None,
        on_bad: str = "skip",
    ):
        check_noise_options(noise_step, noise_seed, overflow)
        if corrupted_cache_dir is not None and noise_seed is None:
            raise ValueError(
                "corrupted_cache_dir needs a seeded noise (noise_seed not None): fresh noise cannot be cached"
            )
        if on_bad not in BAD_RECORD_MODES:
            raise ValueError(f"on_bad must be one of {BAD_RECORD_MODES}, got {on_bad!r}")
        self.records = _indexed_records(records)
        self.image_folder = image_folder
        self.noise_step = noise_step
        self.noise_seed = noise_seed
        self.overflow = overflow
        self.corrupted_cache_dir = None if corrupted_cache_dir is None else Path(corrupted_cache_dir)
        self.on_bad = on_bad
        if self.corrupted_cache_dir is not None:
            self.corrupted_cache_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike, image_folder: str | os.PathLike | None = None, **kwargs):
        """Load, validate (see `load_preference_records`) and wrap a preference file."""
        records, _ = load_preference_records(path, image_folder, on_bad=kwargs.get("on_bad", "skip"))
        return cls(records, image_folder, **kwargs)

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def _key(record: dict[str, Any]) -> str:
        image = record["image"]
        if isinstance(image, bytes):
            return "bytes:" + hashlib.blake2b(image, digest_size=16).hexdigest()
        return str(image)

    def _source_id(self, source: str | bytes) -> str:
        """What identifies an image file in the corrupted-image cache: the digest of inline bytes, or the
        absolute path of the file with its size and modification time (a file replaced in place is another)."""
        if isinstance(source, bytes):
            return "bytes:" + hashlib.blake2b(source, digest_size=16).hexdigest()
        path = image_path(source, self.image_folder)
        stat = path.stat()
        return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"

    def corrupt(self, image: Image.Image, key: str, source: str | bytes | None = None) -> Image.Image:
        """The corrupted image for `key`, from the cache when there is one.

        `source` (the record's image: a path or inline bytes; default `key`) names the image file in the cache.
        """
        seed = None if self.noise_seed is None else example_seed(self.noise_seed, key)
        cache = None
        if self.corrupted_cache_dir is not None:
            # DECODE_VERSION: entries written before 16-bit images were scaled (not clipped) by `open_image` are
            # another name, so a cache filled then is never read for them
            source_id = f"{DECODE_VERSION}:{self._source_id(key if source is None else source)}"
            file_id = hashlib.blake2b(source_id.encode(), digest_size=8)
            name = f"{seed:016x}_{file_id.hexdigest()}_t{self.noise_step}_{self.overflow}.png"
            cache = self.corrupted_cache_dir / name
            try:
                if cache.exists():
                    return Image.open(cache).convert("RGB")
            except Exception as e:  # noqa: BLE001 - a damaged entry: computed again (and rewritten) below
                self._cache_failed(cache, "read", e)
        corrupted = add_diffusion_noise(image, self.noise_step, seed=seed, overflow=self.overflow)
        if cache is not None:
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            try:
                corrupted.save(tmp, format="PNG")
                os.replace(tmp, cache)  # atomic, so concurrent ranks never read half a file
            except Exception as e:  # noqa: BLE001 - a read-only or full folder: the noise is seeded, use it uncached
                self._cache_failed(cache, "write", e)
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
        return corrupted

    def _cache_failed(self, entry: Path, action: str, error: Exception) -> None:
        """Warn, once per dataset (and process), that the corrupted-image cache failed: the record keeps its
        corrupted image, computed from its seeded noise (the same image the cache would hold), never replaced."""
        if getattr(self, "_warned_cache", False):
            return
        self._warned_cache = True
        logger.warning(
            "corrupted-image cache %s: cannot %s %s (%s: %s); corrupted images are computed from their seeded noise "
            "instead (the same images; warned once)", self.corrupted_cache_dir, action, entry.name,
            type(error).__name__, error,
        )

    def _load(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        key = self._key(record)
        image = open_image(record["image"], self.image_folder)
        return {
            "index": record["index"],
            "image_key": key,
            # Pairs share one image slot when they load the same file (the absolute source, not the name as
            # written: two data sets may each have a "0000.png") with the same noise. Fresh noise makes every
            # load distinct: nothing to share with another pair.
            "dedupe_key": (self._source_id(record["image"]), key, self.noise_seed, self.noise_step, self.overflow)
            if self.noise_seed is not None else None,
            "image": image,
            "corrupted_image": self.corrupt(image, key, record["image"]),
            "prompt": record["prompt"],
            "chosen": record["chosen"],
            "rejected": record["rejected"],
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self._load(i)
        except Exception as e:  # noqa: BLE001
            # Files validated at load time can still vanish or break during a long run.
            if self.on_bad == "error":
                raise RuntimeError(f"preference record #{self.records[i]['index']} failed to load: {e}") from e
            for step in range(1, len(self.records)):
                j = (i + step) % len(self.records)
                try:
                    item = self._load(j)
                except Exception:  # noqa: BLE001
                    continue
                logger.warning(
                    "preference record #%d failed to load (%s: %s); used record #%d in its place",
                    self.records[i]["index"], type(e).__name__, e, item["index"],
                )
                return item
            raise RuntimeError(
                f"no preference record can be loaded any more: #{self.records[i]['index']} failed with "
                f"{type(e).__name__}: {e}, and so did every other record"
            ) from e
