"""Correctness that no error would reveal: SyncBatchNorm that trains, timm's crop modes,
one GPU per rank, the determinism switches, writes that survive a power cut, one downloader."""

import hashlib
import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

from tlcli.errors import SpecError, WeightsError

from conftest import tiny_recipe


# --------------------------------------------------------------------------- SyncBatchNorm


def test_sync_batchnorm_layers_train_and_frozen_ones_stay_in_eval():
    from tlcli.model.build import build_network
    from tlcli.config.schema import Recipe
    from tlcli.engine.stage import StageForward, use_sync_batchnorm

    recipe = Recipe.model_validate(tiny_recipe(__import__("pathlib").Path("/tmp"), freeze={"until": "stem"}))
    prepared = build_network(recipe, [str(i) for i in range(10)])
    model = StageForward(prepared, on_images=True, device=torch.device("cpu"))
    before = {n: m.weight.data_ptr() for n, m in model.trainable.named_modules() if isinstance(m, nn.BatchNorm2d)}
    converted = use_sync_batchnorm(model.pinned.net, model.trainable, model.pinned.frozen_modules)
    assert converted and set(converted) == set(before) and not any(n.startswith("stem") for n in converted)
    for mode in (True, False, True):
        model.train(mode)
        for name in converted:
            m = model.trainable.get_submodule(name)
            # One module object in the full model and in the trainable part, sharing the old parameters.
            assert isinstance(m, nn.SyncBatchNorm) and model.pinned.net.get_submodule(name) is m
            assert m.weight.data_ptr() == before[name] and m.training is mode
        assert not model.pinned.net.get_submodule("stem.1").training  # frozen BN: eval, always


# --------------------------------------------------------------------------- timm's crop modes


def _smooth_picture(h=300, w=460):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([128 + 100 * np.sin(x / 37.0), 128 + 100 * np.cos(y / 23.0),
                     128 + 80 * np.sin((x + y) / 51.0)], -1).astype(np.uint8)


def test_every_timm_pretrained_config_is_preprocessed_as_timm_does():
    """Over timm's whole registry of pretrained configs (no download): each distinct eval
    preprocessing (size, crop_pct, crop_mode, interpolation, mean) gives the picture timm's
    own transform gives, within resampling noise; non-square inputs are refused by name."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    from tlcli.data.pipeline import fit_to_size
    from tlcli.model.zoo import timm_preprocess

    picture = _smooth_picture()
    pil, tensor = Image.fromarray(picture), torch.from_numpy(picture).permute(2, 0, 1).contiguous()
    combos, refused = {}, []
    for name in timm.list_pretrained():
        cfg = resolve_data_config(pretrained_cfg=get_pretrained_cfg(name).to_dict())
        try:
            pp = timm_preprocess(cfg)
        except WeightsError as err:
            assert "tl takes square inputs" in str(err) and cfg["input_size"][1] != cfg["input_size"][2]
            refused.append(name)
            continue
        combos.setdefault((cfg["input_size"], cfg["crop_pct"], cfg.get("crop_mode"), cfg["interpolation"],
                           cfg["mean"]), (name, cfg, pp))
    assert {cfg.get("crop_mode") for _, cfg, _ in combos.values()} == {"center", "squash", "border"}
    assert len(refused) < 10
    for name, cfg, pp in combos.values():
        reference = torch.as_tensor(np.asarray(create_transform(**cfg, is_training=False, normalize=False)(pil)))
        ours = fit_to_size(tensor, pp)
        assert ours.shape == reference.shape, name
        assert (ours.float() - reference.float()).abs().mean() < 1.0, (name, cfg.get("crop_mode"))


def test_a_timm_model_with_a_squash_config_gets_it():
    import math

    from tlcli.config.schema import BaseSpec
    from tlcli.model.zoo import build_base

    # tf_efficientnetv2_b3's pretrained config: crop_mode squash, crop_pct 0.9, 240 px.
    zoo = build_base(BaseSpec.model_validate({"zoo": "timm", "model": "tf_efficientnetv2_b3", "weights": "none"}))
    assert (zoo.preprocess.mode, zoo.preprocess.size, zoo.preprocess.resize) == ("squash", 240, math.floor(240 / 0.9))


# --------------------------------------------------------------------------- devices


def test_under_torchrun_an_explicit_gpu_is_refused_not_shared_by_every_rank():
    from tlcli.engine.device import resolve_device

    with pytest.raises(SpecError, match="each rank takes its own GPU"):
        resolve_device("cuda:1", cuda_available=True, cuda_count=4, local_rank=0)
    assert str(resolve_device("cuda:1", cuda_available=True, cuda_count=4, local_rank=None)) == "cuda:1"


def test_cuda_gets_the_determinism_switches_and_the_cpu_keeps_its_defaults():
    code = ("import os, torch; from tlcli.engine.device import make_deterministic; "
            "make_deterministic(torch.device(os.environ['DEV'])); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), "
            "torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, os.environ.get('CUBLAS_WORKSPACE_CONFIG'), "
            "torch.utils.deterministic.fill_uninitialized_memory)")
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    # torch.device("cuda") is only a name here: the switches are set, no GPU is touched.
    on = subprocess.run([sys.executable, "-c", code], env={**env, "DEV": "cuda"}, capture_output=True, text=True)
    off = subprocess.run([sys.executable, "-c", code], env={**env, "DEV": "cpu"}, capture_output=True, text=True)
    # Without a NaN fill of every new tensor: deterministic kernels, not a kernel per allocation.
    assert on.stdout.split() == ["True", "True", "True", "False", ":4096:8", "False"], on.stderr
    assert off.stdout.split() == ["False", "False", "False", "False", "None", "True"], off.stderr


# --------------------------------------------------------------------------- durable writes


def test_a_write_is_fsynced_before_its_rename_and_a_commit_fsyncs_the_directory(tmp_path, monkeypatch):
    from tlcli import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("rename", os.path.basename(b)))
        real_replace(a, b)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    files.atomic_write(tmp_path / "shard", b"data")
    assert events == [("fsync", False), ("rename", "shard")]
    events.clear()
    files.write_json_atomic(tmp_path / "manifest.json", {"a": 1}, commit=True)
    assert events == [("fsync", False), ("rename", "manifest.json"), ("fsync", True)]


def test_the_files_that_commit_a_run_or_a_cache_fsync_their_directory(tmp_path, monkeypatch):
    from tlcli import files
    from tlcli.config.schema import Recipe
    from tlcli.engine.train import fit

    renamed, committed = [], set()
    real_fsync, real_replace = os.fsync, os.replace

    def replace(a, b):
        renamed.append(os.path.basename(b))
        real_replace(a, b)

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}") and renamed:
            committed.add(renamed[-1])  # the directory made durable right after this rename
        real_fsync(fd)

    monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.setattr(files.os, "fsync", fsync)
    fit(Recipe.model_validate(tiny_recipe(tmp_path, fine_tune={"epochs": 1})))
    assert {"tl-run.json", "manifest.json", "state.json", "checkpoint.json"} <= committed, committed


# --------------------------------------------------------------------------- one downloader


BODY = bytes(range(256)) * 64
SHA = hashlib.sha256(BODY).hexdigest()


class _Flaky:
    """Answers the first `failures` requests with `failure` (503, or silence past the timeout), then serves BODY."""

    def __init__(self, failures, failure, name="file.bin"):
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                """Quiet: the test reads the request count, not the log."""

            def do_GET(self):
                outer.requests += 1
                if outer.requests <= failures:
                    if failure == "slow":
                        threading.Event().wait(1.5)  # past the client's 0.5 s timeout
                    else:
                        self.send_response(503)
                        self.end_headers()
                        return
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(BODY)))
                    self.end_headers()
                    self.wfile.write(BODY)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow answer, as it should

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("failure", ["503", "slow"])
def test_server_errors_and_timeouts_are_retried_with_backoff(tmp_path, failure):
    from tlcli.data.download import download

    with _Flaky(2, failure) as srv:
        path = download(srv.url, tmp_path / "f.bin", SHA, max_bytes=1 << 20, timeout=0.5)
    assert path.read_bytes() == BODY and srv.requests == 3


def test_torchvision_weights_come_through_the_same_downloader(tmp_path):
    from tlcli.model.zoo import fetch_checkpoint

    name = f"weights-{SHA[:8]}.pth"
    with _Flaky(1, "503", name) as srv:
        assert fetch_checkpoint(srv.url, tmp_path / name).read_bytes() == BODY
    assert srv.requests == 2  # retried, as the data downloader retries
    bad = f"weights-{'0' * 8}.pth"
    with _Flaky(0, "503", bad) as srv, pytest.raises(WeightsError, match="sha256 is"):
        fetch_checkpoint(srv.url, tmp_path / bad)
    assert not (tmp_path / bad).exists()


@pytest.mark.parametrize("data,fragment", [
    ({"url": "https://mirror.example/f.tgz"}, "needs the archive's 'sha256'"),
    ({"url": "http://mirror.example/f.tgz", "sha256": SHA}, "must be https"),
])
def test_a_mirror_must_be_https_and_pinned(tmp_path, cli, data, fragment):
    from conftest import write_recipe

    recipe = tiny_recipe(tmp_path, data={"dataset": "flowers", "limit": None, **data})
    recipe["data"].pop("limit")
    code, out = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 1 and fragment in out
