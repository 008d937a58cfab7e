# Everything assumes scripts/install-deps.sh has run (.ci/run does it).
PY := .venv/bin/python

.PHONY: test unit lint bench go demo demo-k8s soak soak-nftables soak-iptables lock
test: lint go
	CI=$${CI:-false} .venv/bin/pytest -q

unit:
	.venv/bin/pytest -q tests/unit

lint:
	.venv/bin/ruff check .
	.venv/bin/mypy

bench: go
	$(PY) bench/bench_apply.py
	$(PY) bench/bench_boot.py
	$(PY) bench/bench_kube.py
	$(PY) bench/bench_egress.py
	$(PY) bench/bench_egress.py --backend iptables
	$(PY) bench/bench_metrics.py
	$(PY) bench/bench_tschains.py
	$(PY) bench/bench_tschains.py --foreign 1000
	# The same rule installs in the linux/386 image (32-bit Python and iptables-legacy-restore, natively).
	scripts/base-image.sh linux/386 >/dev/null
	$(PY) bench/bench_apply.py --scenario ingress --sizes 1000,10000 --image $$(PLATFORM=linux/386 \
	  BASE='containerboot-base:bookworm-{arch}' REPOS=containerboot-bench TAGS=386 ./build_docker.sh 2>/dev/null)

go:
	scripts/build-go.sh >/dev/null

demo:
	scripts/install-deps.sh
	scripts/build-go.sh >/dev/null
	$(PY) scripts/demo.py

demo-k8s:
	scripts/install-deps.sh
	scripts/docker-engine.sh
	scripts/build-go.sh >/dev/null
	scripts/k8s-images.sh >/dev/null
	$(PY) scripts/demo_k8s.py

# The 10-minute soak of issue 10: both backends at once (about 11 minutes); SOAK_SECONDS=600 unless set.
# (make test runs the same tests for 90 s each.)
soak: go
	$(MAKE) -j2 --output-sync=target soak-nftables soak-iptables

soak-nftables soak-iptables:
	SOAK_SECONDS=$${SOAK_SECONDS:-600} .venv/bin/pytest -q -s -p no:cacheprovider tests/soak -k $(@:soak-%=%)

# The Python dependencies re-resolved to the newest versions pyproject.toml allows, written exact to
# requirements.txt (the image) and requirements-test.txt (CI); run `make test`, then commit both.
lock:
	scripts/lock-deps.sh
