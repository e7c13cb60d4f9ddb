# ngx.dyups: dynamic upstreams for OpenResty (Rust + mlua, LuaJIT module).
#
#   make deps      install system packages (Debian 12) the build/tests need
#   make build     build the Lua module lib/ngx/dyups.so and the tool bin/dyups
#   make test      cargo test (core) + busted specs against a real nginx
#   make lint      rustfmt, clippy (with and without the lua binding), luacheck
#   make demo      run scripts/demo.sh
#   make bench     run bench/run.sh
#   make fuzz      run each fuzz target FUZZ_SECONDS (30) s: scripts/fuzz.sh
#   make install   install into $(DESTDIR)$(LUA_LIB_DIR) and $(DESTDIR)$(BINDIR)

PREFIX      ?= /usr/local/openresty
LUA_LIB_DIR ?= $(PREFIX)/lualib
BINDIR      ?= $(PREFIX)/bin
DESTDIR     ?=
INSTALL     ?= install
CARGO       ?= cargo
BUSTED      ?= busted
LUACHECK    ?= luacheck
LUAJIT      ?= luajit

SO_BUILT    := target/release/libngx_dyups.so
SO          := lib/ngx/dyups.so
BIN_BUILT   := target/release/dyups
BIN         := bin/dyups
LUA_SHIMS   := $(wildcard lua/*.lua)
LINT_DIRS   := $(wildcard lua spec examples bench/lua src/binding)

.PHONY: all deps build test test-rust test-lua lint demo bench fuzz install clean

all: build

deps:
	bash scripts/install-deps.sh

# One cargo run builds both: the binary links the library without calling
# its Lua binding, so it needs no Lua to run.
build:
	$(CARGO) build --release --features lua
	$(INSTALL) -d lib/ngx bin
	$(INSTALL) -m 0755 $(SO_BUILT) $(SO)
	$(INSTALL) -m 0755 $(BIN_BUILT) $(BIN)

test: deps build
	$(MAKE) --no-print-directory test-rust
	$(MAKE) --no-print-directory test-lua

test-rust:
	$(CARGO) test

test-lua:
	$(BUSTED) --lua=$(LUAJIT) spec/

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features lua -- -D warnings
ifneq ($(strip $(LINT_DIRS)),)
	$(LUACHECK) $(LINT_DIRS)
endif

demo: deps build
	@test -f scripts/demo.sh || { echo "scripts/demo.sh is not written yet"; exit 1; }
	bash scripts/demo.sh

bench:
	@if [ -f bench/run.sh ]; then \
		bash bench/run.sh; \
	else \
		echo "bench/run.sh is not written yet"; exit 1; \
	fi

FUZZ_SECONDS ?= 30

fuzz:
	FUZZ_SECONDS="$(FUZZ_SECONDS)" bash scripts/fuzz.sh

install:
	@test -f $(SO) || { echo "$(SO) is missing: run 'make build' first"; exit 1; }
	@test -f $(BIN) || { echo "$(BIN) is missing: run 'make build' first"; exit 1; }
	$(INSTALL) -d $(DESTDIR)$(LUA_LIB_DIR)/ngx/dyups $(DESTDIR)$(BINDIR)
	$(INSTALL) -m 0755 $(SO) $(DESTDIR)$(LUA_LIB_DIR)/ngx/dyups.so
	$(INSTALL) -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/dyups
ifneq ($(strip $(LUA_SHIMS)),)
	$(INSTALL) -m 0644 $(LUA_SHIMS) $(DESTDIR)$(LUA_LIB_DIR)/ngx/dyups/
endif

clean:
	$(CARGO) clean
	rm -rf lib bin
