PY      := .venv/bin/python
STAMP   := .venv/.installed

.PHONY: venv test sweep ui lint

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

lint: venv
	.venv/bin/ruff check .

test: lint
	$(PY) -m pytest

sweep: venv
	$(PY) -m pipeline.sweep

ui: venv
	@echo "open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the runs tables)"
	.venv/bin/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 --backend-store-uri sqlite:///mlruns/mlflow.db
