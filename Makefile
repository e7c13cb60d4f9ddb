# ngx.dyups: dynamic upstreams for OpenResty (Rust + mlua, LuaJIT module).
#
#   make deps      install system packages (Debian 12) the build/tests need
#   make build     build the Lua module lib/ngx/dyups.so and the tool bin/dyups
#   make test      cargo test (core) + busted specs against a real nginx
#   make lint      rustfmt, clippy (with and without the lua binding), luacheck
#   make demo      run scripts/demo.sh (EXAMPLE=from-upsops or from-dyups: examples/NAME/)
#   make bench     run bench/run.sh
#   make fuzz      run each fuzz target FUZZ_SECONDS (30) s: scripts/fuzz.sh
#   make install   install the module, its shims and bin/dyups where nginx and its Lua find them
#   make uninstall remove what make install put there

# Where `make install` puts the module (ngx/dyups.so, on package.cpath) and
# the shims (ngx/dyups/*.lua, named by *_by_lua_file), for the nginx at hand:
#   LAYOUT=openresty  both in $(PREFIX)/lualib
#   LAYOUT=debian     /usr/local/lib/lua/5.1 and /usr/local/share/lua/5.1: on
#                     the default package.cpath and package.path of Debian's
#                     libnginx-mod-http-lua, so nginx.conf needs no lua_package_*
# Default: openresty when $(PREFIX)/lualib exists, else debian. DESTDIR is
# honoured; LUA_LIB_DIR and LUA_SHARE_DIR override the two directories.
PREFIX      ?= /usr/local/openresty
LAYOUT      ?= $(if $(wildcard $(PREFIX)/lualib),openresty,debian)
ifeq ($(LAYOUT),openresty)
LUA_LIB_DIR   ?= $(PREFIX)/lualib
LUA_SHARE_DIR ?= $(LUA_LIB_DIR)
BINDIR        ?= $(PREFIX)/bin
else ifeq ($(LAYOUT),debian)
LUA_LIB_DIR   ?= /usr/local/lib/lua/5.1
LUA_SHARE_DIR ?= /usr/local/share/lua/5.1
BINDIR        ?= /usr/local/bin
else
$(error LAYOUT must be openresty or debian, not "$(LAYOUT)")
endif
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

.PHONY: all deps build test test-rust test-lua lint demo bench fuzz install uninstall clean

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
	EXAMPLE="$(EXAMPLE)" bash scripts/demo.sh

bench:
	@if [ -f bench/run.sh ]; then \
		bash bench/run.sh; \
	else \
		echo "bench/run.sh is not written yet"; exit 1; \
	fi

FUZZ_SECONDS ?= 30

fuzz:
	FUZZ_SECONDS="$(FUZZ_SECONDS)" bash scripts/fuzz.sh

SHIM_DIR := $(LUA_SHARE_DIR)/ngx/dyups

install:
	@test -f $(SO) || { echo "$(SO) is missing: run 'make build' first"; exit 1; }
	@test -f $(BIN) || { echo "$(BIN) is missing: run 'make build' first"; exit 1; }
	$(INSTALL) -d -m 0755 $(DESTDIR)$(LUA_LIB_DIR)/ngx $(DESTDIR)$(SHIM_DIR) $(DESTDIR)$(BINDIR)
	$(INSTALL) -m 0755 $(SO) $(DESTDIR)$(LUA_LIB_DIR)/ngx/dyups.so
	$(INSTALL) -m 0644 $(LUA_SHIMS) $(DESTDIR)$(SHIM_DIR)/
	$(INSTALL) -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/dyups
	@echo "installed for $(LAYOUT):"
	@echo "  $(LUA_LIB_DIR)/ngx/dyups.so   require \"ngx.dyups\""
	@echo "  $(BINDIR)/dyups"
	@echo "  $(SHIM_DIR)/, in nginx.conf:"
	@echo "    balancer_by_lua_file $(SHIM_DIR)/upstream.lua;"
	@echo "    log_by_lua_file      $(SHIM_DIR)/log.lua;"
	@echo "    content_by_lua_file  $(SHIM_DIR)/upsops.lua;     # /ups"
	@echo "    content_by_lua_file  $(SHIM_DIR)/srvcheck.lua;   # /ups/check"
	@echo "    content_by_lua_file  $(SHIM_DIR)/dyups_api.lua;  # the REST interface"
	@echo "    content_by_lua_file  $(SHIM_DIR)/check_status.lua; # the check_status page"
	@echo "    content_by_lua_file  $(SHIM_DIR)/metrics.lua;      # Prometheus /metrics"
	@echo "    content_by_lua_file  $(SHIM_DIR)/dashboard.lua;    # the status page"

# Only what install put there: ngx/ itself may hold other modules
# (OpenResty's lua-resty-core), so it goes only when nothing else is left.
uninstall:
	rm -f $(DESTDIR)$(LUA_LIB_DIR)/ngx/dyups.so $(addprefix $(DESTDIR)$(SHIM_DIR)/,$(notdir $(LUA_SHIMS)))
	rm -f $(DESTDIR)$(BINDIR)/dyups
	rmdir --ignore-fail-on-non-empty $(DESTDIR)$(SHIM_DIR) 2>/dev/null || true
	rmdir --ignore-fail-on-non-empty $(DESTDIR)$(LUA_SHARE_DIR)/ngx $(DESTDIR)$(LUA_LIB_DIR)/ngx 2>/dev/null || true

clean:
	$(CARGO) clean
	rm -rf lib bin
