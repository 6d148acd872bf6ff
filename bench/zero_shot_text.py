"""How long zero-shot classification's text side takes on this CPU: an open_clip ViT-B-32's text tower (random
weights: the time does not depend on them) encoding CLIP's ImageNet prompts, over the full 77-token context as
open_clip's ``encode_text`` runs it, and on the longest prompt's tokens only (``open_clip_text._run``: a causal
tower pooled at the end-of-text token sees the same), interleaved in one process; and the largest difference
between the two embeddings.

    python bench/zero_shot_text.py [--classes 64] [--rounds 3] [--threads N]

Writes ``bench/results/zero_shot_text/result.json`` and ``.md`` (the command, the machine, every round).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch
from open_clip import zero_shot_metadata

from tofu_export.models.open_clip_text import _run
from tofu_export.profiling.device import describe_device

OUT = Path(__file__).parent / "results" / "zero_shot_text"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=64, help="ImageNet classes encoded per round (of 1,000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()  # random weights; its text tower as open_clip builds it
    tower = open_clip.model._build_text_tower(512, open_clip.get_model_config("ViT-B-32")["text_cfg"])
    tower.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", "logit"))})
    tower.eval()
    tokenize = open_clip.get_tokenizer("ViT-B-32")
    templates = [make("{}") for make in zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES]
    names = zero_shot_metadata.IMAGENET_CLASSNAMES[:args.classes]
    tokens = tokenize([template.replace("{}", name) for name in names for template in templates])  # [K * 7, 77]
    lengths = (tokens.argmax(dim=-1) + 1).tolist()
    ways = {"full context": lambda batch: tower(batch), "longest prompt": lambda batch: _run(tower, batch)}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for way, run in ways.items():  # interleaved: a slow spell hits both
                start = time.perf_counter()
                outputs[way] = torch.cat([run(tokens[i:i + 256]) for i in range(0, len(tokens), 256)])
                seconds[way].append(time.perf_counter() - start)
    ratios = [full / short for full, short in zip(seconds["full context"], seconds["longest prompt"], strict=True)]
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": describe_device().to_dict(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "prompts": len(tokens), "classes": len(names), "templates": len(templates),
        "tokens_per_prompt": {"min": min(lengths), "max": max(lengths), "context": tokens.shape[1]},
        "seconds": seconds, "prompts_per_second": {way: [len(tokens) / s for s in values]
                                                   for way, values in seconds.items()},
        "speedup_per_round": ratios,
        "max_abs_diff": float((outputs["full context"] - outputs["longest prompt"]).abs().max()),
        "embedding_scale": float(outputs["full context"].abs().max()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    cpu = f"{result['machine']['cpu_model']} ({result['machine']['cpu_cores']} cores)"
    lines = [f"# Zero-shot text side: {len(tokens)} prompts ({len(names)} ImageNet classes x {len(templates)} "
             "templates), open_clip ViT-B-32 text tower", "", f"`{result['command']}` on {cpu}, "
             f"torch {torch.__version__}, {result['threads']} threads; rounds interleaved.", "",
             "| | seconds per round | prompts/s (median) |", "|---|---|---|"]
    for way, values in seconds.items():
        lines.append(f"| {way} | {', '.join(f'{s:.2f}' for s in values)} | "
                     f"{statistics.median(result['prompts_per_second'][way]):.0f} |")
    lines += ["", f"Speed-up per round: {', '.join(f'{r:.2f}x' for r in ratios)}; tokens per prompt "
              f"{min(lengths)}-{max(lengths)} of {tokens.shape[1]}; largest difference between the embeddings "
              f"{result['max_abs_diff']:.2e} (their largest value {result['embedding_scale']:.2f})."]
    (args.out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
