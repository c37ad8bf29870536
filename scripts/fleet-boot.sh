#!/usr/bin/env bash
# Boot a Celery fleet worker: install the code into its venv, then hand over to
# `python -m app.boot` (app/host/), which does everything else: settings from
# SSM Parameter Store, concurrency from the usable CPUs, the environment file,
# the systemd units, the start. Only what must happen before the app's Python
# code exists is here.
#
#   fleet-boot                    install, configure and start (cloud-init runs this, as root)
#   fleet-boot --foreground       install, then run the worker in the foreground (containers)
#   fleet-boot install [ARTIFACT] install only (AMI bake, Ansible, `fleet ops deploy`, `fleet local --code`)
#   fleet-boot ARGS...            install, then `python -m app.boot ARGS...`
#
# /etc/celery-fleet/boot.env (the user-data writes it; optional elsewhere) sets:
#
#   FLEET_SSM_PREFIX       /celery-fleet/<stack>/, where app.boot reads the settings
#   FLEET_ARTIFACT         the code: a wheelhouse (app/wheelhouse.py, `fleet package`),
#                          the stack's s3://<bucket>/artifacts/<version>/ or a directory
#   AWS_DEFAULT_REGION     the stack's region
#
# The wheelhouse is installed offline, exactly as its requirements file pins it;
# every network step is retried with backoff; a boot that fails goes through
# fail_boot (on EC2: tagged with the reason, reported Unhealthy). How and why:
# docs/boot.md. FLEET_APP_DIR (/opt/celery-fleet) and FLEET_PYTHON (python3.11)
# move things for tests. Sourcing this file only defines functions.

set -euo pipefail
# Let a failing command inside $(...) stop the script too.
shopt -s inherit_errexit

BOOT_ENV=${FLEET_BOOT_ENV:-/etc/celery-fleet/boot.env}
APP_DIR=${FLEET_APP_DIR:-/opt/celery-fleet}
PYTHON=${FLEET_PYTHON:-python3.11}
ATTEMPTS=${FLEET_BOOT_ATTEMPTS:-5}
BACKOFF=${FLEET_BOOT_BACKOFF:-2}
BACKOFF_MAX=${FLEET_BOOT_BACKOFF_MAX:-30}
IMDS=${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}
IMDS=${IMDS%/}
BOOT_ERROR_TAG=celery-fleet:boot-error
# A wheelhouse's manifest and requirements file (app/names.py).
MANIFEST=celery-fleet-wheelhouse.json
REQUIREMENTS=celery-fleet-requirements.txt
CWAGENT_CTL=/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl
# Set by main while it boots: the file the reason of a failure goes to.
REASON_FILE=

log() {
    echo "fleet-boot: $*" >&2
}

# Keep REASON as why the boot failed (written from $(...) subshells too).
note_failure() {
    [[ -n "$REASON_FILE" ]] && echo "$*" >"$REASON_FILE"
    return 0
}

die() {
    log "$*"
    note_failure "$*"
    exit 1
}

# retry COMMAND...: run it up to $ATTEMPTS times, waiting $BACKOFF s, then twice
# as long each time (at most $BACKOFF_MAX s); its exit code once it gives up.
retry() {
    local attempt=1 wait=$BACKOFF rc
    while true; do
        rc=0
        "$@" || rc=$?
        ((rc == 0)) && return 0
        if ((attempt >= ATTEMPTS)); then
            log "gave up after $attempt attempts (exit $rc): $*"
            note_failure "$* failed $attempt times (exit $rc)"
            return "$rc"
        fi
        log "attempt $attempt of $ATTEMPTS failed (exit $rc), again in ${wait} s: $*"
        sleep "$wait"
        attempt=$((attempt + 1))
        wait=$((wait * 2 > BACKOFF_MAX ? BACKOFF_MAX : wait * 2))
    done
}

# IMDSv2: a session token, then metadata PATH with it. Fails fast off EC2.
imds_token() {
    curl -fsS --connect-timeout 1 --max-time 2 -X PUT \
        -H "X-aws-ec2-metadata-token-ttl-seconds: 300" "$IMDS/latest/api/token" 2>/dev/null
}

imds_get() {
    local token=$1 path=$2
    curl -fsS --connect-timeout 1 --max-time 2 \
        -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/$path" 2>/dev/null
}

# A JSON string of TEXT (the tag's value goes to the aws CLI as JSON: commas and
# equals signs would break its shorthand syntax).
json_string() {
    local text=$1
    text=${text//\\/\\\\}
    text=${text//\"/\\\"}
    printf '"%s"' "$text"
}

# fail_boot REASON: the one way a boot fails. Logs REASON; on EC2 also tags the
# instance with it and reports the instance Unhealthy, so the group replaces it.
fail_boot() {
    local reason=$1 token id region
    # One line, at most 255 characters (a tag value takes 256).
    reason=${reason//[[:cntrl:]]/ }
    reason=${reason:0:255}
    log "boot failed: $reason"
    if ! command -v curl >/dev/null || ! token=$(imds_token) || ! id=$(imds_get "$token" instance-id); then
        log "not on EC2 (no instance metadata at $IMDS): no $BOOT_ERROR_TAG tag, no health report"
        return 0
    fi
    if ! command -v aws >/dev/null; then
        log "no aws CLI: cannot tag $id or report it unhealthy"
        return 0
    fi
    region=${AWS_DEFAULT_REGION:-$(imds_get "$token" placement/region || true)}
    local aws=(aws ${region:+--region "$region"})
    if retry "${aws[@]}" ec2 create-tags --resources "$id" \
        --tags "[{\"Key\": \"$BOOT_ERROR_TAG\", \"Value\": $(json_string "$reason")}]"; then
        log "tagged $id $BOOT_ERROR_TAG"
    else
        log "could not tag $id"
    fi
    if retry "${aws[@]}" autoscaling set-instance-health --instance-id "$id" \
        --health-status Unhealthy --no-should-respect-grace-period; then
        log "reported $id Unhealthy: its group replaces it"
        release_hook "$id" "${aws[@]}"
    else
        log "could not report $id Unhealthy"
    fi
}

# release_hook ID AWS...: no drain agent runs here to let the termination hook go, which
# would hold the instance (and its replacement) for the hook's whole heartbeat timeout:
# wait (FLEET_BOOT_RELEASE_SECONDS, 120) for the group to start terminating it, then
# complete the hook's action with CONTINUE, as the agent would.
release_hook() {
    local id=$1 token state group hook waited=0
    shift
    local limit=${FLEET_BOOT_RELEASE_SECONDS:-120}
    while ((waited < limit)); do
        state=
        if token=$(imds_token); then
            state=$(imds_get "$token" autoscaling/target-lifecycle-state) || state=
        fi
        [[ "$state" == Terminated ]] && break
        sleep 1
        waited=$((waited + 1))
    done
    if [[ "$state" != Terminated ]]; then
        log "$id is not being terminated after ${limit} s; its termination hook is left to time out"
        return 0
    fi
    group=$("$@" autoscaling describe-auto-scaling-instances --instance-ids "$id" \
        --query "AutoScalingInstances[0].AutoScalingGroupName" --output text) || group=
    hook=$("$@" autoscaling describe-lifecycle-hooks --auto-scaling-group-name "$group" \
        --query "LifecycleHooks[?LifecycleTransition=='autoscaling:EC2_INSTANCE_TERMINATING'].LifecycleHookName | [0]" \
        --output text) || hook=
    if [[ -z "$group" || -z "$hook" || "$hook" == None ]]; then
        log "no termination hook found for $id (group ${group:-?})"
        return 0
    fi
    if retry "$@" autoscaling complete-lifecycle-action --auto-scaling-group-name "$group" \
        --lifecycle-hook-name "$hook" --instance-id "$id" --lifecycle-action-result CONTINUE; then
        log "let $hook go: $id terminates now"
    fi
}

# The EXIT trap of a boot: a failure of any step ends in fail_boot.
on_boot_exit() {
    local rc=$? reason=
    trap - EXIT
    if ((rc != 0)); then
        [[ -s "$REASON_FILE" ]] && reason=$(<"$REASON_FILE")
        fail_boot "${reason:-the boot failed (exit $rc)}"
    fi
    rm -f "$REASON_FILE"
    exit "$rc"
}

ensure_python() {
    command -v "$PYTHON" >/dev/null && return
    log "installing $PYTHON"
    if command -v dnf >/dev/null; then
        retry dnf install -y --quiet "$PYTHON" "$PYTHON-pip"
    else
        retry apt-get update -qq
        DEBIAN_FRONTEND=noninteractive retry apt-get install -y -qq "$PYTHON" "$PYTHON-venv" >/dev/null
    fi
}

# The Amazon CloudWatch agent, which ships the logs (app.boot configures it).
# Amazon Linux only: elsewhere (Debian, a container) it is skipped. Not a reason
# to fail a boot either: without it the worker works, its logs stay on the host.
install_cloudwatch_agent() {
    if [[ -x "$CWAGENT_CTL" ]]; then
        return
    fi
    if ! command -v dnf >/dev/null; then
        log "no dnf: not installing the CloudWatch agent (logs stay on this host)"
        return
    fi
    log "installing amazon-cloudwatch-agent"
    # dnf's own timeout and retries kept short: the attempts here are the retries.
    if ! retry dnf install -y --quiet --setopt=timeout=20 --setopt=retries=1 amazon-cloudwatch-agent; then
        log "could not install the CloudWatch agent: the logs stay on this host"
        note_failure ""
    fi
}

# Print the wheelhouse directory of ARTIFACT; an s3:// prefix is mirrored to $APP_DIR/wheels.
fetch_artifact() {
    local artifact=$1 dir=$1
    if [[ "$artifact" == s3://* ]]; then
        dir=$APP_DIR/wheels
        mkdir -p "$dir"
        # sync: a baked image that holds these wheels downloads nothing.
        retry aws s3 sync --only-show-errors --delete "$artifact" "$dir/" >&2
    fi
    [[ -f "$dir/$MANIFEST" ]] || die "no wheelhouse at $artifact (no $MANIFEST): make one with \`fleet package\`"
    echo "$dir"
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

# Make the venv VENV. No pip inside it when the system's pip can install into it:
# ensurepip costs seconds of every boot.
make_venv() {
    local venv=$1
    ensure_python
    "$PYTHON" -m venv --without-pip "$venv"
    venv_pip "$venv" --version >/dev/null 2>&1 || "$venv/bin/python" -m ensurepip --default-pip >/dev/null
}

# manifest_field PYTHON FILE KEY...: a wheelhouse manifest's value (lists space-separated).
manifest_field() {
    local python=$1 file=$2
    shift 2
    "$python" - "$file" "$@" <<'PY'
import json, sys
manifest = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:
    value = manifest.get(key, "")
    print(" ".join(value) if isinstance(value, list) else value)
PY
}

# Install the wheelhouse DIR into $APP_DIR/venv unless that very wheelhouse is installed:
# offline, exactly the wheels its requirements file pins, each checked against its sha256.
install_wheelhouse() {
    local dir=$1 venv=$APP_DIR/venv stamp version ours
    stamp=$venv/$MANIFEST
    if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$dir/$MANIFEST" "$stamp"; then
        log "unchanged: wheelhouse $(manifest_field "$venv/bin/python" "$stamp" version) is installed in $venv"
        return
    fi
    if [[ ! -x "$venv/bin/python" ]]; then
        make_venv "$venv"
    else
        # The kit's and the projects' wheels (those installed and those coming) may keep
        # their version numbers, which pip would call installed: out with them first. A
        # project no longer shipped goes too, and its task modules with it.
        ours=$(manifest_field "$venv/bin/python" "$dir/$MANIFEST" built)
        [[ -f "$stamp" ]] && ours+=" $(manifest_field "$venv/bin/python" "$stamp" built)"
        # Not installed until the new wheelhouse is, should this fail half-way.
        rm -f "$stamp"
        # shellcheck disable=SC2086 # a list of distribution names
        venv_pip "$venv" uninstall --quiet --yes $ours
    fi
    retry venv_pip "$venv" install --quiet --disable-pip-version-check --no-index \
        --find-links "$dir" --require-hashes -r "$dir/$REQUIREMENTS"
    cp "$dir/$MANIFEST" "$stamp"
    version=$(manifest_field "$venv/bin/python" "$stamp" version)
    log "installed wheelhouse $version ($(manifest_field "$venv/bin/python" "$stamp" built)) in $venv"
}

main() {
    if [[ -r "$BOOT_ENV" ]]; then
        # Exported: the aws CLI and app.boot read AWS_DEFAULT_REGION and FLEET_SSM_PREFIX.
        set -a
        # shellcheck source=/dev/null
        source "$BOOT_ENV"
        set +a
    fi
    local code arg foreground=0
    if [[ "${1:-}" == install ]]; then
        code=$(fetch_artifact "${2:-${FLEET_ARTIFACT:?give a wheelhouse or set FLEET_ARTIFACT}}")
        install_wheelhouse "$code"
        install_cloudwatch_agent
        return
    fi
    case "${1:-}" in
        "" | -* | configure)
            # A boot: any failure from here on goes through fail_boot.
            REASON_FILE=$(mktemp)
            export FLEET_BOOT_REASON_FILE=$REASON_FILE
            trap on_boot_exit EXIT
            ;;
    esac
    if [[ -n "${FLEET_ARTIFACT:-}" ]]; then
        code=$(fetch_artifact "$FLEET_ARTIFACT")
        install_wheelhouse "$code"
        install_cloudwatch_agent
    elif [[ ! -x "$APP_DIR/venv/bin/python" ]]; then
        die "no app installed in $APP_DIR/venv and no FLEET_ARTIFACT to install"
    fi
    # Out of any directory holding an app/ package that would shadow the installed one.
    cd "$APP_DIR"
    for arg in "$@"; do
        if [[ "$arg" == --foreground ]]; then
            foreground=1
        fi
    done
    if [[ -z "$REASON_FILE" ]] || ((foreground)); then
        # exec: the worker keeps this pid. A failure of app.boot is then only
        # logged: --foreground is for containers, with no instance to tag.
        if [[ -n "$REASON_FILE" ]]; then
            rm -f "$REASON_FILE"
            unset FLEET_BOOT_REASON_FILE
        fi
        exec "$APP_DIR/venv/bin/python" -m app.boot "$@"
    fi
    : >"$REASON_FILE"
    "$APP_DIR/venv/bin/python" -m app.boot "$@"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
