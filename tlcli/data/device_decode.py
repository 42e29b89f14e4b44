"""Decoding on the GPU: nvjpeg a batch at a time with a CPU fallback per file, on a stream of its own.

What `ImageLoader` runs on its device worker when it has a GPU decoder: raw JPEG
bytes decoded in one call and resized a shape at a time, the images decoded on
the CPU copied over in one pinned copy, and the event that tells the consumer's
stream the batch is ready. Every piece takes stand-ins (decoder, streams), so
the CPU's tests exercise the paths a GPU takes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from tlcli.data.images import JPEG_SUFFIXES, Source, fit_to_size, load_sized
from tlcli.errors import DataError
from tlcli.model.preprocess import Preprocess


class DeviceLane:
    """Where the device worker's work runs, and how its results reach the consumer. On CUDA:
    a stream of its own, and an event the consumer's stream waits on before it reads a batch
    (each tensor is then recorded on the consumer's stream, so the caching allocator does not
    hand its memory back to the worker's stream while it is still read). Elsewhere the work
    runs in order and there is nothing to wait for. `cuda` is torch.cuda; tests pass a stand-in."""

    def __init__(self, device: torch.device, cuda=None):
        self.device = device
        self.cuda = cuda if cuda is not None else (torch.cuda if device.type == "cuda" else None)
        self.stream = None  # made at the first batch: a loader is built before any CUDA work is due

    def working(self):
        if self.cuda is None:
            return contextlib.nullcontext()
        if self.stream is None:
            self.stream = self.cuda.Stream(self.device)
        return self.cuda.stream(self.stream)

    def done(self):
        if self.stream is None:
            return None
        event = self.cuda.Event()
        event.record(self.stream)
        return event

    def hand_over(self, images: list, event) -> None:
        """In the consumer's thread, before it reads `images`."""
        if event is None:
            return
        current = self.cuda.current_stream(self.device)
        current.wait_event(event)
        for image in images:
            if image is not None and image.is_cuda:
                image.record_stream(current)


def staged_on_device(images: list, device: torch.device, pin: bool) -> list:
    """The images not yet on the device (decoded and sized on the CPU: every one the same
    shape) stacked into one (pinned) buffer and copied in one non-blocking copy, instead of
    one small copy each from pageable memory. Order and Nones (skipped files) are kept."""
    on_host = [i for i, img in enumerate(images) if img is not None and img.device != device]
    if not on_host:
        return images
    stacked = torch.stack([images[i] for i in on_host])
    if pin:
        stacked = stacked.pin_memory()
    moved = stacked.to(device, non_blocking=pin).unbind(0)
    out = list(images)
    for i, image in zip(on_host, moved):
        out[i] = image
    return out


def fit_in_batches(images: list, pp: Preprocess) -> list:
    """`fit_to_size` of each image, images of one shape resized together in one call (a
    folder of photos is mostly one or two shapes): a few kernels per batch, not per image."""
    out = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    for indices in groups.values():
        if len(indices) == 1:
            out[indices[0]] = fit_to_size(images[indices[0]], pp)
            continue
        for i, image in zip(indices, fit_to_size(torch.stack([images[i] for i in indices]), pp).unbind(0)):
            out[i] = image
    return out


def read_bytes_or_decode(source: Source, pp: Preprocess):
    """For a GPU decoder: a JPEG's raw bytes (decoded on the GPU); any other image decoded and sized here."""
    from torchvision.io import read_file

    if isinstance(source, str) and os.path.splitext(source)[1].lower() in JPEG_SUFFIXES and pp.channels == 3:
        try:
            return read_file(source)
        except RuntimeError as err:
            raise DataError(f"{source}: cannot read image: {err}") from None
    return load_sized(source, pp)


class NvjpegDecoder:
    """torchvision's nvjpeg: a batch of raw JPEGs decoded on the GPU in one call. A stand-in
    with the same `decode` (tests use one on the CPU) exercises every path around it."""

    name = "nvjpeg"

    def decode(self, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def gpu_decode(decoder, items: list, sources: list, pp: Preprocess, device: torch.device, skip_bad: bool) -> list:
    """The raw-JPEG items of a batch decoded by `decoder` in one call and sized on the device;
    the rest (decoded on the CPU already) kept in place, so the batch keeps its order.

    A failed batch call is retried one image at a time; an image the GPU decoder refuses
    (a CMYK or progressive JPEG it lacks, out of memory, a build without nvjpeg) is decoded
    on the CPU instead, so the GPU accepts exactly the files the CPU does. Only a file the CPU
    cannot read either is an error (or, with skip_bad, left out as None)."""
    raw = [i for i, t in enumerate(items) if t is not None and t.ndim == 1]  # read_file gives 1-d uint8 bytes
    if not raw:
        return items
    try:
        decoded = list(decoder.decode([items[i] for i in raw], device))
    except RuntimeError:
        decoded = [_decode_one(decoder, items[i], sources[i], pp, device, skip_bad) for i in raw]
    else:
        decoded = fit_in_batches(decoded, pp)
    out = list(items)
    for i, image in zip(raw, decoded):
        out[i] = image
    return out


def _decode_one(decoder, data: torch.Tensor, source, pp: Preprocess, device: torch.device,
                skip_bad: bool) -> Optional[torch.Tensor]:
    try:
        return fit_to_size(decoder.decode([data], device)[0], pp)
    except RuntimeError:
        pass  # the GPU decoder's refusal; the CPU has the last word
    try:
        return load_sized(source, pp)  # on the CPU; staged_on_device copies it with the batch's others
    except DataError:
        if skip_bad:
            return None
        raise
