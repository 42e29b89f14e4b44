"""Input pipeline: images to normalised batches on the device, decoded ahead of the forward.

One definition of preprocessing serves featurize, image stages, evaluate
and predict:

1. decode: `torchvision.io` (libjpeg-turbo, libpng, libwebp), PIL for what it
   cannot read (BMP, TIFF, 16-bit and float modes), or nvjpeg on CUDA for
   JPEGs, a batch at a time;
2. fit to size: resize (and centre-crop) each image in uint8, with
   antialiasing, on the CPU (SIMD path) or on the GPU after nvjpeg;
3. on the device: uint8 -> float, normalise with the model's mean and std,
   channels_last.

Threads decode batch k+1 while batch k runs forward (torch's decoders and
resize release the GIL). On CUDA a device worker with its own stream decodes
the JPEGs of the batches ahead with nvjpeg, resizes them a shape at a time and
copies the CPU-decoded rest in one pinned copy; the consumer's stream waits on
its event, so decoding overlaps the forward instead of running before it.
Augmentation, when a stage has it, runs in the main thread in a fixed order,
so a seeded epoch replays exactly. The decoder is part of the cache key and
the checkpoint: nvjpeg and libjpeg-turbo differ by +-1 in some pixels. One
image's decoding and sizing is `images.py`; the GPU's part, `device_decode.py`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from collections import deque
from typing import Iterator, Optional, Sequence, Union

import torch
from torchvision.transforms.v2 import InterpolationMode

from tlcli.data.device_decode import DeviceLane, NvjpegDecoder, gpu_decode, read_bytes_or_decode, staged_on_device
from tlcli.data.images import Source, fit_to_size, load_sized, read_image
from tlcli.errors import DataError
from tlcli.model.preprocess import Preprocess, normalized

__all__ = ["ImageLoader", "augmentation", "available_cores", "decode_threads", "fit_to_size", "jpeg_decoder",
           "load_sized", "mean_std", "read_image", "to_model_input"]


def available_cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def decode_threads(requested: Union[int, str], device: torch.device) -> int:
    """How many threads decode. `auto` on CUDA: every core but one (the GPU does the
    math, the CPU reads and decodes). On the CPU the forward is over 95% of the work
    (0.6 ms to decode and resize a 500x375 JPEG, about 23 ms of Lite0 forward per image
    on 2 cores), so one decode thread per 4 cores fills the forward's serial gaps
    without taking its cores."""
    if requested != "auto":
        return max(int(requested), 0)
    cores = available_cores()
    return max(cores - 1, 1) if device.type == "cuda" else max(cores // 4, 1)


def jpeg_decoder(device: torch.device) -> str:
    """What decodes JPEGs on this device: nvjpeg on CUDA (which makes the loader read raw bytes
    and decode batches on the GPU), libjpeg-turbo elsewhere. It enters the cache key and the
    checkpoint: the two differ by +-1 in some pixels."""
    return "nvjpeg" if device.type == "cuda" and _nvjpeg_available() else "libjpeg-turbo"


def _nvjpeg_available() -> bool:
    try:
        from torchvision.io import decode_jpeg

        decode_jpeg  # noqa: B018 - the import is the check
        return torch.cuda.is_available()
    except ImportError:
        return False


# --------------------------------------------------------------------------- to the model


def mean_std(pp: Preprocess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's mean and std as (1, C, 1, 1) tensors on the device, made once per loader."""
    return (torch.tensor(pp.mean, device=device).view(1, -1, 1, 1),
            torch.tensor(pp.std, device=device).view(1, -1, 1, 1))


def to_model_input(batch: torch.Tensor, pp: Preprocess, device: torch.device,
                   stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """A uint8 (or [0, 1] float) batch at the model's size -> normalised float on the device."""
    channels_last = device.type != "mps" and batch.ndim == 4
    mean, std = stats if stats is not None else mean_std(pp, device)
    x = normalized(batch.to(device, non_blocking=True), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augmentation(spec, pp: Preprocess):
    """The recipe's augmentation as a transforms.v2 pipeline on an image already
    at the model's input size (uint8, or float in [0, 1]), before normalisation;
    None when it asks for no step (v2.Compose refuses an empty list)."""
    from torchvision.transforms import v2

    if spec.changes_nothing:
        return None
    steps = []
    if spec.random_resized_crop is not None:
        c = spec.random_resized_crop
        steps.append(v2.RandomResizedCrop(
            [pp.size, pp.size], scale=tuple(c.scale), ratio=tuple(c.ratio),
            interpolation=InterpolationMode(pp.interpolation), antialias=True,
        ))
    if spec.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(spec.hflip))
    if spec.color_jitter is not None:
        j = spec.color_jitter
        steps.append(v2.ColorJitter(brightness=j.brightness, contrast=j.contrast, saturation=j.saturation, hue=j.hue))
    return v2.Compose(steps)


# --------------------------------------------------------------------------- batches


def _chunks(pairs: Sequence[tuple[Source, int]], batch_size: int,
            order: Optional[Sequence[int]] = None) -> list[list[tuple[Source, int]]]:
    """The (source, label) pairs in `order` (default: as given), cut into batches."""
    items = [pairs[i] for i in order] if order is not None else list(pairs)
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


class ImageLoader:
    """Batches of preprocessed images on the device, decoded `prefetch` batches ahead.

    CPU decoding runs on a thread pool. With a GPU decoder (nvjpeg on CUDA) the pool only
    reads files (and decodes what is not a JPEG), and one device worker, on its own CUDA
    stream, decodes each batch's JPEGs, copies the CPU-decoded images in one pinned copy and
    resizes in batches, while the main thread's stream runs the forward of the batch before.
    Iterating yields (normalised float batch on the device, labels on the CPU).
    """

    def __init__(self, pairs, pp: Preprocess, batch_size: int, device: torch.device, threads: int,
                 augment=None, order: Optional[Sequence[int]] = None, prefetch: int = 2, gpu_decoder=None,
                 on_bad_image: str = "error", lane: Optional["DeviceLane"] = None):
        """`gpu_decoder`: what decodes raw JPEGs on the device (default nvjpeg on CUDA, none on
        the CPU); any object with nvjpeg's `decode(list of bytes tensors, device)`.
        `lane`: where the device worker's work runs (default: its own stream on CUDA)."""
        self.chunks = _chunks(pairs, batch_size, order)
        self.pp, self.device, self.augment = pp, device, augment
        self.threads, self.prefetch = threads, max(prefetch, 1)
        if gpu_decoder is None and jpeg_decoder(device) == "nvjpeg":
            gpu_decoder = NvjpegDecoder()
        self.gpu_decoder = gpu_decoder
        self._stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # mean and std on the device, made once
        self.pin = device.type == "cuda"
        self.lane = lane if lane is not None else DeviceLane(device)
        self.skip_bad = on_bad_image == "skip"
        self.skipped: list[str] = []  # with on_bad_image: skip, the files left out
        self.chunk = -1

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in order; `self.chunk` is the index of the chunk the last batch came from
        (a chunk whose images were all skipped yields nothing)."""
        if self.threads == 0:
            for i, chunk in enumerate(self.chunks):
                images = [self._guarded(s) for s, _ in chunk]
                if self.gpu_decoder:
                    images, event = self._on_device(images, chunk)
                    self.lane.hand_over(images, event)
                batch = self._finish(images, chunk)
                if batch is not None:
                    self.chunk = i
                    yield batch
            return
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="tl-decode"))
            # One device worker: decoding on the GPU holds torchvision's global lock anyway,
            # and one stream keeps the batches in order.
            device_worker = (stack.enter_context(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tl-device"))
                             if self.gpu_decoder else None)
            pending: deque = deque()
            for i, chunk in enumerate(self.chunks):
                reads = [pool.submit(self._guarded, s) for s, _ in chunk]
                work = device_worker.submit(self._read_and_decode, reads, chunk) if device_worker else None
                pending.append((i, chunk, reads, work))
                if len(pending) > self.prefetch:
                    yield from self._ready(pending.popleft())
            while pending:
                yield from self._ready(pending.popleft())

    def _ready(self, pending) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        i, chunk, reads, work = pending
        if work is not None:
            images, event = work.result()
            self.lane.hand_over(images, event)
        else:
            images = [f.result() for f in reads]
        batch = self._finish(images, chunk)
        if batch is not None:
            self.chunk = i
            yield batch

    def _read(self, source: Source) -> torch.Tensor:
        return read_bytes_or_decode(source, self.pp) if self.gpu_decoder else load_sized(source, self.pp)

    def _guarded(self, source: Source):
        """The image, or None for an undecodable file when bad images are skipped."""
        try:
            return self._read(source)
        except DataError:
            if not self.skip_bad:
                raise
            return None

    def _read_and_decode(self, reads: list, chunk):
        """In the device worker: the chunk's files as read, then on the device."""
        return self._on_device([f.result() for f in reads], chunk)

    def _on_device(self, images: list, chunk) -> tuple[list, object]:
        """Raw JPEG bytes decoded on the device in one call and resized in batches, the images
        decoded on the CPU copied over in one pinned copy, all on the lane's stream; and the
        event that marks the work done, for the consumer's stream to wait on."""
        with self.lane.working():
            images = gpu_decode(self.gpu_decoder, images, [s for s, _ in chunk], self.pp, self.device, self.skip_bad)
            images = staged_on_device(images, self.device, self.pin)
            return images, self.lane.done()

    def _finish(self, images: list, chunk) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped.extend(str(s) for (s, _), img in zip(chunk, images) if img is None)
        chunk = [item for item, img in zip(chunk, images) if img is not None]
        images = [img for img in images if img is not None]
        if not images:
            return None
        if self.augment is not None:
            # In the main thread, in order: torch's global generator, seeded per epoch, decides.
            images = [self.augment(img) for img in images]
        batch = torch.stack(images)
        if self.pin and not batch.is_cuda:
            batch = batch.pin_memory()
        labels = torch.tensor([label for _, label in chunk], dtype=torch.int64)
        if self._stats is None:
            self._stats = mean_std(self.pp, self.device)
        return to_model_input(batch, self.pp, self.device, self._stats), labels
