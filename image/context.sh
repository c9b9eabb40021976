# shellcheck shell=sh
# The copilot VM's contextualization parsers, sourced by /init (POSIX sh for busybox; the VM
# test runs them on the host too). KEY=VALUE settings from the user-data's [copilot-begin]
# section and from copilot.KEY=VALUE words of the kernel command line become lines
# `export COPILOT_AGENT_<KEY>='VALUE'` in $SETTINGS. Strict: an unknown key, a control
# character, a malformed section calls `fail` (which the caller defines, as `log`).
# Needs $CONTEXT (the unpacked context tar), $RUN (scratch space) and $SETTINGS.

# setting SOURCE KEY VALUE: records one KEY=VALUE for the agent's environment.
setting() {
    case "$2" in
    name | jid | password | server | manager | manager_key | slots | idle_timeout | ca | insecure_loopback | plaintext_host) ;;
    *) fail "$1: unknown setting '$2' (known: name jid password server manager manager_key slots idle_timeout ca insecure_loopback plaintext_host)" ;;
    esac
    case "$3" in
    *[![:print:]]*) fail "$1: the value of $2 has control characters" ;;
    esac
    var=COPILOT_AGENT_$(printf '%s' "$2" | tr '[:lower:]' '[:upper:]')
    quoted=$(printf '%s' "$3" | sed "s/'/'\\\\''/g")
    printf "export %s='%s'\n" "$var" "$quoted" >>"$SETTINGS"
    [ "$2" = password ] || log "$1: $2=$3"
}

# The [copilot-begin] … [copilot-end] section of $CONTEXT/user-data: KEY=VALUE lines, blank
# lines and # comments; the other sections are someone else's.
read_user_data() {
    file=$CONTEXT/user-data
    [ -f "$file" ] || return 0
    section=$RUN/user-data.copilot
    problem=$(tr -d '\r' <"$file" | awk -v out="$section" '
        /^\[copilot-begin\][ \t]*$/ { if (on || done) { print "more than one [copilot-begin] section"; exit }
                                      on = 1; done = 1; next }
        /^\[copilot-end\][ \t]*$/ { if (!on) { print "[copilot-end] without [copilot-begin]"; exit }
                                    on = 0; next }
        on { print > out }
        END { if (on) print "[copilot-begin] without [copilot-end]" }')
    [ -z "$problem" ] || fail "user-data: $problem"
    [ -f "$section" ] || { log "user-data: no settings in a [copilot-begin] section"; return 0; }
    n=0
    while IFS= read -r line; do
        n=$((n + 1))
        line=$(printf '%s\n' "$line" | sed 's/^[ \t]*//; s/[ \t]*$//')
        case "$line" in
        "" | "#"*) ;;
        *=*)
            key=$(printf '%s\n' "${line%%=*}" | sed 's/[ \t]*$//')
            setting "user-data" "$key" "$(printf '%s\n' "${line#*=}" | sed 's/^[ \t]*//')"
            ;;
        *) fail "user-data: line $n of the [copilot-begin] section is not KEY=VALUE" ;;
        esac
    done <"$section"
    rm -f "$section"
}

# cmdline_settings LINE PUBLIC: records the copilot.KEY=VALUE words of the kernel command line
# LINE and writes the other words to the file PUBLIC (what jobs may see).
cmdline_settings() {
    set -f
    public=
    for word in $1; do
        case "$word" in
        copilot.probe) continue ;; # run-vm's KVM test boot (see /init)
        copilot.*=*)
            key=${word%%=*}
            setting "kernel command line" "${key#copilot.}" "${word#*=}"
            continue
            ;;
        copilot.*) fail "kernel command line: '$word' is not copilot.KEY=VALUE" ;;
        esac
        public="$public${public:+ }$word"
    done
    set +f
    printf '%s\n' "$public" >"$2"
}
