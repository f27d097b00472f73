# unionfs — the targets people expect.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := fuse3 libfuse3-3 libfuse2 fuse-overlayfs attr strace kmod fio dbench podman buildah runc debootstrap skopeo umoci docker-registry busybox-static
HYPOTHESIS_PROFILE ?= ci
export HYPOTHESIS_PROFILE

.PHONY: install install-apt install-system uninstall-system test test-one test-stress lint demo fuzz bench bench-quick clean

# The daemon is a new interpreter for every mount: its bytecode is compiled here, so that no mount compiles
# the sources again (where PYTHONDONTWRITEBYTECODE is set nothing else writes it; 45 ms per mount here).
install: install-apt $(VENV)/.installed
	@$(BIN)/python -m compileall -q unionfs mountd

install-apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# editable_mode=compat: the checkout on sys.path through a plain .pth line; setuptools' default import hook
# costs every interpreter (so every mount's daemon) 10-15 ms of start-up.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $@

# Wrappers in $(PREFIX)/bin with an absolute interpreter: mount(8) runs mount.fuse, which resets PATH, so
# `mount -t fuse.unionfs-mount SOURCE MNT -o lowerdir=…` needs a system-wide program.
PREFIX ?= /usr/local
SYSTEM_WRAPPERS := unionfs unionfs-mount
install-system: install
	@[ "$$(id -u)" = 0 ] || { echo "install-system: run as root" >&2; exit 1; }
	@for p in $(SYSTEM_WRAPPERS); do \
	  printf '#!/bin/sh\nexec %s %s "$$@"\n' '$(abspath $(BIN))/python' '$(abspath $(BIN))/'"$$p" \
	    > $(PREFIX)/bin/.$$p.tmp && chmod 755 $(PREFIX)/bin/.$$p.tmp && mv -f $(PREFIX)/bin/.$$p.tmp $(PREFIX)/bin/$$p; \
	done

uninstall-system:
	rm -f $(addprefix $(PREFIX)/bin/,$(SYSTEM_WRAPPERS))

# As root the suite also mounts through mount(8) (tests/e2e/test_mount_helper.py), which runs mount.fuse with
# PATH reset to the system dirs: `make test` then writes the system-wide wrappers of install-system first, so
# that a clean clone runs every test and skips none.  The mounted and differential tests run a second time on
# the fusepy frontend (mountd/highlevel/; the protocol frontend, mountd/lowlevel/, is the default).
test: install
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory install-system; fi
	$(BIN)/pytest -q -p no:cacheprovider tests
	UNIONFS_FRONTEND=fusepy $(BIN)/pytest -q -p no:cacheprovider tests/mounted tests/differential

test-stress: install
	UNIONFS_STRESS_SCALE=$${UNIONFS_STRESS_SCALE:-1} $(BIN)/pytest -q -p no:cacheprovider -m stress tests/reliability

test-one: install
	$(BIN)/pytest -q -p no:cacheprovider $(T)

lint: install
	$(BIN)/ruff check unionfs mountd tests benchmarks
	$(BIN)/mypy

demo: install
	$(BIN)/python -m mountd.cli.demo

fuzz: install
	HYPOTHESIS_PROFILE=dev $(BIN)/pytest -q -p no:cacheprovider tests/differential -k state_machine

bench: install
	$(BIN)/python -m benchmarks.run --full

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

clean:
	rm -rf $(VENV) build *.egg-info
