# Quick start: `make run` (Pleura on embedded defaults) and `make test` (the test suite).
.PHONY: run test lint venv

venv:
	@[ -x .venv/bin/python ] || python3 -m venv .venv
	@.venv/bin/pip install -q --disable-pip-version-check -e .

run: venv
	PLEURA_HTTP_PORT=$${PLEURA_HTTP_PORT-8080} .venv/bin/pleura serve

test:
	bash .ci/setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports  # the layers: pyproject.toml [tool.importlinter], docs/architecture.md
	.venv/bin/pytest -q -m 'not alone'
	.venv/bin/pytest -q -n 0 -m alone  # tests/e2e/test_viewer_ohif.py: headless Chromium, starved beside the others

lint:
	.venv/bin/ruff check .
	.venv/bin/lint-imports
