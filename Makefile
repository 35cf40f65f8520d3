# The README's two commands: `make demo` (the offline audit demo) and `make test`.
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/python -m flows.demo

test: setup
	.venv/bin/ruff check textcam tasks flows reports tests bench data
	.venv/bin/python -m pytest -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check textcam tasks flows reports tests bench data

bench: setup
	.venv/bin/python bench/explain.py
	.venv/bin/python bench/groundtruth.py
	.venv/bin/python bench/audit.py
