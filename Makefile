# medssl — the two README commands: `make demo` and `make test`.
# Each target creates .venv if missing, installs torch==2.13.0 FIRST (a local CPU wheel on our machines; any
# other spec downloads a multi-GB CUDA build), then the package with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medssl-installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
STUDIES_DIR ?= studies

.PHONY: install demo test test-cluster bench studies lint clean peer-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medssl demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The `slurm` tests (tests/cluster; `make test` deselects them): a one-node SLURM cluster on localhost started by
# the tests as root (Debian's slurm-wlm + munge, installed here when missing); a few minutes on 2 cores.
test-cluster: $(STAMP)
	@if ! { test -x /usr/sbin/slurmctld && test -x /usr/sbin/munged; }; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge \
		|| echo "make test-cluster: could not install slurm-wlm/munge (not root?); the slurm tests will skip" >&2; \
	fi
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slurm tests/cluster $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/ingest_dicom.py
	$(PY) benchmarks/ingest_nifti.py
	$(PY) benchmarks/augment.py

# The issue-5 label-efficiency studies on the shared datasets (about 45 min each alone on 2 CPU cores; re-running
# resumes). Each prints a Markdown section for benchmarks/RESULTS.md and copies its plots to benchmarks/figures.
studies: $(STAMP)
	MEDSSL_DATASETS=$${MEDSSL_DATASETS:-$(CURDIR)/../shared/datasets} \
		$(PY) benchmarks/label_efficiency.py pipelines/label_efficiency.yaml --workdir $(STUDIES_DIR)
	MEDSSL_DATASETS=$${MEDSSL_DATASETS:-$(CURDIR)/../shared/datasets} \
		$(PY) benchmarks/label_efficiency.py pipelines/classification_adrenal.yaml --workdir $(STUDIES_DIR)
	MEDSSL_DATASETS=$${MEDSSL_DATASETS:-$(CURDIR)/../shared/datasets} \
		$(PY) benchmarks/label_efficiency.py pipelines/label_efficiency_genesis.yaml --workdir $(STUDIES_DIR)

# nnU-Net v2 for benchmarks/peer_nnunet.py, in its own venv (it would upgrade packages medssl shares). torch is pinned
# in the nnunetv2 install too: unpinned, timm's torchvision pulls torch 2.14 with ~6 GB of CUDA. nnunetv2 as in
# pyproject's `peer` extra. The CPU torch cannot load torchvision's ops; peer_nnunet.py avoids importing it.
NNUNET_VENV ?= .venv-nnunet
peer-venv:
	test -x $(NNUNET_VENV)/bin/python || $(PYTHON) -m venv $(NNUNET_VENV)
	$(NNUNET_VENV)/bin/python -m pip install --disable-pip-version-check -q torch==2.13.0
	$(NNUNET_VENV)/bin/python -m pip install --disable-pip-version-check -q "nnunetv2==2.8.1" torch==2.13.0

# Wheels for the lent GPU machine (benchmarks/gpu_wheels.txt: what its image lacks, by group) into .gpu/whl/<group>/
# (git-ignored through .git/info/exclude): cp312 manylinux x86_64, --no-deps; a source-only package is built here as
# a pure-Python wheel; wheels over 1 MiB are recompressed with LZMA by benchmarks/_gpu_repack.py (same files: pip
# installs them as published; a device call carries 64 MiB). Idempotent: a group's wheel of the listed version is kept.
GPU_WHL ?= .gpu/whl
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_PIP := --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	$(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1,--platform $(p)_x86_64)
.PHONY: gpu-wheels
gpu-wheels:
	@set -e; group=; sed 's/#.*//' benchmarks/gpu_wheels.txt | while read -r spec; do \
	  case "$$spec" in "") continue ;; "["*"]") group=$${spec#[}; group=$${group%]}; continue ;; esac; \
	  dir="$(GPU_WHL)/$$group"; mkdir -p "$$dir"; \
	  norm=$$(echo "$${spec%%==*}" | tr 'A-Z.-' 'a-z__'); ver=$${spec#*==}; \
	  have() { ls "$$dir" | tr 'A-Z' 'a-z' | grep -q "^$$norm-$$ver-.*$$1"; }; \
	  have '\.whl$$' && continue; echo "gpu-wheels: $$group: $$spec"; \
	  if ! $(GPU_PY) -m pip download $(GPU_PIP) -d "$$dir" "$$spec" 2>/dev/null; then \
	    echo "gpu-wheels: $$spec has no wheel for cp312 manylinux: building a pure-Python one here"; \
	    $(GPU_PY) -m pip wheel --disable-pip-version-check -q --no-deps --no-binary :all: -w "$$dir" "$$spec" 2>/dev/null; \
	    have '-none-any\.whl$$' || { echo "gpu-wheels: no pure-Python wheel of $$spec" >&2; exit 1; }; \
	  fi; \
	done
	@$(GPU_PY) benchmarks/_gpu_repack.py $(GPU_WHL)/*/*.whl
	@for d in $(GPU_WHL)/*/; do echo "gpu-wheels: $$d $$(ls $$d | wc -l) wheels, $$(du -sm $$d | cut -f1) MiB"; done

lint: $(STAMP)
	$(VENV)/bin/ruff check medssl tests benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
