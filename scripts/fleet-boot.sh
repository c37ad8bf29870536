#!/usr/bin/env bash
# Boot a Celery fleet worker: install the app, fetch its settings, start the worker.
#
# cloud-init runs this once, as root, on every instance the autoscaling group
# launches. The Pulumi program writes /etc/celery-fleet/boot.env with:
#
#   FLEET_SSM_PREFIX       /celery-fleet/<stack>/, where the connection settings are
#   FLEET_ARTIFACT         s3://<bucket>/artifacts/<digest>/, the wheels to install
#   FLEET_OFFLINE_INSTALL  1 when the subnets have no way to PyPI: wheels only
#   AWS_DEFAULT_REGION     the stack's region
#
# Settings and secrets come from SSM Parameter Store, never from user-data.
# Sourcing this file defines the functions without running anything (tests).

set -euo pipefail
# Let a failing command inside $(...) stop the script too.
shopt -s inherit_errexit

BOOT_ENV=${FLEET_BOOT_ENV:-/etc/celery-fleet/boot.env}
ENV_FILE=${FLEET_ENV_FILE:-/etc/celery-fleet/env}
APP_DIR=${FLEET_APP_DIR:-/opt/celery-fleet}
SYSTEMD_DIR=${FLEET_SYSTEMD_DIR:-/etc/systemd/system}
UNIT=celery-fleet-worker.service
SERVICE_USER=celery-fleet
PYTHON=python3.11
# SSM parameter under the prefix -> the variable app/settings.py reads.
declare -A ENV_NAMES=(
    [broker_url]=FLEET_BROKER_URL
    [result_url]=FLEET_RESULT_URL
    [queue]=FLEET_QUEUE
    [queue_url]=FLEET_SQS_QUEUE_URL
    [max_batch_seconds]=FLEET_MAX_BATCH_SECONDS
    [result_ttl]=FLEET_RESULT_TTL
)

log() {
    echo "fleet-boot: $*" >&2
}

# The CPUs this machine lets us use: nproc honours CPU affinity, and a cgroup
# v2 quota (cpu.max "quota period") caps it further, rounded up.
usable_cpus() {
    local cpus quota period cgroup
    cpus=$(nproc)
    cgroup=$(sed -n 's/^0:://p' /proc/self/cgroup)
    if [[ -r "/sys/fs/cgroup${cgroup}/cpu.max" ]]; then
        read -r quota period <"/sys/fs/cgroup${cgroup}/cpu.max"
        if [[ "$quota" != max ]]; then
            local limit=$(((quota + period - 1) / period))
            ((limit < cpus)) && cpus=$limit
        fi
    fi
    echo "$cpus"
}

# URL with ":secret" after the user: "amqps://fleet@host//" -> "amqps://fleet:s3cret@host//".
with_secret() {
    local url=$1 secret=$2
    echo "${url%%@*}:${secret}@${url#*@}"
}

install_app() {
    if ! command -v "$PYTHON" >/dev/null; then
        log "installing $PYTHON"
        dnf install -y --quiet "$PYTHON" "$PYTHON-pip"
    fi
    log "fetching $FLEET_ARTIFACT"
    mkdir -p "$APP_DIR/wheels"
    aws s3 cp --recursive --only-show-errors "$FLEET_ARTIFACT" "$APP_DIR/wheels/"
    local app_wheels=("$APP_DIR"/wheels/celery_fleet-*.whl)
    local pip_args=(--quiet --find-links "$APP_DIR/wheels")
    if [[ "${FLEET_OFFLINE_INSTALL:-0}" == 1 ]]; then
        pip_args+=(--no-index)
    fi
    "$PYTHON" -m venv "$APP_DIR/venv"
    # By file, not by name, so a same-named project on PyPI can never be picked.
    "$APP_DIR/venv/bin/pip" install "${pip_args[@]}" "${app_wheels[0]}[aws]"
}

# Print FLEET_* lines for the worker's environment file from the String
# parameters under the prefix (see ENV_NAMES); each <role>_password_parameter
# names the SecureString that goes into <role>_url.
fetch_settings() {
    local -A settings=()
    local parameters name value key role secret
    parameters=$(aws ssm get-parameters-by-path --path "$FLEET_SSM_PREFIX" \
        --parameter-filters Key=Type,Values=String \
        --query 'Parameters[].[Name,Value]' --output text)
    while IFS=$'\t' read -r name value; do
        key=${name#"$FLEET_SSM_PREFIX"}
        if [[ "$key" == *_password_parameter ]]; then
            role=${key%_password_parameter}
            secret=$(aws ssm get-parameter --with-decryption --name "$value" \
                --query Parameter.Value --output text)
            settings["${role}_secret"]=$secret
        else
            settings[$key]=$value
        fi
    done <<<"$parameters"

    for role in broker result; do
        if [[ -n "${settings[${role}_secret]:-}" ]]; then
            settings[${role}_url]=$(with_secret "${settings[${role}_url]}" "${settings[${role}_secret]}")
            unset "settings[${role}_secret]"
        fi
    done
    for key in "${!settings[@]}"; do
        if [[ -n "${ENV_NAMES[$key]:-}" ]]; then
            printf '%s=%s\n' "${ENV_NAMES[$key]}" "${settings[$key]}"
        fi
    done
}

write_environment() {
    local settings cpus
    settings=$(fetch_settings)
    cpus=$(usable_cpus)
    mkdir -p "$(dirname "$ENV_FILE")"
    # Secrets inside: readable by root only; systemd reads it before dropping to the service user.
    (
        umask 077
        {
            echo "$settings"
            echo "FLEET_CONCURRENCY=$cpus"
            # The app's SQS transport reads the first, boto3's other clients the second.
            echo "FLEET_AWS_REGION=$AWS_DEFAULT_REGION"
            echo "AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION"
        } >"$ENV_FILE.new"
    )
    mv "$ENV_FILE.new" "$ENV_FILE"
}

# systemd must wait for the longest batch before it kills a stopping worker.
write_stop_timeout() {
    local max_batch
    max_batch=$(sed -n 's/^FLEET_MAX_BATCH_SECONDS=//p' "$ENV_FILE")
    mkdir -p "$SYSTEMD_DIR/$UNIT.d"
    printf '[Service]\nTimeoutStopSec=%s\n' "$((max_batch + 60))" >"$SYSTEMD_DIR/$UNIT.d/stop-timeout.conf"
}

main() {
    # Exported: the aws CLI needs AWS_DEFAULT_REGION.
    set -a
    # shellcheck source=/dev/null
    source "$BOOT_ENV"
    set +a
    install_app
    write_environment
    write_stop_timeout
    if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir "$APP_DIR" --shell /sbin/nologin "$SERVICE_USER"
    fi
    systemctl daemon-reload
    systemctl enable --now "$UNIT"
    log "started $UNIT"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
