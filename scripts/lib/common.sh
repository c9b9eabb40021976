# shellcheck shell=bash
# Helpers shared by scripts/install-deps, scripts/build-image and scripts/run-vm (sourced, not
# run): where copilot keeps downloads and its private QEMU, how to find QEMU, and fetching one
# Debian package by exact version with apt-get download.

# Sbin tools (sfdisk, mkfs.fat) are not on a normal user's PATH on Debian.
PATH=$PATH:/usr/sbin:/sbin

# Per-user cache: downloaded .debs, the private QEMU, the KVM probe's verdict.
copilot_cache_dir() {
    echo "${COPILOT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/copilot}"
}

# Where install-deps unpacks Debian's QEMU when apt cannot install it.
qemu_prefix() {
    echo "$(copilot_cache_dir)/qemu"
}

# Prints the qemu-system-x86_64 to run: $COPILOT_QEMU, the one on PATH, or the private one.
find_qemu() {
    if [[ -n ${COPILOT_QEMU:-} ]]; then
        echo "$COPILOT_QEMU"
    elif command -v qemu-system-x86_64 2>/dev/null; then
        :
    elif [[ -x $(qemu_prefix)/bin/qemu-system-x86_64 ]]; then
        echo "$(qemu_prefix)/bin/qemu-system-x86_64"
    else
        return 1
    fi
}

# qemu_data_has QEMU FILE: whether the data dir of that qemu-system-x86_64 holds FILE.
qemu_data_has() {
    local dir
    if [[ $1 == "$(qemu_prefix)/bin/qemu-system-x86_64" ]]; then
        dir=$(qemu_prefix)/root/usr/share/qemu
    else
        dir=$(dirname "$(readlink -f "$1")")/../share/qemu
    fi
    [[ -f $dir/$2 ]]
}

# The version apt would install of package $1 (from the local package lists), or fails.
apt_candidate() {
    local v
    v=$(apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')
    [[ -n $v && $v != "(none)" ]] || { echo "no version of $1 is known to apt (run apt-get update?)" >&2; return 1; }
    echo "$v"
}

# deb_fetch PKG VERSION DIR: prints the path of PKG's .deb at exactly VERSION, downloading it
# into DIR with apt-get download unless it is there already. Needs no root.
deb_fetch() {
    local pkg=$1 ver=$2 dir=$3
    local file="$dir/${pkg}_${ver//:/%3a}.deb"
    if [[ ! -s $file ]]; then
        mkdir -p "$dir"
        local tmp
        tmp=$(mktemp -d "$dir/.download.XXXXXX")
        if ! (cd "$tmp" && apt-get -q download "$pkg=$ver") >"$tmp/log" 2>&1; then
            echo "cannot download $pkg=$ver with apt-get download:" >&2
            grep -v unsandboxed "$tmp/log" >&2 || true
            rm -rf "$tmp"
            return 1
        fi
        local got=("$tmp"/*.deb)
        if [[ ${#got[@]} != 1 || ! -s ${got[0]} ]]; then
            echo "apt-get download $pkg=$ver gave no single .deb" >&2
            rm -rf "$tmp"
            return 1
        fi
        mv "${got[0]}" "$file"
        rm -rf "$tmp"
    fi
    echo "$file"
}
