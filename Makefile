# The two commands: `make demo` and `make test`. Both set up .venv on a fresh machine from the lock
# (lock/cpu.txt: every package at a fixed version, torch's CPU build). On a GPU machine, add TORCH=cuda
# (lock/cuda.txt: the same versions with PyPI's CUDA build of torch), e.g. `make test TORCH=cuda`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= cpu
LOCK ?= lock/$(TORCH).txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(TORCH)
DEMO_DIR ?= runs/demo

.PHONY: demo test bench lint lock upgrade clean

$(STAMP): $(LOCK) pyproject.toml lock/sync.sh
	lock/sync.sh $(PYTHON) $(VENV) $(LOCK)
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) -m minimind.demo --out $(DEMO_DIR)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest bench/ --benchmark-columns=mean,stddev,rounds --benchmark-sort=name

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# after editing pyproject's dependencies: re-resolve, keeping every pin that still fits
lock: $(STAMP)
	lock/lock.sh $(VENV)/bin/uv lock

# newest releases of everything (torch stays at lock/torch.txt): resolve into .lock-new, run the whole
# suite on them in .venv-new, and only if it passes replace the lock and date it in README.md
upgrade: $(STAMP)
	rm -rf .lock-new .venv-new
	lock/lock.sh $(VENV)/bin/uv .lock-new --upgrade
	$(MAKE) test VENV=.venv-new LOCK=.lock-new/$(TORCH).txt
	cp .lock-new/cpu.txt .lock-new/cuda.txt lock/
	sed -i -E "s/^(The lock was last refreshed on )[0-9-]+/\1$$(date +%F)/" README.md
	rm -rf .lock-new .venv-new
	@echo "lock upgraded and tested: review 'git diff lock/', then commit lock/ and README.md"

clean:
	rm -rf $(VENV) .venv-new .lock-new runs .pytest_cache .benchmarks
