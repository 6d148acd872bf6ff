"""tegrastats parsing on recorded JetPack 4/5/6 lines, summaries, and the background monitor."""

import sys
import time

import pytest

from tofu_export.profiling.tegrastats import (
    TegraSample,
    TegrastatsMonitor,
    find_tegrastats,
    parse_line,
    summarize_samples,
)

JETPACK4_NANO = (
    "RAM 1512/3956MB (lfb 132x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [4%@102,1%@102,0%@102,0%@102] EMC_FREQ 0%@1600 GR3D_FREQ 7%@76 APE 25 PLL@20C CPU@22C "
    "PMIC@100C GPU@21.5C AO@28C thermal@21.75C POM_5V_IN 1221/1300 POM_5V_GPU 0/0 POM_5V_CPU 164/164"
)
JETPACK5_ORIN_NX = (
    "RAM 3000/15388MB (lfb 2851x4MB) SWAP 0/7694MB (cached 0MB) CPU [2%@729,1%@729,0%@729,0%@729,off,off,"
    "off,off] EMC_FREQ 0%@2133 GR3D_FREQ 45%@[305,305] VIC_FREQ 729 APE 200 CV0@-256C CPU@46.968C "
    "SOC2@43.968C tj@46.968C VDD_IN 5015mW/4800mW VDD_CPU_GPU_CV 632mW/632mW VDD_SOC 1500mW/1500mW"
)
JETPACK6_ORIN_NANO = (
    "11-15-2024 10:30:45 RAM 2296/7620MB (lfb 4x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [1%@729,0%@729,0%@729,0%@729,0%@729,0%@729] GR3D_FREQ 99% cpu@48.437C soc2@47.25C "
    "gpu@48.218C tj@48.437C VDD_IN 7395mW/4395mW VDD_CPU_GPU_CV 2476mW/476mW VDD_SOC 1347mW/1347mW"
)
AGX_ORIN_NO_INPUT_RAIL = (
    "RAM 4722/30536MB (lfb 6330x4MB) CPU [0%@2201,0%@2201] GR3D_FREQ 0%@[0,0] "
    "GPU 0mW/0mW CPU 826mW/826mW SOC 2476mW/2476mW CV 0mW/0mW VDDRQ 412mW/412mW SYS5V 3524mW/3524mW"
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (JETPACK4_NANO, TegraSample(1512, 3956, 7, 1221, "POM_5V_IN")),
        (JETPACK5_ORIN_NX, TegraSample(3000, 15388, 45, 5015, "VDD_IN")),
        (JETPACK6_ORIN_NANO, TegraSample(2296, 7620, 99, 7395, "VDD_IN")),
        (AGX_ORIN_NO_INPUT_RAIL, TegraSample(4722, 30536, 0, None, None)),
    ],
)
def test_parse_line(line: str, expected: TegraSample) -> None:
    assert parse_line(line) == expected


def test_unrelated_line_is_ignored() -> None:
    assert parse_line("tegrastats: permission denied") is None


def test_summary_mean_power_and_energy_per_image() -> None:
    samples = [parse_line(JETPACK5_ORIN_NX), parse_line(JETPACK6_ORIN_NANO)]
    report = summarize_samples([s for s in samples if s], total_time_s=2.0, images=100)
    assert report.available and report.reason is None and report.n_samples == 2
    assert report.mean_power_mw == pytest.approx(6205.0)
    assert report.energy_mj_per_image == pytest.approx(6205.0 * 2.0 / 100)  # W * s / images, in mJ
    assert report.gr3d_mean_pct == pytest.approx(72.0)
    assert (report.ram_used_max_mib, report.ram_total_mib) == (3000, 15388)


def test_summary_without_input_rail_leaves_power_unset() -> None:
    sample = parse_line(AGX_ORIN_NO_INPUT_RAIL)
    assert sample is not None
    report = summarize_samples([sample], total_time_s=1.0, images=10)
    assert report.mean_power_mw is None and report.energy_mj_per_image is None
    assert "VDD_IN" in (report.reason or "")


def test_summary_without_samples_is_unavailable() -> None:
    report = summarize_samples([], total_time_s=1.0, images=10)
    assert not report.available and report.mean_power_mw is None and report.reason


@pytest.mark.skipif(find_tegrastats() is not None, reason="tegrastats is installed (this is a Jetson)")
def test_monitor_off_jetson_reports_unavailable() -> None:
    with TegrastatsMonitor() as monitor:
        pass
    report = monitor.report(total_time_s=1.0, images=1)
    assert not report.available and "not a Jetson" in (report.reason or "")
    assert report.mean_power_mw is None and report.energy_mj_per_image is None


def test_monitor_collects_lines_from_a_background_process() -> None:
    script = (
        "import sys, time\n"
        f"for line in {[JETPACK5_ORIN_NX, JETPACK6_ORIN_NANO, 'noise']!r}:\n"
        "    print(line, flush=True)\n"
        "time.sleep(60)\n"
    )
    with TegrastatsMonitor(command=[sys.executable, "-c", script]) as monitor:
        deadline = time.monotonic() + 20
        while len(monitor.samples) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert monitor._process is not None and monitor._process.poll() is not None  # stopped on exit
    report = monitor.report(total_time_s=1.0, images=10)
    assert report.n_samples == 2 and report.mean_power_mw == pytest.approx(6205.0)
