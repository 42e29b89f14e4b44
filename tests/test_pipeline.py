"""The input pipeline: backend choice, prefetching equals serial loading, decoders agree,
and every image mode becomes the right 8-bit pixels."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from tlcli.data.device_decode import DeviceLane, NvjpegDecoder, fit_in_batches, staged_on_device
from tlcli.data.images import _decode_with_pil, fit_to_size, read_image
from tlcli.data.pipeline import ImageLoader, decode_threads, jpeg_decoder, to_model_input
from tlcli.model.preprocess import Preprocess

PP = Preprocess(32, 32, "squash", (0.5,) * 3, (0.5,) * 3, "bilinear")


def test_auto_threads_follow_the_cores_and_the_device(monkeypatch):
    import tlcli.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "available_cores", lambda: 16)
    assert decode_threads("auto", torch.device("cuda")) == 15  # the GPU computes; the CPU decodes
    assert decode_threads("auto", torch.device("cpu")) == 4  # the CPU computes too
    monkeypatch.setattr(pipeline, "available_cores", lambda: 2)
    assert decode_threads("auto", torch.device("cpu")) == 1
    assert decode_threads(3, torch.device("cpu")) == 3 and decode_threads(0, torch.device("cpu")) == 0


def test_nvjpeg_is_chosen_on_cuda_only(monkeypatch):
    assert jpeg_decoder(torch.device("cpu")) == "libjpeg-turbo"
    assert ImageLoader([], PP, 4, torch.device("cpu"), 0).gpu_decoder is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert jpeg_decoder(torch.device("cuda")) == "nvjpeg"
    assert isinstance(ImageLoader([], PP, 4, torch.device("cuda"), 0).gpu_decoder, NvjpegDecoder)
    assert jpeg_decoder(torch.device("cpu")) == "libjpeg-turbo"


class StandIn:
    """nvjpeg's place on the CPU: libjpeg-turbo decodes, so results are comparable bit for bit
    with the CPU path; `refuse` names files it raises for, as nvjpeg does for CMYK or OOM."""

    name = "stand-in"

    def __init__(self, refuse=()):
        self.refuse, self.calls = set(refuse), []

    def decode(self, data, device):
        from torchvision.io import ImageReadMode, decode_jpeg

        self.calls.append(len(data))
        for raw in data:
            if bytes(raw[-64:].tolist()) in self.refuse:
                raise RuntimeError("nvjpeg: unsupported JPEG (stand-in)")
        return [decode_jpeg(raw, mode=ImageReadMode.RGB) for raw in data]


def _mixed(tmp_path):
    """JPEGs and PNGs interleaved, as a real folder has them."""
    pairs = _photos(tmp_path, 9)
    for i in (2, 5):
        png = tmp_path / f"{i}.png"
        Image.open(pairs[i][0]).save(png)
        pairs[i] = (str(png), pairs[i][1])
    return pairs


def _cpu_batches(pairs, **kw):
    return list(ImageLoader(pairs, PP, 4, torch.device("cpu"), threads=0, **kw))


def test_the_gpu_decoder_path_keeps_batch_order_and_pixels(tmp_path):
    pairs = _mixed(tmp_path)
    standin = StandIn()
    gpu = list(ImageLoader(pairs, PP, 4, torch.device("cpu"), threads=2, gpu_decoder=standin))
    cpu = _cpu_batches(pairs)
    assert len(gpu) == len(cpu) == 3 and standin.calls == [3, 3, 1]  # one call per batch, JPEGs only
    for (a, ya), (b, yb) in zip(gpu, cpu):
        assert torch.equal(ya, yb) and torch.equal(a, b)


def _tail(path):
    return open(path, "rb").read()[-64:]


def test_a_file_the_gpu_decoder_refuses_is_decoded_on_the_cpu(tmp_path):
    pairs = _mixed(tmp_path)
    standin = StandIn(refuse={_tail(pairs[4][0])})
    gpu = list(ImageLoader(pairs, PP, 4, torch.device("cpu"), threads=0, gpu_decoder=standin))
    # The batch call failed, so that batch went image by image; the refused one fell back to the CPU.
    assert standin.calls[0] == 3 and standin.calls[1] == 3 and standin.calls[2:5] == [1, 1, 1]
    for (a, ya), (b, yb) in zip(gpu, _cpu_batches(pairs)):
        assert torch.equal(ya, yb) and torch.equal(a, b)


@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_a_file_neither_decoder_reads_is_an_error_or_a_skip(tmp_path, on_bad_image):
    from tlcli.errors import DataError

    pairs = _mixed(tmp_path)
    bad = pairs[6][0]
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 not really a JPEG" * 8)
    loader = ImageLoader(pairs, PP, 4, torch.device("cpu"), threads=1, gpu_decoder=StandIn(), on_bad_image=on_bad_image)
    if on_bad_image == "error":
        with pytest.raises(DataError, match=f"{bad}: cannot read image"):
            list(loader)
        return
    batches = list(loader)
    assert loader.skipped == [bad]
    labels = [y for _, ys in batches for y in ys.tolist()]
    assert labels == [label for source, label in pairs if source != bad]
    assert [len(y) for _, y in batches] == [4, 3, 1]


def _photos(tmp_path, n=10):
    import skimage.data

    cat = skimage.data.chelsea()
    paths = []
    for i in range(n):
        crop = cat[i * 10 : i * 10 + 200, i * 15 : i * 15 + 250]
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(crop).save(path, quality=90)
        paths.append((str(path), i % 3))
    return paths


def test_threads_and_prefetch_give_the_same_batches_as_serial_loading(tmp_path):
    pairs = _photos(tmp_path)
    cpu = torch.device("cpu")
    serial = list(ImageLoader(pairs, PP, 4, cpu, threads=0))
    threaded = list(ImageLoader(pairs, PP, 4, cpu, threads=3, prefetch=2))
    assert [len(y) for _, y in threaded] == [4, 4, 2]
    for (a, ya), (b, yb) in zip(serial, threaded):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    order = [9, 0, 5, 1, 2, 3, 4, 6, 7, 8]
    first, labels = next(iter(ImageLoader(pairs, PP, 4, cpu, threads=2, order=order)))
    assert labels.tolist() == [pairs[i][1] for i in order[:4]]
    assert first.is_contiguous(memory_format=torch.channels_last) and first.dtype == torch.float32


@pytest.mark.real
def test_decoders_and_resize_paths_bound_the_feature_difference(tmp_path):
    """torchvision.io and PIL decode JPEGs with the same libjpeg-turbo; the uint8 resize of the
    pipeline rounds where the old float path did not. Both must leave Lite0's features alone."""
    from tlcli.config.schema import BaseSpec, WeightsSpec
    from tlcli.model.zoo import build_base

    base = build_base(BaseSpec(zoo="timm", model="tf_efficientnet_lite0", weights=WeightsSpec(name="embedded")))
    pp, cpu = base.preprocess, torch.device("cpu")
    paths = [p for p, _ in _photos(tmp_path, 4)]
    tv = torch.stack([fit_to_size(read_image(p), pp) for p in paths])
    pil = torch.stack([fit_to_size(_decode_with_pil(p, 3), pp) for p in paths])
    assert (tv.int() - pil.int()).abs().max() <= 1  # the same library; at most rounding
    old = torch.stack([fit_to_size(read_image(p).float() / 255, pp) for p in paths])  # tl 0.1's float path
    features = base.model.eval()
    with torch.no_grad():
        a, b, c = (features.forward_features(to_model_input(x, pp, cpu)).mean((2, 3)) for x in (tv, pil, old))
    for other in (b, c):
        cos = torch.nn.functional.cosine_similarity(a, other).min()
        assert cos > 0.999, cos


@pytest.mark.parametrize("mode,make,expected", [
    ("I;16", lambda: Image.fromarray(np.full((4, 4), 32896, np.uint16)), 128),  # 32896 / 65535 * 255 = 128
    ("I", lambda: Image.fromarray(np.full((4, 4), 40000, np.int32)), 156),  # 16-bit range in a 32-bit image
    ("F", lambda: Image.fromarray(np.full((4, 4), 0.25, np.float32)), 64),  # floats are [0, 1]
    ("P", lambda: Image.fromarray(np.full((4, 4), 200, np.uint8)).convert("P"), 200),
    ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 0)), 255),  # no ink: white
    ("RGBA", lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 0)), 255),  # transparent: white background
    ("LA", lambda: Image.new("LA", (4, 4), (100, 255)), 100),
])
def test_every_image_mode_becomes_the_right_8_bit_pixels(tmp_path, mode, make, expected):
    image = make()
    assert image.mode == mode
    path = tmp_path / ("x.tiff" if mode in ("I", "F", "CMYK") else "x.png")
    image.save(path)
    pixels = read_image(str(path))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 4, 4)
    assert int(pixels[0, 0, 0]) == expected, pixels[:, 0, 0]


def test_16_bit_png_through_torchvision_keeps_its_grey_levels(tmp_path):
    grey = np.linspace(0, 65535, 16, dtype=np.uint16).reshape(4, 4)
    Image.fromarray(grey).save(tmp_path / "x.png")
    pixels = read_image(str(tmp_path / "x.png"))
    assert len(torch.unique(pixels)) == 16  # not crushed to two levels
    assert int(pixels[0, 0, 0]) == 0 and int(pixels[0, 3, 3]) == 255


# ----------------------------------------------------------------- the CUDA plumbing, on the CPU


class _Ahead(StandIn):
    """A stand-in that notes the thread each decode runs on and says when the second batch's began."""

    def __init__(self):
        super().__init__()
        import threading

        self.threads, self.second = [], threading.Event()

    def decode(self, data, device):
        import threading

        self.threads.append(threading.current_thread().name)
        if len(self.calls) == 1:
            self.second.set()
        return super().decode(data, device)


def test_the_device_worker_decodes_the_next_batch_while_the_consumer_holds_this_one(tmp_path):
    """The GPU decode runs on the device worker, not in the consumer's thread: while the
    consumer still holds batch 0 (it has not asked for batch 1), batch 1's decode starts."""
    standin = _Ahead()
    loader = iter(ImageLoader(_photos(tmp_path, 9), PP, 3, torch.device("cpu"), threads=2, gpu_decoder=standin))
    next(loader)
    assert standin.second.wait(timeout=120), "batch 1 was not decoded until the consumer asked for it"
    rest = list(loader)
    assert len(rest) == 2 and set(standin.threads) == {"tl-device_0"}


class _FakeCuda:
    """torch.cuda's streams and events as records: which stream ran the decoder, which events
    the consumer's stream waited on, in what order."""

    def __init__(self):
        self.log, self.active = [], None

    class Stream:
        def __init__(self, device):
            self.name = "worker"

        def wait_event(self, event):
            raise AssertionError("the worker's stream waits on nothing")

    class _Consumer:
        def __init__(self, log):
            self.log = log

        def wait_event(self, event):
            self.log.append(("consumer waits", event.id))

    class Event:
        count = 0

        def __init__(self):
            _FakeCuda.Event.count += 1
            self.id = _FakeCuda.Event.count

        def record(self, stream):
            assert stream.name == "worker"
            self.recorded = True

    @contextlib.contextmanager
    def stream(self, stream):
        self.active = stream
        try:
            yield
        finally:
            self.active = None

    def current_stream(self, device):
        return _FakeCuda._Consumer(self.log)



def test_each_batch_is_decoded_on_the_workers_stream_and_waited_for_by_the_consumers(tmp_path):
    fake = _FakeCuda()

    class OnStream(StandIn):
        def decode(self, data, device):
            fake.log.append(("decode", fake.active.name if fake.active else None))
            return super().decode(data, device)

    pairs = _mixed(tmp_path)
    loader = ImageLoader(pairs, PP, 4, torch.device("cpu"), threads=2, gpu_decoder=OnStream(),
                         lane=DeviceLane(torch.device("cpu"), cuda=fake))
    seen = []
    for x, y in loader:
        seen.append([entry for entry in fake.log if entry[0] == "consumer waits"])
    assert all(entry == ("decode", "worker") for entry in fake.log if entry[0] == "decode")
    waits = seen[-1]
    # One event per batch, each waited on by the time its batch is yielded, in order.
    assert [len(s) for s in seen] == [1, 2, 3] and [w[1] for w in waits] == sorted(w[1] for w in waits)
    for (a, ya), (b, yb) in zip(ImageLoader(pairs, PP, 4, torch.device("cpu"), threads=2, gpu_decoder=StandIn(),
                                            lane=DeviceLane(torch.device("cpu"), cuda=_FakeCuda())), _cpu_batches(pairs)):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_images_decoded_on_the_cpu_reach_the_device_in_one_copy(monkeypatch):
    """The meta device stands in for the GPU: the CPU-decoded images of a batch are copied in
    one call, the one already on the device is left as it is, and order and skips are kept."""
    meta = torch.device("meta")
    on_device = torch.zeros(3, 32, 32, dtype=torch.uint8, device=meta)
    host = [torch.full((3, 32, 32), i, dtype=torch.uint8) for i in range(3)]
    copies = []
    original = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(tuple(self.shape)) or original(self, *a, **k))
    out = staged_on_device([host[0], on_device, None, host[1], host[2]], meta, pin=False)
    assert copies == [(3, 3, 32, 32)]  # one copy, of the three stacked
    assert out[1] is on_device and out[2] is None
    assert all(o.device == meta and o.shape == (3, 32, 32) for i, o in enumerate(out) if i != 2)


def test_images_of_one_shape_are_resized_together_with_the_pixels_of_one_at_a_time(monkeypatch):
    import tlcli.data.device_decode as device_decode

    rng = np.random.default_rng(0)
    shapes = [(3, 40, 50), (3, 40, 50), (3, 60, 30), (3, 40, 50), (3, 60, 30), (3, 33, 33)]
    images = [torch.from_numpy(rng.integers(0, 256, s, dtype=np.uint8)) for s in shapes]
    one_by_one = [fit_to_size(img, PP) for img in images]
    calls = []
    original = device_decode.fit_to_size
    monkeypatch.setattr(device_decode, "fit_to_size", lambda image, pp: calls.append(image.ndim) or original(image, pp))
    together = fit_in_batches(images, PP)
    assert calls == [4, 4, 3]  # one call per shape
    assert all(torch.equal(a, b) for a, b in zip(together, one_by_one))
