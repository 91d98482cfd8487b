# One command per job; each creates or reuses .venv itself.
PY      := .venv/bin/python
STAMP   := .venv/.installed
JOBS    ?= 2

.PHONY: install test train train-quick example lint docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## the whole test suite
test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) tests

## the main job (see README): ResNet-14, BatchNorm only, CIFAR-10, 30 epochs cosine; resumes if interrupted
ARGS ?= --depth 14 --train norm --epochs 30 --schedule cosine --output runs/resnet14-norm --resume
train: $(STAMP)
	.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/resnet_cifar.py $(ARGS)

## the main job on the 2,000-image CIFAR-10-mini, 3 epochs: the whole run (outputs, adapter, curves) in about a minute
train-quick: $(STAMP)
	.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/resnet_cifar.py --depth 14 --train norm --epochs 3 --schedule cosine \
		--data ../shared/data/cifar10-mini --output runs/quick-r14-norm --overwrite

## 10-line example: freeze a torchvision ResNet-18 to its BatchNorms and train a few steps
example: $(STAMP)
	$(PY) examples/quickstart.py

## the documentation site (mkdocs.yml, docs/) into site/; fails on any broken link or docstring warning
docs: $(STAMP)
	.venv/bin/mkdocs build --strict

lint: $(STAMP)
	.venv/bin/ruff check normonly tests recipes scripts examples

clean:
	rm -rf .venv .pytest_cache
