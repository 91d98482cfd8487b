# One command per job; each creates or reuses .venv itself.
PY      := .venv/bin/python
STAMP   := .venv/.installed
JOBS    ?= 2

.PHONY: install test train example lint clean

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

## 10-line example: freeze a torchvision ResNet-18 to its BatchNorms and train a few steps
example: $(STAMP)
	$(PY) examples/quickstart.py

lint: $(STAMP)
	.venv/bin/ruff check normonly tests recipes scripts examples

clean:
	rm -rf .venv .pytest_cache
