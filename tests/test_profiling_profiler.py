"""profile(): per-batch latency, optional breakdown, memory and power, over a fake and a real backend."""

import json
from pathlib import Path

import pytest
import timm
import torch

from tofu_export.engines.base import OpTime, Runner
from tofu_export.engines.torch import TorchRunner
from tofu_export.profiling.device import cpu_features_from_cpuinfo, cpu_model_from_cpuinfo, describe_device
from tofu_export.profiling.errors import ProfilerError
from tofu_export.profiling.images import TimingImages
from tofu_export.profiling.profiler import profile


class FakeRunner:
    """Counts runs per batch size and reports fixed op times."""

    name = "fake"
    device = "cpu"

    def __init__(self) -> None:
        self.runs: dict[int, int] = {}
        self.profiled: list[tuple[int, int]] = []
        self.fed: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)

    def run(self, batch_size: int) -> None:
        self.runs[batch_size] = self.runs.get(batch_size, 0) + 1

    def feed_images(self, images: torch.Tensor) -> None:
        self.fed = images

    def sync(self) -> None:
        return None

    def profile_ops(self, batch_size: int, iters: int) -> list[OpTime]:
        self.profiled.append((batch_size, iters))
        return [OpTime("/blocks.0/attn/qkv/MatMul", "MatMul", 1.0 * batch_size), OpTime("/head/Gemm", "Gemm", 0.5)]


def test_profile_runs_each_batch_size_with_warmup_and_iters() -> None:
    backend = FakeRunner()
    assert isinstance(backend, Runner)
    result = profile(backend, batch_sizes=[1, 4], warmup=3, iters=7, breakdown=True, breakdown_iters=2)
    assert backend.runs == {1: 10, 4: 10}
    assert backend.profiled == [(1, 2), (4, 2)]
    assert [b.batch_size for b in result.batches] == [1, 4]
    assert all(b.latency.n == 7 for b in result.batches)
    assert result.batches[1].breakdown is not None
    assert result.batches[1].breakdown.by_category_ms["attention"] == pytest.approx(4.0)
    assert result.batches[0].memory.peak_rss_mib is not None
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["backend"] == "fake" and payload["batches"][0]["latency"]["batch_size"] == 1


def test_profile_feeds_the_images_and_says_what_it_timed_on() -> None:
    backend, images = FakeRunner(), torch.rand(2, 3, 8, 8)
    assert profile(backend, batch_sizes=[1], warmup=0, iters=2).timed_on == "seeded normal noise"
    assert backend.fed is None
    result = profile(backend, batch_sizes=[1], warmup=0, iters=2, images=TimingImages(images, "2 images from x"))
    assert backend.fed is images
    assert result.timed_on == "2 images from x" and result.to_dict()["timed_on"] == "2 images from x"


def test_profile_without_breakdown_skips_op_profiling() -> None:
    backend = FakeRunner()
    result = profile(backend, batch_sizes=[2], warmup=0, iters=3, breakdown=False)
    assert backend.profiled == [] and result.batches[0].breakdown is None


def test_profile_rejects_bad_batch_sizes() -> None:
    with pytest.raises(ProfilerError, match="batch_sizes"):
        profile(FakeRunner(), batch_sizes=[0], warmup=0, iters=1)


def test_profile_torch_backend_end_to_end() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    backend = TorchRunner(model, img_size=32, threads=1)
    result = profile(backend, batch_sizes=[2], warmup=1, iters=None, budget_s=0.05, breakdown=True)
    batch = result.batches[0]
    assert batch.latency.n >= 1 and batch.latency.mean_ms > 0
    assert batch.breakdown is not None and batch.breakdown.by_category_ms["mlp"] > 0
    assert not batch.power.available  # no tegrastats here, and nothing is invented


def test_cpu_model_from_cpuinfo_x86_and_arm() -> None:
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
    arm = "processor\t: 0\nBogoMIPS\t: 62.50\nCPU part\t: 0xd42\n\nModel\t: NVIDIA Jetson Orin Nano\n"
    assert cpu_model_from_cpuinfo(x86) == "AMD EPYC 7B13"
    assert cpu_model_from_cpuinfo(arm) == "NVIDIA Jetson Orin Nano"
    assert cpu_model_from_cpuinfo(None) is None


def test_cpu_features_from_cpuinfo_x86_and_arm() -> None:
    """The vector extensions that decide ORT's kernels, in SIMD_FLAGS order; a CPU without one says so."""
    no_avx2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse4_2 fma avx f16c hypervisor\nflags\t: avx2\n"
    vnni = "flags\t: avx512_vnni avx2 avx avx512f avx512_vnnix fma\n"  # a longer name is not its prefix
    arm = "Features\t: fp asimd evtstrm aes asimdhp cpuid asimddp\nModel\t: NVIDIA Jetson Orin Nano\n"
    assert cpu_features_from_cpuinfo(no_avx2) == ["avx", "fma", "f16c"]  # the first flags line only
    assert cpu_features_from_cpuinfo(vnni) == ["avx", "avx2", "fma", "avx512f", "avx512_vnni"]
    assert cpu_features_from_cpuinfo(arm) == ["asimd", "asimdhp", "asimddp"]
    assert cpu_features_from_cpuinfo("model name\t: x\n") is None and cpu_features_from_cpuinfo(None) is None
    assert cpu_features_from_cpuinfo("flags\t: fpu sse\n") == []


def test_describe_device_reads_versions(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Test CPU 9000\nflags\t: fpu avx2 avx\n")
    device = describe_device(cpuinfo)
    assert device.cpu_model == "Test CPU 9000" and device.cpu_features == ["avx", "avx2"]
    assert device.torch == torch.__version__.split("+")[0]
    assert device.cpu_cores is not None and device.cpu_cores >= 1
