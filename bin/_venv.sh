# Sourced by bin/serve and bin/test: make .venv and install the pinned
# requirements file given as $1 (locked by constraints.txt), re-installing
# only when one of those files changes.
ensure_venv() {
    local requirements="$1"
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        if ! "$python" -m venv .venv 2>/dev/null; then
            rm -rf .venv
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                echo "installing python3-venv (Debian)" >&2
                apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
                "$python" -m venv .venv
            else
                echo "error: '$python -m venv' failed; install python3-venv" >&2
                return 1
            fi
        fi
    fi
    local stamp=".venv/.installed-$(basename "$requirements")"
    local wanted
    wanted="$(cat requirements*.txt constraints.txt | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
        echo "installing $requirements into .venv" >&2
        .venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
        echo "$wanted" > "$stamp"
    fi
}
