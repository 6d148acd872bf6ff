"""``tofu-export calibrate CHECKPOINT DATA``: measure per-block modes and r on your images; write policy.json."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tofu_export.cli.options import JsonOption, ModelOptions, OnnxOptions, RuntimeOptions
from tofu_export.cli.output import print_json, print_line, print_table
from tofu_export.errors import Hint, UserError


def calibrate(
    checkpoint: Annotated[str, typer.Argument(help="The model: a checkpoint file (or a timm name: random weights).")],
    data: Annotated[Path, typer.Argument(help="Images: a folder, an ImageFolder, or a dataset root with train/.")],
    model: ModelOptions,
    runtime: RuntimeOptions,
    onnx: OnnxOptions,
    r: Annotated[int, typer.Option("--r", "-r", help="Tokens a reducing block removes.")] = 16,
    images: Annotated[int, typer.Option("--images", help="Calibration images, evenly spread over DATA.")] = 64,
    confirm_images: Annotated[int, typer.Option(
        "--confirm-images", min=0, help="More images of DATA, beyond --images, on which the few best candidates of "
        "the search images are run again before one is chosen: under --speedup / --max-latency-ms the fastest whose "
        "mean over both sets is within one standard error of the highest, under a floor the fastest keeping "
        "--min-cosine over both (the search images alone cannot separate candidates a few 1e-4 of cosine apart); "
        "0: none.")] = 192,
    damage_images: Annotated[int, typer.Option(
        "--damage-images", min=1, help="How many of the search images (evenly spread; all where there are fewer) the "
        "damage per block is measured on: the prediction that guides the search, which runs every candidate on all "
        "of them. More: a steadier prediction, a longer calibration.")] = 32,
    min_cosine: Annotated[
        float | None, typer.Option("--min-cosine", help="Fastest policy whose output cosine to the unreduced model "
                                   "stays at least this [default: 0.995 when no budget is given].")
    ] = None,
    speedup: Annotated[
        float | None, typer.Option("--speedup", help="Most faithful policy at least this much faster than the "
                                   "unreduced model (measured latencies, batch 1).")
    ] = None,
    max_latency_ms: Annotated[
        float | None, typer.Option("--max-latency-ms", help="Most faithful policy at most this latency (batch 1).")
    ] = None,
    provider: Annotated[
        str, typer.Option("--provider", help="ONNX Runtime provider the latencies are measured on: cpu, cuda, "
                          "tensorrt.")
    ] = "cpu",
    rule: Annotated[
        str, typer.Option("--rule", help="How a block's mode is chosen: damage (the measured damage per mode) or "
                          "linearity (the paper's criterion: prune where the block is non-linear, MLERP elsewhere).")
    ] = "damage",
    linearity_threshold: Annotated[
        float, typer.Option("--linearity-threshold", help="With --rule linearity: prune where the block's mean "
                            "criterion exceeds this.")
    ] = 0.05,
    clock: Annotated[
        str, typer.Option("--clock", help="How latencies are timed: wall, or thread-cpu (the calling thread's CPU "
                          "time on one ORT thread: steadier on a busy machine).")
    ] = "wall",
    out: Annotated[Path, typer.Option("--out", "-o", help="Policy file to write; the plot goes beside it (.png).")]
    = Path("policy.json"),
    as_json: JsonOption = False,
) -> None:
    """Measure, per block, how much reducing tokens there damages the output with prune, mean and MLERP, the
    linearity criterion on the pairs matching would merge, and the latency each mode adds; choose per-block modes
    and r (0, r/2, r, 3r/2 or 2r) under one budget; verify the choice on the images; write policy.json and a plot.

    Use the policy with --policy on export, eval, sweep, profile and schedule.

    Examples:

      tofu-export calibrate dinov2.safetensors data/fashion-mnist --r 16 --min-cosine 0.998

      tofu-export calibrate deit_small.pth /data/imagenet/train --speedup 1.6 -o deit-policy.json
    """
    from tofu_export.calibration.images import check_image_count
    from tofu_export.calibration.select import Budget, check_rule
    from tofu_export.output_paths import FileOutput, check_file_outputs, is_policy_file, is_tofu_png
    from tofu_export.profiling.timing import clock_threads

    runtime.check()  # the options first: none of these loads torch
    clock_threads(clock, runtime.threads)
    config = onnx.build()  # how the graphs the latencies are measured on are exported: as the user exports
    if config.precision != "fp32":
        raise UserError(f"calibrate measures FP32 graphs; --precision {config.precision} is not supported here yet: "
                        "calibrate in FP32, then export the policy at the precision you ship "
                        f"(tofu-export export ... --policy {out} --precision {config.precision})",
                        hint=Hint("precision", "fp32"))
    if min_cosine is None and speedup is None and max_latency_ms is None:
        min_cosine = 0.995
    budget = Budget(min_cosine=min_cosine, speedup=speedup, max_latency_ms=max_latency_ms)
    check_rule(rule)
    check_image_count(images)
    plot_path = out.with_suffix(".png")
    check_file_outputs([FileOutput(out, is_policy_file, "policy"), FileOutput(plot_path, is_tofu_png, "policy plot")],
                       inputs=[checkpoint, data])  # refused before calibrating
    from tofu_export.calibration import calibrate, load_images, plot_policy
    from tofu_export.calibration.images import split_confirm
    from tofu_export.calibration.measured import ExportSettings

    loaded = model.load(checkpoint)
    batch, source = load_images(data, loaded.model, images + confirm_images)
    batch, confirm = split_confirm(batch, images)
    start = time.perf_counter()
    settings = ExportSettings(config.exporter, config.opset or 17, config.simplify, config.simplifier,
                              config.tolerance)
    policy = calibrate(loaded.model, batch, r=r, budget=budget, provider=provider, threads=runtime.threads,
                       source=source, settings=settings, clock=clock, rule=rule,
                       linearity_threshold=linearity_threshold, confirm=confirm, damage_images=damage_images)
    seconds = time.perf_counter() - start
    checkpoint_record = {"source": str(checkpoint), "sha256": loaded.sha256, "arch": loaded.arch.name}
    policy = dataclasses.replace(policy, source=dict(policy.source, checkpoint=checkpoint_record,
                                                     seconds=round(seconds, 1)))
    from tofu_export.atomic import signals_held

    with signals_held():  # the policy and its plot are written as a pair: a Ctrl-C waits until both are
        policy.save(out)
        plot_policy(policy, plot_path)
    if as_json:
        print_json(json_answer(policy, out, plot_path, r, seconds))
        return
    m = policy.measurements
    gate = (m.get("measured_latency") or {}).get("export_parity")  # the parity gate `export --policy` applies
    table = Table(title=f"{checkpoint}: per-block choice for {budget_text(budget)} ({source['count']} images, "
                  f"{seconds:.0f} s)", title_justify="left")
    for column in ("block", "mode", "r", "damage prune", "damage mean", "damage mlerp", "linearity",
                   "linearity rule"):
        table.add_column(column, justify="right")
    for i, (mode, removed) in enumerate(zip(policy.modes, policy.r, strict=True)):
        damage = [f"{m['damage'][k][i]:.1e}" for k in ("prune", "mean", "mlerp")]
        table.add_row(str(i), mode if removed else "-", str(removed), *damage, f"{m['linearity'][i]['mean']:.3f}",
                      m["rule_modes"]["linearity"][i])
    console = Console()
    print_table(console, table)
    print_line(console, f"wrote {out} and {plot_path}")
    print_table(console, comparison_table(m, r))
    calibration_images = policy.source["images"]["count"]  # the search and held-out images, not the confirm ones
    for line in (f"verdict: {comparison_verdict(m)}", noise_note(m, calibration_images), floor_note(m, budget),
                 tome_note(m), parity_warning(gate, out)):
        if line:
            print_line(console, line)


def json_answer(policy: Any, out: Path, plot_path: Path, r: int, seconds: float) -> dict[str, Any]:
    """What ``calibrate --json`` prints: the files, the choice, its predicted and measured figures, ToMe at the same r
    and at the same measured speed, the held-out lead over it (``held_out_vs_tome``) and the export's parity gate."""
    from tofu_export.calibration.versus_tome import better_tome

    m = policy.measurements
    return {"policy": str(out), "plot": str(plot_path), "modes": list(policy.modes), "r": list(policy.r),
            "predicted_cosine": m["predicted_cosine"], "measured_cosine": m["measured_cosine"],
            "predicted_speedup": m["predicted_speedup"], "baseline_ms": m["baseline_ms"], "seconds": seconds,
            "measured_speedup": m.get("measured_speedup"), "held_out_cosine": m.get("held_out_cosine"),
            "held_out_standard_error": m.get("held_out_standard_error"),
            "tome": {"r": r, "measured_cosine": m["uniform"]["mean"]["measured_cosine"],
                     "predicted_ms": m["uniform"]["mean"]["predicted_ms"]},
            "tome_at_measured_speedup": m.get("tome_at_measured_speedup"), "better_tome": better_tome(m),
            "held_out_vs_tome": m.get("held_out_vs_tome"),
            "export_parity": (m.get("measured_latency") or {}).get("export_parity")}


def tome_note(m: dict[str, Any]) -> str | None:
    """The note for ``calibration.versus_tome.better_tome``: plain ToMe measured faster and closer than the policy."""
    from tofu_export.calibration.versus_tome import better_tome

    tome = better_tome(m)
    if tome is None:
        return None
    images = f"{m['held_out_images']} held-out" if tome["images"] == "held-out" else "calibration"
    return (f"note: ToMe r={tome['r']}, timed in the same rounds, measured {tome['measured_speedup']:.2f}x (the policy "
            f"{m['measured_speedup']:.2f}x) with cosine {tome['cosine']:.5f} on the {images} images (the policy "
            f"{tome['policy_cosine']:.5f}): plain ToMe is the better export here (--mode tome --r {tome['r']}), "
            f"unless calibrating on more images (--images) says otherwise.")


def parity_warning(gate: dict[str, Any] | None, out: Path) -> str | None:
    """A warning when the policy's graph (timed by the calibration) fails the parity gate of ``export --policy``
    (``gate``: the policy's ``export_parity`` record; None when its latency was not measured)."""
    if not gate or gate["ok"]:
        return None
    return (f"warning: this policy's graph fails the export's parity gate (lowest per-image cosine "
            f"{gate['min_cosine']:.4f}, {gate['images_within_tolerance']:.0%} of the images within the tolerance), "
            f"so `tofu-export export --policy {out}` will refuse it. {gate['advice']}")


def budget_text(budget: Any) -> str:
    """``cosine >= 0.995``, ``1.60x speed-up`` or ``at most 40.0 ms``: the budget in words, not a dict."""
    if budget.min_cosine is not None:
        return f"cosine >= {budget.min_cosine:g}"
    if budget.speedup is not None:
        return f"a {budget.speedup:g}x speed-up"
    return f"at most {budget.max_latency_ms:g} ms"


def comparison_table(m: dict[str, Any], r: int) -> Table:
    """The answer: the policy against the unreduced model, ToMe at the same r and, where it was timed, ToMe at the
    policy's measured speed-up (cosine on the search and the held-out images; latency predicted by the calibration's
    latency model on its backend, and measured on the exported graphs); ``comparison_verdict`` says it in a line."""
    tome = m["uniform"]["mean"]
    base_ms = m["baseline_ms"]
    measured = m.get("measured_latency")
    caption = (f"cosine to the unreduced model's output, on the search images and on images the search never saw "
               f"(held out); latency predicted on {m['latency']['backend']} from per-block timings")
    if measured is not None:
        caption += (f"; measured: the exported graphs ({measured['exporter']}, opset {measured['opset']}), "
                    f"{measured['rounds']} interleaved rounds against the unreduced graph on the "
                    f"{measured.get('clock', 'wall')} clock")
    matched = m.get("tome_at_measured_speedup")
    if matched is not None:
        *others, last = [str(k) for k in matched["r"]]
        at_r = "r=" + (f"{', '.join(others)} and {last}" if others else last)
        caption += (f"; ToMe at the policy's measured speed-up: timed in the same rounds at {at_r}, its cosine "
                    "interpolated between the two nearest"
                    + (" (extrapolated: the policy lies outside them)" if matched.get("extrapolated") else ""))
    table = Table(title="calibrated policy vs ToMe at the same r and at the same measured speed", title_justify="left",
                  caption_justify="left", caption=caption + ".")
    at_speed = "ToMe, same speed" if matched is not None else None
    table.add_column("", justify="left", no_wrap=True)
    for column in ("unreduced", f"ToMe r={r}", *([at_speed] if at_speed else []), "policy"):
        table.add_column(column, justify="right")

    def row(label: str, base: str, same_r: str, same_speed: str, policy: str) -> None:
        table.add_row(label, base, same_r, *([same_speed] if at_speed else []), policy)

    same = matched or {}
    row("cosine, search images", "1", f"{tome['measured_cosine']:.5f}",
        f"{same['cosine']:.5f}" if "cosine" in same else "", f"{m['measured_cosine']:.5f}")
    if m.get("held_out_cosine") is not None:
        row(f"cosine, {m['held_out_images']} held out", "1", "",
            f"{same['held_out_cosine']:.5f}" if "held_out_cosine" in same else "", f"{m['held_out_cosine']:.5f}")
    row("latency, predicted", f"{base_ms:.1f} ms", f"{tome['predicted_ms']:.1f} ms", "", f"{m['predicted_ms']:.1f} ms")
    row("speed-up, predicted", "1.00x", f"{base_ms / tome['predicted_ms']:.2f}x", "", f"{m['predicted_speedup']:.2f}x")
    if measured is not None:
        low, high = measured["speedup_iqr"]
        row("speed-up, measured", "1.00x", "",
            f"{m['measured_speedup']:.2f}x" if matched else "", f"{m['measured_speedup']:.2f}x")
        row("  quartiles over rounds", "", "", "", f"{low:.2f}-{high:.2f}x")
    return table


def comparison_verdict(m: dict[str, Any]) -> str:
    """The comparison table's answer in one line: the held-out lead over ToMe at the same measured speed where it
    was measured, else where the policy stands against ToMe at the same r (search images, predicted latency)."""
    same, tome = m.get("tome_at_measured_speedup") or {}, m["uniform"]["mean"]
    if "held_out_cosine" in same and m.get("held_out_cosine") is not None:
        return held_out_verdict(m["held_out_cosine"] - same["held_out_cosine"], m.get("held_out_vs_tome"))
    closer = m["measured_cosine"] >= tome["measured_cosine"]
    faster = m["predicted_ms"] <= tome["predicted_ms"]
    return {(True, True): "beats ToMe on both", (True, False): "closer than ToMe, predicted slower",
            (False, True): "faster than ToMe, less close", (False, False): "behind ToMe on both"}[closer, faster]


def held_out_verdict(ahead: float, paired: dict[str, Any] | None) -> str:
    """The policy's lead over ToMe at its measured speed on the held-out images, with the standard error of the
    per-image differences (``evaluation.metrics.paired_difference``; None in a policy written before it)."""
    if paired is None:
        return f"held out: {ahead:+.5f} cosine vs ToMe at the same measured speed"
    n = paired["images"]
    se = "no error bar" if paired["standard_error"] is None else f"± {paired['standard_error']:.5f} SE"
    return f"held out: {ahead:+.5f} cosine vs ToMe at the same measured speed ({se}, {n} image{'s' * (n != 1)})"


def floor_note(m: dict[str, Any], budget: Any) -> str | None:
    """A note when a floor's policy, kept on the search images, reads below the floor on the held-out images, with
    the standard error of that mean (``held_out_standard_error``) saying whether the images can tell."""
    held = m.get("held_out_cosine")
    if budget.min_cosine is None or held is None or held >= budget.min_cosine:
        return None
    short, se = budget.min_cosine - held, m.get("held_out_standard_error")
    if se is None:
        spread = "one image: no error bar"
    elif short <= 2 * se:
        spread = f"within two standard errors ({se:.5f} each): these images cannot tell"
    else:
        spread = f"beyond two standard errors ({se:.5f} each)"
    return (f"note: on the {m['held_out_images']} held-out images the policy measures {held:.5f}, {short:.5f} below "
            f"the floor {budget.min_cosine:g} it kept on the calibration images ({spread}). Images unlike those "
            "calibrated on read lower: calibrate on images like the ones you will run, or ask for a higher "
            "--min-cosine.")


def noise_note(m: dict[str, Any], images: int | None = None) -> str | None:
    """A note when the policy's held-out lead over ToMe at the same speed (``held_out_vs_tome``) is within two
    standard errors: the images cannot tell the two apart. With ``images`` (the calibration's, the held-out ones
    among them) it says how many would show a difference of this size (``evaluation.metrics.images_to_show``)."""
    from tofu_export.evaluation.metrics import images_to_show

    paired = m.get("held_out_vs_tome")
    if not paired or paired["standard_error"] is None or abs(paired["difference"]) > 2 * paired["standard_error"]:
        return None
    note = (f"note: on the {paired['images']} held-out images the policy's lead over ToMe at the same speed, "
            f"{paired['difference']:+.5f} cosine, is within two standard errors ({paired['standard_error']:.5f} "
            "each): noise, not a difference.")
    needed = images_to_show(paired)
    if needed is None or not images:
        return note + " Calibrate on more --images to tell them apart."
    return (note + f" A difference this size would stand two standard errors out on about {needed:,} held-out images "
            f"(--images {math.ceil(needed * images / paired['images']):,}), the spread per image staying as measured "
            "here.")
