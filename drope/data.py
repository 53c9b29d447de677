"""Local training data for recalibration: files -> token ids -> fixed-length chunks or packed documents.

Supported files (a directory stands for the supported files inside it, sorted by name):

=========  ==========================================================================================
``.txt``   one document per file, tokenized with the model's tokenizer
``.jsonl`` one document per line, the string in field ``text_field`` (default ``"text"``), tokenized
``.npy``   integer token ids: a 1-D array is one document, a 2-D array one document per row
``.bin``   raw integer token ids, one document (``bin_dtype``, default uint16 as nanoGPT writes them)
=========  ==========================================================================================

Two ways to cut documents into training examples at the training context length ``seq_len``:

- :func:`chunk_documents` concatenates every document (EOS between them when the tokenizer has one)
  and cuts the stream into rows of exactly ``seq_len`` tokens; attention crosses document borders.
- :func:`pack_documents` keeps documents apart: each example is a list of whole documents (long ones
  split into ``seq_len`` pieces) holding at most ``seq_len`` tokens; :class:`PackedCollator` flattens a
  batch into one row with ``cu_seq_lens_q``/``cu_seq_lens_k`` (transformers'
  ``DataCollatorWithFlattening``), so attention never crosses a document border.

Pure numpy/PyTorch plus the tokenizer; no Triton.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIXES = (".npy", ".bin")
SUFFIXES = TEXT_SUFFIXES + TOKEN_SUFFIXES

PathLike = Union[str, os.PathLike]
# token ids are held as int32 (4 bytes a token: a billion-token corpus fits in 4 GB); batches are int64
TOKEN_DTYPE = np.int32


def resolve_data_files(paths: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Expand files and directories into the list of data files to read.

    Args:
        paths: one path or a sequence of paths; a directory contributes its files with a supported
            suffix (``.txt``, ``.jsonl``, ``.npy``, ``.bin``), sorted by name, not recursively.

    Returns:
        The data files, in the order given.

    Raises:
        ValueError: a path that does not exist, a file with an unsupported suffix, or no data file at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: List[Path] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ValueError(f"data path {str(path)!r} does not exist")
        if path.is_dir():
            files.extend(sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES))
            continue
        if path.suffix.lower() not in SUFFIXES:
            raise ValueError(f"data file {str(path)!r} has an unsupported type {path.suffix!r}; accepted: {', '.join(SUFFIXES)}")
        files.append(path)
    if not files:
        raise ValueError(f"no data files found in {[str(p) for p in paths]}; accepted types: {', '.join(SUFFIXES)}")
    return files


def _tokenize(tokenizer, text: str, add_eos: bool) -> np.ndarray:
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids = list(ids) + [eos]
    return np.asarray(ids, dtype=TOKEN_DTYPE)


def _read_jsonl(path: Path, text_field: str) -> Iterable[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{lineno} has no string field {text_field!r}; each line must be a JSON object with it")
            yield record[text_field]


def _int_array(path: Path, arr: np.ndarray) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token file {str(path)!r} holds {arr.dtype} values; token ids must be integers")
    if arr.size and arr.min() < 0:
        raise ValueError(f"token file {str(path)!r} holds negative token ids (min {int(arr.min())})")
    if arr.size and arr.max() > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError(f"token file {str(path)!r} holds token id {int(arr.max())}, beyond any vocabulary (> 2**31 - 1)")
    return arr.astype(TOKEN_DTYPE)


def load_documents(paths: Union[PathLike, Sequence[PathLike]], tokenizer=None, *, text_field: str = "text",
                   bin_dtype: Union[str, np.dtype] = "uint16", add_eos: bool = True,
                   vocab_size: Optional[int] = None) -> List[np.ndarray]:
    """Read local data files into documents of token ids.

    Args:
        paths: files or directories (see the module docstring for the accepted types).
        tokenizer: a Hugging Face tokenizer; required for ``.txt`` and ``.jsonl`` files.
        text_field: the JSON field holding the text in ``.jsonl`` files.
        bin_dtype: the integer dtype of raw ``.bin`` token files.
        add_eos: append the tokenizer's EOS token to every tokenized document (when it has one).
        vocab_size: when given, every token id must be below it.

    Returns:
        A list of 1-D int32 numpy arrays, one per document, empty documents left out.

    Raises:
        ValueError: see :func:`resolve_data_files`; a text file without a tokenizer; a malformed
            ``.jsonl`` line; non-integer, negative or out-of-vocabulary token ids; no tokens at all.
    """
    files = resolve_data_files(paths)
    docs: List[np.ndarray] = []
    for path in files:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES and tokenizer is None:
            raise ValueError(f"data file {str(path)!r} is text: a tokenizer is needed to tokenize it")
        if suffix == ".txt":
            docs.append(_tokenize(tokenizer, path.read_text(encoding="utf-8"), add_eos))
        elif suffix == ".jsonl":
            docs.extend(_tokenize(tokenizer, text, add_eos) for text in _read_jsonl(path, text_field))
        elif suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.ndim not in (1, 2):
                raise ValueError(f"token file {str(path)!r} must hold a 1-D or 2-D array, got shape {arr.shape}")
            arr = _int_array(path, arr)
            docs.extend([arr] if arr.ndim == 1 else list(arr))
        else:
            dtype = np.dtype(bin_dtype)
            if not np.issubdtype(dtype, np.integer):
                raise ValueError(f"bin_dtype must be an integer dtype, got {dtype}")
            docs.append(_int_array(path, np.fromfile(path, dtype=dtype)))
    docs = [d for d in docs if d.size]
    if not docs:
        raise ValueError(f"the data files {[str(f) for f in files]} hold no tokens")
    if vocab_size is not None:
        top = max(int(d.max()) for d in docs)
        if top >= vocab_size:
            raise ValueError(f"the data holds token id {top}, outside the model's vocabulary of {vocab_size}")
    return docs


def _check_seq_len(seq_len) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (a label needs a previous token), got {seq_len!r}")


def chunk_documents(docs: Sequence[np.ndarray], seq_len: int, *, separator_id: Optional[int] = None) -> torch.Tensor:
    """Concatenate documents into one stream and cut it into rows of ``seq_len`` tokens.

    Args:
        docs: 1-D integer arrays (or tensors / lists) of token ids.
        seq_len: tokens per row (the training context length), >= 2.
        separator_id: a token put between documents that do not already end with it (for example EOS);
            None puts nothing.

    Returns:
        An int32 tensor (N, seq_len) (the collators make int64 batches); the tail shorter than
        ``seq_len`` is dropped.

    Raises:
        ValueError: a bad ``seq_len``, or fewer than ``seq_len`` tokens in all.
    """
    _check_seq_len(seq_len)
    parts = []
    for d in docs:
        d = np.asarray(d, dtype=TOKEN_DTYPE).reshape(-1)
        parts.append(d)
        if separator_id is not None and (not d.size or d[-1] != separator_id):
            parts.append(np.array([separator_id], dtype=TOKEN_DTYPE))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=TOKEN_DTYPE)
    n = stream.size // seq_len
    if n == 0:
        raise ValueError(f"the data holds {stream.size} tokens, fewer than one row of seq_len={seq_len}")
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).copy())


def pack_documents(docs: Sequence[np.ndarray], seq_len: int) -> List[List[torch.Tensor]]:
    """Group whole documents, in order, into packs of at most ``seq_len`` tokens.

    A document longer than ``seq_len`` is split into pieces of ``seq_len`` tokens (and a shorter last
    piece); pieces of a single token carry no label and are dropped. Documents are never reordered.

    Args:
        docs: 1-D integer arrays (or tensors / lists) of token ids.
        seq_len: the most tokens one pack holds (the training context length), >= 2.

    Returns:
        A list of packs, each a list of 1-D int32 tensors whose lengths sum to at most ``seq_len``.

    Raises:
        ValueError: a bad ``seq_len``, or no document of at least two tokens.
    """
    _check_seq_len(seq_len)
    pieces: List[torch.Tensor] = []
    for d in docs:
        d = torch.as_tensor(np.asarray(d, dtype=TOKEN_DTYPE).reshape(-1))
        pieces.extend(p for p in d.split(seq_len) if p.numel() >= 2)
    if not pieces:
        raise ValueError("the data holds no document of at least two tokens to pack")
    packs: List[List[torch.Tensor]] = []
    current: List[torch.Tensor] = []
    used = 0
    for p in pieces:
        if used + p.numel() > seq_len:
            packs.append(current)
            current, used = [], 0
        current.append(p)
        used += p.numel()
    packs.append(current)
    return packs


class ChunkDataset(torch.utils.data.Dataset):
    """Rows of a (N, seq_len) token tensor as ``{"input_ids": row}`` examples."""

    def __init__(self, chunks: torch.Tensor):
        if not isinstance(chunks, torch.Tensor) or chunks.dim() != 2:
            raise ValueError("chunks must be a 2-D (N, seq_len) tensor of token ids")
        self.chunks = chunks

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[i]}


class PackDataset(torch.utils.data.Dataset):
    """Packs from :func:`pack_documents` as ``{"documents": [ids, ...]}`` examples."""

    def __init__(self, packs: List[List[torch.Tensor]]):
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> Dict[str, List[torch.Tensor]]:
        return {"documents": self.packs[i]}


@dataclass
class CausalLMCollator:
    """Stack fixed-length rows into int64 ``input_ids`` and ``labels`` (the model shifts labels itself)."""

    def __call__(self, features: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        input_ids = torch.stack([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        return {"input_ids": input_ids, "labels": input_ids.clone()}


class PackedCollator:
    """Flatten a batch of packs into one row of documents with their boundaries.

    Every document of every pack in the batch becomes one segment of a single (1, total) row, passed
    through transformers' ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``: ``input_ids``,
    ``labels`` (-100 at each document's first token), ``position_ids`` restarting at 0 per document,
    and ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 boundaries) with ``max_length_q``/``max_length_k``.
    An attention implementation that reads ``cu_seq_lens_*`` (``"drope_triton"``, flash attention)
    keeps documents apart; eager/SDPA rebuild the block-diagonal mask from the restarting positions.
    """

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self._flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")

    def __call__(self, features: List[Dict[str, List[torch.Tensor]]]) -> Dict[str, torch.Tensor]:
        docs = [{"input_ids": d} for f in features for d in f["documents"]]
        return self._flatten(docs)
