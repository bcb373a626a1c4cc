"""Batches of token windows for training (Grain, shuffled, resumable) and evaluation (fixed).

A split's token stream (documents packed back to back, eos between them) is cut into windows of
seq_len + 1 tokens with stride seq_len: window i is tokens[i*L : i*L + L + 1], inputs are its first
L tokens and targets its last L, so consecutive windows share one token and every token after the
first is a target exactly once per epoch. Windows never cross a .bin file boundary. A split
shorter than one window is tiled (repeated) until it fills one.

Training order: a Grain index shuffle of the windows, reseeded every epoch from shuffle_seed,
repeated forever, grouped into global batches of `batch_size` windows. Process p of P reads only
rows [p*b, (p+1)*b) of each global batch (b = batch_size // P), so the processes' local batches,
concatenated in process order, are exactly the single-process batch.

A mixture (`data.sources`, mixture.py) replaces the one shuffled index stream by Grain's weighted
interleaving of one shuffled stream per source; batching and process sharding are the same.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import numpy as np

from nagjax.data import mixture
from nagjax.data.shards import DataError, TokenSplit
from nagjax.data.splits import open_split


class WindowSource:
    """Random-access windows of seq_len + 1 tokens over a split's (memory-mapped) files."""

    def __init__(self, split: TokenSplit, seq_len: int):
        self.seq_len = seq_len
        arrays = list(split.arrays)
        counts = [max(0, (len(a) - 1) // seq_len) for a in arrays]
        if sum(counts) == 0:  # tiny split: tile it so that it holds at least one window
            flat = np.concatenate(arrays)
            arrays = [np.tile(flat, -(-(seq_len + 1) // len(flat)))]
            counts = [1]
        self._arrays = arrays
        self._starts = np.cumsum([0] + counts)  # first global window index of each file

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict:
        """Pickle memmaps as (file, dtype, length), not their data, for Grain worker processes."""
        state = dict(self.__dict__)
        state["_arrays"] = [
            ("memmap", a.filename, a.dtype.str, len(a)) if isinstance(a, np.memmap) else a
            for a in self._arrays
        ]
        return state

    def __setstate__(self, state: dict) -> None:
        state["_arrays"] = [
            np.memmap(a[1], dtype=a[2], mode="r", shape=(a[3],)) if isinstance(a, tuple) else a
            for a in state["_arrays"]
        ]
        self.__dict__.update(state)

    def gather_batch(self, idx_b: np.ndarray) -> dict[str, np.ndarray]:
        return _to_batch(self._getitems(idx_b))

    def _window(self, index: int) -> np.ndarray:
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        s = (index - int(self._starts[f])) * self.seq_len
        return np.asarray(self._arrays[f][s : s + self.seq_len + 1])

    def __getitem__(self, index: int) -> np.ndarray:
        return self._window(int(index) % len(self))

    def _getitems(self, indices: Sequence[int]) -> np.ndarray:
        if len(self._arrays) == 1:  # one vectorised gather
            starts = (np.asarray(indices, dtype=np.int64) % len(self)) * self.seq_len
            return self._arrays[0][starts[:, None] + np.arange(self.seq_len + 1)]
        return np.stack([self[i] for i in indices])


def _to_batch(windows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    w_bt = np.asarray(windows if isinstance(windows, np.ndarray) else np.stack(windows), np.int32)
    return {"inputs": w_bt[:, :-1], "targets": w_bt[:, 1:]}


class DocumentIds:
    """Adds what document masking needs to a batch (`data.document_mask`): `documents` [b, t], the
    document of each input token within its window (the count of EOS tokens up to and including it:
    an EOS opens the document it precedes, as a prompt starts with EOS at sampling), and `positions`
    [b, t], the tokens' RoPE positions (restarting at each EOS with `data.document_positions`, else
    0..t-1). A module-level class so Grain worker processes can pickle it."""

    def __init__(self, eos_id: int, restart_positions: bool):
        self.eos_id, self.restart_positions = int(eos_id), bool(restart_positions)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = batch["inputs"]
        is_eos = inputs == self.eos_id
        index = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)
        positions = index
        if self.restart_positions:
            positions = index - np.maximum.accumulate(np.where(is_eos, index, 0), axis=1)
        return {**batch, "documents": np.cumsum(is_eos, axis=1, dtype=np.int32),
                "positions": np.ascontiguousarray(positions, np.int32)}


def with_documents(data_cfg, ds, tokenizer):
    """`ds` (batches) with `documents` and `positions` when `data.document_mask`, else as it is."""
    if not getattr(data_cfg, "document_mask", False):
        return ds
    return ds.map(DocumentIds(tokenizer.eos_id, data_cfg.document_positions))


def local_batch_size(data_cfg, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, process_count={process_count})")
    if data_cfg.batch_size % process_count:
        raise DataError(
            f"data.batch_size={data_cfg.batch_size} must be divisible by the process "
            f"count {process_count} (each process loads batch_size // process_count rows)"
        )
    return data_cfg.batch_size // process_count


def corpus_passes(data_cfg, steps: int) -> float:
    """How many times `steps` global batches read the train split (windows of seq_len + 1); for
    a mixture, the most-repeated source (each source gets its weight's share of the windows)."""
    return max(steps * data_cfg.batch_size * src.weight / len(WindowSource(split, data_cfg.seq_len))
               for src, split in mixture.open_sources(data_cfg, "train"))


def train_dataset(data_cfg, *, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Infinite MapDataset of this process's local batches (index = step).

    Grain shuffles and batches window *indices*; the windows of a batch are then read with one
    vectorised gather, which keeps a batch well under a millisecond.
    """
    b_local = local_batch_size(data_cfg, process_index, process_count)
    if mixture.is_mixture(data_cfg):
        return _mixture_dataset(data_cfg, b_local, process_index, process_count)
    split = open_split(data_cfg, "train")
    source = WindowSource(split, data_cfg.seq_len)
    ds = (
        grain.MapDataset.range(len(source)).shuffle(seed=data_cfg.shuffle_seed % 2**32).repeat(None)
    )
    ds = ds.batch(b_local, drop_remainder=True, batch_fn=np.asarray)[process_index::process_count]
    return with_documents(data_cfg, ds.map(source.gather_batch), split.tokenizer)


class MixtureWindows:
    """Windows of several sources, addressed by (source, window) index pairs."""

    def __init__(self, windows: list[WindowSource]):
        self.windows = windows

    def gather_batch(self, pairs_b2: np.ndarray) -> dict[str, np.ndarray]:
        return _to_batch([self.windows[int(j)][int(i)] for j, i in pairs_b2])


def _tag_source(j: int, i: int) -> tuple[int, int]:
    """(source, window) pair; a module-level function so Grain worker processes can pickle it."""
    return j, i


def _mixture_dataset(data_cfg, b_local: int, process_index: int, process_count: int):
    opened = mixture.open_sources(data_cfg, "train")
    windows = [WindowSource(split, data_cfg.seq_len) for _, split in opened]
    parts = []
    for j, w in enumerate(windows):
        ds = grain.MapDataset.range(len(w)).shuffle(seed=(data_cfg.shuffle_seed + j) % 2**32)
        parts.append(ds.repeat(None).map(functools.partial(_tag_source, j)))
    mixed = grain.MapDataset.mix(parts, [src.weight for src, _ in opened])
    batched = mixed.batch(b_local, drop_remainder=True, batch_fn=np.asarray)
    ds = batched[process_index::process_count].map(MixtureWindows(windows).gather_batch)
    return with_documents(data_cfg, ds, opened[0][1].tokenizer)


def train_iterator(data_cfg, *, process_index: int = 0, process_count: int = 1):
    """Endless iterator of {"inputs", "targets"}: int32 [batch_size // process_count, seq_len].

    Checkpoint with `it.get_state()` (a small JSON-serialisable dict); `it.set_state(state)` on a
    freshly built iterator continues with exactly the same batches.
    """
    ds = train_dataset(data_cfg, process_index=process_index, process_count=process_count)
    # Batches are cheap memmap gathers, so reading happens in the main thread by default;
    # worker_count > 0 moves it into Grain worker processes.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if data_cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    return iter(it_ds)


def _ensure_absl_flags_parsed() -> None:
    """Grain workers read absl flags; a program that never ran absl.app must mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def eval_batches(
    data_cfg, n_batches: int, *, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
    """The first n_batches global batches of validation windows in order (wrapping around); for
    a mixture, the sources' batches taken in turn (what analysis tools read)."""
    sets = eval_sets(data_cfg, n_batches, process_index=process_index, process_count=process_count)
    if len(sets) == 1:
        return sets[0].batches
    return [sets[k % len(sets)].batches[k // len(sets)] for k in range(n_batches)]


@dataclasses.dataclass
class EvalSet:
    """One source's validation batches, its weight in the mixture and its bytes per token."""

    name: str  # "" for a config without data.sources
    weight: float
    batches: list[dict[str, np.ndarray]]
    bytes_per_token: float


def eval_sets(data_cfg, n_batches: int, *, process_index: int = 0,
              process_count: int = 1) -> list[EvalSet]:
    """Per source: the first n_batches global batches of its validation windows, in order."""
    b_local = local_batch_size(data_cfg, process_index, process_count)
    out = []
    for src, split in mixture.open_sources(data_cfg, "validation"):
        source = WindowSource(split, data_cfg.seq_len)
        batches = []
        for k in range(n_batches):
            first = k * data_cfg.batch_size + process_index * b_local
            batch = source.gather_batch(np.arange(first, first + b_local))
            if data_cfg.document_mask:
                batch = DocumentIds(split.tokenizer.eos_id, data_cfg.document_positions)(batch)
            batches.append(batch)
        out.append(EvalSet(src.name, src.weight, batches, split.bytes_per_token))
    return out


def bytes_per_token(data_cfg, split: str = "validation") -> float:
    """UTF-8 bytes of raw text per token (eos included): bits/byte = loss_nats / ln2 / this.
    For a mixture, the weighted mean over its sources."""
    return sum(src.weight * ts.bytes_per_token for src, ts in mixture.open_sources(data_cfg, split))
