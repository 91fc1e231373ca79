"""A training data loader whose sample order and augmentations can be resumed exactly.

detectron2's training loader draws its order from a sampler seeded once per run and its random
augmentations (flips, crops) from the numpy RNG of whichever process maps the image (a loader
worker, seeded when the worker starts). A run restarted from a checkpoint therefore sees
different images and flips than the run it continues. Here both are functions of
(data seed, position in the sample stream) only:

* the **global sample stream** is an endless sequence of dataset indices, epoch ``e`` a
  permutation drawn from ``numpy.random.default_rng([seed, e])`` (with repeat factors for
  ``RepeatFactorTrainingSampler``, stochastic rounding drawn from the same generator);
* process ``rank`` of ``world_size`` takes positions ``rank, rank + world_size, ...`` of the
  stream (as detectron2's TrainingSampler) and forms batches of ``IMS_PER_BATCH / world_size``;
  with ``DATALOADER.ASPECT_RATIO_GROUPING`` images are grouped by orientation (width > height
  or not) from the dataset dicts, as detectron2's AspectRatioGroupedDataset does;
* the **augmentation seed** of the sample at stream position ``p`` is derived from
  ``(seed, p)``: the mapper runs with numpy, python ``random`` and torch (CPU) seeded from it,
  in a loader worker or the main process alike, and the caller's RNG states are restored after.

Resuming at iteration ``i`` skips the batches of iterations ``0..i-1`` (directly in the stream
without grouping; by replaying the grouping, which costs integer work only, with it). A killed
and resumed run therefore trains on exactly the batches the uninterrupted run would have.
"""
import copy
import itertools
import logging
import random
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm

logger = logging.getLogger("d2_norms.data_order")

SUPPORTED_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler")
_MAX_MAP_ATTEMPTS = 16


def derive_seed(*entropy: int) -> int:
    """A 32-bit seed from integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(e) & 0xFFFFFFFFFFFFFFFF for e in entropy])
               .generate_state(1)[0])


class SampleStream:
    """The global, endless, deterministic sequence of dataset indices (see module docstring)."""

    def __init__(self, size: int, seed: int, *, shuffle: bool = True,
                 repeat_factors: Optional[Sequence[float]] = None):
        if size <= 0:
            raise ValueError("the training set is empty: nothing to sample from (check "
                             "DATASETS.TRAIN and DATALOADER.FILTER_EMPTY_ANNOTATIONS)")
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.repeat_factors = None
        if repeat_factors is not None:
            factors = np.asarray(repeat_factors, dtype=np.float64)
            self._int_part = np.floor(factors)
            self._frac_part = factors - self._int_part
            self.repeat_factors = factors

    def epoch(self, e: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(e)])
        if self.repeat_factors is None:
            indices = np.arange(self.size)
        else:
            reps = self._int_part + (rng.random(self.size) < self._frac_part)
            indices = np.repeat(np.arange(self.size), reps.astype(np.int64))
        return indices[rng.permutation(len(indices))] if self.shuffle else indices

    def iter_from(self, position: int = 0) -> Iterator[Tuple[int, int]]:
        """(stream position, dataset index) from ``position`` on."""
        if self.repeat_factors is None:  # fixed epoch length: jump straight there
            e, offset = divmod(int(position), self.size)
            start = e * self.size
        else:
            e, start, offset = 0, 0, int(position)
            while True:
                length = len(self.epoch(e))
                if offset < length:
                    break
                offset -= length
                start += length
                e += 1
        pos = start
        while True:
            indices = self.epoch(e)
            for k in range(offset, len(indices)):
                yield pos + k, int(indices[k])
            pos += len(indices)
            offset = 0
            e += 1


class ResumableBatchSampler(torch.utils.data.Sampler):
    """This process's batches of ``(stream position, dataset index)`` keys, from ``start_iter``.

    ``group_ids``: per dataset index, 0 for landscape (width > height) and 1 otherwise, or None
    for no aspect-ratio grouping."""

    def __init__(self, stream: SampleStream, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, group_ids: Optional[Sequence[int]] = None,
                 start_iter: int = 0):
        self.stream = stream
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.group_ids = None if group_ids is None else np.asarray(group_ids, dtype=np.int64)
        self.start_iter = int(start_iter)

    def _mine(self, first_global_position: int):
        return itertools.islice(self.stream.iter_from(first_global_position), 0, None,
                                self.world_size)

    def __iter__(self):
        if self.group_ids is None:
            # Without grouping, iteration i of every rank used global positions
            # [i * total_batch, (i + 1) * total_batch): jump straight past them.
            total = self.batch_size * self.world_size
            mine = self._mine(self.start_iter * total + self.rank)
            while True:
                yield [next(mine) for _ in range(self.batch_size)]
        buckets: List[List[Tuple[int, int]]] = [[], []]
        produced = 0
        for key in self._mine(self.rank):
            bucket = buckets[self.group_ids[key[1]]]
            bucket.append(key)
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                del bucket[:]
                if produced >= self.start_iter:
                    yield batch
                produced += 1

    def __len__(self):  # endless; DataLoader only asks for len() when it is used
        raise TypeError("the training sampler is infinite")


class _SeededCall:
    """Runs ``fn`` with numpy / random / torch(CPU) seeded, restoring the caller's states."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, fn, *args):
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            np.random.seed(self.seed)
            random.seed(self.seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                return fn(*args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class SeededMapDataset(torch.utils.data.Dataset):
    """Maps ``dataset[index]`` with the augmentation seed of its stream position.

    Keys are ``(position, index)``. If the mapper returns None (it may reject a sample, e.g. a
    crop without objects), another index is drawn deterministically from the same seed."""

    def __init__(self, dataset_dicts: list, mapper, seed: int):
        self.dataset = DatasetFromList(dataset_dicts, copy=False, serialize=True)
        self.mapper = mapper
        self.seed = int(seed)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        position, index = key
        for attempt in range(_MAX_MAP_ATTEMPTS):
            seed = derive_seed(self.seed, position, attempt)
            out = _SeededCall(seed)(self.mapper, copy.deepcopy(self.dataset[index]))
            if out is not None:
                return out
            logger.warning("mapper returned None for dataset index %d; drawing another", index)
            index = int(np.random.default_rng(seed).integers(len(self.dataset)))
        raise RuntimeError(f"the mapper rejected {_MAX_MAP_ATTEMPTS} samples in a row at stream "
                           f"position {position}: check the mapper / augmentations")


class _LazyIterable:
    """Iterating it returns an iterator that starts the real one on the first ``next``: the
    trainer asks for an iterator when it is built, before resuming sets the start iteration,
    and a DataLoader with workers would start them (and prefetch) at once."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return _LazyIterator(self.loader)

    def __getattr__(self, name):  # batch_sampler, dataset, num_workers, ...
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class _LazyIterator:
    def __init__(self, loader):
        self._loader = loader
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self._loader)
        return next(self._it)


class ResumableTrainLoader(_LazyIterable):
    """The training loader; ``set_position(start_iter, seed)`` before the first batch."""

    @property
    def batch_sampler(self) -> ResumableBatchSampler:
        return self.loader.batch_sampler

    def set_position(self, start_iter: int, seed: Optional[int] = None) -> None:
        sampler = self.loader.batch_sampler
        sampler.start_iter = int(start_iter)
        if seed is not None:
            sampler.stream.seed = int(seed)
            self.loader.dataset.seed = int(seed)
            self.loader.generator.manual_seed(int(seed))

    @property
    def seed(self) -> int:
        return self.loader.batch_sampler.stream.seed


def data_seed(cfg) -> int:
    """cfg.SEED when set (>= 0), else a random seed shared by all processes (stored in the
    checkpoints, so that resuming continues the same order)."""
    if cfg.SEED >= 0:
        return int(cfg.SEED)
    return int(comm.shared_random_seed())


def orientation_groups(dataset_dicts: list) -> Optional[List[int]]:
    if not all("width" in d and "height" in d for d in dataset_dicts):
        logger.warning("DATALOADER.ASPECT_RATIO_GROUPING needs 'width' and 'height' in every "
                       "dataset dict; some lack them, so batches are not grouped")
        return None
    return [0 if d["width"] > d["height"] else 1 for d in dataset_dicts]


def build_resumable_train_loader(cfg, mapper, *, seed: Optional[int] = None,
                                 start_iter: int = 0) -> ResumableTrainLoader:
    """The training loader of ``cfg`` (same datasets, filtering, sampler kind, batch and
    workers as detectron2's ``build_detection_train_loader``) with a resumable order."""
    world_size, rank = comm.get_world_size(), comm.get_rank()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world_size:
        from .errors import BatchSizeError

        raise BatchSizeError(f"SOLVER.IMS_PER_BATCH={total} is not divisible by the "
                             f"{world_size} processes")
    sampler_name = cfg.DATALOADER.SAMPLER_TRAIN
    if sampler_name not in SUPPORTED_SAMPLERS:
        raise ValueError(f"DATALOADER.SAMPLER_TRAIN={sampler_name!r}: the resumable loader "
                         f"supports {SUPPORTED_SAMPLERS}")
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
        if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    repeat = None
    if sampler_name == "RepeatFactorTrainingSampler":
        repeat = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD).tolist()
    seed = data_seed(cfg) if seed is None else int(seed)
    groups = orientation_groups(dicts) if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None
    sampler = ResumableBatchSampler(SampleStream(len(dicts), seed, repeat_factors=repeat),
                                    total // world_size, rank=rank, world_size=world_size,
                                    group_ids=groups, start_iter=start_iter)
    dataset = SeededMapDataset(dicts, mapper, seed)
    logger.info("Resumable training order: %d images, sampler %s, seed %d, %d per process, "
                "%s", len(dicts), sampler_name, seed, total // world_size,
                "grouped by orientation" if groups is not None else "no grouping")
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator, worker_init_fn=worker_init_reset_seed,
        # its own generator: creating the iterator must not draw from the global torch RNG
        generator=torch.Generator().manual_seed(seed))
    return ResumableTrainLoader(loader)
