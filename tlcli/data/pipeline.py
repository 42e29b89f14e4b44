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
so a seeded epoch replays exactly. The decoder is
part of the cache key and the checkpoint: nvjpeg and libjpeg-turbo differ by
+-1 in some pixels.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import warnings
from collections import deque
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from tlcli.errors import DataError
from tlcli.model.preprocess import Preprocess, normalized

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they are
# still shipped and are what this pipeline is built and measured on. Told once
# here, not once per image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

Source = Union[int, str]  # an index into the digits array, or an image path
# What torchvision.io decodes itself; everything else goes through PIL.
TORCHVISION_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}
JPEG_SUFFIXES = {".jpg", ".jpeg"}


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


# --------------------------------------------------------------------------- one image


def _digits_image(index: int, channels: int) -> torch.Tensor:
    from tlcli.data.sources import digits_arrays

    images, _ = digits_arrays()
    # Digits store ink intensity 0..16. They are rendered as a PNG of them comes out when written
    # the natural way, (x * 255 / 16).astype(uint8): white ink on black, the same uint8 pixels, so
    # that a user's own digit files are what the model was trained on.
    grey = torch.from_numpy((images[index] * 255 / 16).astype(np.uint8))
    return grey.unsqueeze(0).expand(channels, -1, -1).contiguous()


def _decode_file(path: str, channels: int) -> torch.Tensor:
    """uint8 CHW. torchvision for the formats it reads, PIL for the rest."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    if os.path.splitext(path)[1].lower() in TORCHVISION_SUFFIXES:
        try:
            image = decode_image(read_file(path), mode=ImageReadMode.UNCHANGED)
        except (RuntimeError, ValueError):
            return _decode_with_pil(path, channels)  # PIL tries, and says what is wrong if it can't either
        if image.ndim == 4:  # an animated GIF or WebP: frames x C x H x W; the first frame, as viewers show it
            image = image[0]
        if image.dtype == torch.uint16:  # 16-bit PNG: scale, don't truncate
            image = (image.to(torch.int32) * 255 + 32767).div(65535, rounding_mode="floor").to(torch.uint8)
        if image.dtype == torch.uint8 and image.shape[0] in (1, 2, 3, 4):
            return _channels(image, channels)
    return _decode_with_pil(path, channels)


def _channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey, grey+alpha, RGB or RGBA (uint8) -> `channels` channels; alpha composited on white."""
    if image.shape[0] in (2, 4):
        alpha = image[-1:].float() / 255.0
        image = (image[:-1].float() * alpha + 255.0 * (1.0 - alpha)).round_().to(torch.uint8)
    if channels == 3 and image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    if channels == 1 and image.shape[0] == 3:
        return TF.rgb_to_grayscale(image)
    return image


def _decode_with_pil(path: str, channels: int) -> torch.Tensor:
    try:
        from PIL import Image

        with Image.open(path) as im:
            arr = _pil_to_uint8(im, channels)
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for bad files; all mean "unreadable"
        raise DataError(f"{path}: cannot read image: {err}") from None
    t = torch.from_numpy(np.array(arr))  # a writable copy: PIL's arrays are read-only
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t.unsqueeze(0)


def _pil_to_uint8(im, channels: int) -> np.ndarray:
    """8-bit pixels from any PIL mode: 16-bit and 32-bit integers are scaled by their
    range, floats are taken as [0, 1], palette, CMYK and alpha go through PIL's RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        scale = {"F": 1.0, "I": 65535.0 if a.max(initial=0) > 255 else 255.0}.get(im.mode, 65535.0)
        grey = np.clip(np.rint(a / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2) if channels == 3 else grey
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        from PIL import Image

        background = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent -> white, as viewers show it
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)


def read_image(source: Source, channels: int = 3) -> torch.Tensor:
    """One image as uint8 CHW: a file, or an image of the digits array."""
    if isinstance(source, (int, np.integer)):
        return _digits_image(int(source), channels)
    return _decode_file(source, channels)


def fit_to_size(image: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """The image at the model's input size, as timm's eval transforms make it, keeping the dtype:
    `squash` resizes both edges to `resize` (the aspect ratio is not kept) and crops the centre;
    `center_crop` resizes the shorter edge to `resize` and crops the centre; `border` resizes
    the longer edge to `resize` and pads (with the mean colour) or crops to the size."""
    interp = InterpolationMode(pp.interpolation)
    if pp.mode == "squash":
        image = TF.resize(image, [pp.resize, pp.resize], interpolation=interp, antialias=True)
    elif pp.mode == "border":
        h, w = image.shape[-2:]
        scale = pp.resize / max(h, w)
        image = TF.resize(image, [max(1, round(h * scale)), max(1, round(w * scale))], interpolation=interp, antialias=True)
        image = _pad_to(image, pp.size, [round(255 * m) if image.dtype == torch.uint8 else m for m in pp.mean])
    else:
        image = TF.resize(image, [pp.resize], interpolation=interp, antialias=True)
    if tuple(image.shape[-2:]) == (pp.size, pp.size):
        return image
    return TF.center_crop(image, [pp.size, pp.size])


def _pad_to(image: torch.Tensor, size: int, fill: list) -> torch.Tensor:
    """Pad each edge shorter than `size` evenly on both sides (timm's CenterCropOrPad), per channel."""
    h, w = image.shape[-2:]
    top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
    bottom, right = max(size - h, 0) - top, max(size - w, 0) - left
    if not (top or bottom or left or right):
        return image
    out = torch.empty((*image.shape[:-2], h + top + bottom, w + left + right), dtype=image.dtype, device=image.device)
    for c in range(out.shape[-3]):
        out[..., c, :, :] = fill[c] if c < len(fill) else fill[0]
    out[..., top : top + h, left : left + w] = image
    return out


def load_sized(source: Source, pp: Preprocess) -> torch.Tensor:
    return fit_to_size(read_image(source, pp.channels), pp)


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
        return _read_bytes_or_decode(source, self.pp) if self.gpu_decoder else load_sized(source, self.pp)

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


def _read_bytes_or_decode(source: Source, pp: Preprocess):
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
