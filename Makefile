# swav_fast: `make demo` and `make test` are the two commands a new user needs; both set up the environment first.
PY := .venv/bin/python
DEMO_DATA := data/demo
DEMO_RUN := runs/demo

.PHONY: env demo test lint clean

env:
	@bash tools/setup_env.sh

demo: env
	$(PY) tools/make_demo_data.py --out $(DEMO_DATA)
	rm -rf $(DEMO_RUN)
	$(PY) train.py --preset demo_cpu --data_path $(DEMO_DATA)/digits/train --run_dir $(DEMO_RUN)
	$(PY) tools/knn_eval.py --trunk $(DEMO_RUN)/trunk_resnet18.pth --arch resnet18 \
		--train $(DEMO_DATA)/digits/train --val $(DEMO_DATA)/digits/val --size 32 \
		--baseline $(DEMO_RUN)/trunk_init_resnet18.pth --baseline-name 'random init' --json $(DEMO_RUN)/knn.json

test: env
	$(PY) -m pytest -q

lint: env
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO_RUN) .pytest_cache
