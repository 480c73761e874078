# Shared by the .ci scripts that run containers: timed steps, one FAILED line, a free port and
# a poll for HTTP 200. Source it with CI_NAME set (the prefix of every line) and WORK, a
# temporary directory of the script's own.

T0=$(date +%s)
STEP_T=$T0
say() { echo "[$CI_NAME +$(($(date +%s) - T0))s] $*" >&2; }
step() {
    local now
    now=$(date +%s)
    echo "[$CI_NAME +$((now - T0))s] ---- $* (previous step took $((now - STEP_T))s)" >&2
    STEP_T=$now
}
run() {
    echo "+ $*" >&2
    "$@"
}
fail() {
    echo "$CI_NAME: FAILED: $*" >&2
    exit 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Polls URL until it answers 200 (its body then in $WORK/last-body) or SECONDS pass; fails early
# if CONTAINER stopped.
wait_for_200() { # URL SECONDS CONTAINER
    local url=$1 deadline=$(($(date +%s) + $2)) code
    while :; do
        code=$(curl -s -o "$WORK/last-body" -w '%{http_code}' --max-time 2 "$url" || true)
        [ "$code" = 200 ] && return 0
        if [ "$(podman inspect -f '{{.State.Running}}' "$3" 2>/dev/null)" != true ]; then
            fail "$3 stopped while waiting for $url (exit code $(podman inspect -f '{{.State.ExitCode}}' "$3" 2>/dev/null))"
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            fail "$url did not answer 200 within $2 s (last answer: ${code:-none} $(head -c 300 "$WORK/last-body" 2>/dev/null))"
        fi
        sleep 0.5
    done
}

# The image, as .ci/container-smoke checks it; after a first build only changed sources compile.
build_image() { # IMAGE
    run podman build --format docker --build-arg RUST_VERSION="$(rustc --version | awk '{print $2}')" \
        -t "$1" . || fail "podman build failed"
}

# Prints the path of a fake-klarify binary: FAKE_KLARIFY, or the debug build (which .ci/run's
# `cargo test` has already made). `--workspace --examples` (there are no examples) resolves the
# dependencies' features as `cargo test` does, so that build is reused; `-p klarify-fake` alone
# would compile the fake's dependencies again with its own features (about 2 minutes).
fake_klarify_binary() {
    local fake=${FAKE_KLARIFY:-}
    if [ -z "$fake" ]; then
        run cargo build --locked --workspace --bin fake-klarify --examples >&2
        fake=$(cargo metadata --format-version 1 --no-deps |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug/fake-klarify
    fi
    [ -x "$fake" ] || fail "fake-klarify not found at $fake"
    echo "$fake"
}
