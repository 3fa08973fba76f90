# fvae-ct: `make demo` (main job) and `make test`; both install what they need into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# every pip call of the Makefile installs at the exact versions of the one constraints file
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

# real data and weights live outside the repository
ifneq ($(wildcard ../shared/assets),)
export FVAE_ASSETS ?= $(abspath ../shared/assets)
endif
export MPLBACKEND := Agg

.PHONY: install demo test test-fast lint bundles bundle-check zoo-check bench bench-video bench-dist bench-gpu clean ablation-demo monailabel-check ldm-demo pacs-check

install: $(STAMP)

# a fresh environment whenever the project's requirements or the pins change; every package at its pin in
# constraints.txt (after changing this recipe: rm $(STAMP))
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv --clear $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools
	# the project with its extras (pyproject.toml): test tools (pytest, black / isort / flake8 + plugins, mypy,
	# nnU-Net v2), dicom (highdicom: DICOM SEG), ldm (the offline text-encoder weights), reference (JAX/Flax + I3D
	# weights, what the official repositories import); built with the pinned setuptools
	$(PIP_INSTALL) --no-build-isolation -e ".[test,ldm,reference,dicom]"
	$(PY) tools/pins.py check --env test
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fvae recon -o outputs/demo --vae taef2

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# the inner loop: no subprocess, nothing marked slow / distributed / download, and nothing whose last measured run
# (kept in .pytest_cache by every pytest run, `make test` included) took over 2 s
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra --fast $(PYTEST_ARGS)

# the model-zoo's format checks (its runtests.sh --codeformat flags) on the code every bundle vendors; the same
# hooks run from .pre-commit-config.yaml (`pre-commit install`, with this venv's tools on PATH); then the type checker
# on the core (files and settings: [tool.mypy] of pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/isort --check common/fvae_ct
	$(VENV)/bin/black --skip-magic-trailing-comma --check common/fvae_ct
	$(VENV)/bin/flake8 --count --statistics common/fvae_ct
	$(VENV)/bin/mypy

# self-contained bundle archives: dist/<bundle>_v<version>.zip with the fvae_ct code each bundle needs vendored
bundles: $(STAMP)
	$(PY) tools/build_bundles.py --out dist

# each archive downloaded from a 127.0.0.1 server with MONAI's `download` + `download_large_files` and run in a
# fresh virtual environment that has the bundle's listed requirements but not fvae-ct (slow: 3 venvs, ~1.5 GB)
bundle-check: $(STAMP)
	$(PY) -m pytest -q -ra -m download tests/test_bundle_download.py $(PYTEST_ARGS)

# the MONAI model-zoo's own CI scripts, unchanged, on the archives (needs a model-zoo checkout or bare git dir)
zoo-check: $(STAMP)
	test -n "$(ZOO)" || (echo "give ZOO=<Project-MONAI/model-zoo checkout or git dir>"; exit 2)
	$(PY) tools/zoo_ci.py --zoo $(ZOO) --update-readmes

bench: $(STAMP)
	$(PY) bench/bench_taef2.py --out outputs/bench
	$(PY) bench/bench_memory.py --out outputs/bench_memory --slices 20,60,180
	$(PY) bench/ldm_long_volume.py --out outputs/ldm_long_volume
	$(PY) bench/bench_official_ldm.py --out outputs/bench_official_ldm

bench-video: $(STAMP)
	$(PY) bench/bench_video_vaes.py --out outputs/bench_video --models ivvae_z16_dim64 --slices 5,9
	$(PY) bench/bench_video_vaes.py --out outputs/bench_video_lean --models leanvae_dim16 --slices 5,17,33

# one dataset reconstruction (8 real CT cases) with torchrun on 1 and 2 CPU processes of 1 thread each (about 2.5 min)
bench-dist: $(STAMP)
	$(PY) bench/bench_distributed.py --out outputs/bench_distributed --procs 1,2

# the GPU check (full-size VAEs, fp32 / bf16, tiled / untiled, training steps; under 8 min on one H100-class GPU;
# exits at once without CUDA)
bench-gpu: $(STAMP)
	$(PY) bench/bench_gpu.py --out outputs/bench_gpu

# CPU demo that the generation bundle learns: its configs on one real CT (TAEF2 latents), 10 + 2.5 min of training,
# then held-out loss per timestep, bias at high t and generation over 4 seeds on another scan, trained vs the zero
# network vs the closed-form Gaussian prior (about 21 min on 2 cores; outputs/ldm_demo)
ldm-demo: $(STAMP)
	$(PY) bench/ldm_demo.py --out outputs/ldm_demo

TINY := --patch_size "[48,48,16]" --init_filters 8 --blocks_down "[1,1,1]" --blocks_up "[1,1]" --num_workers 0

# CPU demo of the segmentation ablation: real CT with synthetic lesions; arms none, union (the VAE view) and the
# gaussian-filter control; 3 training seeds each; checkpoint by validation Dice, scores on a held-out test split
ablation-demo: $(STAMP)
	$(VENV)/bin/fvae make-lesion-set outputs/lesions --n_cases 16
	$(VENV)/bin/fvae ablate-seg --datalist outputs/lesions/dataset.json --arms none,union,gaussian --seeds 0,1,2 \
	    --output_dir outputs/ablation --val_fraction 0.2 --test_fraction 0.3 --max_epochs 30 --val_interval 10 \
	    --learning_rate 0.003 $(TINY)

# A real MONAI Label 0.8.5 server (monaibundle app, 127.0.0.1, offline) serving the PACKAGED fvae_aug_seg archive:
# HTTP info / datastore / infer (shape, affine, label ids) / a tiny train, then the server is stopped; then a second
# server serves a tiny nnU-Net v2 model the bundle trained (infer only). Separate venv:
# monailabel needs torch 2.14.1 + torchvision 0.29.1 (about 8 GB) and pydicom 2 (its DICOM code breaks on pydicom 3);
# every package at the pins of constraints.txt ([test] + [monailabel]), rebuilt when that file changes
MLVENV  := .venv-monailabel
MLCHECK := outputs/mlcheck
$(MLVENV)/.installed: constraints.txt $(STAMP)
	$(PYTHON) -m venv --clear $(MLVENV)
	$(PY) tools/pins.py export --env monailabel > $(MLVENV)/constraints.txt
	$(MLVENV)/bin/pip install -q -c $(MLVENV)/constraints.txt --upgrade pip setuptools
	$(MLVENV)/bin/pip install -q -c $(MLVENV)/constraints.txt torch torchvision monailabel pydicom dicomweb-client \
	    pynetdicom nibabel nnunetv2 dcmqi
	$(PY) tools/pins.py check --env monailabel --python $(MLVENV)/bin/python
	touch $@

monailabel-check: $(STAMP) $(MLVENV)/.installed
	rm -rf $(MLCHECK)
	$(VENV)/bin/fvae make-lesion-set $(MLCHECK)/lesions --n_cases 4
	$(PY) tools/build_bundles.py --out $(MLCHECK)/dist --bundles fvae_aug_seg --unpack $(MLCHECK)/bundle
	cp -r $(MLCHECK)/bundle $(MLCHECK)/bundle_nnunet   # the same unpacked archive, for the nnU-Net model below
	$(PY) -m monai.bundle run --config_file $(MLCHECK)/bundle/fvae_aug_seg/configs/train.yaml \
	    --datalist $(MLCHECK)/lesions/dataset.json --bundle_root $(MLCHECK)/run \
	    --max_epochs 4 --val_interval 2 --learning_rate 0.003 $(TINY)
	cp $(MLCHECK)/run/models/model.pt $(MLCHECK)/run/models/model.json $(MLCHECK)/bundle/fvae_aug_seg/models/
	$(MLVENV)/bin/python tools/check_monailabel.py --bundle $(MLCHECK)/bundle/fvae_aug_seg \
	    --images $(MLCHECK)/lesions/imagesTr --labels $(MLCHECK)/lesions/labelsTr --work $(MLCHECK)/server --port 8123
	# the archive as downloaded (no models/model.pt): 2 labelled images, MONAI Label's default val_split 0.2 (no
	# validation case), a first training must save a model; a request with only recon_mode; restart; infer
	$(MLVENV)/bin/python tools/check_monailabel.py --bundle $(MLCHECK)/bundle/fvae_aug_seg --from-scratch \
	    --n-labelled 2 --images $(MLCHECK)/lesions/imagesTr --labels $(MLCHECK)/lesions/labelsTr \
	    --work $(MLCHECK)/server_scratch --port 8125 --recon-modes none
	# an nnU-Net v2 model trained by the bundle (nnunet_train.yaml, tiny: 1 epoch of 2 iterations on CPU), served by
	# the same archive's inference.yaml (models/model.json names it), infer only (MONAI Label trains the SegResNet)
	$(PY) -m monai.bundle run --config_file "['$(MLCHECK)/bundle_nnunet/fvae_aug_seg/configs/train.yaml', \
	    '$(MLCHECK)/bundle_nnunet/fvae_aug_seg/configs/nnunet_train.yaml']" --datalist $(MLCHECK)/lesions/dataset.json \
	    --bundle_root $(MLCHECK)/run_nnunet --nnunet_arm none --nnunet_max_epochs 1 --nnunet_epoch_length 2 \
	    --nnunet_num_processes 1
	cp -r $(MLCHECK)/run_nnunet/models/model.pt $(MLCHECK)/run_nnunet/models/model.json \
	    $(MLCHECK)/run_nnunet/models/nnunet $(MLCHECK)/bundle_nnunet/fvae_aug_seg/models/
	$(MLVENV)/bin/python tools/check_monailabel.py --bundle $(MLCHECK)/bundle_nnunet/fvae_aug_seg \
	    --images $(MLCHECK)/lesions/imagesTr --labels $(MLCHECK)/lesions/labelsTr --work $(MLCHECK)/server_nnunet \
	    --port 8124 --no-train

# DICOM in, DICOM out against a real PACS: Orthanc + its DICOMweb and GDCM plugins (Debian's orthanc, orthanc-dicomweb,
# orthanc-gdcm; installed with apt-get when missing, as root) started on a free 127.0.0.1 port with a temporary config
# and storage; the sample series uploaded; the recon bundle run DICOMweb -> DICOMweb (derived series read back over WADO
# = the NIfTI output, voxel for voxel); the aug_seg bundle DICOMweb -> DICOM SEG (read back = its label map); a real
# MONAI Label server (the MONAI Label venv above) on the packaged aug_seg archive with the PACS as its datastore: list,
# infer on the uploaded series, save a corrected label, the SEG it stores decoded onto the series = that label; Orthanc
# stopped by PID. Not part of `make test` (tests/test_dicomweb.py runs a shorter round trip when Orthanc is installed).
PACS_VAE ?= taef2
# the Debian (bookworm) versions the check was run with: pinned like the pip tools, so a new release cannot change it
ORTHANC_PKGS := orthanc=1.10.1+dfsg-2+deb12u1 orthanc-dicomweb=1.7+dfsg-6+b2 orthanc-gdcm=1.5-1+b6
ORTHANC_PLUGINS := /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/share/orthanc/plugins/libOrthancGdcm.so
pacs-check: $(STAMP) $(MLVENV)/.installed
	test -x /usr/sbin/Orthanc $(foreach p,$(ORTHANC_PLUGINS),-a -f $(p)) || \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(ORTHANC_PKGS)) || \
	    (echo "pacs-check needs Orthanc and its DICOMweb and GDCM plugins: apt-get install $(ORTHANC_PKGS)"; exit 2)
	$(PY) tools/check_pacs.py --vae $(PACS_VAE) --monailabel-venv $(MLVENV)

clean:
	rm -rf outputs .pytest_cache dist .venv-bundles
