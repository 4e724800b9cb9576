# Two commands on a fresh clone with only python3: `make book` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= cpu
# The versions the book was built with (make lock), used as pip constraints when present.
LOCK := requirements.lock

ABLATION_SEEDS ?= 0 1 2

.PHONY: book test sweep ablations bench student screenshot lint lock publish clean help

help:
	@echo "make book        set up .venv, run every notebook for PROFILE=$(PROFILE), build _build/html"
	@echo "make test        set up .venv and run the test suite"
	@echo "make sweep       choose the learning rates on validation (about 25 minutes on two cores, resumable);"
	@echo "                 writes book/results/sweep_$(PROFILE).json for the stage-1 chapter"
	@echo "make ablations   the ablation grid at the full schedule over seeds $(ABLATION_SEEDS) (about an hour"
	@echo "                 on two cores, resumable); writes book/results/ablations_$(PROFILE).json for the book"
	@echo "make bench       run the benchmarks (benchmarks/results/)"
	@echo "make student     write the student edition of the notebooks (student/)"
	@echo "make screenshot  check every page of the built book in headless Chromium (_build/screenshots/)"
	@echo "make lock        write $(LOCK), the exact versions of .venv, used by the targets above"
	@echo "make publish     push the built book (_build/html) to the gh-pages branch of origin"

# One stamp per extra: reinstall when pyproject.toml or the lock changes. With the lock,
# every package gets the version the book was built with (torch stays unpinned).
$(VENV)/.installed-%: pyproject.toml $(wildcard $(LOCK))
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(wildcard $(LOCK)),-c $(LOCK)) -e ".[$*]"
	@touch $@

book: $(VENV)/.installed-book
	$(BIN)/referseg book --profile $(PROFILE)

sweep: $(VENV)/.installed-book
	$(BIN)/referseg sweep --profile $(PROFILE)

ablations: $(VENV)/.installed-book
	$(BIN)/referseg ablations --profile $(PROFILE) --seeds $(ABLATION_SEEDS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# The notebooks at the width of the book's code column (88), on their own.
lint: $(VENV)/.installed-test
	$(BIN)/ruff check referseg tests benchmarks
	$(BIN)/ruff check --line-length 88 --select E,W,F notebooks

bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.run

student: $(VENV)/.installed-book
	$(BIN)/referseg book --student

screenshot: $(VENV)/.installed-test
	$(BIN)/python -m referseg.screenshot _build/html

# pip freeze of .venv with both extras, without referseg itself and with torch, torchvision
# and their CUDA libraries left unpinned; the stamps are refreshed, so nothing reinstalls.
lock: $(VENV)/.installed-book $(VENV)/.installed-test
	$(BIN)/python -m pip freeze --exclude-editable \
	    | $(BIN)/python -c 'import sys; from referseg.book import lock_text; sys.stdout.write(lock_text(sys.stdin.read()))' \
	    > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	@touch $(VENV)/.installed-book $(VENV)/.installed-test

# Jupyter Book 1's convention: the built HTML becomes the gh-pages branch (-n: no Jekyll,
# -p: push it to origin, -f: force, replacing the previous edition).
publish: $(VENV)/.installed-book
	@test -f _build/html/index.html || { echo "error: no built book in _build/html; run make book first" >&2; exit 1; }
	$(BIN)/ghp-import -n -p -f _build/html

clean:
	rm -rf _build book/notebooks runs student
