#!/usr/bin/env bash
# Boot a Celery fleet worker: install the app wheel into its venv, then hand
# over to `python -m app.boot` (app/host/), which does everything else:
# settings from SSM Parameter Store, concurrency from the usable CPUs, the
# environment file, the systemd units, the start. Only what must happen before
# the app's Python code exists is here.
#
#   fleet-boot                    install, configure and start (cloud-init runs this, as root)
#   fleet-boot --foreground       install, then run the worker in the foreground (containers)
#   fleet-boot install [ARTIFACT] install only (AMI bake, Ansible, `fleet ops deploy`)
#   fleet-boot ARGS...            install, then `python -m app.boot ARGS...`
#
# /etc/celery-fleet/boot.env (the user-data writes it; optional elsewhere) sets:
#
#   FLEET_SSM_PREFIX       /celery-fleet/<stack>/, where app.boot reads the settings
#   FLEET_ARTIFACT         the wheels: s3://<bucket>/artifacts/<digest>/, a directory, or a .whl
#   FLEET_OFFLINE_INSTALL  1 when the subnets have no way to PyPI: wheels only
#   AWS_DEFAULT_REGION     the stack's region
#
# FLEET_WHEELHOUSE adds a directory of dependency wheels; FLEET_APP_DIR
# (/opt/celery-fleet) and FLEET_PYTHON (python3.11) move things for tests.
# Installing is skipped when the venv already holds this exact wheel (an AMI
# baked with it, a second run). Sourcing this file only defines functions.

set -euo pipefail
# Let a failing command inside $(...) stop the script too.
shopt -s inherit_errexit

BOOT_ENV=${FLEET_BOOT_ENV:-/etc/celery-fleet/boot.env}
APP_DIR=${FLEET_APP_DIR:-/opt/celery-fleet}
PYTHON=${FLEET_PYTHON:-python3.11}

log() {
    echo "fleet-boot: $*" >&2
}

die() {
    log "$*"
    exit 1
}

ensure_python() {
    command -v "$PYTHON" >/dev/null && return
    log "installing $PYTHON"
    if command -v dnf >/dev/null; then
        dnf install -y --quiet "$PYTHON" "$PYTHON-pip"
    else
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PYTHON" "$PYTHON-venv" >/dev/null
    fi
}

# Print the app wheel of ARTIFACT; an s3:// prefix is mirrored to $APP_DIR/wheels first.
fetch_artifact() {
    local artifact=$1 dir wheels
    case "$artifact" in
        s3://*)
            dir=$APP_DIR/wheels
            mkdir -p "$dir"
            # sync: a baked image that holds these wheels downloads nothing.
            aws s3 sync --only-show-errors --delete "$artifact" "$dir/"
            ;;
        *.whl)
            [[ -f "$artifact" ]] || die "no wheel at $artifact"
            echo "$artifact"
            return
            ;;
        *) dir=$artifact ;;
    esac
    shopt -s nullglob
    wheels=("$dir"/celery_fleet-*.whl)
    shopt -u nullglob
    ((${#wheels[@]} == 1)) || die "expected one celery_fleet-*.whl in $dir, found ${#wheels[@]}"
    echo "${wheels[0]}"
}

# pip acting on the venv VENV: its own if it has one, else the system's (pip >= 22.3 has --python).
venv_pip() {
    local venv=$1
    shift
    if [[ -x "$venv/bin/pip" ]]; then
        "$venv/bin/python" -m pip "$@"
    else
        "$PYTHON" -m pip --python "$venv/bin/python" "$@"
    fi
}

# Install WHEEL (with the [aws] extra) into $APP_DIR/venv unless it is installed already.
install_app() {
    local wheel=$1 venv=$APP_DIR/venv digest stamp
    stamp=$venv/.celery-fleet-wheel
    digest=$(sha256sum "$wheel")
    digest=${digest%% *}
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(<"$stamp")" == "$digest" ]]; then
        log "unchanged: ${wheel##*/} is installed in $venv"
        return
    fi
    local pip_args=(--quiet --disable-pip-version-check --find-links "$(dirname "$wheel")")
    [[ -d "$APP_DIR/wheels" ]] && pip_args+=(--find-links "$APP_DIR/wheels")
    [[ -n "${FLEET_WHEELHOUSE:-}" ]] && pip_args+=(--find-links "$FLEET_WHEELHOUSE")
    [[ "${FLEET_OFFLINE_INSTALL:-0}" == 1 ]] && pip_args+=(--no-index)
    if [[ ! -x "$venv/bin/python" ]]; then
        ensure_python
        # No pip inside the venv when the system's pip can install into it:
        # ensurepip costs seconds of every boot.
        "$PYTHON" -m venv --without-pip "$venv"
        venv_pip "$venv" --version >/dev/null 2>&1 || "$venv/bin/python" -m ensurepip --default-pip >/dev/null
    elif [[ -f "$stamp" ]]; then
        # Not installed until the new wheel is, should this fail half-way.
        rm -f "$stamp"
        # A rebuilt wheel may keep its version number, which pip would call installed.
        venv_pip "$venv" uninstall --quiet --yes celery-fleet
    fi
    # By file, not by name, so a same-named project on PyPI can never be picked.
    venv_pip "$venv" install "${pip_args[@]}" "${wheel}[aws]"
    echo "$digest" >"$stamp"
    log "installed ${wheel##*/} in $venv"
}

main() {
    if [[ -r "$BOOT_ENV" ]]; then
        # Exported: the aws CLI and app.boot read AWS_DEFAULT_REGION and FLEET_SSM_PREFIX.
        set -a
        # shellcheck source=/dev/null
        source "$BOOT_ENV"
        set +a
    fi
    local wheel
    if [[ "${1:-}" == install ]]; then
        wheel=$(fetch_artifact "${2:-${FLEET_ARTIFACT:?give an artifact or set FLEET_ARTIFACT}}")
        install_app "$wheel"
        return
    fi
    if [[ -n "${FLEET_ARTIFACT:-}" ]]; then
        wheel=$(fetch_artifact "$FLEET_ARTIFACT")
        install_app "$wheel"
    elif [[ ! -x "$APP_DIR/venv/bin/python" ]]; then
        die "no app installed in $APP_DIR/venv and no FLEET_ARTIFACT to install"
    fi
    # Out of any directory holding an app/ package that would shadow the installed one.
    cd "$APP_DIR"
    exec "$APP_DIR/venv/bin/python" -m app.boot "$@"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
